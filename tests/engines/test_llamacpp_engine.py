"""The llama.cpp engine (afinar.engines) against the transformers one, on real llama-server
children built by scripts/install_llama_cpp.sh: same greedy answers by export verification's
rule, the base converted once, adapters per run, a dead child as a clear error then restarted,
and `auto` falling back with its reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from afinar.engines import answerer_for, open_model
from afinar.engines.agreement import compare_engines
from afinar.engines.llama_server import EngineUnavailable
from afinar.errors import AfinarError
from afinar.infer.generate import GenerationSettings, load
from families import FAMILIES, GGUF_VARIANTS
from family_fixtures import _one_thread, family_dir, family_run  # noqa: F401,F811 (fixtures)

QUIET = lambda message: None  # noqa: E731
PROMPTS = [[{"role": "user", "content": f"pedido {i} llegó roto"}] for i in (3, 17, 41, 99)] + [
    [{"role": "system", "content": "Responde breve."}, {"role": "user", "content": text}]
    for text in ("¿Dónde está mi paquete?", "hello world", "Quiero cambiar la dirección",
                 "Factura duplicada")]


@pytest.fixture(scope="module")
def tiny_run(evaluated_run):
    return str(evaluated_run[0].run_dir)


def test_same_greedy_answers_as_transformers_and_base_converted_once(tiny_run):
    messages: list[str] = []
    llama = open_model(tiny_run, "llamacpp", notify=messages.append)
    try:
        assert llama.engine == "llama.cpp" and llama.files.how == "base model + LoRA adapter"
        loaded = load(tiny_run, notify=QUIET)
        agreement = compare_engines(loaded, llama, PROMPTS, max_new_tokens=24)
        assert agreement.passed, agreement.partings
        assert agreement.summary()["identical"] >= len(PROMPTS) - 2, agreement.partings
        # Texts through complete(), one prompt at a time (prompts answered together can part at
        # a near-tie by batch, docs/serving.md): what the transformers engine returns.
        settings = GenerationSettings(max_new_tokens=24)
        ours = [llama.complete([p], settings)[0] for p in PROMPTS]
        theirs = loaded.complete(PROMPTS, settings)
        same = sum(a.text == b.text for a, b in zip(ours, theirs))
        assert same == agreement.summary()["identical"]
    finally:
        llama.close()
    assert not llama.server.alive()
    # The base GGUF and the adapter are cached: a second start converts nothing.
    again: list[str] = []
    second = open_model(tiny_run, "llamacpp", notify=again.append)
    second.close()
    assert not [m for m in again if "converting" in m], again
    assert second.files == llama.files and llama.files.model.stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", [GGUF_VARIANTS[n].name if n in GGUF_VARIANTS else n
                                  for n in FAMILIES])
def test_every_family_answers_alike_on_both_engines(name, family_run):
    run = str(family_run(name))
    llama = open_model(run, "llamacpp", notify=QUIET)
    try:
        agreement = compare_engines(load(run, notify=QUIET), llama, PROMPTS[:4], max_new_tokens=16)
    finally:
        llama.close()
    assert agreement.passed, (name, agreement.partings)


def test_evaluation_says_which_engine_answered_and_caches_per_engine(tiny_run, tmp_path):
    from afinar.pipeline import evaluate_run

    first = evaluate_run(tiny_run, engine="llamacpp", output=str(tmp_path / "a"),
                         notify=QUIET).data
    assert first["engine"]["model"]["engine"] == "llama.cpp"
    assert first["engine"]["baseline"]["files"] == "base model"
    assert first["engine"]["model"]["adapter_file"].endswith(".gguf")
    again = evaluate_run(tiny_run, engine="llamacpp", output=str(tmp_path / "b"),
                         notify=QUIET).data
    assert again["generation"]["answers_generated"] == {"model": 0, "baseline": 0}
    assert [r["model"]["answer"] for r in again["examples"]] == \
        [r["model"]["answer"] for r in first["examples"]]
    # The fixture's own evaluation was on transformers: its report says so.
    tuned = json.loads((Path(tiny_run) / "report.json").read_text())
    assert tuned["engine"]["model"] == {"engine": "transformers"}


def test_the_same_calls_give_the_same_answers_whenever_requests_arrive(tiny_run):
    # llama.cpp's slots are not batch-invariant: answered one request per prompt, which prompts
    # shared a batch depended on timing and a few answers changed from run to run (4-6 of 36 on
    # the demo's held-out set). complete() queues its prompts together: two fresh servers given
    # the same calls answer alike, in input order.
    prompts = [[{"role": "user", "content": f"{text} ({i})"}] for i in range(6)
               for text in ("pedido llegó roto", "¿Dónde está mi paquete? " * (i + 1))]
    settings = GenerationSettings(max_new_tokens=32)
    runs = []
    for _ in range(2):
        model = open_model(tiny_run, "llamacpp", notify=QUIET, slots=4)
        try:
            progress: list[int] = []
            answers = model.complete(prompts, settings, on_progress=progress.append)
            assert sum(progress) == len(prompts)
            assert [a.prompt_tokens for a in answers] == [len(model.prompt_ids(p)) for p in prompts]
            runs.append([(a.text, a.completion_tokens) for a in answers])
        finally:
            model.close()
    assert runs[0] == runs[1]


def test_requests_are_cut_into_equal_groups():
    from afinar.engines.llamacpp import request_groups

    assert request_groups([], 8) == []
    assert [len(g) for g in request_groups(list(range(36)), 8)] == [36]
    assert [len(g) for g in request_groups(list(range(65)), 8)] == [33, 32]
    assert [len(g) for g in request_groups(list(range(1000)), 8)] == [63] * 15 + [55]
    assert sum(request_groups(list(range(1000)), 8), []) == list(range(1000))


def test_a_dead_child_is_a_clear_error_and_the_next_request_restarts_it(tiny_run):
    model = open_model(tiny_run, "llamacpp", notify=QUIET, slots=2)
    try:
        pid = model.server.pid
        failure: list[BaseException] = []

        def answer():
            try:
                model.complete(PROMPTS[:3], GenerationSettings(max_new_tokens=64))
            except BaseException as exc:  # noqa: BLE001 - what the caller would get
                failure.append(exc)
        # Frozen first, so that the request is surely in flight when the child dies (the tiny
        # model would otherwise answer before any kill).
        os.kill(pid, signal.SIGSTOP)
        worker = threading.Thread(target=answer)
        worker.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=30)
        assert not worker.is_alive(), "a request to a dead child must not hang"
        assert failure and isinstance(failure[0], EngineUnavailable)
        assert "died" in failure[0].message and "started again" in failure[0].message
        answer = model.complete([PROMPTS[1]], GenerationSettings(max_new_tokens=8))[0]
        assert answer.completion_tokens >= 1 and model.server.restarts == 1
        assert model.server.pid != pid
    finally:
        model.close()


def test_auto_falls_back_with_its_reason_and_llamacpp_refuses(tiny_run, monkeypatch, tmp_path):
    monkeypatch.setenv("AFINAR_LLAMA_SERVER", str(tmp_path / "no-llama-server"))
    model = open_model(tiny_run, "auto", notify=QUIET)
    assert model.engine == "transformers" and "llama-server is not installed" in model.engine_note
    assert answerer_for(model, "auto") is model
    with pytest.raises(AfinarError, match="llama-server is not installed") as refused:
        open_model(tiny_run, "llamacpp", notify=QUIET)
    assert "install_llama_cpp.sh" in refused.value.hint
    with pytest.raises(AfinarError, match="unknown engine"):
        open_model(tiny_run, "vllm", notify=QUIET)
    # The CLI says it in one line, exit 1, no traceback.
    env = {**os.environ, "AFINAR_LLAMA_SERVER": str(tmp_path / "no-llama-server")}
    done = subprocess.run([str(Path(sys.executable).parent / "afinar"), "generate", tiny_run,
                           "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                           "--engine", "llamacpp"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1 and "llama-server is not installed" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_model_llama_cpp_cannot_run_answers_with_transformers_under_auto(family_run):
    """Mistral v0.1's sliding window: llama.cpp would not apply it (export refuses it too)."""
    run = str(family_run("mistral"))
    model = open_model(run, "auto", notify=QUIET)
    assert model.engine == "transformers" and "sliding-window" in model.engine_note
    with pytest.raises(AfinarError, match="sliding-window"):
        open_model(run, "llamacpp", notify=QUIET)


def test_a_qlora_run_answers_from_its_dequantised_base_plus_its_adapter(tmp_path, tiny_model_dir,
                                                                         small_chat_file):
    """A QLoRA run's adapter learned against the quantised base: llama.cpp gets that base
    (de-quantised, converted once, keyed by the quantisation) and the adapter on top, and
    answers as the transformers engine does (which merges into the same weights)."""
    from afinar.config import TrainConfig
    from afinar.train.recipe import train

    run = str(train(TrainConfig(data=str(small_chat_file), model=str(tiny_model_dir),
                                output=str(tmp_path / "run"), quantization="4bit",
                                precision="fp32", learning_rate=1e-2, batch_size=4, max_steps=6,
                                seed=0, evaluate=False)).run_dir)
    plain = open_model(str(tiny_model_dir), "llamacpp", notify=QUIET)
    plain.close()
    llama = open_model(run, "llamacpp", notify=QUIET)
    try:
        assert llama.files.how == "base model + LoRA adapter"
        assert llama.files.model != plain.files.model  # not the original base's file
        agreement = compare_engines(load(run, notify=QUIET), llama, PROMPTS[:4],
                                    max_new_tokens=16)
    finally:
        llama.close()
    assert agreement.passed, agreement.partings
