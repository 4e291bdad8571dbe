"""Typed configuration for every command: pydantic models, YAML files, `key=value` overrides.

    cfg = load_train_config("examples/soporte-triaje/train.yaml", ["lora.r=8", "epochs=2"])

Each run saves its resolved config (every default filled in) as RUN/config.yaml.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from afinar.errors import AfinarError
from afinar.models.registry import DEFAULT_MODEL


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# What answers prompts (afinar.engines): the training config's and the server settings' choice.
EngineName = Literal["auto", "llamacpp", "transformers"]


class LoraSettings(StrictModel):
    r: int = Field(16, ge=1, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale: the update is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input. 0 skips a "
                           "copy of every adapted input: measured ~1.5x faster steps on CPU.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="Which linear layers get adapters; all-linear = every one but "
        "the output head (what QLoRA found works best).")
    dora: bool = Field(False, description="Use DoRA (weight-decomposed LoRA).")


class DpoSettings(StrictModel):
    beta: float = Field(0.1, gt=0, description="How far the tuned model may move from the "
                        "reference: smaller lets it move further. The reward of an answer is "
                        "beta x (its log-probability change from the reference).")
    loss: Literal["sigmoid", "ipo", "robust"] = Field(
        "sigmoid", description="sigmoid: the DPO paper's loss (with label_smoothing, conservative "
        "DPO); ipo: squared loss on per-token log-ratios, which does not push margins to "
        "infinity; robust: unbiased under the share of flipped labels set by label_smoothing.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of pairs "
                                   "whose preference is wrong (sigmoid and robust losses).")
    sft_weight: float = Field(1.0, ge=0, description="Adds this times the SFT loss (mean NLL "
                              "of the chosen answers' tokens, as RPO does): keeps the chosen "
                              "answers likely while their margin grows. Measured on the "
                              "embedded model: without it, DPO pushed both answers down and "
                              "greedy answers degenerated (style check 53% vs 73% with it). "
                              "0 = the DPO paper's loss alone (TRL's default).")


class OrpoSettings(StrictModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              serialize_by_alias=True)

    lambda_: float = Field(0.1, alias="lambda", gt=0, description="Weight of the odds-ratio "
                           "term next to the SFT loss on the chosen answers (ORPO's lambda).")


# Learning-rate auto for preference objectives, as a share of the SFT value for the same model:
# DPO starts from a model that already answers and only reweighs answers (its recipes use about a
# tenth of SFT's rate); ORPO also learns the chosen answers (its recipes use about half).
OBJECTIVE_LR_SHARE = {"sft": 1.0, "dpo": 0.1, "orpo": 0.5}


class TrainConfig(StrictModel):
    """Everything `afinar train` needs; only `data` has no default."""

    data: str = Field(description="Training file (.jsonl).")
    model: str = Field(DEFAULT_MODEL, description="Base model: a name, folder, .gguf or hub id.")
    output: str | None = Field(None, description="Run directory; default runs/<data>-<time>.")
    format: str | None = Field(None, description="Force a data format instead of detecting it.")
    validation_data: str | None = Field(None, description="Held-out file; else split `data`.")
    held_out_fraction: float = Field(0.2, ge=0, lt=1,
                                     description="Share of `data` held out when no validation file.")
    method: Literal["lora", "full"] = Field("lora", description="LoRA (or DoRA) adapters, or "
                                            "full fine-tuning of every weight.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    objective: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="What training optimises (`afinar train --method`): sft learns the "
        "answers; dpo learns from preference pairs to prefer the chosen answer over the "
        "rejected one, against a reference model (the starting model: with LoRA, the same "
        "weights with the adapter off); orpo does the same without a reference model, adding "
        "an odds-ratio term to SFT on the chosen answers.")
    dpo: DpoSettings = Field(default_factory=DpoSettings)
    orpo: OrpoSettings = Field(default_factory=OrpoSettings)
    epochs: Union[int, Literal["auto"]] = Field(
        "auto", description="Passes over the data. auto: at least 200 example-passes (2 to 25 "
        "epochs); for large sets at most 25,000 example-passes and 20M tokens.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    learning_rate: Union[float, Literal["auto"]] = Field(
        "auto", description="Peak learning rate. auto: from the model's size (LoRA: 2e-4 at "
        "7B, rising as models get smaller, 1e-3 near 135M; full: a tenth of that; DPO a tenth "
        "and ORPO half of the SFT value), or the winner of the search when `tune` is on.")
    learning_rate_multiplier: float = Field(1.0, gt=0, description="Scales the auto learning "
                                            "rate (OpenAI's hyperparameter of that name).")
    batch_size: int = Field(4, ge=1, description="Examples per micro-batch (per process).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per step.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps warming up the LR.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="How the learning rate falls after warm-up: cosine to 0, "
        "linearly to 0, or constant.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the trained "
                                "weights; 0 = none (LoRA rarely needs it).")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping; null = off.")
    max_seq_length: int = Field(1024, ge=8, description="Longer examples are truncated or dropped.")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="What to do with "
                                                  "examples longer than max_seq_length.")
    seed: int = 42
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps; default: "
                                   "about 10 evaluations per run.")
    save_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps; default: "
                                   "at every evaluation.")
    keep_checkpoints: int = Field(1, ge=1, description="Resumable step checkpoints kept on disk "
                                  "(the newest ones); the best one is always kept apart.")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop after this many evaluations without a better held-out loss; "
        "null = never.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype. auto: bf16 on GPUs (fp16 without bf16); on a CPU "
        "the faster of fp32 and bf16, measured by timing a training step of the model's own "
        "layers in each (cached per CPU and model; bf16 only when at least 10% faster: CPUs "
        "differ, bf16 is 3x slower than fp32 without native bf16). fp16 is GPU-only.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1...")
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Base weights in 4-bit (QLoRA: NF4, double-quantised scales, "
        "matmuls in the compute dtype) or 8-bit (LLM.int8) with bitsandbytes; LoRA only. "
        "Roughly a quarter (4bit) or half (8bit) of the bf16 weights' memory.")
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="Recompute activations in the backward pass (about a third more "
        "compute per step, a fraction of the activation memory). auto: on only when the memory "
        "plan says the run does not fit without it.")
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="Compile each decoder layer with torch.compile (Inductor: fused "
        "element-wise kernels, fewer saved activations; measured on the embedded model on a "
        "CPU: about 1.5x the tokens/s at less peak memory). The first compile takes 30-60 s on "
        "a small CPU (cached on disk for later runs). auto: on for single-process LoRA or full "
        "runs on a CPU with a C++ compiler, without quantization or gradient checkpointing, "
        "when the plan estimates more than 2 minutes of training.")
    max_memory: str | None = Field(
        None, description="Memory budget the plan must fit, e.g. 12GB or 800MB. Default: the "
        "GPU's memory, or on a CPU the memory available now.")
    preserve: Union[bool, Literal["auto"]] = Field(
        "auto", description="Mix into training a replay set: the base model's own answers to "
        "bundled general prompts (Spanish and English; with no system prompt, other system "
        "prompts and the data's own), so the taught format stays where it was taught. Generated "
        "once per base model and cached. auto: on for LoRA, off for full fine-tuning.")
    preserve_ratio: float = Field(0.25, gt=0, le=2, description="Replay examples per epoch, "
                                  "as a share of the training examples.")
    preserve_data_system: bool = Field(True, description="Also ask the replay prompts under "
                                       "the data's own system prompt(s): general questions "
                                       "under the task's system prompt keep ordinary answers.")
    preserve_task_prompts: float = Field(
        0.25, ge=0, le=1, description="Share of the data's own prompts (up to 24) also asked "
        "under other assistants' system prompts or none, answered by the base model: the "
        "format stays tied to its system prompt. 0 = off.")
    tune: bool = Field(False, description="Before the run, search learning rate and epochs "
                       "with a few short runs (Optuna, a SQLite study in RUN/tune/), scored on "
                       "an inner held-out split: check pass rate when a checks file is given, "
                       "then held-out loss; the full run uses the winner.")
    tune_trials: int = Field(4, ge=2, le=50, description="Short runs the search makes.")
    evaluate: bool = Field(True, description="At the end, evaluate base vs tuned on the held-out "
                           "data and write RUN/report.json and report.html (`afinar eval`).")
    engine: EngineName = Field(
        "auto", description="What answers in the end-of-run evaluation: llamacpp (llama.cpp's "
        "server on a GGUF of the base, cached, with the run's LoRA as a GGUF adapter), "
        "transformers, or auto (llama.cpp on a CPU when it is installed and the model "
        "converts). docs/serving.md")
    checks: str | None = Field(None, description="Checks file (YAML) for the end-of-run "
                               "evaluation: format regexes, JSON schemas, expected topics.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Also report metrics, the config and the eval report "
        "to these tools (pip install 'afinar[tracking]'): TensorBoard files in RUN/tensorboard, "
        "MLflow in RUN/mlflow.db unless MLFLOW_TRACKING_URI is set, W&B offline in RUN/wandb "
        "unless you logged in. docs/tracking.md")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tool(cls, value):
        return [value] if isinstance(value, str) else value  # `report_to: tensorboard`

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.validation_data and self.held_out_fraction and "held_out_fraction" in (
                self.model_fields_set):
            raise ValueError("give either validation_data or held_out_fraction, not both")
        if self.quantization != "none" and self.method != "lora":
            raise ValueError(f"quantization {self.quantization} is for LoRA (QLoRA): the "
                             "quantised base weights cannot be trained; use method lora")
        if self.max_memory is not None:
            parse_memory(self.max_memory)
        if self.objective != "sft" and self.preserve is True:
            raise ValueError(f"preserve is for SFT; {self.objective} keeps the model near its "
                             "start by itself (DPO: the reference; ORPO: the SFT term)")
        if self.objective != "sft" and self.tune:
            raise ValueError(f"tune searches SFT runs; for {self.objective}, set learning_rate "
                             "and epochs (or leave them auto)")
        return self

    def resolved_learning_rate(self, n_params: int | None = None) -> float:
        """`n_params`: the base model's parameter count (None: the 7B-recipe value)."""
        if self.learning_rate != "auto":
            return float(self.learning_rate)
        lr = auto_learning_rate(self.method, n_params) * OBJECTIVE_LR_SHARE[self.objective]
        return float(f"{lr:.2g}") * self.learning_rate_multiplier

    def preserve_on(self) -> bool:
        if self.objective != "sft":
            return False
        return self.method == "lora" if self.preserve == "auto" else bool(self.preserve)


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20,
          "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40,
          "TIB": 2**40}


