"""Hugging Face folders to GGUF with llama.cpp's own converter, run as an external tool.

    converter = find_converter()              # .venv/share/llama.cpp-0.3.36, or says how to get it
    convert_model(merged_folder, Path("m-f16.gguf"), "f16", {"afinar.run": "soporte"}, print)
    convert_adapter(peft_folder, base_folder, Path("lora-f32.gguf"), "f32", {}, print)
    converter.version                        # "llama.cpp 0c1e57098 (llama-cpp-python 0.3.36, ...)"

The converter (convert_hf_to_gguf.py with its conversion/ package, convert_lora_to_gguf.py and
the gguf-py they were written with) comes from the same llama-cpp-python source distribution as
the llama.cpp that quantises and verifies the file; scripts/install_llama_cpp.sh places it in
the venv (sys.prefix/share/llama.cpp-VERSION), or AFINAR_LLAMA_CPP_CONVERTER names another copy
laid out the same way. It runs in a child process whose import path is its own (convert_child.py),
reads the safetensors lazily and writes tensor by tensor, so no export holds the whole model
twice. The file appears at its final name only once complete. A failure is an AfinarError with
the converter's last lines and what to try, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from afinar.errors import AfinarError
from afinar.export.pre_tokenizer import pre_tokenizer_name
from afinar.export.space_prefix import gguf_overrides

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose source the converter is from
CONVERTER_ENV = "AFINAR_LLAMA_CPP_CONVERTER"
SOURCE_FILE = "afinar-source.json"  # written by scripts/install_llama_cpp.sh
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself
ADAPTER_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
PROGRESS = "afinar-progress "
_CHILD = Path(__file__).with_name("convert_child.py")
# Starts convert_child.py by path without putting its folder (afinar's) on the import path.
_BOOT = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
INSTALL_HINT = ("run scripts/install_llama_cpp.sh from afinar's checkout (it builds "
                f"llama-cpp-python {LLAMA_CPP_PYTHON} and places llama.cpp's converter from the "
                f"same source in the venv), or set {CONVERTER_ENV} to a folder holding "
                "convert_hf_to_gguf.py, conversion/ and gguf-py/ of one llama.cpp version; "
                "export --to merged needs neither")


@dataclass(frozen=True)
class Converter:
    home: Path
    llama_cpp_python: str
    commit: str
    gguf_py: str

    @property
    def version(self) -> str:
        """What converted a file, as afinar.json, the card and the GGUF header say it."""
        return (f"llama.cpp {self.commit} (converter from llama-cpp-python "
                f"{self.llama_cpp_python}'s source, gguf-py {self.gguf_py})")


def converter_home() -> Path:
    chosen = os.environ.get(CONVERTER_ENV)
    if chosen:
        return Path(chosen).expanduser()
    return Path(sys.prefix) / "share" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def find_converter() -> Converter:
    home = converter_home()
    needed = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/__init__.py",
              "gguf-py/gguf/__init__.py")
    missing = [name for name in needed if not (home / name).is_file()]
    if missing:
        raise AfinarError(f"GGUF export needs llama.cpp's converter, and {home} lacks "
                          + ", ".join(missing), INSTALL_HINT)
    try:
        source = json.loads((home / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        source = {}  # a copy placed by hand: its version is unknown, say so
    return Converter(home, source.get("llama_cpp_python", "unknown"),
                     source.get("llama_cpp_commit", "unknown"), source.get("gguf_py", "unknown"))


def convert_model(hf_folder: Path, target: Path, outtype: str, metadata: dict[str, str],
                  notify: Callable[[str], None], name: str | None = None) -> Path:
    """convert_hf_to_gguf.py on a Hugging Face model folder (weights, config, tokenizer);
    `name` is the GGUF's general.name (default: the file's stem). Where llama.cpp's default for
    a tokenizer setting would tokenise prompts differently from the trained tokenizer, the file
    says otherwise (space_prefix.py)."""
    if outtype not in OUTTYPES:
        raise AfinarError(f"llama.cpp's converter writes {', '.join(OUTTYPES)}, not {outtype}")
    converter = find_converter()
    partial = _partial(target)
    args = [str(hf_folder), "--outfile", str(partial), "--outtype", outtype,
            "--model-name", name or target.stem]
    tokenizer_file = hf_folder / "tokenizer.json"
    overrides = gguf_overrides(json.loads(tokenizer_file.read_text(encoding="utf-8"))
                               if tokenizer_file.is_file() else {})
    with _removed_on_failure(partial):
        _run(converter, "convert_hf_to_gguf.py", args, {**metadata, **overrides}, target, notify,
             pre_tokenizer=pre_tokenizer_name(tokenizer_file))
    return _finish(partial, target)


def convert_adapter(adapter_folder: Path, base_folder: Path, target: Path, outtype: str,
                    metadata: dict[str, str], notify: Callable[[str], None]) -> Path:
    """convert_lora_to_gguf.py on a PEFT LoRA folder; `base_folder` needs only config.json."""
    if outtype not in ADAPTER_OUTTYPES:
        raise AfinarError(f"llama.cpp's adapter converter writes {', '.join(ADAPTER_OUTTYPES)}, "
                          f"not {outtype}")
    converter = find_converter()
    partial = _partial(target)
    args = [str(adapter_folder), "--base", str(base_folder), "--outfile", str(partial),
            "--outtype", outtype]
    with _removed_on_failure(partial):
        _run(converter, "convert_lora_to_gguf.py", args, metadata, target, notify)
    return _finish(partial, target)


def _partial(target: Path) -> Path:
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)
    return partial


@contextlib.contextmanager
def _removed_on_failure(partial: Path):
    try:
        yield
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _finish(partial: Path, target: Path) -> Path:
    os.replace(partial, target)
    return target


def _run(converter: Converter, script: str, args: list[str], metadata: dict[str, str | bool],
         target: Path, notify: Callable[[str], None], pre_tokenizer: str | None = None) -> None:
    metadata = {**metadata, "afinar.converted_by": converter.version}
    notify(f"converting to {target.name} with {converter.version}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter.home / "gguf-py"),
                                                        str(converter.home)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py
    with tempfile.TemporaryDirectory(prefix="afinar-convert-") as scratch:
        task_file, log_file = Path(scratch) / "task.json", Path(scratch) / "converter.log"
        task_file.write_text(json.dumps({"converter": str(converter.home), "script": script,
                                         "args": args, "metadata": metadata,
                                         "pre_tokenizer": pre_tokenizer}), encoding="utf-8")
        with open(log_file, "w", encoding="utf-8") as log:
            child = subprocess.Popen([sys.executable, "-c", _BOOT, str(_CHILD), str(task_file)],
                                     stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                     cwd=scratch)
            try:
                for line in child.stdout:
                    if line.startswith(PROGRESS):
                        notify("  " + line[len(PROGRESS):].rstrip())
                code = child.wait()
            except BaseException:  # Ctrl-C: never leave a converter running behind
                child.kill()
                child.wait()
                raise
        if code != 0:
            raise _failure(code, log_file.read_text(encoding="utf-8", errors="replace"),
                           target, converter)


def last_lines(log: str, count: int = 6) -> str:
    """The converter's last words: its log and error lines, without a traceback's frames
    (indented) or its header, which name the converter's files, not the user's problem."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines()
             if line.strip() and not line[:1].isspace()
             and not line.startswith("Traceback (most recent call last)")]
    return " | ".join(lines[-count:])


