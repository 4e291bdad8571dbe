"""Serving benchmark: `afinar serve` on the embedded model, against the same model called
in-process (what a user without a server would do: load it, generate).

    .venv/bin/python bench/bench_serve.py [--tokens 32] [--concurrent 8]
    .venv/bin/python bench/bench_serve.py --smoke --out PATH [--model DIR]   # does it still run?

Measures, with greedy decoding and `--tokens` new tokens per answer:
- latency of one chat completion through the server (HTTP + OpenAI client), median of 5, next to
  in-process generation of the same answer (median of 5);
- 8 requests sent at once from 8 threads (the server batches what arrives together) next to the
  same 8 requests one after another.
The server runs in its own process group; nothing else should run meanwhile. Numbers are for
reading, never for assertions. `--smoke`: a tiny random model (or --model) served as a base model
of the server's, 4 tokens, 2 requests at once (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

PROMPTS = ["Explain in detail how a refrigerator keeps food cold.",
           "Describe the water cycle step by step.",
           "Write a short story about a lighthouse keeper.",
           "Explain how vaccines train the immune system.",
           "Describe how a bicycle's gears work.",
           "Explica con detalle cómo funciona un horno microondas.",
           "Describe paso a paso cómo se hace el pan.",
           "Explica qué es la fotosíntesis y por qué importa."]


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, help="default 32; --smoke: 4")
    parser.add_argument("--concurrent", type=int, help="default 8; --smoke: 2")
    parser.add_argument("--model", help="default smollm2-135m-instruct; --smoke: a tiny random "
                        "model")
    parser.add_argument("--out", help="default bench/results/serve.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "serve.json")
    args.tokens = args.tokens or (4 if args.smoke else 32)
    args.concurrent = args.concurrent or (2 if args.smoke else 8)
    model = _smoke.smoke_model(args.model) if args.smoke else args.model or "smollm2-135m-instruct"
    from openai import OpenAI

    from afinar.infer.generate import GenerationSettings, load
    from afinar.models.registry import BASE_MODELS

    # A folder is offered as one of the server's base models, under a name of its own.
    served = model if model in BASE_MODELS else "bench-model"

    settings = GenerationSettings(max_new_tokens=args.tokens)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS[:args.concurrent]]

    loaded = load(model, notify=lambda m: None)
    loaded.complete(msgs[:1], GenerationSettings(max_new_tokens=4), 1)
    local = []
    for _ in range(5):
        start = time.perf_counter()
        done = loaded.complete(msgs[:1], settings, 1)[0]
        local.append(time.perf_counter() - start)
    local_tokens = done.completion_tokens
    del loaded

    state = tempfile.mkdtemp(prefix="afinar-bench-serve-")
    config = Path(state) / "serve.yaml"
    config.write_text(json.dumps({"home": state, "evaluate_jobs": False, "models": {} if
                                  served == model else {served: str(Path(model).resolve())}}))
    port = _port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "afinar"), "serve", "--config",
                             str(config), "--port", str(port)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        for _ in range(600):
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - still starting
                time.sleep(0.2)

        def ask(messages):
            return client.chat.completions.create(model=served,
                                                  messages=messages, max_tokens=args.tokens,
                                                  temperature=0)

        ask(msgs[0])  # loads the model in the server
        single = []
        for _ in range(5):
            start = time.perf_counter()
            answer = ask(msgs[0])
            single.append(time.perf_counter() - start)
        start = time.perf_counter()
        sequential = [ask(m) for m in msgs]
        sequential_s = time.perf_counter() - start
        results: list = [None] * len(msgs)

        def worker(i):
            results[i] = ask(msgs[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(msgs))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        concurrent_s = time.perf_counter() - start
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(state, ignore_errors=True)

    tokens_seq = sum(r.usage.completion_tokens for r in sequential)
    tokens_con = sum(r.usage.completion_tokens for r in results)
    record = {
        "smoke": args.smoke, "model": model, "max_tokens": args.tokens, "threads": os.cpu_count(),
        "single_request": {"server_median_s": round(statistics.median(single), 3),
                           "in_process_median_s": round(statistics.median(local), 3),
                           "server_over_in_process": round(statistics.median(single)
                                                           / statistics.median(local), 2),
                           "completion_tokens": answer.usage.completion_tokens,
                           "in_process_tokens": local_tokens},
        f"{len(msgs)}_requests": {
            "one_after_another_s": round(sequential_s, 2),
            "at_once_s": round(concurrent_s, 2),
            "tokens_per_s_one_after_another": round(tokens_seq / sequential_s, 1),
            "tokens_per_s_at_once": round(tokens_con / concurrent_s, 1),
            "speedup_at_once": round(sequential_s / concurrent_s, 2)},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
