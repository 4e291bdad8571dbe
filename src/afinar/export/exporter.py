"""`afinar export RUN --to merged|gguf|gguf-adapter|ollama [--quant TYPE] [--output DIR]`.

    result = afinar.export("runs/soporte", to="gguf", quant="q8_0")
    result.output, result.files, result.verification.summary()

Everything is written into a hidden temporary folder beside the output, verified there, and only
then renamed into place: an interrupted or failed export never leaves a folder that looks done.
When verification fails, only its report is kept (OUTPUT.verify-failed.json).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from afinar import rundir
from afinar.errors import AfinarError
from afinar.export import verify as V
from afinar.export.convert import OUTTYPES as DIRECT_TYPES
from afinar.export.convert import convert_adapter, convert_model, find_converter
from afinar.export.llama_cpp_limits import adapter_for_llama_cpp, check_model_config
from afinar.export.llama_runner import LLAMA_CPP_TYPES
from afinar.export.merged import DTYPES as MERGED_TYPES
from afinar.export.merged import (METADATA_FILE, MergedRunner, adds_special, converter_folder,
                                  cut_at_stop, write_merged)
from afinar.export.quantize import quantize_with_llama_cpp
from afinar.models.quantize import merge_note

FORMATS = ("merged", "gguf", "gguf-adapter", "ollama")
DEFAULT_TYPE = {"merged": "f32", "gguf": "f16", "gguf-adapter": "f32", "ollama": "f16"}
GGUF_TYPES = DIRECT_TYPES + tuple(LLAMA_CPP_TYPES)
VERIFICATION_FILE = "verification.json"


@dataclass
class ExportResult:
    format: str
    kind: str
    output: Path
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    seconds: float = 0.0
    verification: V.VerifyReport | None = None
    command: str | None = None  # what to run next (ollama create ..., llama-cli ...)
    # "4bit"/"8bit" for a QLoRA run: the export holds the adapter merged into the de-quantised
    # base weights it was trained against (the original base is not in it).
    qlora: str | None = None


@dataclass
class _Job:
    run_dir: Path
    name: str
    kind: str
    tmp: Path
    loaded: object  # afinar LoadedModel of the run (fp32, adapter merged)
    notify: Callable[[str], None]
    round_reference: bool = True
    converted_by: str | None = None  # GGUF formats: the llama.cpp version of the converter


def _check_type(fmt: str, kind: str) -> str:
    kind = kind.lower()
    allowed = {"merged": tuple(MERGED_TYPES), "gguf-adapter": ("f32", "f16")}.get(fmt, GGUF_TYPES)
    if kind not in allowed:
        raise AfinarError(f"--quant {kind} is not a type for --to {fmt}",
                          "use one of: " + ", ".join(allowed))
    return kind


def _run_dir(run: str) -> Path:
    from afinar.versions import registered_run

    path = registered_run(run) or Path(run)
    if not rundir.is_run_dir(path):
        raise AfinarError(f"{run}: not a run directory (or a version id/tag of one)",
                          "export takes what `afinar train` wrote: afinar export runs/NAME --to gguf")
    return path  # a run without trained weights is refused by load() (models/registry.py)


def _publish(tmp: Path, output: Path) -> None:
    """Atomically swaps the finished temporary folder into place."""
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(run: str, to: str = "gguf", quant: str | None = None, output: str | None = None,
           verify: bool = True, prompts: int = 8, exact_tokens: int = 32,
           max_new_tokens: int = 128, min_agreement: float | None = None,
           name: str | None = None, notify: Callable[[str], None] = print,
           round_reference: bool = True) -> ExportResult:
    """`round_reference=False` compares f16/bf16 files with the unrounded fp32 model (only for
    measuring what the rounding itself changes; exact agreement is then not expected)."""
    if to not in FORMATS:
        raise AfinarError(f"unknown export format {to!r}", "use one of: " + ", ".join(FORMATS))
    kind = _check_type(to, quant or DEFAULT_TYPE[to])
    run_dir = _run_dir(run)
    out = Path(output) if output else run_dir / "exports" / f"{to}-{kind}"
    name = name or run_dir.resolve().name
    started = time.time()

    from afinar.infer.generate import load

    notify(f"loading {run_dir} (base + adapter, merged in fp32)")
    loaded = load(str(run_dir), device="cpu", notify=notify)
    if to == "gguf-adapter" and loaded.resolved.adapter is None:
        raise AfinarError(f"{run_dir}: a full fine-tune has no adapter", "use --to gguf")
    qlora = _qlora(loaded)
    if qlora and to != "gguf-adapter":
        notify(merge_note(qlora))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    job = _Job(run_dir, name, kind, tmp, loaded, notify, round_reference)
    try:
        command, verifier = _WRITERS[to](job)
        report = None
        if verify:
            golden, source = V.golden_prompts(run_dir, prompts)
            notify(f"verifying on {len(golden)} golden prompts from the {source}")
            report = verifier(golden, exact_tokens, max_new_tokens, min_agreement)
            (tmp / VERIFICATION_FILE).write_text(json.dumps(report.to_dict(), indent=2,
                                                            ensure_ascii=False), encoding="utf-8")
            if not report.passed:
                failed = out.parent / f"{out.name}.verify-failed.json"
                shutil.copyfile(tmp / VERIFICATION_FILE, failed)
                report.saved_to = str(failed)
                raise V.VerificationFailed(f"the {to} {kind} export does not behave like the "
                                           "trained model: " + "; ".join(report.problems), report)
        _write_card(job, to, out, report, command)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        _publish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(to, kind, out, files, time.time() - started, report,
                        command(out) if command else None, qlora)


def _write_card(job: _Job, to: str, out: Path, report, command) -> None:
    """README.md, the export's model card (afinar.model_card); a card failure only warns."""
    from afinar.export.ollama import valid_model_name
    from afinar.model_card import ExportCard, try_write_card

    files = {p.name: p.stat().st_size for p in sorted(job.tmp.iterdir())
             if p.is_file() and not p.name.startswith(".")}
    try_write_card(job.run_dir, job.tmp, ExportCard(
        to, job.kind, out.resolve(), files, report.summary() if report else None,
        command(out.resolve()) if command else None, _qlora(job.loaded),
        valid_model_name(job.name) if to == "ollama" else None, job.converted_by),
        warn=job.notify)


