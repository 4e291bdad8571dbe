"""/v1/models: base models, fine-tuned models (and, by id, checkpoints); delete a fine-tune.
Model ids contain ':' and may contain '/', hence the `:path` routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from afinar.serve.engine import Engine
from afinar.serve.errors import ApiError
from afinar.serve.routers.deps import Project, get_engine, get_project, get_settings, get_store
from afinar.serve.schemas import model_object, page
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

router = APIRouter(prefix="/v1/models", tags=["models"])
_STARTED = 0  # base models have no creation time of ours


@router.get("")
def list_models(store: Store = Depends(get_store), engine: Engine = Depends(get_engine),
                settings: ServeSettings = Depends(get_settings),
                project: Project = Depends(get_project)):
    data = [model_object(name, _STARTED, "afinar", engine.engine_of(name))
            for name in settings.base_models()]
    data += [model_object(job["fine_tuned_model"], job["finished_at"] or job["created_at"],
                          settings.organization, engine.engine_of(job["fine_tuned_model"]))
             for job in store.fine_tuned_jobs(project.view)]
    return page(data, False)


@router.get("/{model:path}")
def retrieve(model: str, engine: Engine = Depends(get_engine),
             store: Store = Depends(get_store), settings: ServeSettings = Depends(get_settings),
             project: Project = Depends(get_project)):
    ref = engine.resolve(model, project.view)
    if ref.adapter_kind is None:
        return model_object(model, _STARTED, "afinar", engine.engine_of(model))
    job = store.job_by_model(model, project.view)
    created = (job["finished_at"] if job
               else store.checkpoint_by_model(model, project.view)["created_at"])
    return model_object(model, created, settings.organization, engine.engine_of(model))


@router.delete("/{model:path}")
def delete(model: str, engine: Engine = Depends(get_engine), store: Store = Depends(get_store),
           project: Project = Depends(get_project)):
    ref = engine.resolve(model, project.view)
    if ref.adapter_kind != "final":
        raise ApiError(403, f"You cannot delete '{model}': only fine-tuned models can be "
                       "deleted.", param="model", code="model_not_deletable")
    job = store.job_by_model(model, project.view)
    store.update_job(job["id"], model_deleted=1)
    engine.forget(model)
    return {"id": model, "object": "model", "deleted": True}
