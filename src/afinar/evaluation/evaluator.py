"""`afinar eval`: a model or run on held-out data, side by side with its base model.

    report = evaluate("runs/soporte")          # the run's held-out split, vs the run's base model
    report = evaluate("runs/soporte", data="heldout.jsonl", baseline="none")

For each model: held-out loss/perplexity/token accuracy on the assistant tokens (the training
loop's own function and masks), greedy answers to every held-out prompt scored against the
reference (exact, normalised, ROUGE-L) and by the declared checks, and answers to the bundled
general probes ("what did it break"). Writes report.json, report.html and report.md atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from afinar import rundir
from afinar.config import TrainConfig, load_train_config
from afinar.data.example import Example
from afinar.data.prepare import split_for
from afinar.data.tokenize import fit_length
from afinar.data.validate import load_examples
from afinar.errors import AfinarError, DataError
from afinar.events import EvalDone, EvalPhase, EvalProgress, Listener
from afinar.evaluation import diagnosis, regressions
from afinar.infer.answer_cache import AnswerCache
from afinar.evaluation.checks import CheckSet, load_checks, run_check
from afinar.evaluation.fewshot import describe as fewshot_info
from afinar.evaluation.fewshot import (parse_fewshot, pick_shots, training_system_prompt,
                                       with_shots)
from afinar.losses.held_out import evaluate_loss
from afinar.evaluation.metrics import REFERENCE_METRICS, score_answer
from afinar.evaluation.preference import (pair_log_probs, preference_metrics,
                                          preference_section)
from afinar.paths import sha256_file

PROBE_MAX_NEW_TOKENS = 64  # enough to see what changed; the base model can ramble for longer
CHANGE_THRESHOLD = 0.05  # per-example score differences below this are "same"
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")


@dataclass
class EvalReport:
    data: dict  # everything report.json holds
    output: Path
    markdown: str
    # The run evaluated (None: a plain model), and whether on its own held-out split: the
    # report its registry version and card show (afinar.pipeline.evaluate_run records them).
    run_dir: Path | None = None
    is_default_eval: bool = False

    @property
    def summary(self) -> dict:
        return self.data["summary"]


@dataclass
class _Target:
    spec: str
    run_dir: Path | None
    config: TrainConfig | None
    examples: list[Example]
    data_source: str
    checks: CheckSet
    baseline: str | None
    output: Path
    is_default_eval: bool  # a run's own held-out split: the report the registry shows
    warnings: list[str]
    # The prompting baseline (`--baseline fewshot[:K]`): the training examples shown to the
    # base model before each held-out prompt, and the system prompt it gets.
    shots: list[Example] | None = None
    shots_system: str | None = None

    def baseline_examples(self, examples: list[Example]) -> list[Example]:
        if self.shots is None:
            return examples
        return [with_shots(ex, self.shots, self.shots_system) if ex.is_chat else ex
                for ex in examples]


def evaluate(model: str, data: str | None = None, baseline: str | None = "auto",
             output: str | None = None, checks: str | None = None, probes: bool = True,
             max_new_tokens: int | None = None, batch_size: int = 32, use_cache: bool = True,
             on_event: Listener | None = None, notify: Callable = print,
             answerer: Callable | None = None) -> EvalReport:
    """`baseline`: "auto" (a run's base model; none for a plain model), "none", or any model.
    `use_cache`: reuse greedy answers a previous evaluation generated with identical weights,
    prompt and settings (see answer_cache.py). `answerer(loaded)`: what generates the answers
    for a loaded (transformers) model, which itself computes the losses; default: itself
    (afinar.pipeline.evaluate_run passes the chosen engine)."""
    from afinar.infer.generate import GenerationSettings

    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    target = _resolve_target(model, data, baseline, output, checks)
    examples = target.examples
    chat_examples = [ex for ex in examples if ex.is_chat]
    probe_examples = regressions.load_probes() if probes and target.baseline else []
    cross_sets = (regressions.cross_system_prompts(chat_examples, probe_examples)
                  if probe_examples else {})
    timings: dict[str, float] = {}

    results: dict[str, dict] = {}
    settings = None
    for role, spec in (("model", target.spec), ("baseline", target.baseline)):
        if spec is None:
            continue
        t0 = time.perf_counter()
        emit(EvalPhase(f"{role}: loading {spec}"))
        loaded = _load(spec, notify)
        if settings is None:  # both models answer with the same settings
            settings = GenerationSettings(
                max_new_tokens=max_new_tokens or answer_budget(loaded.tokenizer, chat_examples))
        shown = examples if role == "model" else target.baseline_examples(examples)
        answering = answerer(loaded) if answerer else loaded
        try:
            results[role] = _run_model(loaded, answering, role, shown,
                                       [list(ex.prompt_messages()) for ex in shown if ex.is_chat],
                                       probe_examples, cross_sets, settings, target, batch_size,
                                       emit, use_cache)
        finally:
            if answering is not loaded:
                answering.close()
        del loaded, answering
        timings[f"{role}_s"] = round(time.perf_counter() - t0, 2)

    report = _assemble(target, chat_examples, results, probe_examples, cross_sets, settings,
                       batch_size)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    report["timing"] = timings
    report["engine"] = {role: result["engine"] for role, result in results.items()}
    from afinar.evaluation.report_html import render_html
    from afinar.evaluation.report_md import render_markdown

    markdown = render_markdown(report)
    target.output.mkdir(parents=True, exist_ok=True)
    rundir.write_json_atomic(target.output / "report.json", report)
    rundir.write_text_atomic(target.output / "report.md", markdown)
    rundir.write_text_atomic(target.output / "report.html", render_html(report))
    emit(EvalDone(str(target.output), report["summary"]))
    return EvalReport(report, target.output, markdown, target.run_dir, target.is_default_eval)


# --- what to evaluate ------------------------------------------------------------------------

def _resolve_target(model: str, data: str | None, baseline: str | None, output: str | None,
                    checks: str | None) -> _Target:
    from afinar.versions import registered_run

    path = registered_run(model) or Path(model)  # a version id or tag names its run
    config = None
    run_dir = path if rundir.is_run_dir(path) else None
    if run_dir is not None:
        config = load_train_config(run_dir / rundir.CONFIG_FILE, anchor_paths=False)
    warnings: list[str] = []
    if data:
        report = load_examples(data, for_training=False)
        if not report.ok:
            raise DataError(f"{data}: {len(report.errors)} problem(s) in the evaluation data",
                            report)
        examples, source = report.examples, str(data)
    train_examples = None
    if config is not None and (not data or parse_fewshot(baseline)):
        train_report = load_examples(config.data, config.format)
        if not train_report.ok:
            raise DataError(f"{config.data}: the run's training data no longer validates",
                            train_report, "pass the held-out file with --data")
        train_examples, held_examples, how = split_for(config, train_report)
    if not data and config is not None:
        examples = held_examples
        source = f"held-out part of {config.data} ({how})"
        trained_on = rundir.read_run_info(run_dir).get("data_sha256")
        if trained_on and not config.validation_data and trained_on != sha256_file(
                Path(config.data)):
            warnings.append(f"{config.data} changed since this run trained on it: the "
                            "held-out split may now contain examples it was trained on")
    elif not data:
        raise AfinarError(f"{model}: not a run directory, so there is no held-out split to use",
                          "pass the evaluation file with --data FILE")
    if not examples:
        raise AfinarError(f"{model}: no held-out examples to evaluate on",
                          "pass a file with --data, or train with held_out_fraction > 0")

    shots, shots_system = None, None
    if (k := parse_fewshot(baseline)) is not None:
        if config is None:
            raise AfinarError(f"--baseline {baseline} needs a run: its training examples are the "
                              "shots", "evaluate a run directory (or a version id)")
        base = config.model
        shots = pick_shots(train_examples, k, config.seed)
        shots_system = training_system_prompt(train_examples)
    elif baseline in (None, "none", ""):
        base = None
    elif baseline == "auto":
        base = config.model if config is not None else None
    else:
        base = baseline
    checks_file = checks or (config.checks if config is not None else None)
    is_default = run_dir is not None and not data
    if output:
        out = Path(output)
    elif run_dir is not None:
        out = run_dir if is_default else run_dir / f"eval-{Path(data).stem}"
    else:
        out = Path(f"eval-{Path(data).stem}-{datetime.now():%Y%m%d-%H%M%S}")
    if shots is not None and not output and run_dir is not None:
        out = run_dir / f"eval-{baseline.replace(':', '')}"  # the run's own report stays
        is_default = False
    return _Target(str(model), run_dir, config, examples, source, load_checks(checks_file), base,
                   out, is_default, warnings, shots, shots_system)


def _load(spec: str, notify: Callable):
    from afinar.infer.generate import load

    return load(spec, notify=notify)


def answer_budget(tokenizer, examples: list[Example]) -> int:
    """Room for the longest reference answer and a margin, so a rambling model is cut off
    near where a correct answer would have ended (and evaluation stays fast)."""
    refs = [ex.final_answer() or "" for ex in examples]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs),
                  default=0)
    return int(min(512, max(32, longest * 1.25 + 16)))


# --- one model --------------------------------------------------------------------------------

def _run_model(loaded, answering, role: str, examples, prompts, probes, cross_sets: dict,
               settings, target: _Target, batch_size: int, emit: Listener, use_cache: bool
               ) -> dict:
    """Losses from `loaded` (transformers); answers from `answering` (either engine)."""
    from afinar.losses.supervised import SupervisedLoss

    max_len = target.config.max_seq_length if target.config else 2048
    if role == "baseline" and target.shots:  # the shots lengthen every prompt: use the context
        max_len = max(max_len, getattr(loaded.model.config, "max_position_embeddings", 0))
    items = [fit_length(loaded.encoder.encode(ex, i), max_len, "truncate")
             for i, ex in enumerate(examples) if ex.is_chat is False or ex.final_answer()]
    items = [t for t in items if t is not None]
    loss = {}
    if items:
        emit(EvalPhase(f"{role}: held-out loss on {len(items)} examples"))
        loss = evaluate_loss(SupervisedLoss(loaded.model), items, batch_size,
                             loaded.tokenizer.pad_token_id, device=loaded.device)
    pairs = None
    if any(ex.is_preference for ex in examples):
        emit(EvalPhase(f"{role}: log-probs of the held-out pairs"))
        pairs = pair_log_probs(loaded, examples, max_len, batch_size)
    counts: dict[str, int] = {}
    answers = _generate(answering, prompts, settings, batch_size, emit,
                        f"{role}: held-out answers", use_cache, counts)
    probe_answers, cross_answers = [], {}
    if probes:
        from afinar.infer.generate import GenerationSettings

        probe_settings = GenerationSettings(max_new_tokens=PROBE_MAX_NEW_TOKENS)
        probe_answers = _generate(answering, [list(p.prompt_messages()) for p in probes],
                                  probe_settings, batch_size, emit, f"{role}: general prompts",
                                  use_cache, counts)
        for name, items in cross_sets.items():
            cross_answers[name] = _generate(
                answering, [messages for _, messages in items], probe_settings, batch_size, emit,
                f"{role}: {name.replace('_', ' ')}", use_cache, counts)
    return {"loss": loss, "pairs": pairs, "answers": answers, "probe_answers": probe_answers,
            "cross_answers": cross_answers,
            "spec": loaded.name, "engine": answering.describe(),
            "answers_from_cache": counts.get("cached", 0),
            "answers_generated": counts.get("generated", 0)}


def _generate(loaded, prompts, settings, batch_size, emit, label, use_cache: bool,
              counts: dict) -> list[str]:
    from afinar.infer.generate import running_count

    if not prompts:
        return []
    cache = AnswerCache(loaded, settings) if use_cache else None
    answers = cache.lookup(prompts) if cache else [None] * len(prompts)
    todo = [i for i, a in enumerate(answers) if a is None]
    done = len(prompts) - len(todo)
    counts["cached"] = counts.get("cached", 0) + done
    counts["generated"] = counts.get("generated", 0) + len(todo)

    def report(finished: int) -> None:
        emit(EvalProgress(label, finished, len(prompts)))

    report(done)
    progress = running_count(report, start=done)
    if todo:
        new = loaded.generate([prompts[i] for i in todo], settings, batch_size, progress)
        for i, answer in zip(todo, new):
            answers[i] = answer
        if cache:
            cache.store([prompts[i] for i in todo], new)
    return answers


# --- the report -------------------------------------------------------------------------------

def _baseline_info(target: _Target, examples: list[Example]) -> dict | None:
    if target.baseline is None:
        return None
    if target.shots is None:
        return {"spec": target.baseline}
    sample = target.baseline_examples(examples[:1])
    return {"spec": f"{target.baseline} prompted with {len(target.shots)} training examples "
                    f"(fewshot:{len(target.shots)})", "model": target.baseline,
            "fewshot": fewshot_info(target.shots, target.shots_system,
                                    sample[0] if sample else None)}


def _score(example: Example, answer: str, checks: CheckSet) -> dict:
    reference = example.final_answer()
    scores = score_answer(answer, reference) if reference is not None else {}
    results = [run_check(spec, answer) for spec in checks.for_example(example)]
    # One number per answer to say "better" or "worse": the checks when there are any (they
    # are what the user declared matters), else closeness to the reference.
    if results:
        primary = sum(r.score for r in results) / len(results)
    else:
        primary = scores.get("rouge_l")
    return {"answer": answer, "scores": scores, "checks": [vars(r) for r in results],
            "primary": primary}


def _change(model: dict, base: dict | None) -> tuple[str, float | None]:
    if base is None or model["primary"] is None or base["primary"] is None:
        return "n/a", None
    delta = model["primary"] - base["primary"]
    if delta > CHANGE_THRESHOLD:
        return "improved", delta
    if delta < -CHANGE_THRESHOLD:
        return "worse", delta
    return ("same" if model["answer"].strip() == base["answer"].strip() else "reworded"), delta


def _aggregate(scored: list[dict], loss: dict) -> dict[str, tuple[float | None, int]]:
    """metric -> (value, number of examples it covers)."""
    out: dict[str, tuple[float | None, int]] = {}
    for key in ("eval_loss", "eval_perplexity", "eval_token_accuracy"):
        if key in loss:
            out[key] = (loss[key], loss.get("eval_tokens", 0))
    with_ref = [s for s in scored if s["scores"]]
    for name in REFERENCE_METRICS:
        if with_ref:
            out[name] = (sum(s["scores"][name] for s in with_ref) / len(with_ref), len(with_ref))
    by_check: dict[str, list[float]] = {}
    for s in scored:
        for c in s["checks"]:
            by_check.setdefault(c["name"], []).append(c["score"])
    for name, values in sorted(by_check.items()):
        out[f"check:{name}"] = (sum(values) / len(values), len(values))
    return out


def _assemble(target: _Target, examples: list[Example], results: dict, probes: list[Example],
              cross_sets: dict, settings, batch_size: int) -> dict:
    has_base = "baseline" in results
    rows, model_scored, base_scored = [], [], []
    for i, ex in enumerate(examples):
        m = _score(ex, results["model"]["answers"][i], target.checks)
        b = _score(ex, results["baseline"]["answers"][i], target.checks) if has_base else None
        change, delta = _change(m, b)
        model_scored.append(m)
        if b is not None:
            base_scored.append(b)
        rows.append({"index": i, "where": ex.where,
                     "prompt": [{"role": msg.role, "content": msg.content}
                                for msg in ex.prompt_messages()],
                     "reference": ex.final_answer(), "model": m, "baseline": b,
                     "change": change, "delta": delta})

    model_metrics = _aggregate(model_scored, results["model"]["loss"])
    base_metrics = _aggregate(base_scored, results["baseline"]["loss"]) if has_base else {}
    metrics = []
    for name, (value, n) in model_metrics.items():
        base_value = base_metrics.get(name, (None, 0))[0]
        delta = value - base_value if value is not None and base_value is not None else None
        metrics.append({"name": name, "model": value, "baseline": base_value, "delta": delta,
                        "n": n, "better": "lower" if name in LOWER_IS_BETTER else "higher"})

    preference = {}
    if results["model"].get("pairs") is not None:
        config = target.config
        beta = config.dpo.beta if config is not None and config.objective == "dpo" else 0.1
        preference = preference_section(
            results["model"]["pairs"], results["baseline"]["pairs"] if has_base else None, beta,
            results["model"]["answers"], results["baseline"]["answers"] if has_base else None)
        metrics += preference_metrics(preference)

    warnings: list[str] = list(target.warnings)
    regression = None
    if probes:
        signature = regressions.format_signature(
            [ex.final_answer() or "" for ex in examples], target.checks.leak_regex)
        regression = regressions.compare_probes(probes, results["model"]["probe_answers"],
                                                results["baseline"]["probe_answers"], signature)
        cross = regressions.compare_cross_system(cross_sets, results["model"]["cross_answers"],
                                                 results["baseline"]["cross_answers"], signature,
                                                 regressions.PREFERENCE_ADVICE
                                                 if _is_preference_run(target)
                                                 else regressions.PRESERVE_ADVICE)
        regression["cross_system"] = cross["sets"]
        warnings += regression["warnings"] + cross["warnings"]
    training = None
    if target.run_dir is not None:
        records = diagnosis.read_metrics(target.run_dir / rundir.METRICS_FILE)
        training = {"curves": diagnosis.curves(records), "diagnosis": diagnosis.diagnose(records)}
        data_report = _read_json(target.run_dir / rundir.DATA_REPORT) or {}
        training["preserve"] = data_report.get("preserve")
        training["data_format"] = (data_report.get("stats") or {}).get("format")
        if training["diagnosis"]["verdict"] in ("overfitting", "not_learning"):
            warnings.append(training["diagnosis"]["message"])
    changes = {k: sum(r["change"] == k for r in rows)
               for k in ("improved", "worse", "same", "reworded")} if has_base else {}
    worse = [m for m in metrics if m["delta"] is not None and m["name"].startswith("check:")
             and m["delta"] < -CHANGE_THRESHOLD]
    for m in worse:
        warnings.append(f"{m['name']} is lower than the base model's "
                        f"({m['model']:.0%} vs {m['baseline']:.0%})")

    summary = {m["name"]: m["model"] for m in metrics}
    if regression:
        summary["probes_changed"] = regression["summary"]["changed"]
        summary["probes_leaks"] = regression["summary"]["model_leaks"]
        for name, found in regression["cross_system"].items():
            if isinstance(found, dict) and found["prompts"]:
                summary[f"{name}_leaks"] = found["model_leaks"]
    run_info = rundir.read_run_info(target.run_dir) if target.run_dir else {}
    return {
        "afinar_report": 1,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": target.spec, "run_dir": str(target.run_dir) if target.run_dir else None,
                  "base_model": target.config.model if target.config else None,
                  "status": run_info.get("status")},
        "baseline": _baseline_info(target, examples),
        "data": {"source": target.data_source, "examples": len(target.examples),
                 "with_prompt": len(examples)},
        "checks": {"source": target.checks.source, "names": target.checks.names,
                   "leak_regex": target.checks.leak_regex},
        "generation": {"max_new_tokens": settings.max_new_tokens if settings else None,
                       "probe_max_new_tokens": PROBE_MAX_NEW_TOKENS, "greedy": True,
                       "batch_size": batch_size,
                       "answers_from_cache": {role: r["answers_from_cache"]
                                              for role, r in results.items()},
                       "answers_generated": {role: r["answers_generated"]
                                             for role, r in results.items()}},
        "metrics": metrics,
        "summary": summary,
        "changes": changes,
        "examples": rows,
        "regressions": regression,
        "preference": preference or None,
        "training": training,
        "tuning": _read_json(target.run_dir / "tune" / "trials.json") if target.run_dir else None,
        "warnings": warnings,
    }


def _is_preference_run(target: _Target) -> bool:
    return target.config is not None and target.config.objective != "sft"


def _read_json(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