def _qlora(loaded) -> str | None:
    quantization = loaded.resolved.quantization
    return None if quantization == "none" else quantization


# -- reference answers -------------------------------------------------------------------------
@torch.inference_mode()
def _reference(loaded, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The trained model's greedy answer, one prompt at a time (no padding to perturb it)."""
    out = loaded.model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=loaded.stop_ids,
        pad_token_id=loaded.tokenizer.pad_token_id)
    return cut_at_stop(out[0, len(prompt_ids):].tolist(), set(loaded.stop_ids))


@dataclass
class _ExportSide:
    """What the export did with the golden prompts: its own prompt ids for each conversation,
    its greedy answers to the trained prompt ids, and whether each stopped by itself."""
    prompt_ids: list[list[int]]
    answers: list[list[int]]
    stopped: list[bool]
    tokenizer_mismatches: list[str] = field(default_factory=list)
    # Teacher forcing (quantised types): the export's choice for each token of the trained
    # model's answer, given the same preceding tokens.
    forced: list[list[int]] | None = None
    chat_template_mismatches: list[str] = field(default_factory=list)
    tokenizer_probe_lead: str = ""  # verify.probe_lead


def _compare(job: _Job, engine: str, golden, exact_tokens, max_new_tokens, min_agreement,
             answer: Callable[[list[list[dict]], list[list[int]], list[list[int]] | None],
                              _ExportSide]) -> V.VerifyReport:
    exact = job.kind in V.EXACT_TYPES
    report = V.VerifyReport(job.kind, engine, exact, exact_tokens,
                            1.0 if exact else (V.default_min_agreement(job.kind)
                                               if min_agreement is None else min_agreement),
                            reference=V.reference_name(_qlora(job.loaded)))
    if job.kind in ("f16", "bf16") and job.round_reference:
        # A 16-bit file holds the trained weights rounded to 16 bits; its greedy answers are
        # compared with exactly that model (fp32 compute), so any difference left is the
        # conversion's fault. (bf16 keeps 8 bits of mantissa: the rounding alone changes a few
        # greedy tokens of a 135M model.) Rounding in place is safe: the writers are done.
        _round_weights(job.loaded.model, MERGED_TYPES[job.kind])
        report.reference = V.reference_name(_qlora(job.loaded),
                                            f"weights rounded to {job.kind}, fp32 compute")
    ours = [job.loaded.prompt_ids(conversation) for conversation in golden]
    job.notify(f"  the trained model answers {len(golden)} prompts")
    refs = [_reference(job.loaded, ids, max_new_tokens) for ids in ours]
    # The export's side in one go: llama.cpp runs in one child process. It is given the
    # conversations as the template accepts them (a system message joined to the first user
    # message where the template has no system role, as afinar's own encoder does).
    side = answer([job.loaded.encoder.renderable(c) for c in golden], ours,
                  None if exact else refs)
    report.tokenizer_mismatches = side.tokenizer_mismatches
    report.chat_template_mismatches = side.chat_template_mismatches
    report.tokenizer_probe_lead = side.tokenizer_probe_lead
    decode = lambda ids: job.loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    for k, conversation in enumerate(golden):
        ref, got = refs[k], side.answers[k]
        result = V.compare_answer(conversation[-1]["content"], ours[k] == side.prompt_ids[k], ref,
                                  got, exact_tokens, decode, side.stopped[k],
                                  forced=side.forced[k] if side.forced else None)
        if exact and result.agreed_tokens < result.compared_tokens:
            result.near_tie = V.tie_margin(job.loaded.model, ours[k], ref, got,
                                           result.agreed_tokens)
        report.prompts.append(result)
        tie = "" if result.near_tie is None else \
            f", then parted where the reference's margin was {result.near_tie:.1e} of its spread"
        forced = "" if result.forced_compared is None else \
            f"; teacher-forced {result.forced_agreed}/{result.forced_compared}"
        job.notify(f"  prompt {k + 1}/{len(golden)}: {result.agreed_tokens}/"
                   f"{result.compared_tokens} tokens agree{tie}{forced}"
                   + ("" if side.stopped[k] else " (did not stop)"))
    return V.judge(report)