# What a converter message means for the user, by a pattern of its output.
_KNOWN = (
    ("pre-tokenizer was not recognized",
     "llama.cpp's converter does not know this tokenizer (it identifies byte-level BPE "
     "tokenizers by a hash of published ones), and afinar could not name its pre-tokenizer "
     "from tokenizer.json either",
     "export --to merged works for any tokenizer; GGUF needs a tokenizer of a published model "
     "or a SentencePiece tokenizer.model"),
    (r"Model \S+ is not supported",
     "llama.cpp's converter has no conversion for this architecture",
     "export --to merged works for any model; a newer llama.cpp may know it"),
    ("not a lora_A or lora_B tensor",
     "the adapter holds tensors that llama.cpp's LoRA adapters cannot hold",
     "export --to gguf (the adapter merged into the model) instead"),
)


def _failure(code: int, log: str, target: Path, converter: Converter) -> AfinarError:
    tail = last_lines(log)
    what = f"llama.cpp's converter failed making {target.name}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        killed = " (killed: usually out of memory)" if -code == signal.SIGKILL else ""
        return AfinarError(f"{what}: it died of signal {name}{killed}; its last output: {tail}",
                           "free memory (the conversion streams tensors, but the export also "
                           "holds the trained model for verification), or export --to merged")
    for phrase, meaning, hint in _KNOWN:
        if re.search(phrase, log):
            return AfinarError(f"{what}: {meaning}. Its last output: {tail}", hint)
    return AfinarError(f"{what} (exit {code}, {converter.version}); its last output: {tail}",
                       "export --to merged works for any model; if the model is a standard "
                       "one, report this output with the model's config.json")
