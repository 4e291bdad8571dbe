"""/v1/registry: afinar's model versions (the `afinar models` registry) for the dashboard's
Models and Compare pages: versions with their tags and lineage (base → job → checkpoints),
eval reports, config diffs, loss curves, and verified exports. An afinar extension of the API;
every answer comes from the same functions the CLI uses (afinar.versions, afinar export)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from afinar import rundir
from afinar.errors import AfinarError
from afinar.serve import exports
from afinar.serve.errors import ApiError
from afinar.serve.routers.deps import Project, get_project, get_settings, get_store
from afinar.serve.schemas import ExactModel, page
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store
from afinar.versions import (REPORT_FILE, Version, compare_rows, config_diff_rows, loss_curves,
                             metric_direction, open_registry)

router = APIRouter(prefix="/v1/registry", tags=["registry"])


class TagRequest(ExactModel):
    tag: str


class ExportRequest(ExactModel):
    format: str = "gguf"
    quant: str | None = None


def _get(ref: str, store: Store, project: Project) -> Version:
    with open_registry() as registry:
        try:
            version = registry.get(ref)
        except AfinarError as exc:
            raise ApiError(404, exc.message, param="version", code="version_not_found") from None
    if not _visible(version, _jobs_by_run(store), project):  # a 404, as OpenAI answers
        raise ApiError(404, f"No model version '{ref}'.", param="version",
                       code="version_not_found")
    return version


def _visible(version: Version, jobs: dict[str, dict], project: Project) -> bool:
    """A job's run belongs to the job's project (`jobs`: _jobs_by_run); runs trained outside
    the server (`afinar train` on this machine) to the project 'default'. An admin key sees
    every version."""
    if project.view is None:
        return True
    job = jobs.get(version.path)
    return (job["project"] if job else "default") == project.view


def _jobs_by_run(store: Store) -> dict[str, dict]:
    return {str(Path(job["run_dir"]).resolve()): job
            for job in store.jobs(limit=100_000) if job.get("run_dir")}


def version_object(version: Version, job: dict | None) -> dict:
    return {"id": version.id, "object": "model.version", "tags": version.tags,
            "status": version.status, "base_model": version.base_model,
            "method": version.method, "path": version.path,
            "data_path": version.data_path, "data_sha256": version.data_sha256,
            "data_size": version.data_size, "started_at": version.started_at,
            "finished_at": version.finished_at, "error": version.error,
            "metrics": version.metrics, "eval_metrics": version.eval_metrics,
            "evaluated": (Path(version.path) / REPORT_FILE).is_file(),
            "job": job["id"] if job else None,
            "fine_tuned_model": job.get("fine_tuned_model") if job else None}


def _lineage(version: Version, job: dict | None, store: Store, others: list[Version]) -> dict:
    """base → (earlier version, when this run started from one) → job → checkpoints."""
    parent = next((v.id for v in others if version.base_model and
                   v.path == str(Path(version.base_model).expanduser().resolve())), None)
    if job:
        checkpoints = [{"step": c["step_number"], "model": c["model_name"]}
                       for c in store.checkpoints(job["id"])]
    else:
        folder = Path(version.path) / rundir.CHECKPOINTS_DIR
        checkpoints = [{"step": int(p.name.split("-")[1]), "model": None}
                       for p in sorted(folder.glob("step-*"), reverse=True)
                       if p.name.split("-")[1].isdigit()] if folder.is_dir() else []
    return {"base_model": version.base_model, "parent_version": parent,
            "job": job["id"] if job else None,
            "fine_tuned_model": job.get("fine_tuned_model") if job else None,
            "checkpoints": checkpoints}


@router.get("/versions")
def list_versions(store: Store = Depends(get_store), project: Project = Depends(get_project)):
    with open_registry() as registry:
        versions = registry.list()
    jobs = _jobs_by_run(store)
    mine = [v for v in versions if _visible(v, jobs, project)]
    return page([version_object(v, jobs.get(v.path)) for v in mine], False)


@router.get("/versions/{ref}")
def retrieve_version(ref: str, store: Store = Depends(get_store),
                     settings: ServeSettings = Depends(get_settings),
                     project: Project = Depends(get_project)):
    version = _get(ref, store, project)
    with open_registry() as registry:
        others = registry.list()
    job = _jobs_by_run(store).get(version.path)
    return {**version_object(version, job), "config": version.config,
            "lineage": _lineage(version, job, store, others),
            "exports": exports.list_exports(settings.state_dir(), version.id)}


def _report_file(version: Version, name: str) -> Path:
    file = Path(version.path) / name
    if not file.is_file():
        raise ApiError(404, f"{version.id} has no evaluation report yet: run `afinar eval "
                       f"{version.id}`.", param="version", code="report_not_found")
    return file


@router.get("/versions/{ref}/report")
def report(ref: str, store: Store = Depends(get_store),
           project: Project = Depends(get_project)):
    return Response(_report_file(_get(ref, store, project), REPORT_FILE).read_bytes(),
                    media_type="application/json")


@router.get("/versions/{ref}/report.html")
def report_html(ref: str, store: Store = Depends(get_store),
                project: Project = Depends(get_project)):
    version = _get(ref, store, project)
    return Response(_report_file(version, "report.html").read_bytes(),
                    media_type="text/html; charset=utf-8", headers={
                        "Content-Disposition": f'attachment; filename="{version.id}-report.html"'})


@router.post("/versions/{ref}/tags")
def add_tag(ref: str, body: TagRequest, store: Store = Depends(get_store),
            project: Project = Depends(get_project)):
    version = _get(ref, store, project)
    with open_registry() as registry:
        tagged = registry.tag(version.id, body.tag.strip())
    return version_object(tagged, _jobs_by_run(store).get(tagged.path))


@router.delete("/tags/{tag}")
def remove_tag(tag: str, store: Store = Depends(get_store),
               project: Project = Depends(get_project)):
    _get(tag, store, project)  # another project's tag is not this key's to remove
    with open_registry() as registry:
        try:
            version = registry.untag(tag)
        except AfinarError as exc:
            raise ApiError(404, exc.message, param="tag", code="tag_not_found") from None
    return version_object(version, _jobs_by_run(store).get(version.path))


@router.get("/compare")
def compare(versions: str = Query(..., description="Comma-separated version ids or tags"),
            store: Store = Depends(get_store), project: Project = Depends(get_project)):
    refs = [r.strip() for r in versions.split(",") if r.strip()]
    if len(refs) < 2:
        raise ApiError(400, "Compare needs at least two versions, e.g. versions=v1,v2.",
                       param="versions")
    found = [_get(ref, store, project) for ref in refs]
    return {"versions": [{"id": v.id, "tags": v.tags, "method": v.method,
                          "base_model": v.base_model} for v in found],
            "metrics": [{"metric": name, "better": metric_direction(name), "values": values}
                        for name, values in compare_rows(found)],
            "config_diff": [{"setting": name, "values": values}
                            for name, values in config_diff_rows(found)],
            "curves": {v.id: loss_curves(v) for v in found}}


@router.post("/versions/{ref}/exports")
def start_export(ref: str, body: ExportRequest,
                 settings: ServeSettings = Depends(get_settings),
                 store: Store = Depends(get_store), project: Project = Depends(get_project)):
    version = _get(ref, store, project)
    if version.status != "succeeded":
        raise ApiError(400, f"{version.id} is {version.status}: only a finished run can be "
                       "exported.", param="version")
    return exports.start_export(settings.state_dir(), version.id, version.path, body.format,
                                body.quant)


@router.get("/exports/{export_id}")
def get_export(export_id: str, settings: ServeSettings = Depends(get_settings),
               store: Store = Depends(get_store), project: Project = Depends(get_project)):
    try:
        record = exports.get_export(settings.state_dir(), export_id)
        _get(record["version"], store, project)  # another project's export: a 404
        return record
    except (AfinarError, ApiError):
        raise ApiError(404, f"No export '{export_id}'.", param="export_id",
                       code="export_not_found") from None