@torch.no_grad()
def _round_weights(model, dtype: torch.dtype) -> None:
    for param in model.parameters():
        param.copy_(param.to(dtype).to(param.dtype))


# -- merged ------------------------------------------------------------------------------------
def _merged(job: _Job):
    job.notify(f"writing merged {job.kind} weights")
    write_merged(job.loaded, job.tmp, job.kind, _export_metadata(job))

    def verifier(golden, exact_tokens, max_new_tokens, min_agreement):
        runner = MergedRunner(job.tmp)

        def answer(conversations, prompt_ids, _references):  # merged types are all exact
            answers = [runner.greedy(ids, max_new_tokens) for ids in prompt_ids]
            return _ExportSide([runner.prompt_ids(c) for c in conversations], answers,
                               [bool(a) and a[-1] in runner.stop_ids for a in answers])
        return _compare(job, "transformers", golden, exact_tokens, max_new_tokens, min_agreement,
                        answer)
    return None, verifier


# -- gguf --------------------------------------------------------------------------------------
def _export_metadata(job: _Job) -> dict[str, str]:
    """What an export records of its run (GGUF keys afinar.*, the merged folder's afinar.json)."""
    qlora = _qlora(job.loaded)
    meta = {"run": job.run_dir.resolve().name,
            "base_model": job.loaded.resolved.base_spec,
            "data_sha256": rundir.read_run_info(job.run_dir).get("data_sha256"),
            "merged_into": qlora and f"de-quantised {qlora} base weights (QLoRA run)"}
    return {k: str(v) for k, v in meta.items() if v}


def _gguf_metadata(job: _Job) -> dict[str, str]:
    return {f"afinar.{k}": v for k, v in _export_metadata(job).items()}


