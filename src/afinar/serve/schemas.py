"""Request models and response objects, with OpenAI's field names (from its OpenAPI spec, as the
`openai` package's generated types carry them: FineTuningJob, FileObject, FineTuningJobEvent,
FineTuningJobCheckpoint, ChatCompletion, ChatCompletionChunk, Model)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

Auto = Literal["auto"]


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's SDK may send newer ones (e.g. integrations).
    model_config = ConfigDict(extra="ignore")


class ExactModel(BaseModel):
    # Inside `method` and `hyperparameters` an unknown field is a 400, never dropped: a typo
    # ("n_epoch") must not silently train with the default. Values are range-checked in
    # serve/jobs.py, with messages naming the field.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Hyperparameters(ExactModel):
    n_epochs: Any = None
    batch_size: Any = None
    learning_rate_multiplier: Any = None


class DpoHyperparameters(Hyperparameters):
    beta: Any = None


class OrpoHyperparameters(Hyperparameters):
    lambda_: Any = Field(None, alias="lambda")


class SupervisedMethod(ExactModel):
    hyperparameters: Optional[Hyperparameters] = None


class DpoMethod(ExactModel):
    hyperparameters: Optional[DpoHyperparameters] = None


class OrpoMethod(ExactModel):
    hyperparameters: Optional[OrpoHyperparameters] = None


class Method(ExactModel):
    # "orpo" is afinar's extension of OpenAI's method types.
    type: Literal["supervised", "dpo", "orpo", "reinforcement"]
    supervised: Optional[SupervisedMethod] = None
    dpo: Optional[DpoMethod] = None
    orpo: Optional[OrpoMethod] = None
    reinforcement: Optional[dict[str, Any]] = None


class JobCreate(_Request):
    model: str
    training_file: str
    validation_file: Optional[str] = None
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[Method] = None
    suffix: Optional[str] = Field(None, max_length=64)
    seed: Optional[int] = None
    metadata: Optional[dict[str, str]] = None
    # afinar's extension: any training setting by dotted name (serve/job_settings.py).
    settings: Optional[dict[str, Any]] = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None


class StreamOptions(_Request):
    include_usage: bool = False


class ChatRequest(_Request):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    n: Optional[int] = Field(1, ge=1, le=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None


# --- response objects -------------------------------------------------------------------------

def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


def job_object(row: dict, organization: str) -> dict:
    hp = row["hyperparameters"] or {}
    method = row["method"] or {"type": "supervised", "supervised": {"hyperparameters": hp}}
    return {
        "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
        "error": row["error"], "fine_tuned_model": row["fine_tuned_model"],
        "finished_at": row["finished_at"], "hyperparameters": hp, "model": row["model"],
        "organization_id": organization, "result_files": row["result_files"] or [],
        "seed": row["seed"], "status": row["status"], "trained_tokens": row["trained_tokens"],
        "training_file": row["training_file"], "validation_file": row["validation_file"],
        "estimated_finish": row["estimated_finish"], "integrations": [],
        "metadata": row["metadata"], "method": method, "suffix": row["suffix"],
        "settings": row.get("settings") or {},  # afinar's extension
    }


def event_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"], "type": row["type"],
            "data": row["data"] or {}}


def checkpoint_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint",
            "created_at": row["created_at"], "fine_tuned_model_checkpoint": row["model_name"],
            "fine_tuning_job_id": row["job_id"], "metrics": row["metrics"] or {},
            "step_number": row["step_number"]}


def model_object(name: str, created: int, owned_by: str, engine: str | None = None) -> dict:
    """OpenAI's model object; `engine` (afinar's own field) says what answers it."""
    entry = {"id": name, "object": "model", "created": created, "owned_by": owned_by}
    if engine:
        entry["engine"] = engine
    return entry


def page(data: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
