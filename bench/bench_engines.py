"""The llama.cpp engine against llama.cpp called directly and against the transformers engine.

    .venv/bin/python bench/bench_engines.py decode [--run DIR] [--prompts 8] [--max-new-tokens 64]
    .venv/bin/python bench/bench_engines.py eval --run DEMO_RUN
    .venv/bin/python bench/bench_engines.py serve [--models 4] [--clients 40] [--requests 4]
    .venv/bin/python bench/bench_engines.py all --run DEMO_RUN          # the three, one file
    .venv/bin/python bench/bench_engines.py all --smoke --out PATH [--model DIR]

- decode: batch-1 greedy answers to held-out prompts of the bundled example, one after another,
  timed from the prompt to the last token (prefill included), new tokens per second, through
  (a) afinar's llama.cpp engine (afinar.engines.open_model: afinar's prompt ids, HTTP to its
  llama-server child, afinar's decoding), (b) the same llama-server binary started by hand on
  the same GGUF files and asked directly with the same token ids (no afinar code on the path),
  (c) llama-cpp-python in-process on the same files, when installed, and (d) afinar's
  transformers engine. Same threads everywhere (physical cores). Also how many answers the
  engines give token for token alike (agreement.py's rule).
- eval: `afinar eval` of a run (base + tuned, every section, answer cache off) with each engine:
  wall time and the report's figures side by side.
- serve: `afinar serve` (uvicorn, one process) with `--models` fine-tunes of the embedded model
  trained through its own jobs API, then `--clients` concurrent OpenAI clients, each sending
  `--requests` chat completions (greedy, `--max-tokens`) to model (client index mod models),
  once per engine on the same state: p50/p95 latency, completion tokens/s, errors.

Numbers are for reading, never for test assertions; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _smoke  # noqa: E402
from bench_eval import held_out_prompts  # noqa: E402

QUIET = lambda message: None  # noqa: E731
SERVE_PROMPTS = ["Explain how a refrigerator keeps food cold.",
                 "Describe the water cycle step by step.",
                 "Mi pedido 4412 llegó roto, ¿qué hago?",
                 "Write a short story about a lighthouse keeper.",
                 "Explica qué es la fotosíntesis.",
                 "No puedo iniciar sesión en la app desde ayer."]


def machine() -> dict:
    from afinar.engines.llama_server import default_threads
    from afinar.export.llama_runner import cpu_flags

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16",
                                  "amx_int8"})
    return {"cpu": platform.processor() or platform.machine(), "cpu_flags": flags,
            "cores": os.cpu_count(), "threads": default_threads()}


# --- decode -----------------------------------------------------------------------------------
def _direct_server(files, threads: int):
    """The same llama-server binary, started by hand: no afinar code between client and it."""
    import httpx

    from afinar.engines.llama_server import (child_environment, free_port,
                                             require_server_binary)

    port = free_port()
    command = [str(require_server_binary()), "-m", str(files.model), "--port", str(port),
               "-t", str(threads), "-np", "1", "-c", "4096", "--no-webui"]
    if files.adapter:
        command += ["--lora", str(files.adapter)]
    # As a user would start it: not with the OMP_WAIT_POLICY afinar sets for torch.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=child_environment())
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
    for _ in range(600):
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # 503 while the model loads
    return process, client


def _timed(fn, prompts) -> tuple[float, list]:
    outs, started = [], time.perf_counter()
    for prompt in prompts:
        outs.append(fn(prompt))
    return time.perf_counter() - started, outs


def decode(spec: str, n_prompts: int, max_new: int) -> dict:
    from afinar.engines import open_model
    from afinar.engines.agreement import compare_engines
    from afinar.infer.generate import GenerationSettings, load

    prompts = held_out_prompts(n_prompts)
    settings = GenerationSettings(max_new_tokens=max_new)
    from afinar.engines.gguf_cache import cache_dir

    cached_before = sorted(p.name for p in cache_dir().rglob("*.gguf"))
    started = time.perf_counter()
    llama = open_model(spec, "llamacpp", notify=QUIET, slots=1)
    result: dict = {"model": spec, "prompts": len(prompts), "max_new_tokens": max_new,
                    "first_open_s": time.perf_counter() - started,
                    "first_open_converted": sorted(p.name for p in cache_dir().rglob("*.gguf"))
                    != cached_before,
                    "gguf": {"model": llama.files.model.name, "how": llama.files.how,
                             "adapter": llama.files.adapter.name if llama.files.adapter else None,
                             "converted_by": llama.files.converted_by}}
    try:
        llama.complete([prompts[0]], settings)  # warm: first prompt's pages in memory
        seconds, outs = _timed(lambda p: llama.complete([p], settings)[0], prompts)
        tokens = sum(c.completion_tokens for c in outs)
        result["afinar_llamacpp"] = {"seconds": seconds, "new_tokens": tokens,
                                     "tokens_per_s": tokens / seconds}
        ids = [llama.prompt_ids(p) for p in prompts]
        files = llama.files
        lora = [{"id": 0, "scale": 1.0}] if files.adapter else []
    finally:
        llama.close()

    process, client = _direct_server(files, machine()["threads"])
    try:
        def ask(prompt_ids):
            body = {"prompt": prompt_ids, "n_predict": max_new, "temperature": 0, "top_k": 1,
                    "return_tokens": True, "lora": lora}
            return client.post("/completion", json=body).json()
        ask(ids[0])
        seconds, outs = _timed(ask, ids)
        tokens = sum(o["tokens_predicted"] for o in outs)
        result["llama_server_direct"] = {"seconds": seconds, "new_tokens": tokens,
                                         "tokens_per_s": tokens / seconds}
    finally:
        process.terminate()
        process.wait()
    result["afinar_llamacpp_over_direct"] = (result["afinar_llamacpp"]["tokens_per_s"]
                                             / result["llama_server_direct"]["tokens_per_s"])
    try:
        result["llama_cpp_python_direct"] = _llama_cpp_python(files, ids, max_new)
    except ImportError:
        result["llama_cpp_python_direct"] = None

    loaded = load(spec, notify=QUIET)
    loaded.complete([prompts[0]], settings)
    seconds, outs = _timed(lambda p: loaded.complete([p], settings, batch_size=1)[0], prompts)
    tokens = sum(c.completion_tokens for c in outs)
    result["afinar_transformers"] = {"seconds": seconds, "new_tokens": tokens,
                                     "tokens_per_s": tokens / seconds}
    result["llamacpp_over_transformers"] = (result["afinar_llamacpp"]["tokens_per_s"]
                                            / result["afinar_transformers"]["tokens_per_s"])
    again = open_model(spec, "llamacpp", notify=QUIET, slots=1)
    try:
        result["agreement"] = compare_engines(loaded, again, prompts, max_new).summary()
    finally:
        again.close()
    return result


def _llama_cpp_python(files, ids, max_new: int) -> dict:
    from afinar.export.llama_runner import LlamaCpp

    with LlamaCpp(str(files.model), lora=str(files.adapter) if files.adapter else None) as llm:
        llm.greedy(ids[0], max_new)
        seconds, outs = _timed(lambda p: llm.greedy(p, max_new), ids)
    tokens = sum(len(o) for o in outs)
    return {"seconds": seconds, "new_tokens": tokens, "tokens_per_s": tokens / seconds}


# --- eval -------------------------------------------------------------------------------------
FIGURES = ("adherence", "exact", "match", "rouge", "leak", "pass", "loss", "answered", "regress")


def _figures(summary: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_figures(value, name + "."))
        elif isinstance(value, (int, float)) and any(f in name for f in FIGURES):
            out[name] = value
    return out


def evaluate_both(run: str, scratch: Path) -> dict:
    from afinar.pipeline import evaluate_run

    result: dict = {"run": run}
    for engine in ("llamacpp", "transformers"):
        started = time.perf_counter()
        report = evaluate_run(run, engine=engine, output=str(scratch / f"eval-{engine}"),
                              use_cache=False, notify=QUIET)
        data = report.data
        result[engine] = {"wall_s": time.perf_counter() - started,
                          "timing": data.get("timing"), "engine": data.get("engine"),
                          "figures": _figures(data.get("summary", {}))}
    result["transformers_over_llamacpp_wall"] = (result["transformers"]["wall_s"]
                                                 / result["llamacpp"]["wall_s"])
    a, b = result["llamacpp"]["figures"], result["transformers"]["figures"]
    result["figures_that_differ"] = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
                                     if a.get(k) != b.get(k)}
    return result


# --- serve ------------------------------------------------------------------------------------
def _train_models(base_url: str, n: int, data: Path, smoke: bool) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    upload = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    jobs = [client.fine_tuning.jobs.create(
        training_file=upload.id, model="tiny" if smoke else "smollm2-135m-instruct",
        suffix=f"bench{k}", seed=k, method={"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": 1, "batch_size": 8,
                                "learning_rate_multiplier": 4 + k}}}) for k in range(n)]
    names = []
    for job in jobs:
        while True:
            job = client.fine_tuning.jobs.retrieve(job.id)
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1)
        assert job.status == "succeeded", job.error
        names.append(job.fine_tuned_model)
    return names


def _start_server(config: Path, port: int, engine: str, log: Path):
    from openai import OpenAI

    process = subprocess.Popen([str(Path(sys.executable).parent / "afinar"), "serve",
                                "--config", str(config), "--port", str(port), "--engine", engine],
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench", max_retries=0)
    for _ in range(600):
        try:
            client.models.list()
            return process
        except Exception:  # noqa: BLE001 - not up yet
            if process.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.2)
    raise RuntimeError("server did not start")


def _stop(process) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)


def _load(base_url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client_loop(index: int):
        client = OpenAI(base_url=base_url, api_key="sk-bench", max_retries=0, timeout=900)
        model = models[index % len(models)]
        barrier.wait()
        for k in range(requests):
            prompt = SERVE_PROMPTS[(index + k) % len(SERVE_PROMPTS)]
            started = time.perf_counter()
            try:
                answer = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens, temperature=0)
                with lock:
                    latencies.append(time.perf_counter() - started)
                    tokens.append(answer.usage.completion_tokens)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(exc)[:400])
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(p: float) -> float | None:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else None
    return {"requests": clients * requests, "served": len(latencies), "errors": len(errors),
            "error_samples": errors[:3], "wall_s": wall, "p50_s": pct(0.50), "p95_s": pct(0.95),
            "median_s": statistics.median(latencies) if latencies else None,
            "completion_tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall}


def serve_load(n_models: int, clients: int, requests: int, max_tokens: int, smoke: bool,
               model_dir: str | None, scratch: Path) -> dict:
    import yaml

    from afinar.engines.llama_server import free_port

    config = scratch / "serve.yaml"
    settings = {"home": str(scratch / "state"), "evaluate_jobs": False, "api_keys": ["sk-bench"],
                "adapter_cache": max(8, n_models)}
    if smoke:
        settings["models"] = {"tiny": model_dir}
    config.write_text(yaml.safe_dump(settings))
    records = [json.loads(line) for line in (ROOT / "examples" / "soporte-triaje" /
                                             "data.jsonl").read_text().splitlines()][:32]
    data = scratch / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = scratch / "server.log"
    process = _start_server(config, port, "auto", log)
    try:
        started = time.perf_counter()
        models = _train_models(url, n_models, data, smoke)
        trained_s = time.perf_counter() - started
    finally:
        _stop(process)
    result = {"fine_tuned_models": models, "training_s": trained_s, "clients": clients,
              "requests_per_client": requests, "max_tokens": max_tokens}
    for engine in ("llamacpp", "transformers"):
        process = _start_server(config, port, engine, log)
        try:
            from openai import OpenAI

            client = OpenAI(base_url=url, api_key="sk-bench", max_retries=0)
            warm = time.perf_counter()
            for model in models:  # conversions, adapters, children: not part of the load
                client.chat.completions.create(model=model, max_tokens=2, temperature=0,
                                               messages=[{"role": "user", "content": "hola"}])
            listed = {m.id: m.model_extra.get("engine") for m in client.models.list()}
            result[engine] = {"engine_in_models": listed.get(models[0]),
                              "warm_s": time.perf_counter() - warm,
                              **_load(url, models, clients, requests, max_tokens)}
        finally:
            _stop(process)
        if result[engine]["errors"]:  # the server's log says why (llama-server's last lines)
            kept = ROOT / "bench" / "results" / f"engines-serve-{engine}-errors.log"
            kept.write_text(log.read_text(errors="replace")[-20000:])
            result[engine]["server_log"] = str(kept.relative_to(ROOT))
    result["llamacpp_over_transformers_tokens_per_s"] = (
        result["llamacpp"]["tokens_per_s"] / result["transformers"]["tokens_per_s"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", default="all",
                        choices=("decode", "eval", "serve", "all"))
    parser.add_argument("--run", help="a run directory (decode: default the embedded model; "
                        "eval: required)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", help="smoke: the tiny model folder")
    parser.add_argument("--out")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / f"engines-{args.part}.json")
    scratch = _smoke.scratch("afinar-bench-engines-")
    if args.smoke:
        os.environ.setdefault("AFINAR_HOME", str(scratch / "home"))
        model = _smoke.smoke_model(args.model)
        run = _smoke.smoke_run(model)
        args.prompts, args.max_new_tokens, args.models, args.clients, args.requests = 2, 4, 2, 4, 1
        args.max_tokens = 4
    else:
        model, run = None, args.run
    result: dict = {"benchmark": "engines", "smoke": args.smoke, "machine": machine()}
    if args.part in ("decode", "all"):
        spec = run if args.smoke else (args.run or "smollm2-135m-instruct")
        result["decode"] = decode(spec, args.prompts, args.max_new_tokens)
        print(json.dumps(result["decode"], indent=1))
    if args.part in ("eval", "all"):
        if not run:
            parser.error("eval needs --run (a trained run, e.g. the demo's)")
        result["eval"] = evaluate_both(run, scratch)
        print(json.dumps(result["eval"], indent=1))
    if args.part in ("serve", "all"):
        result["serve"] = serve_load(args.models, args.clients, args.requests, args.max_tokens,
                                     args.smoke, model, scratch)
        print(json.dumps(result["serve"], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
