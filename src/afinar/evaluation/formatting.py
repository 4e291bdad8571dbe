"""How report numbers are written, shared by the Markdown and HTML reports."""

from __future__ import annotations

PERCENT = ("exact_match", "normalized_match", "eval_token_accuracy", "preference_accuracy",
           "reward_accuracy")


def is_percent(name: str) -> bool:
    return name in PERCENT or name.startswith("check:")


def fmt_value(name: str, value) -> str:
    if value is None:
        return "–"
    if is_percent(name):
        return f"{value:.1%}"
    if name == "eval_perplexity":
        return f"{value:.2f}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def fmt_delta(metric: dict) -> str:
    delta = metric["delta"]
    if delta is None:
        return ""
    if is_percent(metric["name"]):
        text = f"{delta:+.1%}"
    else:
        text = f"{delta:+.2f}" if metric["name"] == "eval_perplexity" else f"{delta:+.4f}"
    return text.replace("%", " pp") if is_percent(metric["name"]) else text


def is_better(metric: dict) -> bool | None:
    """Whether the tuned model beats the baseline on this metric (None: no baseline/no change)."""
    delta = metric["delta"]
    if delta is None or abs(delta) < 1e-12:
        return None
    return delta < 0 if metric["better"] == "lower" else delta > 0


def label(name: str) -> str:
    names = {"eval_loss": "held-out loss", "eval_perplexity": "perplexity",
             "eval_token_accuracy": "token accuracy", "exact_match": "exact match",
             "normalized_match": "normalised match", "rouge_l": "ROUGE-L",
             "preference_accuracy": "preference accuracy (pairs)",
             "preference_margin": "preference margin (log-prob/token)",
             "reward_accuracy": "reward accuracy vs base (DPO)",
             "reward_margin": "reward margin vs base (DPO)"}
    if name.startswith("check:"):
        return f"check: {name[6:]}"
    return names.get(name, name)