def _write_provenance(job: _Job) -> None:
    """afinar.json beside a GGUF: the run it came from and the llama.cpp that converted it."""
    meta = {**_export_metadata(job), "converted_by": job.converted_by}
    (job.tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")


def _write_gguf_file(job: _Job) -> Path:
    """The run's merged model as `job.kind` GGUF: llama.cpp's converter writes f32/f16/bf16/q8_0
    itself; smaller types are quantised by llama.cpp from its f32 file."""
    check_model_config(job.loaded.model.config)
    job.converted_by = find_converter().version  # a missing converter is said before any work
    path = job.tmp / f"{job.name}-{job.kind}.gguf"
    direct = job.kind in DIRECT_TYPES
    converted = path if direct else job.tmp / f".{job.name}-f32.gguf"
    source = job.tmp / ".merged-f32"
    job.notify("writing the merged weights (f32) for llama.cpp's converter")
    converter_folder(job.loaded.model, job.loaded.tokenizer, job.loaded.stop_ids, source,
               job.loaded.resolved)
    convert_model(source, converted, job.kind if direct else "f32", _gguf_metadata(job),
                  job.notify, name=job.name)
    shutil.rmtree(source)  # before quantising: the disk holds one f32 copy at a time
    if not direct:
        job.notify(f"quantising to {job.kind} with llama.cpp")
        quantize_with_llama_cpp(converted, path, job.kind, notify=job.notify)
        converted.unlink()
    _write_provenance(job)
    return path


def _llama_verifier(job: _Job, model_path: Path, lora: Path | None = None):
    def verifier(golden, exact_tokens, max_new_tokens, min_agreement):
        from afinar.export.llama_child import run_llama_task
        from afinar.export.llama_runner import require_llama_cpp

        require_llama_cpp()
        tok = job.loaded.tokenizer

        def answer(conversations, prompt_ids, references):
            texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations]
            what = (f"verifying {model_path.name} ({job.kind})" if lora is None else
                    f"verifying the adapter {lora.name} ({job.kind})")
            checks = V.llama_checks(job.loaded)  # tokenizer probes, the file's chat template
            done = run_llama_task({"task": "answer", "model": str(model_path),
                                   "lora": str(lora) if lora else None, "texts": texts,
                                   **checks.task(), "prompt_ids": prompt_ids,
                                   "forced_answers": references,
                                   "max_new_tokens": max_new_tokens}, what, job.notify)
            mismatches, chat_mismatches = checks.mismatches(done)
            return _ExportSide(done["texts"], done["answers"], done["stopped"], mismatches,
                               done["forced"] if references is not None else None,
                               chat_mismatches, checks.lead)
        return _compare(job, "llama.cpp", golden, exact_tokens, max_new_tokens, min_agreement,
                        answer)
    return verifier


def _gguf(job: _Job):
    path = _write_gguf_file(job)
    return (lambda out: f"llama-cli -m {shlex.quote(str(out / path.name))} -cnv",
            _llama_verifier(job, path))


