"""llama.cpp work in a child process, so that a native crash cannot take afinar down with it.

    answers = run_llama_task({"task": "answer", "model": "m.gguf", ...}, "verifying m.gguf (q8_0)")

The parent writes the task as JSON, starts `python -m afinar.export.llama_child TASK RESULT`,
relays the child's progress lines, and reads the result. A child killed by a signal (llama.cpp
segfaults on some CPUs, see llama_runner.py) becomes an AfinarError naming the file, the type,
the signal and what to try, instead of killing the export, the server or the test run.

Tasks:
- `answer`: tokenise texts and probes with the GGUF's own tokenizer, render chats with its own
  chat template, answer prompt ids greedily (optionally with a LoRA adapter); the
  verification's export side.
- `quantize`: llama.cpp's quantiser (k-quants and other small types).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from afinar.errors import AfinarError

PROGRESS = "afinar-progress "
# The child's command line, followed by the task and result files.
CHILD_COMMAND = [sys.executable, "-m", "afinar.export.llama_child"]


def _answer(task: dict, progress: Callable[[str], None]) -> dict:
    from afinar.export.llama_runner import LlamaCpp

    prompts = task.get("prompt_ids", [])
    forced = task.get("forced_answers")  # the trained model's answers, for teacher forcing
    longest = max((len(p) + max(task["max_new_tokens"], len(a))
                   for p, a in zip(prompts, forced or [[]] * len(prompts))), default=0)
    # logits_all keeps a row of logits per context position: size the context to the need.
    n_ctx = max(512, -(-(longest + 8) // 256) * 256)
    with LlamaCpp(task["model"], lora=task.get("lora"), n_ctx=n_ctx,
                  logits_all=forced is not None) as llm:
        out = {"texts": [llm.tokenize(t) for t in task.get("texts", [])],
               "probes": [llm.tokenize(t, add_special=True) for t in task.get("probes", [])],
               "chats": [_chat_ids(llm, c) for c in task.get("chats", [])],
               "answers": [], "stopped": [], "forced": []}
        for k, ids in enumerate(prompts, start=1):
            answer = llm.greedy(ids, task["max_new_tokens"])
            out["answers"].append(answer)
            out["stopped"].append(bool(answer) and llm.is_end(answer[-1]))
            if forced is not None:
                out["forced"].append(llm.forced_predictions(ids, forced[k - 1]))
            progress(f"llama.cpp answered {k}/{len(prompts)}")
    return out


def _chat_ids(llm, messages: list[dict]) -> list[int] | dict:
    """The prompt ids from the GGUF's own chat template, or why there are none."""
    try:
        return llm.chat_prompt_ids(messages)
    except AfinarError as exc:
        return {"error": exc.message}
    except Exception as exc:  # the template's own raise_exception(), a jinja syntax error...
        return {"error": f"llama.cpp's chat handler cannot render it: {exc}"}


def _quantize(task: dict, progress: Callable[[str], None]) -> dict:
    from afinar.export.llama_runner import quantize_in_process

    quantize_in_process(Path(task["source"]), Path(task["target"]), task["kind"],
                        task.get("threads", 0))
    return {}


TASKS = {"answer": _answer, "quantize": _quantize}


def main(argv: list[str]) -> int:
    task_file, result_file = argv
    task = json.loads(Path(task_file).read_text(encoding="utf-8"))

    def progress(message: str) -> None:
        print(PROGRESS + message, flush=True)

    try:
        result = {"ok": TASKS[task["task"]](task, progress)}
    except AfinarError as exc:
        result = {"error": exc.message, "hint": exc.hint}
    tmp = Path(result_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(result), encoding="utf-8")
    os.replace(tmp, result_file)
    return 0


def _signal_name(code: int) -> str:
    try:
        return f"{signal.Signals(code).name}, signal {code}"
    except ValueError:
        return f"signal {code}"


def crash_hint(task: str) -> str:
    from afinar.export.llama_runner import REPACK_ENV

    common = (f"llama.cpp's kernels for quantised weights crash on some CPUs (Intel Xeons with "
              f"AMX among them; afinar already turns off the repacked weights there). "
              f"{REPACK_ENV}=off (or on) changes how llama.cpp lays out the weights")
    if task == "quantize":
        return (f"{common}; q8_0, f16 and bf16 are written by llama.cpp's converter "
                "without the quantiser (--quant q8_0). If it persists, report it with the output of `lscpu`")
    return (f"{common}; f16 and bf16 files do not use those kernels (--quant f16), and "
            "--no-verify keeps the file without the check. If it persists, report it with the "
            "output of `lscpu`")


def run_llama_task(task: dict, what: str, notify: Callable[[str], None] | None = None) -> dict:
    """Runs `task` in a child process; `what` names the work for error messages (the file and
    its type). Raises AfinarError when the child crashes, fails or reports a user error."""
    with tempfile.TemporaryDirectory(prefix="afinar-llama-") as scratch:
        task_file, result_file = Path(scratch) / "task.json", Path(scratch) / "result.json"
        log_file = Path(scratch) / "stderr.log"
        task_file.write_text(json.dumps(task), encoding="utf-8")
        with open(log_file, "w", encoding="utf-8") as log:
            child = subprocess.Popen(
                [*CHILD_COMMAND, str(task_file), str(result_file)],
                stdout=subprocess.PIPE, stderr=log, text=True)
            try:
                for line in child.stdout:
                    if line.startswith(PROGRESS) and notify:
                        notify("  " + line[len(PROGRESS):].rstrip())
                code = child.wait()
            except BaseException:  # Ctrl-C: never leave a llama.cpp process behind
                child.kill()
                child.wait()
                raise
        log_tail = _tail(log_file)
        if code < 0:
            raise AfinarError(f"llama.cpp crashed ({_signal_name(-code)}) while {what}; the "
                              f"export was not kept" + (f"\n  llama.cpp's last output: {log_tail}"
                                                        if log_tail else ""),
                              crash_hint(task["task"]))
        if code != 0 or not result_file.is_file():
            raise AfinarError(f"llama.cpp's child process failed (exit {code}) while {what}"
                              + (f": {log_tail}" if log_tail else ""))
        result = json.loads(result_file.read_text(encoding="utf-8"))
    if "error" in result:
        raise AfinarError(result["error"], result.get("hint"))
    return result["ok"]


def _tail(path: Path, chars: int = 600) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return " | ".join(text[-chars:].splitlines()[-6:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