def parse_memory(text: str | int | float) -> int:
    """"12GB", "12 GiB", "800MB", "1.5G" -> bytes (binary units: a "12GB" GPU has 12 GiB)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 12GB, 800MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def auto_learning_rate(method: str, n_params: int | None) -> float:
    """LoRA: 2e-4 at 7B (the QLoRA recipes' value), rising as (7B / size)^0.4 for smaller
    models, which need larger steps to move (measured: SmolLM2-135M learns its task's content at
    about 1e-3, barely at 2e-4); between 1e-4 and 1e-3. Full fine-tuning: a tenth."""
    lr = 2e-4
    if n_params:
        lr = min(1e-3, max(1e-4, 2e-4 * (7e9 / n_params) ** 0.4))
    return float(f"{lr if method == 'lora' else lr / 10:.2g}")


def auto_epochs(n_train: int, tokens_per_epoch: int | None = None) -> int:
    """At least 200 example-passes (measured on the embedded model: a 40-60 example task learns
    its content in about 50 steps of 4 at the auto learning rate), between 2 and 25 epochs; for
    large sets at most 25,000 example-passes and 20M tokens (then one epoch may be enough)."""
    if n_train <= 0:
        return 1
    epochs = min(25, max(2, -(-200 // n_train)))
    if n_train * epochs > 25_000:
        epochs = max(1, 25_000 // n_train)
    if tokens_per_epoch:
        epochs = max(1, min(epochs, 20_000_000 // tokens_per_epoch))
    return epochs


def method_option(value: str | None) -> dict:
    """The settings `--method VALUE` sets: an objective (sft, dpo, orpo) or LoRA vs full
    fine-tuning (lora, full), so `afinar train --method dpo` and `afinar plan --method full`
    both read naturally. Combine them with --set, e.g. --method dpo --set method=full."""
    if value is None:
        return {}
    if value in ("sft", "dpo", "orpo"):
        return {"objective": value}
    if value in ("lora", "full"):
        return {"method": value}
    raise AfinarError(f"--method {value!r}: expected sft, dpo or orpo (what to optimise), or "
                      "lora or full (which weights train)")


# --- loading -------------------------------------------------------------------------------------

def set_path(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise AfinarError(f"--set {dotted}: {key} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """`["lora.r=8", "epochs=2"]` → {"lora": {"r": 8}, "epochs": 2}; values parsed as YAML."""
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise AfinarError(f"--set {pair!r}: expected key=value", "e.g. --set lora.r=8")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        set_path(out, key.strip(), value)
    return out


def merge_dicts(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def nested_model(annotation) -> type[BaseModel] | None:
    """The settings model inside a field's type: X, X | None or list[X]."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := nested_model(arg)) is not None:
            return found
    return None


def _field_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        names.append(prefix + (info.alias or name))
        if (nested := nested_model(info.annotation)) is not None:
            names += _field_names(nested, f"{prefix}{name}.")
    return names


def _readable(exc: ValidationError, model: type[BaseModel], source: str,
              hint: str) -> AfinarError:
    lines = []
    known = _field_names(model)
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if not str(p).startswith(("function-", "union["))]
        loc = ".".join(parts)
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            # List positions (checks.0.regx) do not take part in the name matching.
            close = difflib.get_close_matches(".".join(p for p in parts if not p.isdigit()),
                                              known, n=1)
            msg = "unknown setting" + (f" (did you mean {close[0]}?)" if close else "")
        lines.append(f"{loc or '(config)'}: {msg}")
    return AfinarError(f"invalid config ({source}):\n  " + "\n  ".join(lines), hint)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AfinarError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise AfinarError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise AfinarError(f"{path}: a config file must be a mapping of settings")
    return data


def build_config(model: type[BaseModel], values: dict, source: str,
                 hint: str = "see `afinar train --help` or docs/configuration.md"):
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _readable(exc, model, source, hint) from None


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      anchor_paths: bool = True, **values) -> TrainConfig:
    """File values, then keyword values (e.g. from CLI options), then `--set` overrides win.

    anchor_paths=False reads a run's saved config.yaml, whose paths are already resolved.
    """
    data = read_yaml(path) if path else {}
    base_dir = Path(path).parent if path and anchor_paths else None
    if base_dir is not None:
        # Paths in a config file are relative to the file, so examples run from anywhere.
        for key in ("data", "validation_data", "checks"):
            if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
                data[key] = str(base_dir / data[key])
    data = merge_dicts(data, {k: v for k, v in values.items() if v is not None})
    data = merge_dicts(data, parse_overrides(overrides or []))
    return build_config(TrainConfig, data, str(path) if path else "command line")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
