"""/v1/files: upload (multipart), list, retrieve, delete, content."""

from __future__ import annotations

import os
import tempfile
from pathlib import PurePath
from typing import Literal, Optional

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse

from afinar.serve.errors import ApiError, not_found
from afinar.serve.ids import new_id
from afinar.serve.routers.deps import Project, get_project, get_settings, get_store
from afinar.serve.schemas import file_object, page
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune", "fine-tune-results", "assistants", "batch", "user_data", "evals",
            "vision")
_CHUNK = 1 << 20


def _display_name(name: str | None) -> str:
    # Only the last path component, as data: a name never becomes a path on our side.
    base = PurePath((name or "upload.jsonl").replace("\\", "/")).name
    return "".join(ch for ch in base if ch.isprintable())[:255] or "upload.jsonl"


@router.post("")
async def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...),
                 store: Store = Depends(get_store),
                 settings: ServeSettings = Depends(get_settings),
                 project: Project = Depends(get_project)):
    if purpose not in PURPOSES or purpose == "fine-tune-results":
        raise ApiError(400, f"'{purpose}' is not a valid purpose; use 'fine-tune'.",
                       param="purpose")
    quota = settings.project_limits(project.owner)
    count, held = store.usage(project.owner)
    if count >= quota.max_files:
        raise ApiError(429, f"Project '{project.owner}' holds {count} files, its limit "
                       f"(max_files); delete some first.", param="file",
                       code="file_quota_exceeded")
    room = int(quota.max_storage_mb * 2**20) - held
    limit = min(settings.max_upload_bytes, room)
    file_id = new_id("file-")
    dest = store.file_path(file_id)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", dir=dest.parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := await file.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise _too_large(settings, quota, project.owner, limit)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the row says it exists
        os.replace(tmp, dest)
    except OSError as exc:  # the storage folder is full (or gone): nothing is kept
        raise ApiError(507, f"The server could not store the file: {exc.strerror or exc}. "
                       "Nothing was kept; try again later.", param="file",
                       code="storage_full") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file_object(store.add_file(file_id, _display_name(file.filename), size, purpose,
                                      project=project.owner))


def _too_large(settings: ServeSettings, quota, project: str, limit: int) -> ApiError:
    if limit < settings.max_upload_bytes:
        return ApiError(413, f"File is too large for the space project '{project}' has left "
                        f"({max(limit, 0) / 2**20:.1f} of {quota.max_storage_mb:g} MB, "
                        "max_storage_mb); delete files first.", param="file",
                        code="storage_quota_exceeded")
    return ApiError(413, f"File is too large: the limit is {settings.max_upload_mb:g} MB "
                    "(max_upload_mb in the server settings).", param="file",
                    code="file_too_large")


@router.get("")
def list_files(purpose: Optional[str] = None, limit: int = Query(10000, ge=1, le=10000),
               after: Optional[str] = None, order: Literal["asc", "desc"] = "desc",
               store: Store = Depends(get_store), project: Project = Depends(get_project)):
    rows = store.files(purpose, after, limit + 1, order, project=project.view)
    return page([file_object(r) for r in rows[:limit]], len(rows) > limit)


def _file(store: Store, file_id: str, project: Project) -> dict:
    row = store.file(file_id, project.view)
    if row is None:
        raise not_found("file", file_id, "file_id")
    return row


@router.get("/{file_id}")
def retrieve(file_id: str, store: Store = Depends(get_store),
             project: Project = Depends(get_project)):
    return file_object(_file(store, file_id, project))


@router.delete("/{file_id}")
def delete(file_id: str, store: Store = Depends(get_store),
           project: Project = Depends(get_project)):
    _file(store, file_id, project)
    store.delete_file(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/{file_id}/validation")
def validation(file_id: str, model: Optional[str] = None, store: Store = Depends(get_store),
               settings: ServeSettings = Depends(get_settings),
               project: Project = Depends(get_project)):
    """afinar's extension: the file checked as `afinar validate` checks it; with `model` (one of
    the server's base models), token statistics with that model's tokenizer."""
    from afinar.data.summary import file_summary

    row = _file(store, file_id, project)
    bases = settings.base_models()
    if model is not None and model not in bases:
        raise ApiError(400, f"model '{model}' is not one of this server's base models: "
                       f"{', '.join(bases)}.", param="model", code="model_not_found")
    summary = file_summary(store.file_path(file_id), row["filename"],
                           settings.held_out_fraction, tokenizer_of=bases[model] if model else None)
    if "tokens" in summary:
        summary["tokens"]["model"] = model  # its name here, never the server's path to it
    return summary


@router.get("/{file_id}/content")
def content(file_id: str, store: Store = Depends(get_store),
            project: Project = Depends(get_project)):
    row = _file(store, file_id, project)
    media = "text/csv" if row["filename"].endswith(".csv") else "application/octet-stream"
    return FileResponse(store.file_path(file_id), media_type=media, filename=row["filename"])