def _gguf_adapter(job: _Job):
    from transformers import AutoConfig

    resolved = job.loaded.resolved
    config = AutoConfig.from_pretrained(resolved.base)
    check_model_config(config)
    job.converted_by = find_converter().version
    path = job.tmp / f"{job.name}-lora-{job.kind}.gguf"
    with tempfile.TemporaryDirectory(prefix="afinar-adapter-") as scratch:
        adapter = adapter_for_llama_cpp(resolved.adapter, config, Path(scratch))
        if adapter != resolved.adapter:
            job.notify("rsLoRA adapter: its alpha is written as alpha x sqrt(r), so that "
                       "llama.cpp's alpha / r scaling gives rsLoRA's alpha / sqrt(r)")
        base_config = Path(scratch) / "base-config"  # the converter needs only config.json
        config.save_pretrained(base_config)
        convert_adapter(adapter, base_config, path, job.kind, _gguf_metadata(job), job.notify)
    _write_provenance(job)
    if resolved.merged_adapters:
        job.notify("this run trained on top of another run's model: the adapter applies to "
                   "that model's merged weights (export it with --to gguf and use it as BASE), "
                   "not to the original base")
    qlora = _qlora(job.loaded)
    if qlora:
        job.notify(f"QLoRA run: this adapter was trained against the de-quantised {qlora} base "
                   "weights; on the original base GGUF it answers close to the trained model, "
                   "not exactly like it (--to gguf or --to merged hold the exact weights). It is "
                   "verified on the de-quantised base.")

    def verifier(golden, exact_tokens, max_new_tokens, min_agreement):
        # llama.cpp needs the base model as GGUF to apply the adapter to: an f32 one, outside
        # the output folder (users bring their own base GGUF). For a QLoRA run, the base the
        # adapter was trained against.
        from afinar.models.load import load_inference_base

        with tempfile.TemporaryDirectory(prefix="afinar-base-") as scratch:
            base = load_inference_base(resolved)
            folder = converter_folder(base, job.loaded.tokenizer, job.loaded.stop_ids,
                                Path(scratch) / "base", resolved)
            del base
            base_path = convert_model(folder, Path(scratch) / "base-f32.gguf", "f32",
                                      {"afinar.run": f"{job.name} (base, for verification)"},
                                      job.notify)
            shutil.rmtree(folder)
            return _llama_verifier(job, base_path, lora=path)(golden, exact_tokens,
                                                              max_new_tokens, min_agreement)
    return (lambda out: f"llama-cli -m BASE.gguf --lora {shlex.quote(str(out / path.name))} -cnv",
            verifier)


def _ollama(job: _Job):
    from afinar.export import ollama

    # Fails before anything is written: no hand-written TEMPLATE needed to learn that.
    check_model_config(job.loaded.model.config)
    pieces = ollama.template_pieces(job.loaded.tokenizer, prepare=job.loaded.encoder.renderable)
    path = _write_gguf_file(job)
    tok = job.loaded.tokenizer
    stops = sorted({tok.convert_ids_to_tokens(i) for i in job.loaded.stop_ids})
    # Ollama adds BOS itself when the GGUF says so: a BOS written by the template too would
    # double it (afinar's own encoder drops the duplicate; Ollama would not).
    doubled = bool(adds_special(tok, tok.bos_token_id) and tok.bos_token
                   and pieces.always_prefix.startswith(tok.bos_token))
    (job.tmp / "Modelfile").write_text(
        ollama.modelfile(path.name, pieces, stops, None, run=str(job.run_dir.resolve()),
                         include_always_prefix=not doubled), encoding="utf-8")
    model_name = ollama.valid_model_name(job.name)
    (job.tmp / "README.txt").write_text(
        f"Made by afinar from the run {job.run_dir.resolve()}.\nTo use it with Ollama, run in "
        f"this folder:\n\n  ollama create {model_name} -f Modelfile\n  ollama run {model_name}\n"
        + (_AMX_ADVICE if job.kind not in ("f32", "f16", "bf16") else ""), encoding="utf-8")
    return (lambda out: ollama.create_command(out, model_name)), _llama_verifier(job, path)


# What a user can do when their own llama.cpp or Ollama crashes on this file (README.txt).
_AMX_ADVICE = """
If it crashes
-------------
If Ollama or llama.cpp dies with a segmentation fault when it loads or first answers with this
model, and the CPU has AMX (Intel Xeon 4th generation or newer: `lscpu` lists amx_tile and
amx_int8), the cause is llama.cpp's AMX kernels for quantised weights (ggml-org/llama.cpp#20824),
not this file. afinar verified it with those kernels turned off. Any one of these avoids them:

- llama.cpp (llama-cli, llama-server): add --no-repack (short: -nr).
- Ollama on Linux: it picks the CPU library libggml-cpu-sapphirerapids.so on such CPUs. Move that
  file out of Ollama's library folder (/usr/lib/ollama or /usr/local/lib/ollama) and restart
  Ollama: it falls back to the next CPU library, which is slower but does not crash.
- Export an unquantised type, which does not use those kernels:
  afinar export RUN --to ollama --quant f16   (or bf16)
"""


_WRITERS = {"merged": _merged, "gguf": _gguf, "gguf-adapter": _gguf_adapter, "ollama": _ollama}
