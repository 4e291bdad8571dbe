"""Runs one of llama.cpp's converter scripts in a child process that convert.py starts.

    PYTHONPATH=CONVERTER/gguf-py:CONVERTER python -c BOOT convert_child.py TASK.json

This file is executed by path, never imported by afinar, and imports nothing of afinar: the
child's import path is the converter's own (its gguf-py, its conversion/ package), so the
converter cannot mix with afinar's imports, nor with the PyPI `gguf` that afinar uses to read
the embedded model. It adds three things around the unchanged script, each through the script's
own objects:
- `afinar.*` metadata keys written into the GGUF header (what run the file came from, which
  llama.cpp converted it);
- a pre-tokenizer name afinar read from tokenizer.json, used only when the converter does not
  recognise the tokenizer's hash (see pre_tokenizer.py);
- progress lines ("afinar-progress ...") on stdout in place of the converter's progress bar.
Everything else the converter prints goes to stderr, which the parent keeps for its errors.
"""

from __future__ import annotations

import json
import runpy
import sys
import types
from pathlib import Path

PROGRESS = "afinar-progress "


def _say(message: str) -> None:
    print(PROGRESS + message, flush=True)


def _check_gguf_py(home: Path):
    import gguf

    where = Path(gguf.__file__).resolve()
    if not where.is_relative_to((home / "gguf-py").resolve()):
        sys.exit(f"the converter would run with the gguf package at {where}, not its own "
                 f"{home / 'gguf-py'}")
    return gguf


def _add_metadata(gguf, metadata: dict[str, str | bool]) -> None:
    """Every GGUFWriter the converter makes writes these keys too (one file: one writer); a
    key the converter wrote already takes afinar's value (a bool: a setting llama.cpp reads)."""
    original = gguf.GGUFWriter.write_header_to_file

    def write_header_to_file(self, *args, **kwargs):
        for key, value in metadata.items():
            self.remove_key(key)
            (self.add_bool if isinstance(value, bool) else self.add_string)(key, value)
        return original(self, *args, **kwargs)

    gguf.GGUFWriter.write_header_to_file = write_header_to_file


class _Progress:
    """Stands in for tqdm in the writer: a line per tenth of the bytes written."""

    def __init__(self, *args, total=None, desc=None, **kwargs):
        self.total, self.done, self.step = total, 0, 0

    def update(self, n) -> None:
        self.done += n
        if self.total and self.done * 10 // self.total > self.step:
            self.step = self.done * 10 // self.total
            _say(f"{self.done / 1e9:.2f} of {self.total / 1e9:.2f} GB written")

    def set_description(self, *args, **kwargs) -> None:
        pass

    def reset(self, total=None) -> None:
        self.total, self.done, self.step = total, 0, 0

    def close(self) -> None:
        pass


def _report_progress(gguf) -> None:
    original = gguf.GGUFWriter.write_tensors_to_file

    def write_tensors_to_file(self, *args, **kwargs):
        # The writer imports tqdm inside this method: a stand-in module for its duration only,
        # so that transformers' own tqdm is untouched.
        real = sys.modules.get("tqdm")
        sys.modules["tqdm"] = types.SimpleNamespace(tqdm=_Progress)
        try:
            _say("writing tensors")
            return original(self, *args, **kwargs)
        finally:
            if real is None:
                sys.modules.pop("tqdm", None)
            else:
                sys.modules["tqdm"] = real

    gguf.GGUFWriter.write_tensors_to_file = write_tensors_to_file


def _declare_pre_tokenizer(name: str) -> None:
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # the hash of a tokenizer llama.cpp has not published
            _say(f"llama.cpp does not list this tokenizer; its pre-tokenizer is {name!r} "
                 "(read from tokenizer.json by afinar; verification checks the ids)")
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    task = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    home = Path(task["converter"])
    gguf = _check_gguf_py(home)
    _add_metadata(gguf, task.get("metadata") or {})
    _report_progress(gguf)
    if task.get("pre_tokenizer"):
        _declare_pre_tokenizer(task["pre_tokenizer"])
    script = home / task["script"]
    sys.argv = [str(script), *task["args"]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
