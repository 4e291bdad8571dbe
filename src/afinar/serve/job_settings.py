"""afinar's extension of job creation: `settings`, any training setting of the typed config by
its dotted name (`{"lora.r": 32, "max_seq_length": 512}`, or nested), for what OpenAI's
hyperparameters do not reach. The OpenAI SDK sends it with
`client.fine_tuning.jobs.create(..., extra_body={"settings": {...}})`.

Settings the job's own fields already set are refused with the field to use instead, so a job
never has two values for one setting; settings that would name a path on the server are
refused too (a client may only train on files it uploaded).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from afinar.config import TrainConfig, nested_model, set_path
from afinar.errors import AfinarError
from afinar.serve.errors import ApiError

# setting -> what sets it on a job (None: the server decides).
RESERVED = {
    "data": "training_file", "validation_data": "validation_file", "model": "model",
    "objective": "method.type", "seed": "seed", "epochs": "hyperparameters.n_epochs",
    "batch_size": "hyperparameters.batch_size",
    "learning_rate_multiplier": "hyperparameters.learning_rate_multiplier",
    "dpo.beta": "method.dpo.hyperparameters.beta",
    "orpo.lambda": "method.orpo.hyperparameters.lambda",
    "output": None, "checks": None, "evaluate": None, "tune": None, "tune_trials": None,
}


def nested_settings(settings: dict[str, Any] | None) -> dict:
    """`{"lora.r": 8}` or `{"lora": {"r": 8}}` → {"lora": {"r": 8}}; 400 for reserved names."""
    if not settings:
        return {}
    flat = dict(_flatten(settings))
    for name in flat:
        if name in RESERVED or name.split(".")[0] in ("data", "output", "checks"):
            instead = RESERVED.get(name)
            raise ApiError(400, f"settings.{name}: set by the job itself" +
                           (f"; use {instead}" if instead else " (the server decides it)") + ".",
                           param=f"settings.{name}")
    nested: dict = {}
    for name, value in flat.items():
        try:
            set_path(nested, name, value)
        except AfinarError:
            raise ApiError(400, f"settings.{name}: {name.split('.')[0]} is given both as a "
                           "value and as a section.", param=f"settings.{name}") from None
    return nested


def _flatten(data: dict, prefix: str = ""):
    for key, value in data.items():
        if not isinstance(key, str) or not key:
            raise ApiError(400, "settings: names must be non-empty strings.", param="settings")
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def advanced_help() -> list[dict]:
    """Every setting a job may set through `settings`, with the typed config's description,
    default and accepted values: the New job page's Advanced part."""
    return [item for item in _fields(TrainConfig, "") if item["name"] not in RESERVED]


def _fields(model: type[BaseModel], prefix: str) -> list[dict]:
    items = []
    for name, info in model.model_fields.items():
        public = prefix + (info.alias or name)
        nested = nested_model(info.annotation)
        if nested is not None:
            items += _fields(nested, f"{prefix}{name}.")
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        items.append({"name": public, "description": info.description or "",
                      "default": default, "choices": _choices(info.annotation)})
    return items


def _choices(annotation) -> list | None:
    """The literal values a setting accepts (booleans as true/false), else None."""
    values = []
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else (annotation,)
    for arg in members:
        if typing.get_origin(arg) is typing.Literal:
            values += list(typing.get_args(arg))
        elif arg is bool:
            values += [True, False]
        elif arg is not type(None):
            return None  # free values besides the named ones (a number, a list): typed in
    return values or None
