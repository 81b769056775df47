"""`create_app`: the FastAPI application factory (routers, error handlers, middleware, Redis connections)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.deps import Services, Settings, load_secret
from app.errors import install_error_handlers
from app.jobs import JobQueue
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.routers import chat, compact, health, models
from workers import metrics
from workers.queue import Keys
from workers.store.redis_server import connect_redis, redis_url_of
from workers.store.redis_store import BlobStore

log = logging.getLogger("kvcompact.api")


def _observe_redis(op: str, seconds: float) -> None:
    metrics.REDIS_OP_SECONDS.labels(op=op).observe(seconds)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API. Redis is connected in the lifespan, so importing or building the app has no side effects.

    With `settings.redis_url` unset the app starts an embedded Redis under `settings.data_dir` itself (the
    `kvcompact serve` command normally does that first and passes the URL on to its worker).
    """
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sync_client = await run_in_threadpool(connect_redis, settings.redis_url, settings.data_dir)
        async_client = aioredis.from_url(redis_url_of(sync_client))
        app.state.services = Services(
            settings=settings,
            secret=load_secret(settings.secret, settings.data_dir),
            store=BlobStore(sync_client, prefix=settings.prefix, observe=_observe_redis),
            jobs=JobQueue(async_client, Keys(settings.prefix), settings.max_queue_depth),
        )
        if settings.api_keys:
            log.info("API keys configured for %d tenant(s)", len(set(settings.api_keys.values())))
        else:
            log.warning("no API keys configured (KVC_API_KEYS): running in OPEN mode, every caller is one tenant")
        try:
            yield
        finally:
            await async_client.aclose()
            sync_client.close()

    app = FastAPI(
        title="kvcompact",
        version="0.1.0",
        description="OpenAI-compatible KV-cache compaction service (Attention Matching).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_input_bytes)
    app.add_middleware(RequestContextMiddleware)  # added last = outermost: ids and metrics cover everything
    for router in (compact.router, chat.router, models.router, health.router):
        app.include_router(router)
    return app
