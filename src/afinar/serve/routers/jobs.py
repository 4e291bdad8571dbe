"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

from fastapi import APIRouter, BackgroundTasks, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from afinar import rundir
from afinar.serve import jobs as job_ops
from afinar.serve.routers.deps import Project, get_project, get_settings, get_store
from afinar.serve.schemas import JobCreate, checkpoint_object, event_object, job_object, page
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
_STREAM_POLL_S = 0.5  # how often a live stream looks for new events in the database


@router.post("")
def create(body: JobCreate, background: BackgroundTasks, store: Store = Depends(get_store),
           project: Project = Depends(get_project),
           settings: ServeSettings = Depends(get_settings)):
    job = job_ops.create_job(store, settings, body, project.owner)
    # Validation reads the whole file: after the response, like OpenAI's validating_files.
    background.add_task(job_ops.validate_files, store, job["id"])
    return job_object(job, settings.organization)


@router.get("/settings")
def settings_help():
    """afinar's extension: what each hyperparameter sets, for the dashboard's New job form."""
    return job_ops.settings_help()


@router.get("")
def list_jobs(request: Request, after: Optional[str] = None,
              limit: int = Query(20, ge=1, le=100), store: Store = Depends(get_store),
              project: Project = Depends(get_project),
              settings: ServeSettings = Depends(get_settings)):
    # metadata[key]=value filters, as OpenAI's list accepts them.
    metadata = {k[9:-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    rows = store.jobs(after, limit + 1, metadata or None, project.view)
    return page([job_object(r, settings.organization) for r in rows[:limit]], len(rows) > limit)


@router.get("/{job_id}")
def retrieve(job_id: str, store: Store = Depends(get_store),
             project: Project = Depends(get_project),
             settings: ServeSettings = Depends(get_settings)):
    return job_object(job_ops.get_job(store, job_id, project.view), settings.organization)


@router.post("/{job_id}/cancel")
def cancel(job_id: str, store: Store = Depends(get_store),
           project: Project = Depends(get_project),
           settings: ServeSettings = Depends(get_settings)):
    return job_object(job_ops.cancel_job(store, job_id, project.view), settings.organization)


@router.post("/{job_id}/pause")
def pause(job_id: str, store: Store = Depends(get_store),
          project: Project = Depends(get_project),
          settings: ServeSettings = Depends(get_settings)):
    return job_object(job_ops.pause_job(store, job_id, project.view), settings.organization)


@router.post("/{job_id}/resume")
def resume(job_id: str, store: Store = Depends(get_store),
           project: Project = Depends(get_project),
           settings: ServeSettings = Depends(get_settings)):
    return job_object(job_ops.resume_job(store, job_id, project.view), settings.organization)


@router.get("/{job_id}/events")
def events(job_id: str, after: Optional[str] = None, limit: int = Query(20, ge=1, le=1000),
           store: Store = Depends(get_store),
           project: Project = Depends(get_project)):
    job_ops.get_job(store, job_id, project.view)
    rows = store.events(job_id, after, limit + 1)
    return page([event_object(r) for r in rows[:limit]], len(rows) > limit)


@router.get("/{job_id}/config")
def frozen_config(job_id: str, store: Store = Depends(get_store),
                  project: Project = Depends(get_project)):
    """afinar's extension: the resolved training config the job's run froze (config.yaml);
    `config` is null until training starts and writes it."""
    job = job_ops.get_job(store, job_id, project.view)
    file = Path(job["run_dir"] or "") / rundir.CONFIG_FILE
    written = bool(job["run_dir"]) and file.is_file()
    return {"object": "fine_tuning.job.config", "job": job_id,
            "config": file.read_text(encoding="utf-8") if written else None}


@router.get("/{job_id}/events/stream")
async def stream_events(job_id: str, request: Request, after: Optional[str] = None,
                        store: Store = Depends(get_store),
                        project: Project = Depends(get_project),
                        settings: ServeSettings = Depends(get_settings)):
    """afinar's extension: the job's events as server-sent events, oldest first from the
    cursor `after` (an event id; the `id:` of each message, so a reconnecting client resumes
    where it was). A `job` message carries the job whenever its status changes; the stream
    ends with the job's final status. The dashboard's live pages read it."""
    job_ops.get_job(store, job_id, project.view)

    async def messages():
        cursor, status, quiet = after, None, 0.0
        while not await request.is_disconnected():
            rows = await run_in_threadpool(store.events_since, job_id, cursor)
            for row in rows:
                cursor = row["id"]
                yield f"id: {row['id']}\nevent: event\ndata: {json.dumps(event_object(row))}\n\n"
            job = await run_in_threadpool(store.job, job_id)
            if job["status"] != status:
                status = job["status"]
                body = json.dumps(job_object(job, settings.organization))
                yield f"event: job\ndata: {body}\n\n"
            if status in job_ops.FINAL and not rows:
                return
            quiet = 0.0 if rows else quiet + _STREAM_POLL_S
            if quiet >= 15:  # a comment line keeps proxies from closing an idle stream
                quiet = 0.0
                yield ": still here\n\n"
            await asyncio.sleep(_STREAM_POLL_S)

    return StreamingResponse(messages(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/checkpoints")
def checkpoints(job_id: str, after: Optional[str] = None, limit: int = Query(10, ge=1, le=100),
                store: Store = Depends(get_store),
                project: Project = Depends(get_project)):
    job_ops.get_job(store, job_id, project.view)
    rows = store.checkpoints(job_id)
    if after:
        ids = [r["id"] for r in rows]
        rows = rows[ids.index(after) + 1:] if after in ids else []
    return page([checkpoint_object(r) for r in rows[:limit]], len(rows) > limit)
