"""Model cards: a README.md in the Hugging Face convention for every run and every export.

    text = render_card("runs/soporte")                 # the run's card, as a string
    write_card("runs/soporte", "runs/soporte")         # RUN/README.md (train and eval do this)
    write_card(run, tmp_folder, export=ExportCard(...))  # an export's card (the exporter does this)
    afinar card RUN [--output FILE]

A card is rebuilt from what the run directory holds (run.json, config.yaml, data_report.json,
report.json) and, for an export, from what the exporter verified. Nothing in it is typed by hand,
so it is regenerated after training, after `afinar eval` and for each export; a number that is not
known yet is said to be unknown, never left out. A run.json or report.json that cannot be read
raises AfinarError: a card must not claim "not evaluated" over a damaged report. Callers that
write cards as a side effect (train, eval, export) catch that and only warn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from afinar import rundir
from afinar.errors import AfinarError
from afinar.evaluation.formatting import fmt_value, label
from afinar.evaluation.report_md import metrics_table

CARD_FILE = "README.md"
REPORT_FILE = "report.json"
UNKNOWN_LICENSE = "unknown — check the base model's license"


@dataclass
class ExportCard:
    """What an export holds and how it was verified, for its card."""
    format: str  # merged | gguf | gguf-adapter | ollama
    kind: str  # f32, f16, q8_0...
    folder: Path  # where the export is published (the card is written before that)
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    verification: dict | None = None  # VerifyReport.summary(); None: not verified
    command: str | None = None  # what to run next (llama-cli ..., ollama create ...)
    qlora: str | None = None
    model_name: str | None = None  # the Ollama model name
    converted_by: str | None = None  # GGUF: the llama.cpp (converter) version that wrote it


@dataclass
class _Base:
    spec: str  # as the run's config names it
    hub_id: str | None
    license: str | None
    license_source: str
    description: str
    chain: list[str] = field(default_factory=list)  # runs stacked in between, oldest first


# --- public ------------------------------------------------------------------------------------

def write_card(run_dir: str | Path, dest_folder: str | Path, export: ExportCard | None = None
               ) -> Path:
    """Renders the card and writes DEST/README.md atomically; returns its path."""
    path = Path(dest_folder) / CARD_FILE
    rundir.write_text_atomic(path, render_card(run_dir, export))
    return path


def try_write_card(run_dir: str | Path, dest_folder: str | Path,
                   export: ExportCard | None = None, warn=print) -> Path | None:
    """`write_card` for train, eval and export: a card failure is only a warning, never the
    failure of the run or export it describes."""
    try:
        return write_card(run_dir, dest_folder, export)
    except Exception as exc:  # noqa: BLE001 - whatever breaks here, the weights are fine
        message = exc.message if isinstance(exc, AfinarError) else f"{type(exc).__name__}: {exc}"
        warn(f"could not write the model card {Path(dest_folder) / CARD_FILE}: {message} "
             f"(retry with `afinar card {run_dir} --output FILE`)")
        return None


def render_card(run_dir: str | Path, export: ExportCard | None = None) -> str:
    run = Path(run_dir)
    if not rundir.is_run_dir(run):
        raise AfinarError(f"{run}: not a run directory", "a card describes what `afinar train` "
                          "wrote: afinar card runs/NAME")
    info = _read_json(run / rundir.RUN_FILE) or {}
    config = _read_yaml(run / rundir.CONFIG_FILE)
    data = _read_json(run / rundir.DATA_REPORT, strict=False) or {}
    report = _read_json(run / REPORT_FILE)
    base = _base_info(str(config.get("model") or info.get("base_model") or "unknown"))
    name = run.resolve().name
    parts = [_front_matter(name, info, config, base, report, export), _intro(
        name, run, info, config, base, data, export)]
    parts += [_data_section(info, config, data), _method_section(run, config),
              _results_section(info), _eval_section(run, report),
              _limits_section(run, report, data, config), _use_section(data, info),
              _how_to_section(run, info, config, export)]
    if export is not None:
        parts.append(_verification_section(export))
    parts.append(_license_section(base))
    return "\n".join(p.rstrip() + "\n" for p in parts)


# --- reading -----------------------------------------------------------------------------------

def _read_json(path: Path, strict: bool = True) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        if not strict:
            return None
        raise AfinarError(f"{path}: cannot be read ({exc})", "re-run the step that wrote it "
                          "(`afinar eval RUN` for report.json)") from None


def _read_yaml(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, yaml.YAMLError) as exc:
        raise AfinarError(f"{path}: cannot be read ({exc})") from None
    return loaded if isinstance(loaded, dict) else {}


def _base_info(spec: str, depth: int = 0) -> _Base:
    """The root base model's name, hub id and license: the registry entry, else what the folder
    or GGUF file says about itself. A run used as a base is followed to its own base."""
    from afinar.models.registry import BASE_MODELS

    if spec in BASE_MODELS:
        entry = BASE_MODELS[spec]
        return _Base(spec, entry.hub_id, entry.license, "afinar's base-model registry",
                     entry.description)
    path = Path(spec).expanduser()
    if depth < 8 and path.is_dir() and rundir.is_run_dir(path):
        parent = _read_yaml(path / rundir.CONFIG_FILE).get("model") or "unknown"
        base = _base_info(str(parent), depth + 1)
        base.chain.append(str(path))
        return base
    license, source = None, ""
    if path.is_dir():
        front = _front_matter_of(path / CARD_FILE)
        license, source = front.get("license"), f"{path / CARD_FILE}"
    elif path.is_file() and path.suffix.lower() == ".gguf":
        license, source = _gguf_license(path), f"{path.name} (general.license)"
    hub_id = spec if spec.count("/") == 1 and not path.exists() and not spec.startswith(
        (".", "/", "~")) else None
    return _Base(spec, hub_id, str(license) if license else None, source if license else "",
                 "a local model folder" if path.is_dir() else "a local GGUF file"
                 if path.is_file() else "a Hugging Face hub id" if hub_id else "")


def _front_matter_of(readme: Path) -> dict:
    try:
        text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
        if text.startswith("---"):
            loaded = yaml.safe_load(text.split("---", 2)[1])
            return loaded if isinstance(loaded, dict) else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, IndexError):
        pass
    return {}


def _gguf_license(path: Path) -> str | None:
    try:
        import gguf

        found = gguf.GGUFReader(str(path)).fields.get("general.license")
        return bytes(found.parts[found.data[0]]).decode() if found else None
    except Exception:  # noqa: BLE001 - a license we cannot read is an unknown license
        return None


# --- sections ----------------------------------------------------------------------------------

def _front_matter(name, info, config, base: _Base, report, export) -> str:
    method, objective = config.get("method", "lora"), config.get("objective", "sft")
    tags = ["afinar", method, objective]
    if method == "lora" and (config.get("lora") or {}).get("dora"):
        tags.append("dora")
    if (config.get("quantization") or "none") != "none":
        tags.append("qlora")
    if export is None:
        library = "peft" if (info.get("weights") or "adapter") == rundir.ADAPTER_DIR and \
            method == "lora" else "transformers"
    else:
        library = "transformers" if export.format == "merged" else "gguf"
        tags += ["merged" if export.format == "merged" else "gguf", export.kind]
        if export.format == "ollama":
            tags.append("ollama")
    meta = {"base_model": base.hub_id or base.spec, "library_name": library,
            "license": base.license or "unknown", "pipeline_tag": "text-generation",
            "tags": list(dict.fromkeys(tags))}
    metrics = [{"name": label(m["name"]), "type": m["name"], "value": m["model"]}
               for m in (report or {}).get("metrics", []) if m.get("model") is not None]
    if metrics:
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"name": report["data"]["source"], "type": "afinar-held-out"},
            "metrics": metrics}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---"


def _method_text(config: dict) -> str:
    method, objective = config.get("method", "lora"), config.get("objective", "sft")
    lora = config.get("lora") or {}
    quant = config.get("quantization") or "none"
    if method == "lora":
        what = ("QLoRA (" + quant + " base) " if quant != "none" else "") + \
            ("DoRA" if lora.get("dora") else "LoRA") + \
            f" (r {lora.get('r', '?')}, alpha {lora.get('alpha', '?')})"
    else:
        what = "full fine-tuning"
    return f"{what}, objective {objective.upper()}"


def _intro(name, run, info, config, base: _Base, data, export) -> str:
    examples = (data.get("stats") or {}).get("examples") or data.get("examples")
    named = f"afinar's `{base.spec}`: " if base.hub_id and base.spec != base.hub_id else ""
    base_text = f"`{base.hub_id or base.spec}`" + (f" — {named}{base.description} —"
                                                    if base.description else "")
    chain = "".join(f", continued by the run `{c}`" for c in base.chain)
    data_file = Path(str(info.get("data") or config.get("data") or "?")).name
    lines = [f"# {name}", "",
             f"A fine-tune of {base_text}{chain}, trained by afinar with {_method_text(config)} on "
             + (f"{examples} examples of " if examples else "") + f"`{data_file}`."]
    if export is not None:
        lines += ["", f"This folder is its **{export.format}** export ({export.kind})"
                  + (f", the adapter merged into the de-quantised {export.qlora} base weights it "
                     "was trained against" if export.qlora and export.format != "gguf-adapter"
                     else "") + f", made from the run `{run.resolve()}`."]
    status = info.get("status", "unknown")
    if status != "succeeded":
        lines += ["", f"**The run's status is {status}**: its weights may not be final."]
    lines += ["", "_afinar writes this card after training, evaluation and each export; edit a "
              "copy, or edit it after the last of those._"]
    return "\n".join(lines)


def _data_section(info, config, data) -> str:
    stats, split = data.get("stats") or {}, data.get("split") or {}
    size = info.get("data_size")
    rows = [("file", f"`{info.get('data') or config.get('data') or 'unknown'}`"),
            ("format", data.get("format") or config.get("format") or "unknown"),
            ("examples", str(stats.get("examples") or data.get("examples") or "unknown")
             + (f" ({split['train']} trained on, {split['held_out']} held out: "
                f"{split.get('method', '')})" if "train" in split and "held_out" in split
                else "")),
            ("size", f"{size:,} bytes" if isinstance(size, int) else "unknown"),
            ("sha256", f"`{info['data_sha256']}`" if info.get("data_sha256") else "unknown")]
    if stats.get("tokens_total"):
        rows.append(("tokens", f"{stats['tokens_total']:,} in all; per example median "
                     f"{stats.get('tokens_median')}, max {stats.get('tokens_max')}"))
    if config.get("validation_data"):
        rows.append(("held-out file", f"`{config['validation_data']}`"))
    return "\n".join(["## Training data", "", "| | |", "|---|---|"]
                     + [f"| {k} | {v} |" for k, v in rows])


_ESSENTIALS = ("method", "objective", "lora.r", "lora.alpha", "lora.dropout", "lora.dora",
               "quantization", "epochs", "max_steps", "learning_rate", "batch_size",
               "gradient_accumulation_steps", "max_seq_length", "precision", "lr_scheduler",
               "warmup_ratio", "seed", "dpo.beta", "orpo.lambda")


def _method_section(run: Path, config: dict) -> str:
    info = rundir.read_run_info(run)
    summary = info.get("summary") or {}
    resolved = {"learning_rate": summary.get("learning_rate"), "epochs": summary.get("epochs"),
                "precision": info.get("precision")}
    rows = []
    for key in _ESSENTIALS:
        head, _, rest = key.partition(".")
        value = (config.get(head) or {}).get(rest) if rest else config.get(head)
        if head == "lora" and config.get("method") != "lora" or head in ("dpo", "orpo") and \
                config.get("objective") != head or value is None:
            continue
        if value == "auto" and resolved.get(key) is not None:  # what "auto" turned out to be
            value = f"auto → {resolved[key]}"
        rows.append(f"| {key} | {str(value).lower() if isinstance(value, bool) else value} |")
    full = (run / rundir.CONFIG_FILE).read_text(encoding="utf-8") if (
        run / rundir.CONFIG_FILE).is_file() else "(config.yaml is missing)\n"
    return "\n".join(["## Method and settings", "", "| setting | value |", "|---|---|", *rows,
                      "", "<details><summary>Full resolved config (config.yaml)</summary>",
                      "", "```yaml", full.rstrip(), "```", "", "</details>"])


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "unknown"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _results_section(info) -> str:
    s = info.get("summary")
    if not s:
        return "## Training results\n\nUnknown: run.json has no summary (the run did not finish)."
    best = _num(s.get("best_eval_loss")) + (f" at step {s['best_step']}" if s.get("best_step")
                                             else "")
    rows = [("steps", f"{s.get('steps')} of {s.get('total_steps')}"
             + (" (stopped early)" if s.get("stopped_early") else "")),
            ("epochs", _num(s.get("epochs"))),
            ("final train loss", _num(s.get("final_train_loss"))),
            ("best held-out loss", best if s.get("best_eval_loss") is not None
             else "unknown (no held-out split)"),
            ("tokens seen", _num(s.get("tokens_seen"))),
            ("tokens/s", _num(s.get("tokens_per_s"), 1)),
            ("train time", f"{s['train_seconds']:.0f} s" if s.get("train_seconds") is not None
             else "unknown"),
            ("peak memory", f"{s['peak_memory_mb']:.0f} MB" if s.get("peak_memory_mb")
             else "unknown"),
            ("trainable parameters", f"{s['trainable_params']:,}" if s.get("trainable_params")
             else "unknown"),
            ("device", f"{info.get('device', 'unknown')}, {s.get('processes', 1)} process(es)")]
    return "\n".join(["## Training results", "", "| | |", "|---|---|"]
                     + [f"| {k} | {v} |" for k, v in rows])


def _eval_section(run: Path, report: dict | None) -> str:
    head = ["## Evaluation", ""]
    if not report:
        return "\n".join(head + [f"Not evaluated: run `afinar eval {run}` to compare it with its "
                                 "base model on the held-out data."])
    has_base = report.get("baseline") is not None
    head.append(f"On {report['data']['source']} ({report['data']['examples']} examples), "
                + (f"compared with the base model `{report['baseline']['spec']}`, "
                   if has_base else "without a base model to compare with, ")
                + f"greedy answers; evaluated {report.get('created_at', '')}.")
    head.append("")
    head += metrics_table(report, single="tuned")  # report.md's own table
    checks = report.get("checks") or {}
    if checks.get("names"):
        head += ["", f"Checks ({checks.get('source')}): " + ", ".join(checks["names"]) + "."]
    diagnosis = ((report.get("training") or {}).get("diagnosis") or {}).get("message")
    if diagnosis:
        head += ["", f"Training: {diagnosis}."]
    head += ["", "The full report: report.md / report.html in the run directory."]
    return "\n".join(head)


def _limits_section(run: Path, report: dict | None, data: dict, config: dict) -> str:
    lines = ["## Known limitations and leaks", ""]
    if not report:
        lines.append(f"Unknown: not evaluated, so nobody has measured what the fine-tune broke "
                     f"(run `afinar eval {run}`).")
    else:
        reg = report.get("regressions")
        if reg:
            s = reg["summary"]
            lines.append(f"- What did it break: {s['changed']} of {s['prompts']} general prompts "
                         f"are answered differently than by the base ({s['changed_wording_only']}"
                         f" only in wording); their checks pass "
                         f"{fmt_value('check:', s['model_checks_pass_rate'])} (base "
                         f"{fmt_value('check:', s['baseline_checks_pass_rate'])}).")
            if s.get("signature"):
                lines.append(f"- Leaks: the taught format (`{s['signature']}`) shows up in "
                             f"{s['model_leaks']} of {s['prompts']} unrelated prompts (base "
                             f"{s['baseline_leaks']}).")
            for key, found in (reg.get("cross_system") or {}).items():
                if isinstance(found, dict) and found.get("prompts"):
                    lines.append(f"- Across system prompts ({key.replace('_', ' ')}): the taught "
                                 f"format in {found['model_leaks']} of {found['prompts']} (base "
                                 f"{found['baseline_leaks']}).")
        else:
            lines.append("- Not measured: this evaluation ran without the general probes or a "
                         "base model, so what the fine-tune broke is unknown.")
        lines += [f"- **warning:** {w}" for w in report.get("warnings") or []]
    data_warnings = [i["message"] for i in data.get("issues") or []
                     if i.get("severity") == "warning"]
    lines += [f"- training data: {w}" for w in data_warnings[:5]]
    lines.append("- It inherits the base model's limitations and biases."
                 + ("" if config.get("validation_data") else " The held-out data is a part of "
                    "the training file, so it says little about inputs unlike that file's."))
    return "\n".join(lines)


def _use_section(data: dict, info: dict) -> str:
    shape = ((data.get("stats") or {}).get("format") or {}).get("dominant_answer_shape")
    where = Path(str(info.get("data") or "the training data")).name
    return "\n".join([
        "## Intended use", "",
        f"Specialised for the task in its training data (`{where}`"
        + (f"; answers shaped like \"{shape}\"" if shape else "") + "); not evaluated outside "
        "it. Check the evaluation above on your own inputs before relying on it, and within "
        "the base model's license. (afinar cannot know what the task is for: say so here.)"])


def _how_to_section(run: Path, info: dict, config: dict, export: ExportCard | None) -> str:
    lines = ["## How to use", ""]
    resolved_run = run.resolve()
    chat = f"afinar chat {resolved_run}"
    if export is None and (info.get("weights") or rundir.ADAPTER_DIR) == rundir.ADAPTER_DIR:
        base = info.get("base_model_path") or config.get("model")
        lines += ["With afinar (base + adapter, the run's own chat template):", "", "```bash",
                  chat, f"afinar export {resolved_run} --to merged   # or gguf, ollama", "```",
                  "", "With peft and transformers:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"base = AutoModelForCausalLM.from_pretrained({json.dumps(str(base))})"
                  "  # the base weights the run trained on",
                  "model = PeftModel.from_pretrained(base, "
                  f"{json.dumps(str(resolved_run / rundir.ADAPTER_DIR))})",
                  f"tokenizer = AutoTokenizer.from_pretrained("
                  f"{json.dumps(str(resolved_run / rundir.TOKENIZER_DIR))})", *_generate_snippet(),
                  "```"]
        if (config.get("quantization") or "none") != "none" or _is_stacked(config):
            lines += ["", "This adapter was trained on top of "
                      + ("a quantised base" if (config.get("quantization") or "none") != "none"
                         else "another run's merged weights")
                      + ": `afinar chat` and `afinar export` rebuild that exactly; plain peft on "
                      "the original base only approximates it."]
    elif export is None or export.format == "merged":
        folder = str(resolved_run / rundir.FULL_MODEL_DIR) if export is None else str(
            export.folder)
        tokenizer = str(resolved_run / rundir.TOKENIZER_DIR) if export is None else folder
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({json.dumps(folder)})",
                  f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(tokenizer)})",
                  *_generate_snippet(), "```", "", "Or with afinar:", "", "```bash", chat, "```"]
    else:
        commands = [export.command] if export.command else []
        if export.format == "ollama" and export.model_name:
            commands.append(f"ollama run {export.model_name}")
        lines += ["```bash", *commands, "```", "",
                  f"The chat template and stop tokens are in the file; afinar verified them "
                  f"(below). The trained run itself: `{chat}`."]
    return "\n".join(lines)


def _is_stacked(config: dict) -> bool:
    model = Path(str(config.get("model") or "")).expanduser()
    return model.is_dir() and rundir.is_run_dir(model)


def _generate_snippet() -> list[str]:
    return ["", 'messages = [{"role": "user", "content": "..."}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
            "return_dict=True, return_tensors=\"pt\")",
            "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
            "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], "
            "skip_special_tokens=True))"]


def _verification_section(export: ExportCard) -> str:
    lines = ["## Export verification", ""]
    files = ", ".join(f"`{k}` ({_size(v)})" for k, v in export.files.items())
    v = export.verification
    if v is None:
        lines.append("Not verified (exported with `--no-verify`): nobody checked that this export "
                     "answers like the trained model.")
    else:
        forced = v.get("teacher_forced_agreement")
        lines += [f"**{'Passed' if v.get('passed') else 'FAILED'}** ({v.get('engine')}, "
                  f"{v.get('type')}): on {v.get('prompts')} golden held-out prompts, compared "
                  f"with the {v.get('reference')}.", "",
                  "| | |", "|---|---|",
                  f"| prompt token ids identical | {v.get('same_prompt_ids')}/{v.get('prompts')} |",
                  f"| first {v.get('compared_tokens_per_answer')} tokens identical | "
                  f"{v.get('exact_first_tokens')}/{v.get('prompts')} |",
                  f"| greedy token agreement | {_share(v.get('greedy_agreement'))} |",
                  *([f"| teacher-forced agreement | {_share(forced)} |"] if forced is not None
                    else []),
                  f"| whole answers identical | {v.get('identical_answers')}/{v.get('prompts')} |",
                  f"| stopped by itself | {v.get('stopped_by_itself')}/{v.get('prompts')} |"]
        if v.get("engine") == "llama.cpp":
            lines.append(f"| tokenizer probes mismatched | "
                         f"{v.get('tokenizer_probes_mismatched')} |")
        lines += ["", "The details: verification.json in this folder."]
    if export.converted_by:
        lines += ["", f"Converted to GGUF by {export.converted_by}."]
    if files:
        lines += ["", f"Files: {files}."]
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else \
        f"{n / 1e3:.1f} kB"


def _share(value) -> str:
    return "unknown" if value is None else f"{value:.1%}"


def _license_section(base: _Base) -> str:
    if base.license:
        text = f"`{base.license}`, the base model's license (from {base.license_source})."
    else:
        text = f"{UNKNOWN_LICENSE} (`{base.hub_id or base.spec}`)."
    return "\n".join(["## License", "", text + " A fine-tune is a derivative of its base model: "
                      "its license terms apply to these weights too."])
