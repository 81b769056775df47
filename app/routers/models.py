"""GET /v1/models: the models live workers serve right now (a model is listed while any worker for it is alive)."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ServicesDep, TenantDep
from app.errors import NotFoundError
from app.routers.compact import ERROR_RESPONSES
from schemas.wire import Model, ModelList

router = APIRouter(prefix="/v1", tags=["models"])
OWNER = "kvcompact"


async def _served(services: ServicesDep) -> dict[str, Model]:
    models: dict[str, Model] = {}
    for worker in await services.jobs.live_workers():
        models.setdefault(worker["model"], Model(id=worker["model"], created=int(worker.get("started_at", 0)),
                                                 owned_by=OWNER))
    return models


@router.get("/models", response_model=ModelList, responses=ERROR_RESPONSES, summary="List served models")
async def list_models(services: ServicesDep, tenant: TenantDep) -> ModelList:
    return ModelList(data=sorted((await _served(services)).values(), key=lambda m: m.id))


@router.get("/models/{model}", response_model=Model, responses=ERROR_RESPONSES, summary="Retrieve a served model")
async def retrieve_model(model: str, services: ServicesDep, tenant: TenantDep) -> Model:
    served = await _served(services)
    if model not in served:
        raise NotFoundError(f"The model '{model}' does not exist or no worker serves it.", param="model",
                            code="model_not_found")
    return served[model]
