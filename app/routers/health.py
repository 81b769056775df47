"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from redis.exceptions import RedisError

from app.deps import ServicesDep
from app.errors import ServiceUnavailableError
from workers import metrics

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the API process answers")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: Redis answers and at least one worker is alive")
async def ready(services: ServicesDep) -> dict[str, object]:
    try:
        await services.jobs.ping()
        workers = await services.jobs.live_workers()
    except RedisError as exc:
        raise ServiceUnavailableError(f"Redis is unavailable: {exc}", code="redis_unavailable") from exc
    metrics.WORKERS_ALIVE.set(len(workers))
    if not workers:
        raise ServiceUnavailableError("No worker is alive yet.", code="no_worker")
    return {"status": "ready", "workers": len(workers), "models": sorted({w["model"] for w in workers})}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render_metrics()
    return Response(content=body, media_type=content_type)
