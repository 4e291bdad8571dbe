"""From data file(s) to token ids ready for training, plus the report a user reads first.

    prepared = prepare_data(config, encoder)     # raises DataError when the data is unusable

SFT trains on `Tokenized` examples; DPO and ORPO (`config.objective`) on `PairTokenized` pairs.
SFT on a preference file trains on its chosen answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from afinar.data.cache import cached_encode
from afinar.data.consistency import add_to_report
from afinar.data.example import Example
from afinar.data.formats import format_family
from afinar.data.pairs import (PairTokenized, encode_pairs, fit_pair, length_bias_warning,
                               pair_stats, reindexed)
from afinar.data.split import split_examples, split_method
from afinar.data.stats import (duplicates_and_contradictions, format_concentration,
                               token_stats)
from afinar.data.tokenize import ChatEncoder, Tokenized, fit_length
from afinar.data.validate import ValidationReport, load_examples
from afinar.errors import DataError


@dataclass
class PreparedData:
    train_examples: list[Example]
    held_examples: list[Example]
    train: list  # Tokenized, or PairTokenized for a preference objective
    held: list
    report: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def check_usable(report: ValidationReport) -> None:
    if not report.ok:
        raise DataError(f"{report.path}: {len(report.errors)} problem(s) make this data unusable",
                        report, "fix the lines listed above; `afinar validate FILE` re-checks")


def encode_all(examples: list[Example], encoder: ChatEncoder) -> list[Tokenized]:
    return [encoder.encode(ex, i) for i, ex in enumerate(examples)]


def encode_for(examples: list[Example], encoder: ChatEncoder, pairs: bool) -> list:
    return encode_pairs(examples, encoder) if pairs else encode_all(examples, encoder)


def _reindex(item, index: int):
    if isinstance(item, PairTokenized):
        return reindexed(item, index)
    return Tokenized(item.input_ids, item.labels, index, item.truncated, item.weight,
                     item.full_weight_tokens)


def _fit_all(items: list, max_len: int, overflow: str) -> list:
    fit = fit_pair if items and isinstance(items[0], PairTokenized) else fit_length
    return [t for t in (fit(i, max_len, overflow) for i in items) if t is not None]


def describe_data(report: ValidationReport, encoded: list, max_len: int,
                  overflow: str) -> dict:
    """Validation report + token statistics + duplicates/contradictions, as one dict. With
    pairs, the token statistics count both sides, and `preference` compares them."""
    pairs = [p for p in encoded if isinstance(p, PairTokenized)]
    sequences = [side for p in pairs for side in p.sides()] if pairs else encoded
    consistency = add_to_report(report)  # warnings pointing at lines join the issues
    out = report.to_dict()
    out["stats"] = {**token_stats(sequences, max_len, overflow),
                    **duplicates_and_contradictions(report.examples),
                    "format": format_concentration(report.examples),
                    "consistency": consistency["stats"], "advice": consistency["advice"]}
    if pairs:
        out["stats"]["preference"] = pair_stats(pairs, max_len, overflow)
        out["stats"]["preference"]["length_warning"] = length_bias_warning(
            out["stats"]["preference"])
    report.stats = out["stats"]
    return out


def _check_family(report: ValidationReport, objective: str) -> None:
    if objective != "sft" and format_family(report.format) != "preference":
        raise DataError(f"{report.path}: {objective.upper()} trains on preference pairs, and "
                        f"this file is in {report.format} format", report,
                        'write pairs: {"prompt", "chosen", "rejected"} or OpenAI\'s {"input", '
                        '"preferred_output", "non_preferred_output"}; `afinar validate` checks '
                        "them")


def split_for(config, report: ValidationReport) -> tuple[list[Example], list[Example], str]:
    """(train, held-out, how they were chosen) for a train config: its validation file, or the
    seeded split of its data. Evaluation calls this too, so it scores exactly what was held out."""
    if config.validation_data:
        held_report = load_examples(config.validation_data, config.format)
        if held_report.errors:
            raise DataError(f"{held_report.path}: validation data has problems", held_report)
        _check_family(held_report, getattr(config, "objective", "sft"))
        return report.examples, held_report.examples, f"validation file {config.validation_data}"
    train_ex, held_ex = split_examples(report.examples, config.held_out_fraction, config.seed)
    return train_ex, held_ex, split_method(config.held_out_fraction, config.seed)


def prepare_data(config, encoder: ChatEncoder) -> PreparedData:
    report = load_examples(config.data, config.format)
    check_usable(report)
    _check_family(report, config.objective)
    pairs = config.objective != "sft"
    warnings = [str(i) for i in report.warnings]
    train_ex, held_ex, how = split_for(config, report)

    # Encode each file once (cached across runs), then split by position: the split is cheap.
    kind = f"{config.format}:pairs" if pairs else config.format
    encoded, hit = cached_encode(config.data, kind, encoder,
                                 lambda: encode_for(report.examples, encoder, pairs))
    by_line = {ex.line: item for ex, item in zip(report.examples, encoded)}
    if config.validation_data:
        held_encoded, _ = cached_encode(config.validation_data, kind, encoder,
                                        lambda: encode_for(held_ex, encoder, pairs))
    else:
        held_encoded = [by_line[ex.line] for ex in held_ex]
    train_full = [_reindex(by_line[ex.line], i) for i, ex in enumerate(train_ex)]
    held_full = [_reindex(item, i) for i, item in enumerate(held_encoded)]
    summary = describe_data(report, train_full + held_full, config.max_seq_length, config.overflow)
    summary["tokenization_cache"] = "hit" if hit else "miss"
    train = _fit_all(train_full, config.max_seq_length, config.overflow)
    held = _fit_all(held_full, config.max_seq_length, config.overflow)
    summary["split"] = {"method": how, "train": len(train_ex), "held_out": len(held_ex),
                        "train_after_length_limit": len(train), "held_after_length_limit": len(held)}
    dropped = len(train_full) - len(train)
    truncated = sum(1 for t in train if t.truncated)
    if dropped or truncated:
        what = ("pair(s) had their prompt shortened from the start (answers are never cut)"
                if pairs else "training example(s) truncated")
        warnings.append(f"{truncated} {what} and {dropped} dropped at "
                        f"max_seq_length={config.max_seq_length}")
    if pairs and (bias := summary["stats"]["preference"].get("length_warning")):
        warnings.append(bias)
    if not pairs and format_family(report.format) == "preference":
        warnings.append(f"{report.path} holds preference pairs: supervised fine-tuning trains "
                        "on the chosen answers (use --method dpo or orpo to learn from both)")
    if not train:
        raise DataError("no training example is left after applying max_seq_length", report,
                        "raise max_seq_length or use overflow=truncate")
    if encoder.merges_system and any(ex.is_chat and ex.messages[0].role == "system"
                                     for ex in report.examples):
        warnings.append("this model's chat template has no system role: system messages are "
                        "joined to the first user message (as Gemma's own templates do), in "
                        "training and at inference alike")
    if not pairs and (shape := summary["stats"]["format"]).get("one_format"):
        warnings.append(one_format_warning(shape, config.preserve_on()))
    if summary["stats"].get("contradiction_groups") and not pairs:
        warnings.append(f"{len(summary['stats']['contradiction_groups'])} prompt(s) have "
                        "different answers in the data (lines "
                        f"{summary['stats']['contradiction_groups'][:3]}...)")
    return PreparedData(train_ex, held_ex, train, held, summary, warnings)


def one_format_warning(shape: dict, preserve: bool) -> str:
    what = (f"every example has the same system prompt and {shape['dominant_shape_share']:.0%} "
            f"of the answers the same shape ({shape['dominant_answer_shape']}): every prompt "
            "teaches the format, and a model trained on this alone tends to answer everything "
            "that way")
    if preserve:
        return what + ("; `preserve` (on) mixes in the base model's own answers to general "
                       "prompts, with and without this system prompt, to keep the format here")
    return what + ("; turn on `preserve` (--set preserve=true) or add ordinary examples "
                   "without the format")
