"""/v1/ratings: afinar's extension for the dashboard's Rate page. Blind A/B votes are stored,
listed with a per-model tally, and exported as preference JSONL (a download, or a fine-tune
file a DPO job can train on); a job's held-out prompts are served to rate on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import Field

from afinar.serve import jobs as job_ops
from afinar.serve import ratings as rating_ops
from afinar.serve.errors import ApiError
from afinar.serve.ids import new_id
from afinar.serve.routers.deps import Project, get_project, get_settings, get_store
from afinar.serve.schemas import ExactModel, file_object, page  # a misspelt field is a 400
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

router = APIRouter(prefix="/v1/ratings", tags=["ratings"])
_SOURCE = r"^(typed|held-out:ftjob-[A-Za-z0-9]+)$"


class PromptMessage(ExactModel):
    role: str
    content: str


class RatingCreate(ExactModel):
    messages: list[PromptMessage] = Field(min_length=1)
    model_a: str = Field(min_length=1, max_length=500)
    model_b: str = Field(min_length=1, max_length=500)
    answer_a: str
    answer_b: str
    left: Literal["a", "b"]  # the model whose answer was shown on the left
    verdict: Literal["a", "b", "tie", "both_bad"]
    ideal: Optional[str] = None
    source: str = Field("typed", pattern=_SOURCE)


class ExportCreate(ExactModel):
    format: Literal["openai", "preference"] = "openai"


def rating_object(row: dict) -> dict:
    return {"id": row["id"], "object": "rating", "created_at": row["created_at"],
            "messages": row["messages"], "model_a": row["model_a"], "model_b": row["model_b"],
            "answer_a": row["answer_a"], "answer_b": row["answer_b"], "left": row["left"],
            "verdict": row["verdict"], "ideal": row["ideal"], "source": row["source"],
            "winner": rating_ops.winner(row)}


@router.post("")
def create(body: RatingCreate, store: Store = Depends(get_store),
           project: Project = Depends(get_project)):
    values = body.model_dump()
    rating_ops.check_prompt(values["messages"])
    if values["ideal"] is not None and not values["ideal"].strip():
        values["ideal"] = None  # a blank ideal box is no ideal
    return rating_object(store.add_rating(values, project.owner))


@router.get("")
def list_ratings(after: Optional[str] = None, limit: int = Query(100, ge=1, le=1000),
                 store: Store = Depends(get_store), project: Project = Depends(get_project)):
    rows = store.ratings(after, limit + 1, project.view)
    # Human votes: few enough to tally on each request.
    everything = store.ratings(project=project.view)
    result = page([rating_object(r) for r in rows[:limit]], len(rows) > limit)
    result["summary"] = {"votes": len(everything), "models": rating_ops.tally(everything),
                         "export": rating_ops.export(everything[::-1], "openai").summary()}
    return result


@router.get("/prompts")
def prompts(job: str = Query(..., description="a fine-tuning job id"),
            store: Store = Depends(get_store), project: Project = Depends(get_project)):
    """The held-out prompts of a job's run, as evaluation splits them (the same function)."""
    from afinar import rundir
    from afinar.config import load_train_config
    from afinar.data.prepare import split_for
    from afinar.data.validate import load_examples

    row = job_ops.get_job(store, job, project.view)
    config_file = Path(row["run_dir"] or "") / rundir.CONFIG_FILE
    if not config_file.is_file():
        raise ApiError(400, f"Job {job} is {row['status']} and has not started training: its "
                       "held-out split is made when it starts.", param="job",
                       code="no_held_out_split")
    config = load_train_config(config_file, anchor_paths=False)
    _, held_out, how = split_for(config, load_examples(config.data, config.format))
    data = [{"line": ex.line, "messages": [{"role": m.role, "content": m.content}
                                           for m in ex.prompt_messages()],
             "reference": ex.final_answer()} for ex in held_out if ex.is_chat]
    if not data:
        raise ApiError(400, f"Job {job} held nothing out ({how}), so there are no held-out "
                       "prompts to rate; type a prompt instead.", param="job",
                       code="no_held_out_split")
    return {"object": "list", "job": job, "split": how, "data": data}


@router.get("/export")
def download(format: str = Query("openai"), store: Store = Depends(get_store),
             project: Project = Depends(get_project)):
    result = rating_ops.export(store.ratings(project=project.view)[::-1], format)
    skipped = "; ".join(f"{n} {why}" for why, n in result.skipped.items()) or "none"
    return Response(result.text(), media_type="application/jsonl", headers={
        "Content-Disposition": f'attachment; filename="ratings-{format}.jsonl"',
        # What the file leaves out and why: JSONL has no room for comments.
        "X-Afinar-Pairs": str(result.pairs), "X-Afinar-Ratings": str(result.ratings),
        "X-Afinar-Skipped": skipped})


@router.post("/export")
def export_file(body: ExportCreate, store: Store = Depends(get_store),
                settings: ServeSettings = Depends(get_settings),
                project: Project = Depends(get_project)):
    """The export stored as a fine-tune file, checked as a job's training file will be."""
    result = rating_ops.export(store.ratings(project=project.view)[::-1], body.format)
    if not result.pairs:
        raise ApiError(400, rating_ops.no_pairs_message(result), param="format",
                       code="no_preference_pairs")
    data = result.text().encode("utf-8")
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, f"The export is too large: the limit is {settings.max_upload_mb:g} "
                       "MB (max_upload_mb in the server settings).", code="file_too_large")
    file_id = new_id("file-")
    _write_atomic(store.file_path(file_id), data)
    problems = _training_problems(store.file_path(file_id))
    if problems:
        store.file_path(file_id).unlink(missing_ok=True)
        raise ApiError(400, f"The export of {result.pairs} pair(s) cannot train a job yet: "
                       f"{problems}. Rate more prompts, or download the JSONL.",
                       param="format", code="invalid_export")
    row = store.add_file(file_id, f"ratings-{body.format}.jsonl", len(data), "fine-tune",
                         project=project.owner)
    return {**file_object(row), "export": result.summary()}


def _write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".export-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _training_problems(path: Path) -> str:
    """The errors a job's file validation would fail on (e.g. fewer than 10 pairs), or ""."""
    from afinar.data.validate import load_examples

    report = load_examples(path)
    return "; ".join((f"line {i.line}: " if i.line else "") + i.message
                     for i in report.errors[:3])
