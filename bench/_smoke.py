"""What the benchmarks' `--smoke` mode shares: a tiny random model to run on, and a tiny trained
run for the benchmarks that start from one.

Every script in bench/ takes `--smoke --out PATH`: the same code path as a real run, on the
tiny model, one or two steps, tiny data; the result file goes to PATH. tests/test_bench_smoke.py
runs each of them that way and checks the file's fields, so a change that breaks a benchmark
fails the tests. Smoke numbers mean nothing.

    from _smoke import smoke_model, smoke_run      # bench/ is on sys.path for a bench script
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# SmolLM2-Instruct's shipped chat template: the tiny model renders conversations exactly as the
# embedded model does, which bench_train's TRL side checks against its training template.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_model(folder: Path) -> Path:
    """Saves the tests' tiny random Llama (tests/tiny_llama.py) with SmolLM2's chat template and
    an untied head, so that its greedy answers are text, not blank (see build_tiny_model)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_llama import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(SMOLLM2_TEMPLATE)
    build_tiny_model(tokenizer, tied=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def scratch(prefix: str) -> Path:
    """A temporary folder, removed when this process exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def smoke_model(model: str | Path | None) -> str:
    """`--model` when it was given (the test passes one folder to every bench), else a tiny model
    built for this process (removed when it exits)."""
    if model:
        return str(model)
    return str(build_model(scratch("afinar-smoke-model-")))


def smoke_run(model: str | Path | None) -> str:
    """A run directory trained for two steps on the tiny model (bundled example, default
    held-out split, no evaluation): what bench_export and bench_llama_repack start from."""
    from afinar import TrainConfig, train

    folder = scratch("afinar-smoke-run-") / "run"
    config = TrainConfig(data=str(ROOT / "examples" / "soporte-triaje" / "data.jsonl"),
                         model=smoke_model(model), output=str(folder), max_steps=2,
                         batch_size=2, precision="fp32", compile=False, preserve=False,
                         evaluate=False)
    train(config, on_event=lambda event: None)
    return str(folder)


def add_flag(parser) -> None:
    parser.add_argument("--smoke", action="store_true",
                        help="a check that this benchmark still runs (tiny random model, a step "
                        "or two; needs --out): the tests run it; its numbers mean nothing")


def out_path(parser, args, default: Path | str | None) -> Path | None:
    """Where the result file goes: --out, else `default`; a smoke run must name it, so that it
    never replaces a real result in bench/results/."""
    if args.out:
        return Path(args.out)
    if args.smoke:
        parser.error("--smoke needs --out PATH (smoke results must not replace bench/results/)")
    return Path(default) if default is not None else None
