"""The API's side of the job protocol (`workers/queue.py`): enqueue jobs, find live workers, read replies back.

All calls are async (redis.asyncio) so a request waiting minutes for a compaction or streaming tokens holds no
thread, only a coroutine.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from app.errors import (
    APIError,
    BadRequestError,
    ConflictError,
    GatewayTimeoutError,
    InternalServerError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
)
from workers.queue import JOB_FIELD, JobKind, Keys, decode_record, encode


_ERRORS_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    500: InternalServerError,
}


def error_from_record(record: dict[str, Any]) -> APIError:
    """The API error for a worker's error record (a `JobFailure.record()` or a failed status's `error`)."""
    status = int(record.get("status", 500))
    cls = _ERRORS_BY_STATUS.get(status, APIError)
    return cls(str(record.get("message", "The job failed.")), code=record.get("code"), status_code=status)


# One blocking XREAD at most this long: redis-py's async client times a read out at 5 s by default, so a longer
# block would turn every slow job (a real-model compaction) into an error.
REPLY_POLL_SECONDS = 2.0

class JobQueue:
    """Producer side of the per-model job streams and consumer side of the per-request reply streams."""

    def __init__(self, client: aioredis.Redis, keys: Keys, max_depth: int) -> None:
        self.redis = client
        self.keys = keys
        self.max_depth = max_depth

    async def live_workers(self) -> list[dict[str, Any]]:
        """Heartbeat records of the workers whose heartbeat key has not expired."""
        names = [name async for name in self.redis.scan_iter(match=self.keys.worker_pattern(), count=100)]
        if not names:
            return []
        return [json.loads(raw) for raw in await self.redis.mget(names) if raw is not None]

    async def resolve_model(self, requested: str) -> str:
        """The canonical name of the model a live worker serves under `requested` (its name or source alias).

        With no live worker at all the service is unavailable (503); with workers but none for this model the
        model does not exist here (404, as OpenAI answers for an unknown model).
        """
        workers = await self.live_workers()
        if not workers:
            raise ServiceUnavailableError("No worker is alive to serve this request; try again shortly.")
        for worker in workers:
            if requested == worker["model"] or requested in worker.get("aliases", []):
                return worker["model"]
        raise NotFoundError(f"The model '{requested}' does not exist or no worker serves it.", param="model",
                            code="model_not_found")

    async def submit(self, kind: JobKind, model: str, job: BaseModel) -> None:
        """Append a job to the model's stream, refusing (429) when it already holds `max_depth` jobs.

        Workers delete finished entries, so the stream length counts queued and in-flight jobs.
        """
        stream = self.keys.job_stream(kind, model)
        if await self.redis.xlen(stream) >= self.max_depth:
            raise RateLimitError(f"The {kind} queue for {model} is full ({self.max_depth} jobs); retry later.",
                                 code="queue_full")
        await self.redis.xadd(stream, {JOB_FIELD: encode(job)})

    async def replies(self, request_id: str, idle_timeout: float) -> AsyncIterator[dict[str, Any]]:
        """Yield the worker's reply records in order; 504 if no record arrives for `idle_timeout` seconds.

        Reading from the stream's start means records written before the caller began listening are not lost.
        """
        key = self.keys.reply_stream(request_id)
        last_id = "0-0"
        deadline = time.monotonic() + idle_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayTimeoutError("The worker did not answer in time; the job may still complete later.")
            reply = await self.redis.xread({key: last_id}, count=64, block=max(1, int(min(remaining, REPLY_POLL_SECONDS) * 1000)))
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    deadline = time.monotonic() + idle_timeout
                    yield decode_record(fields)

    async def cancel(self, request_id: str) -> None:
        """Ask the worker to stop a generation nobody reads any more."""
        await self.redis.set(self.keys.cancel(request_id), b"1", ex=600)

    async def discard(self, request_id: str) -> None:
        await self.redis.delete(self.keys.reply_stream(request_id))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())
