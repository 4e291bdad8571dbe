"""The `afinar` command. Each command parses its options, calls one library function, prints.

No command holds logic of its own: the server and the Python API call the same functions.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer

from afinar.cli_data import data_app
from afinar.cli_models import models_app
from afinar.cli_plan import plan as plan_command
from afinar.console import TrainProgress, console, out, print_issues, user_errors
from afinar.errors import AfinarError
from afinar.models.registry import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs from a JSONL file: validate, train, evaluate, keep "
                  "versions, chat, generate.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.command("plan")(plan_command)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _notify(message: str) -> None:
    console.print(f"[dim]{message}[/]")


@app.command()
@user_errors
def validate(
    path: Path = typer.Argument(..., help="Data file (.jsonl)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer counts the tokens."),
    format: Optional[str] = typer.Option(None, help="Force a format instead of detecting it."),
    max_seq_length: int = typer.Option(1024, help="Report examples longer than this."),
    tokens: bool = typer.Option(True, help="Compute token statistics (loads the tokenizer)."),
    held_out_fraction: float = typer.Option(0.2, help="Share held out by `afinar train`."),
    seed: int = typer.Option(42, help="Seed of the train/held-out split."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check a data file: every problem as PATH:LINE: field: message, then a report."""
    from afinar.data.validate import load_examples

    report = load_examples(path, format)
    if tokens and report.examples:
        _quiet_libraries()
        from afinar.data.formats import format_family
        from afinar.data.prepare import describe_data, encode_for
        from afinar.data.tokenize import ChatEncoder
        from afinar.models.load import load_tokenizer, stop_token_ids
        from afinar.models.registry import resolve_model

        resolved = resolve_model(model, notify=_notify)
        tokenizer = load_tokenizer(resolved.tokenizer_source)
        encoded = encode_for(report.examples, ChatEncoder(tokenizer, stop_token_ids(tokenizer)),
                             pairs=format_family(report.format) == "preference")
        describe_data(report, encoded, max_seq_length, "truncate")
    elif report.examples:
        from afinar.data.consistency import add_to_report

        add_to_report(report)
    if report.examples:
        from afinar.data.split import split_report

        report.stats["split"] = split_report(report.examples, held_out_fraction, seed)
    if as_json:
        out.print_json(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print_issues(report.issues)
        _print_data_report(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_data_report(report) -> None:
    verdict = "[green]usable[/]" if report.ok else "[red]not usable[/]"
    out.print(f"{report.path}: {len(report.examples)} examples, format {report.format}, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings: {verdict}")
    s = report.stats
    if s.get("examples"):
        out.print(f"  tokens per example: min {s['tokens_min']}, median {s['tokens_median']}, "
                  f"p95 {s['tokens_p95']}, max {s['tokens_max']} (total {s['tokens_total']})")
        out.print(f"  supervised (trained) tokens: {s['supervised_tokens']} "
                  f"({s['supervised_share']:.0%})")
        out.print(f"  longer than {s['max_seq_length']} tokens: {s['over_max_seq_length']} "
                  f"(will be {s['over_max_action']})")
    if "split" in s:
        out.print(f"  train / held out: {s['split']['train']} / {s['split']['held_out']} "
                  f"({s['split']['method']}; `afinar train --validation-data` uses a file instead)")
    if pref := s.get("preference"):
        out.print(f"  answers, chosen vs rejected: {pref['chosen_answer_tokens_mean']:.0f} vs "
                  f"{pref['rejected_answer_tokens_mean']:.0f} tokens on average; chosen longer in "
                  f"{pref['chosen_longer_share']:.0%} of pairs, shorter in "
                  f"{pref['chosen_shorter_share']:.0%}")
        out.print(f"  pairs over max_seq_length: {pref['pairs_prompt_truncated']} keep their answers "
                  f"with the prompt cut from its start, {pref['pairs_dropped_by_length']} dropped "
                  "(answers alone too long)")
        if pref.get("length_warning"):
            out.print(f"  [yellow]warning[/]: {pref['length_warning']}")
    elif (shape := s.get("format")) and shape.get("one_format"):
        from afinar.data.prepare import one_format_warning

        out.print(f"  [yellow]warning[/]: {one_format_warning(shape, preserve=True)} "
                  "(preserve is on by default for LoRA)")
    if c := s.get("consistency"):
        out.print(f"  answer length: median {c['answer_words_median']:g} words (middle half "
                  f"{c['answer_words_p25']:g}-{c['answer_words_p75']:g}, range "
                  f"{c['answer_words_min']}-{c['answer_words_max']}); commonest shape "
                  f"{c['dominant_answer_shape']!r} in {c['dominant_shape_share']:.0%}")
    for advice in s.get("advice", []):
        out.print(f"  [cyan]advice[/]: {advice}")
    if "duplicate_groups" in s:
        out.print(f"  exact duplicates: {len(s['duplicate_groups'])} group(s)"
                  + (f", lines {s['duplicate_groups'][:5]}" if s["duplicate_groups"] else ""))
        out.print(f"  contradictions (same prompt, different answers): "
                  f"{len(s['contradiction_groups'])}"
                  + (f", lines {s['contradiction_groups'][:5]}" if s["contradiction_groups"]
                     else ""))


@app.command()
@user_errors
def train(
    data: Optional[str] = typer.Option(None, help="Training data (.jsonl)."),
    model: Optional[str] = typer.Option(None, help=f"Base model (default {DEFAULT_MODEL})."),
    output: Optional[str] = typer.Option(None, help="Run directory (default runs/<data>-<time>)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting: key=value, e.g. "
                                   "lora.r=8 (repeatable)."),
    validation_data: Optional[str] = typer.Option(None, help="Held-out file instead of a split."),
    method: Optional[str] = typer.Option(None, help="What to optimise: sft (default), dpo or "
                                         "orpo (preference pairs; the `objective` setting), or "
                                         "which weights train: lora (default) or full."),
    epochs: Optional[str] = typer.Option(None, help="Epochs, or auto."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run directory."),
    checks: Optional[str] = typer.Option(None, help="Checks file (YAML) for the final "
                                         "evaluation: format regexes, JSON schemas, topics."),
    evaluate: Optional[bool] = typer.Option(None, "--eval/--no-eval", help="Evaluate base vs "
                                            "tuned on the held-out data at the end (default on)."),
    tune: Optional[bool] = typer.Option(None, "--tune/--no-tune", help="First search learning "
                                        "rate and epochs (those left auto) with a few short runs "
                                        "scored on part of the training data (default off)."),
):
    """Fine-tune a model (LoRA by default), evaluate it against its base, write a run directory."""
    from afinar.config import load_train_config, method_option

    _quiet_libraries()
    from afinar.train.loop import train as run_training

    if resume is not None:
        from afinar import rundir

        cfg_file = resume / rundir.CONFIG_FILE
        if not cfg_file.is_file():
            raise AfinarError(f"{resume}: not a run directory (no {rundir.CONFIG_FILE})")
        cfg = load_train_config(cfg_file, set_, anchor_paths=False)
        cfg = cfg.model_copy(update={"output": str(resume), **(
            {"evaluate": evaluate} if evaluate is not None else {})})
    else:
        values = {"data": data, "model": model, "output": output,
                  "validation_data": validation_data, "checks": checks, "evaluate": evaluate,
                  "tune": tune, **method_option(method),
                  "epochs": (epochs if epochs in (None, "auto") else _int(epochs, "--epochs"))}
        cfg = load_train_config(config, set_, **values)
    progress = TrainProgress()
    result = run_training(cfg, on_event=progress, resume=resume is not None)
    if result.is_main_process:
        if result.report is not None:
            _print_report(result.report)
        _print_summary(result.run_dir, result.summary)


def _print_report(report) -> None:
    from rich.markdown import Markdown

    out.print(Markdown(report.markdown))
    out.print(f"Report: {report.output / 'report.html'}")


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AfinarError(f"{name}: expected a number or auto, got {value!r}") from None


def _print_summary(run_dir, s: dict) -> None:
    best = (f"best held-out loss {s['best_eval_loss']:.4f} at step {s['best_step']}"
            if s.get("best_eval_loss") is not None else "no held-out data")
    out.print(f"[green]done[/] {s['steps']} steps in {s['train_seconds']:.0f} s, "
              f"{s['tokens_per_s']:.0f} tokens/s, peak memory {s['peak_memory_mb']:.0f} MB; "
              f"{best}" + (" (stopped early)" if s.get("stopped_early") else ""))
    out.print(f"Talk to it: afinar chat {run_dir}")


def _settings(max_tokens: int, temperature: float, top_p: float):
    from afinar.infer.generate import GenerationSettings

    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise AfinarError("need temperature >= 0, 0 < top-p <= 1 and max-tokens >= 1")
    return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)


@app.command()
@user_errors
def chat(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model name/path or a run directory."),
    system: Optional[str] = typer.Option(None, help="System message for the conversation."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default); higher = more varied."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
):
    """Talk to a model or a trained run. /reset clears the conversation, /exit quits."""
    _quiet_libraries()
    from afinar.infer.generate import load

    settings = _settings(max_tokens, temperature, top_p)
    loaded = load(model, notify=_notify)
    console.print(f"[dim]{loaded.name} ready. /reset clears, /exit or Ctrl-D quits.[/]")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            text = console.input("[bold cyan]> [/]")
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(start)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in loaded.stream(history, settings):
            pieces.append(piece)
            out.print(piece, end="", soft_wrap=True)
        out.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


@app.command()
@user_errors
def generate(
    model: str = typer.Argument(..., help="Model name/path or a run directory."),
    input: Path = typer.Option(..., "--input", "-i", help="Conversations (.jsonl)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the answers."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    batch_size: int = typer.Option(8, help="Prompts generated together."),
):
    """Answer every conversation of a file (a trailing assistant turn is replaced)."""
    _quiet_libraries()
    from rich.progress import Progress

    from afinar.infer.generate import generate_file, load

    settings = _settings(max_tokens, temperature, top_p)
    loaded = load(model, notify=_notify)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generating", total=None)
        count = generate_file(loaded, str(input), str(output), settings, batch_size,
                              lambda done, total: bar.update(task, completed=done, total=total))
    out.print(f"wrote {count} answers to {output}")


@app.command()
@user_errors
def demo(
    output: Optional[str] = typer.Option(None, help="Run directory (default runs/demo-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a training setting."),
):
    """The quickstart: tune the embedded model on the bundled Spanish triage data, compare."""
    _quiet_libraries()
    from rich.table import Table

    from afinar.demo import run_demo

    output = output or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}"
    result = run_demo(output, on_event=TrainProgress(), overrides=set_)
    _print_report(result.report)
    _print_summary(result.run_dir, result.train_summary)
    table = Table(title="Held-out prompts: base vs tuned", show_lines=True, expand=True)
    for name in ("prompt", "base model", "tuned model"):
        table.add_column(name, ratio=1, overflow="fold")
    rows = result.report.data["examples"]
    triage = [r for r in rows if any("Ferrolux" in m["content"] for m in r["prompt"]
                                     if m["role"] == "system")]
    shown = triage[:4] + [r for r in rows if r not in triage][:2]
    for row in shown:
        table.add_row(row["prompt"][-1]["content"], row["baseline"]["answer"],
                      row["model"]["answer"])
    out.print(table)
    (base_fmt, tuned_fmt), (base_leak, tuned_leak) = result.adherence, result.leak
    out.print(f"Format adherence on {len(triage)} held-out triage prompts: base "
              f"{base_fmt:.0%}, tuned [bold]{tuned_fmt:.0%}[/]")
    out.print(f"Format leaking into {len(rows) - len(triage)} ordinary prompts: base "
              f"{base_leak:.0%}, tuned {tuned_leak:.0%}")
    out.print(f"Try it: .venv/bin/afinar chat {result.run_dir} --system \"Eres el asistente de "
              "soporte de Ferrolux, una tienda online de electrodomésticos.\"")
    out.print(f"Export it: .venv/bin/afinar export {result.run_dir} --to ollama --quant q8_0")


@app.command("eval")
@user_errors
def eval_(
    model: str = typer.Argument(..., help="A run directory, or any model name/path."),
    data: Optional[str] = typer.Option(None, help="Held-out data (.jsonl); default: a run's "
                                       "own held-out split."),
    baseline: str = typer.Option("auto", help="Model to compare with: auto (a run's base "
                                 "model), none, a model name/path/run, or fewshot[:K] (the "
                                 "base model prompted with K training examples, default 5; "
                                 "report in RUN/eval-fewshotK)."),
    output: Optional[str] = typer.Option(None, help="Report folder (default: the run directory)."),
    checks: Optional[str] = typer.Option(None, help="Checks file (YAML); default: the run's."),
    probes: bool = typer.Option(True, help="Also compare answers to bundled general prompts."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest answer (default: from the "
                                             "references' lengths)."),
    batch_size: int = typer.Option(32, help="Prompts generated together (CPU decoding is "
                                   "bound by reading the weights: bigger batches are cheaper)."),
    cache: bool = typer.Option(True, help="Reuse greedy answers an earlier evaluation "
                               "generated with the same weights, prompt and settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Measure a model or run on held-out data against its base: loss, answers, checks."""
    _quiet_libraries()
    from afinar.console import EvalProgress
    from afinar.evaluation.evaluator import evaluate

    if max_tokens is not None and max_tokens < 1:
        raise AfinarError("--max-tokens must be at least 1")
    report = evaluate(model, data=data, baseline=baseline, output=output, checks=checks,
                      probes=probes, max_new_tokens=max_tokens, batch_size=batch_size,
                      use_cache=cache, on_event=EvalProgress(), notify=_notify)
    if as_json:
        out.print_json(data=report.summary)
    else:
        _print_report(report)


@app.command()
@user_errors
def export(
    run: str = typer.Argument(..., help="A run directory, or a version id/tag of one."),
    to: str = typer.Option("gguf", "--to", help="merged | gguf | gguf-adapter | ollama"),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="merged: f32/f16/bf16 (default f32). gguf/ollama: f32, f16 "
        "(default), bf16, q8_0, or q4_k_m, q5_k_m, q6_k... (llama.cpp's quantiser). "
        "gguf-adapter: f32 (default) or f16."),
    output: Optional[str] = typer.Option(None, help="Output folder (default: "
                                         "RUN/exports/FORMAT-TYPE)."),
    verify: bool = typer.Option(True, help="Check the export answers golden held-out prompts "
                                "like the trained model (same prompt ids, same greedy tokens)."),
    prompts: int = typer.Option(8, help="Golden prompts to verify with."),
    exact_tokens: int = typer.Option(32, help="Tokens of each answer compared; f32/f16/bf16 "
                                     "must agree exactly on them."),
    min_agreement: Optional[float] = typer.Option(None, help="Quantised types: the share of "
                                                  "the trained answers' tokens the export must "
                                                  "choose too, teacher-forced (default by type: "
                                                  "q8_0 0.9, q6/q5 0.85, q4 0.7, else 0.5)."),
    name: Optional[str] = typer.Option(None, help="Model name in the files (default: the "
                                       "run's folder name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Export a run as merged weights, GGUF, a GGUF LoRA adapter or an Ollama folder, verified."""
    _quiet_libraries()
    from afinar.export import export as run_export
    from afinar.export.verify import VerificationFailed

    if prompts < 1 or exact_tokens < 1:
        raise AfinarError("--prompts and --exact-tokens must be at least 1")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise AfinarError("--min-agreement is a share between 0 and 1, e.g. 0.8")
    try:
        result = run_export(run, to=to, quant=quant, output=output, verify=verify,
                            prompts=prompts, exact_tokens=exact_tokens,
                            min_agreement=min_agreement, name=name, notify=_notify)
    except VerificationFailed as exc:
        for line in exc.report.lines():
            console.print(line)
        raise
    if as_json:
        out.print_json(data={
            "format": result.format, "type": result.kind, "output": str(result.output),
            "files": result.files, "seconds": round(result.seconds, 1), "command": result.command,
            "verification": result.verification.summary() if result.verification else None})
        return
    if result.verification:
        for line in result.verification.lines():
            console.print(line)
    else:
        console.print("[yellow]not verified (--no-verify)[/]")
    for file, size in result.files.items():
        console.print(f"  {result.output / file}  {size / 1e6:.1f} MB")
    console.print(f"[green]exported[/] {result.format} {result.kind} to {result.output} in "
                  f"{result.seconds:.0f} s")
    if result.command:
        console.print(f"next: {result.command}")


@app.command()
@user_errors
def card(
    run: str = typer.Argument(..., help="A run directory, or a version id/tag of one."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the card to this "
                                          "file (e.g. RUN/README.md) instead of printing it."),
):
    """The run's model card (README.md in the Hugging Face convention): base, data, settings,
    results, base vs tuned, known leaks, license."""
    from afinar.model_card import render_card
    from afinar.rundir import write_text_atomic
    from afinar.versions import registered_run

    text = render_card(registered_run(run) or Path(run))
    if output is None:
        print(text, end="")
        return
    write_text_atomic(output, text)
    console.print(f"wrote {output}")


@app.command()
@user_errors
def serve(
    host: Optional[str] = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Server settings (YAML): "
                                          "api_keys, models, concurrent_jobs, max_upload_mb..."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Training jobs run at once."),
):
    """OpenAI-compatible API: files, fine-tuning jobs, chat completions, models (/v1)."""
    _quiet_libraries()
    import uvicorn

    from afinar.serve.app import create_app
    from afinar.serve.settings import LOOPBACK, load_serve_settings

    settings = load_serve_settings(config, host=host, port=port, concurrent_jobs=jobs)
    if not settings.keys():
        if settings.host not in LOOPBACK:
            console.print(f"[yellow]no API keys configured: listening on 127.0.0.1 only, not "
                          f"{settings.host}[/] (set AFINAR_API_KEYS or api_keys to open it up)")
        else:
            console.print("[dim]no API keys configured: loopback only; any key is accepted[/]")
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    console.print(f"afinar serving OpenAI's API at http://{settings.host}:{settings.port}/v1 "
                  f"(state: {settings.state_dir()}, {settings.concurrent_jobs} training worker"
                  f"{'s' if settings.concurrent_jobs > 1 else ''})")
    uvicorn.run(create_app(settings, str(config) if config else None), host=settings.host,
                port=settings.port, log_level="warning")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
