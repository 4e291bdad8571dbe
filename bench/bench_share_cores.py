"""Sharing the cores: a training run while a second process generates, as under `afinar serve`
(its worker trains while the web process answers chats) or beside a user's other programs.

    .venv/bin/python bench/bench_share_cores.py [--steps 16] [--seconds 30]
        [--out bench/results/share_cores.json]
    .venv/bin/python bench/bench_share_cores.py --smoke --out PATH [--model DIR]  # still runs?

Two children, each with torch's default thread count (all cores): one trains the embedded model
(LoRA, batch 4, the bundled example, `--steps` steps, eager; the loop's tokens/s), one answers
held-out prompts greedily (batch 4, 32 new tokens; new tokens/s) for `--seconds` alone, or for
as long as the training runs beside it. Each runs alone, then both at once, under
libgomp's default wait policy (threads spin for a while before sleeping) and under
OMP_WAIT_POLICY=PASSIVE (afinar's default since issue 13). Reported: each side's speed together
as a share of its speed alone; with the cores shared fairly the two shares add up to about 1.
The numbers are for reading, never for test assertions. `--smoke`: a tiny random model (or
--model), 2 steps, the generator alone for 1 s, the PASSIVE policy only (bench/_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

POLICIES = {"default": None, "passive": "PASSIVE"}


def child_train(steps: int, model: str | None) -> dict:
    from afinar.config import TrainConfig
    from afinar.train.recipe import train

    records: list[dict] = []

    def on_event(event: dict) -> None:
        if event["type"] == "step":
            records.append(event)

    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        config = TrainConfig(data=str(ROOT / "examples/soporte-triaje/data.jsonl"),
                             output=str(Path(tmp) / "run"), held_out_fraction=0.0,
                             **({"model": model} if model else {}),
                             preserve=False, batch_size=4, max_steps=steps, epochs=10,
                             save_steps=10_000, precision="fp32", compile=False)
        train(config, on_event=on_event)
    last = records[-1]  # the loop's own tokens/s: every step's tokens over their step time
    return {"steps": len(records), "tokens_per_s": round(last["tokens_per_s"], 1)}


def child_generate(seconds: float, stop_file: Path, model: str | None) -> dict:
    """Generates for `seconds`, or, beside a training run, until `stop_file` exists; one batch at
    least (a tiny smoke run's training may end before the generator has loaded)."""
    from bench_eval import held_out_prompts

    from afinar.infer.generate import GenerationSettings, load

    loaded = load(model or "smollm2-135m-instruct", notify=lambda message: None)
    prompts = held_out_prompts(8)
    loaded.generate(prompts[:1], GenerationSettings(max_new_tokens=4), 1)  # warm-up
    tokens, started = 0, time.perf_counter()
    while True:
        done = loaded.complete(prompts[:4], GenerationSettings(max_new_tokens=32), batch_size=4)
        tokens += sum(c.completion_tokens for c in done)
        if stop_file.exists() if seconds <= 0 else time.perf_counter() - started >= seconds:
            break
    return {"tokens_per_s": round(tokens / (time.perf_counter() - started), 1)}


def _spawn(role: str, args, seconds: float, policy: str | None, out: Path,
           stop_file: Path) -> subprocess.Popen:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("OMP_NUM_THREADS", None)
    # An empty value is not a policy libgomp knows: it keeps its default (and afinar's
    # setdefault leaves a variable that is set alone).
    env["OMP_WAIT_POLICY"] = policy or ""
    return subprocess.Popen([sys.executable, __file__, "--child", role, "--seconds",
                             str(seconds), "--steps", str(args.steps), "--child-out", str(out),
                             "--stop-file", str(stop_file),
                             *(["--model", args.model] if args.model else [])], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _run(roles: list[str], args, policy: str | None, tmp: Path) -> dict:
    """Alone, the generator runs `--seconds`; beside training, until training ends."""
    stop_file = tmp / "training-ended"
    stop_file.unlink(missing_ok=True)
    seconds = args.seconds if roles == ["generate"] else 0
    procs = {role: _spawn(role, args, seconds, policy, tmp / f"{role}.json", stop_file)
             for role in roles}
    results = {}
    for role, proc in procs.items():  # "train" first: the generator stops when it has ended
        _, err = proc.communicate()
        if role == "train":
            stop_file.touch()
        if proc.returncode != 0:
            raise SystemExit(f"{role} child failed:\n{err[-3000:]}")
        results[role] = json.loads((tmp / f"{role}.json").read_text())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, help="the generator alone (default 30; "
                        "--smoke: 1)")
    parser.add_argument("--steps", type=int, help="training steps (default 16; --smoke: 2)")
    parser.add_argument("--policies", help=f"default {','.join(POLICIES)}; --smoke: passive")
    parser.add_argument("--model", help="both sides' (default smollm2-135m-instruct; --smoke: a "
                        "tiny random model)")
    parser.add_argument("--stop-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="default bench/results/share_cores.json")
    parser.add_argument("--child", choices=["train", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    _smoke.add_flag(parser)
    args = parser.parse_args()
    if args.child:
        result = (child_train(args.steps, args.model) if args.child == "train"
                  else child_generate(args.seconds, Path(args.stop_file), args.model))
        Path(args.child_out).write_text(json.dumps(result))
        return
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "share_cores.json")
    args.seconds = args.seconds or (1 if args.smoke else 30)
    args.steps = args.steps or (2 if args.smoke else 16)
    args.policies = args.policies or ("passive" if args.smoke else ",".join(POLICIES))
    if args.smoke:
        args.model = _smoke.smoke_model(args.model)

    report: dict = {"smoke": args.smoke, "model": args.model, "cpu_count": os.cpu_count(),
                    "generator_seconds_alone": args.seconds, "training_steps": args.steps,
                    "policies": {}}
    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp:
        for name in args.policies.split(","):
            policy = POLICIES[name]
            alone = {role: _run([role], args, policy, Path(tmp))[role]
                     for role in ("train", "generate")}
            together = _run(["train", "generate"], args, policy, Path(tmp))
            shares = {role: round(together[role]["tokens_per_s"] / alone[role]["tokens_per_s"], 3)
                      for role in alone}
            report["policies"][name] = {"alone": alone, "together": together,
                                        "share_of_alone": shares,
                                        "sum_of_shares": round(sum(shares.values()), 3)}
            print(name, json.dumps(report["policies"][name]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
