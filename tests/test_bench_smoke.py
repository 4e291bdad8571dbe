"""Every benchmark in bench/ still runs: each script's smoke mode, `--smoke --out PATH` (the tiny
random model, a step or two, tiny data; bench/_smoke.py), in a subprocess with one thread, and
the result file it writes holds the fields its real runs write (bench/results/). Structure and
sane numbers only, never a timing: a refactor that breaks a benchmark fails here instead of
in the next person's real run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import _smoke  # noqa: E402

# As the benchmarks' own children run: one thread each, nothing fetched.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PYTHONUNBUFFERED": "1"}


def _positive(value) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, value


def _finite(value) -> None:
    """Rounded seconds of a smoke run may be 0.0; they must still be numbers."""
    assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, value


def _share(value) -> None:
    assert value is None or 0 <= value <= 1, value


def check_train(r: dict) -> None:
    assert r["benchmark"] == "train" and r["smoke"] is True and r["steps"] == 2
    assert r["run_order"] == ["afinar", "trl"]
    assert {"lora", "batch_size", "learning_rate", "precision", "compile", "device"} <= set(
        r["settings"])
    _positive(r["matmul_peak_gflop_per_s"]["fp32"])
    _positive(r["matmul_peak_gflop_per_s"]["bf16"])
    _positive(r["flops_per_token_counted"])
    assert r["versions"]["torch"] and r["versions"]["trl"]
    for side in ("afinar", "trl"):
        s = r["results"][side]
        assert s["side"] == side and s["steps"] == 2 and len(s["step_losses"]) == 2
        for key in ("steps_seconds", "tokens", "padded_tokens", "max_batch_width",
                    "tokens_per_s", "padded_tokens_per_s", "peak_rss_mb", "rss_at_start_mb",
                    "final_train_loss", "mean_train_loss", "process_seconds"):
            _positive(s[key])
        assert s["padded_tokens"] >= s["tokens"]
        _finite(s["first_step_seconds"])
        _finite(s["gflop_per_s"])
        _finite(s["share_of_matmul_peak"])
        assert s["torch_threads"] == 1
    afinar, trl = r["results"]["afinar"], r["results"]["trl"]
    assert "token_count_mismatch" not in afinar  # the collate it counts is the one trained on
    assert afinar["afinar_summary"]["tokens_seen"] > afinar["tokens"]  # steps 1..2 vs 2
    labels = trl["labels_identical_to_afinar"]
    assert labels["checked"] > 0
    assert labels["labels_identical"] == labels["input_ids_identical"] == labels["checked"]
    for key in ("tokens_per_s", "peak_rss_mb", "steps_seconds", "padded_tokens_per_s"):
        _positive(r["ratios_afinar_over_trl"][key])


def check_dpo(r: dict) -> None:
    assert r["smoke"] is True and r["settings"]["steps"] == 2
    for side in ("afinar", "trl"):
        s = r[side]
        assert s["side"] == side and s["steps"] == 2 and s["step_losses"]
        for key in ("timed_seconds", "tokens", "tokens_per_s", "peak_rss_mb"):
            _positive(s[key])
        _finite(s["steps_seconds"])
        _finite(s["first_step_seconds"])
        assert math.isfinite(s["final_reward_margin"])
    _positive(r["afinar"]["reference_seconds"])
    _positive(r["afinar"]["reference_charged_s"])
    _share(r["afinar"]["final_accuracy"])
    _positive(r["ratios"]["tokens_per_s"])
    _positive(r["ratios"]["peak_rss_mb"])


def check_eval(r: dict) -> None:
    assert r["smoke"] is True and r["prompts"] == 3
    assert set(r["results"]) == {"guide_loop_batch1", "afinar_batch2"}
    for row in r["results"].values():
        _finite(row["seconds"])
        _positive(row["new_tokens"])
        _positive(row["new_tokens_per_s"])
        _positive(row["speedup_vs_guide_loop"])
    assert 0 <= r["results"]["afinar_batch2"]["answers_identical_to_guide_loop"] <= 3


def check_generate(r: dict) -> None:
    assert r["benchmark"] == "generate" and r["smoke"] is True
    one = r["results"]["batch1"]
    for side in ("afinar", "llama_cpp"):
        _finite(one[side]["seconds"])
        _positive(one[side]["new_tokens"])
        _positive(one[side]["new_tokens_per_s"])
    assert 0 <= one["answers_identical_tokens"] <= one["prompts"]
    _positive(one["ratio_afinar_over_llama_cpp"])
    batched = r["results"]["batched"]
    for size in ("batch1", "batch2"):
        _positive(batched[size]["new_tokens"])
        _positive(batched[size]["new_tokens_per_s"])
    assert 0 <= batched["batch2"]["answers_identical_to_batch1"] <= batched["prompts"]
    _positive(batched["speedup_over_batch1"])


def check_export(r: dict) -> None:
    assert r["smoke"] is True and Path(r["run"]).name == "run"
    _positive(r["transformers_fp32_tokens_per_s"])
    assert set(r["types"]) == {"merged-f32", "f16", "q8_0"}
    for kind, row in r["types"].items():
        _finite(row["seconds"])
        _positive(row["bytes"])
        assert isinstance(row["passed"], bool) and row["prompts"] == 2
        _share(row["greedy_agreement"])
        assert row["engine"] == ("transformers" if kind == "merged-f32" else "llama.cpp")
        if kind != "merged-f32":
            _positive(row["decode_tokens_per_s"])
            _positive(row["decode_speed_vs_transformers"])
    assert r["types"]["merged-f32"]["passed"]
    assert {"greedy_agreement", "exact_first_tokens", "identical_answers"} == set(
        r["types"]["f16"]["vs_unrounded_fp32"])


def check_convert(r: dict) -> None:
    assert r["benchmark"] == "convert" and r["smoke"] is True and r["kind"] == "q4_k_m"
    row = r["shapes"]["tiny"]
    assert "refused" not in row and "verification_failed" not in row, row
    for key in ("export_seconds", "process_seconds", "peak_rss_mb"):
        _positive(row[key])
    _finite(row["train_seconds"])
    _positive(row["files_bytes"]["tiny-q4_k_m.gguf"])  # the run is named after the shape
    check = row["verification"]
    assert check["passed"] and check["prompts"] == 1 and check["same_prompt_ids"] == 1
    assert check["tokenizer_probes_mismatched"] == 0
    _share(check["teacher_forced_agreement"])
    assert row["converted_by"].startswith("llama.cpp ")


def check_frozen_dtype(r: dict) -> None:
    assert r["smoke"] is True and r["steps"] == 1 and isinstance(r["cpu_native_bf16"], bool)
    assert set(r["variants"]) == {"bf16-recast", "bf16-stored"}
    for row in r["variants"].values():
        _positive(row["tokens_per_s"])
        _positive(row["peak_rss_mb"])
        assert math.isfinite(row["final_train_loss"])
    _positive(r["bf16-stored_vs_bf16-recast_tokens_per_s"])
    _positive(r["bf16-stored_vs_bf16-recast_peak_rss_mb"])


def check_llama_repack(r: dict) -> None:
    assert r["smoke"] is True and r["decode_tokens"] == 4
    assert isinstance(r["cpu"]["flags"], list)
    assert isinstance(r["cpu"]["afinar_default_repack"], bool)
    row = r["types"]["f16"]  # f16 never takes the crashing AMX path: both sides measure
    for side in ("repack_on", "repack_off"):
        _positive(row[side]["prefill_tokens_per_s"])
        _positive(row[side]["decode_tokens_per_s"])
    _positive(row["off_vs_on_decode"])
    _positive(row["off_vs_on_prefill"])


def check_team(r: dict) -> None:
    """The team service (PostgreSQL, `serve --no-worker`, 2 workers): a short load, one worker
    SIGKILLed mid-job and taken over, and every cross-project attempt."""
    load, faults, security = r["load"], r["faults"], r["security"]
    for section in (load, faults, security):
        assert section["smoke"] is True and "bench_error" not in section, section.get("bench_error")
        assert section["stray_processes_after_teardown"]["ours_still_running"] == []
    assert load["chat"]["served"] > 0 and load["chat"]["errors_5xx"] == 0
    assert load["jobs"]["every_job_succeeded_exactly_once"] and load["jobs"]["events_in_order"]
    assert load["stream_probe"]["api_hung"] is False
    (run,) = faults["runs"]
    assert run["fault"] == "a" and run["ended"] == "succeeded" and not run["job_lost"]
    assert run["adapter"]["equal"] is True
    assert security["failed"] == 0, [row for row in security["rows"] if not row["ok"]]


def check_serve(r: dict) -> None:
    assert r["smoke"] is True and r["max_tokens"] == 4
    one = r["single_request"]
    _finite(one["server_median_s"])
    _finite(one["in_process_median_s"])
    _positive(one["server_over_in_process"])
    _positive(one["completion_tokens"])
    _positive(one["in_process_tokens"])
    many = r["2_requests"]
    _finite(many["one_after_another_s"])
    _finite(many["at_once_s"])
    for key in ("tokens_per_s_one_after_another", "tokens_per_s_at_once", "speedup_at_once"):
        _positive(many[key])


def check_share_cores(r: dict) -> None:
    assert r["smoke"] is True and r["training_steps"] == 2
    assert set(r["policies"]) == {"passive"}
    policy = r["policies"]["passive"]
    for when in ("alone", "together"):
        assert policy[when]["train"]["steps"] == 2
        _positive(policy[when]["train"]["tokens_per_s"])
        _positive(policy[when]["generate"]["tokens_per_s"])
    _positive(policy["share_of_alone"]["train"])
    _positive(policy["share_of_alone"]["generate"])
    _positive(policy["sum_of_shares"])


DEFAULTS_ROW = json.loads((BENCH / "results" / "defaults.json").read_text())["rows"][0]


def check_defaults(r: dict) -> None:
    assert r["smoke"] is True and r["max_steps"] == 2
    [row] = r["rows"]
    assert set(row) == set(DEFAULTS_ROW)
    assert (row["task"], row["variant"], row["steps"]) == ("ticket-routing", "after", 2)
    _positive(row["learning_rate"])
    _positive(row["tokens_per_s"])
    _finite(row["train_seconds"])
    assert row["held_out_task"] > 0
    for key in ("format_adherence", "exact_match", "normalized_match", "leaks_ordinary",
                "leaks_general", "leaks_general_base", "leaks_task_system",
                "leaks_other_system", "leaks_other_tasks", "general_checks",
                "general_checks_base"):
        _share(row[key])


def check_gpu_qlora(r: dict) -> None:
    # On a CPU the smoke run checks everything but the GPU itself: the plan, loading in 4 bits,
    # the adapter, afinar's loss, the matmul probe and the file; peak GPU memory is then null.
    assert r["smoke"] is True and r["device"] in ("cpu", "cuda")
    on_gpu = r["device"] == "cuda"
    q = r["qlora_8b"]
    assert "error" not in q and q["shape"] == "tiny" and q["seq_len"] == 32
    _positive(q["planned_peak_gb"])
    _positive(q["tokens_per_s"])
    assert math.isfinite(q["final_loss"])
    for key in ("peak_gpu_memory_gb", "after_load_gb", "plan_over_measured"):
        if on_gpu:
            _positive(q[key])
        else:
            assert q[key] is None
    m = r["lora_mfu_135m"]
    assert "error" not in m and m["shape"] == "tiny"
    for key in ("tokens_per_s", "flops_per_token", "bf16_matmul_peak_tflops", "mfu"):
        _positive(m[key])


def check_plan(r: dict) -> None:
    assert r["benchmark"] == "plan" and r["smoke"] is True and r["steps"] == 2
    assert not r["failed"] and isinstance(r["machine"]["cpu_flags"], list)
    assert [c["case"] for c in r["cases"]] == ["tiny:fp32-eager", "tiny:4bit-bf16"]
    for case in r["cases"]:
        assert case["steps"] == 2 and len(case["measured_steps"]) == 2
        for key in ("planned_peak_mb", "measured_peak_mb", "plan_over_measured",
                    "planned_tokens_per_s", "measured_tokens_per_s",
                    "tokens_per_s_plan_over_measured"):
            _positive(case[key])
        for key in ("planned_train_seconds_for_steps", "measured_step_seconds",
                    "measured_train_seconds"):
            _finite(case[key])
        parts = case["planned_parts_mb"]
        assert {"runtime", "weights", "optimizer", "activations", "step", "allocator",
                "total"} == set(parts)
        assert case["measured_before_steps"]["peak_mb"] <= case["measured_peak_mb"]
    assert [c["quantization"] for c in r["cases"]] == ["none", "4bit"]


def check_engines(r: dict) -> None:
    assert r["benchmark"] == "engines" and r["smoke"] is True
    decode = r["decode"]
    for side in ("afinar_llamacpp", "llama_server_direct", "afinar_transformers"):
        _positive(decode[side]["tokens_per_s"])
    _positive(decode["afinar_llamacpp_over_direct"])
    assert decode["agreement"]["prompts"] == 2
    for engine, name in (("llamacpp", "llama.cpp"), ("transformers", "transformers")):
        assert r["eval"][engine]["engine"]["model"]["engine"] == name
        _finite(r["eval"][engine]["wall_s"])
        serve = r["serve"][engine]
        assert serve["errors"] == 0 and serve["served"] == serve["requests"] == 4
        assert serve["engine_in_models"] == name
        _positive(serve["tokens_per_s"])
    assert len(r["serve"]["fine_tuned_models"]) == 2


# script -> (takes --model, checks). Every script in bench/ must be here.
BENCHES = {
    "bench_convert.py": (True, check_convert),
    "bench_defaults.py": (True, check_defaults),
    "bench_dpo.py": (True, check_dpo),
    "bench_engines.py": (True, check_engines),
    "bench_eval.py": (True, check_eval),
    "bench_export.py": (True, check_export),
    "bench_frozen_dtype.py": (True, check_frozen_dtype),
    "bench_generate.py": (True, check_generate),
    "bench_llama_repack.py": (True, check_llama_repack),
    "bench_plan.py": (True, check_plan),
    "bench_serve.py": (True, check_serve),
    "bench_share_cores.py": (True, check_share_cores),
    "bench_team.py": (True, check_team),
    "bench_train.py": (True, check_train),
    "gpu_qlora.py": (False, check_gpu_qlora),
}


def test_every_benchmark_is_smoke_tested():
    assert sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")) == sorted(
        BENCHES)


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory) -> Path:
    """One tiny model for every benchmark (built as their own smoke mode builds it)."""
    return _smoke.build_model(tmp_path_factory.mktemp("smoke-model"))


@pytest.mark.parametrize("script", sorted(BENCHES))
def test_benchmark_runs_in_smoke_mode(script, smoke_model, tmp_path):
    takes_model, check = BENCHES[script]
    out = tmp_path / "result.json"
    command = [sys.executable, str(BENCH / script), "--smoke", "--out", str(out),
               *(["--model", str(smoke_model)] if takes_model else [])]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    check(json.loads(out.read_text()))


def test_a_smoke_run_needs_out_so_it_never_replaces_a_real_result():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    _smoke.add_flag(parser)
    with pytest.raises(SystemExit):
        _smoke.out_path(parser, parser.parse_args(["--smoke"]), BENCH / "results" / "x.json")
    assert _smoke.out_path(parser, parser.parse_args([]), "a.json") == Path("a.json")
