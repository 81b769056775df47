"""POST /v1/compact, GET and DELETE /v1/compactions/{id}.

The status record in Redis (written here, advanced by the worker) is the one source of truth for a compaction;
it holds the raw handle and the tenant, which never leave the server: clients only see the compaction id and, once
completed, the authenticated `encrypted_content` token.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from app.deps import RequestIdDep, Services, ServicesDep, TenantDep
from app.errors import APIError, GatewayTimeoutError, NotFoundError
from app.jobs import error_from_record
from app.tokens import mint_token, new_handle
from schemas.wire import (
    CompactionDeleted,
    CompactionObject,
    CompactionUsage,
    CompactRequest,
    ErrorDetail,
    ErrorResponse,
)
from workers.queue import STATUS_GRACE_SECONDS, CompactJob

router = APIRouter(prefix="/v1", tags=["compaction"])

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 429, 500, 503)
}
# Fields of the request that configure the compaction itself (`workers.compaction.pipeline.CompactionConfig`).
CONFIG_FIELDS = ("method", "keep_ratio", "target_tokens", "query_sources", "chunk_tokens", "beta_prior", "hints",
                 "hint_weight")


def _render(record: dict[str, Any], secret: bytes) -> CompactionObject:
    """The client's view of a status record: no handle, no tenant; a fresh token once the blob exists."""
    error = record.get("error")
    token = None
    if record["status"] == "completed":
        token = mint_token(secret, record["handle"], record["tenant"], record["expires_at"])
    return CompactionObject(
        id=record["id"],
        model=record["model"],
        created_at=record["created_at"],
        status=record["status"],
        encrypted_content=token,
        expires_at=record["expires_at"],
        usage=CompactionUsage(**record["usage"]) if record.get("usage") else None,
        error=ErrorDetail(**error_from_record(error).to_body()["error"]) if error else None,
        metadata=record.get("metadata"),
    )


def _status_ttl(record: dict[str, Any]) -> int:
    return max(1, int(record["expires_at"] - time.time()) + STATUS_GRACE_SECONDS)


async def _owned_record(services: Services, tenant: str, compaction_id: str) -> dict[str, Any]:
    """The caller's status record; someone else's, a deleted or an unknown one are the same 404."""
    record = await run_in_threadpool(services.store.get_status, compaction_id)
    if record is None or record.get("tenant") != tenant or record.get("status") == "deleted":
        raise NotFoundError(f"No compaction found with id '{compaction_id}'.", param="id",
                            code="compaction_not_found")
    return record


@router.post(
    "/compact",
    response_model=CompactionObject,
    status_code=200,
    responses={202: {"model": CompactionObject, "description": "accepted (background) or still running"},
               **ERROR_RESPONSES},
    summary="Compact a context into a reusable KV cache",
)
async def create_compaction(body: CompactRequest, response: Response, services: ServicesDep, tenant: TenantDep,
                            request_id: RequestIdDep) -> CompactionObject:
    """Queue a compaction; wait for it unless `background` (202 at once). A sync call that outlasts the server's
    wait limit also answers 202 with the running compaction, to be polled with GET."""
    model = await services.jobs.resolve_model(body.model)
    now = int(time.time())
    record: dict[str, Any] = {
        "id": f"cmp_{secrets.token_hex(12)}",
        "model": model,
        "created_at": now,
        "status": "queued",
        "expires_at": now + body.ttl_seconds,
        "metadata": body.metadata,
        "tenant": tenant,
        "handle": new_handle(),
    }
    # The record exists before the job does: the worker merges its progress into it.
    await run_in_threadpool(services.store.put_status, record["id"], record, _status_ttl(record))
    job = CompactJob(
        compaction_id=record["id"],
        handle=record["handle"],
        tenant=tenant,
        model=model,
        input=body.input if isinstance(body.input, str) else [
            {"role": message.role, "content": message.text()} for message in body.input],
        config=body.model_dump(include=set(CONFIG_FIELDS), exclude_none=True),
        ttl_seconds=body.ttl_seconds,
        max_input_tokens=services.settings.max_input_tokens,
        request_id=request_id,
        enqueued_at=time.time(),
    )
    try:
        await services.jobs.submit("compact", model, job)
    except APIError:
        await run_in_threadpool(services.store.delete_status, record["id"])
        raise
    if not body.background:
        try:
            async for reply in services.jobs.replies(job.reply_id, services.settings.compact_wait_seconds):
                if reply.get("kind") in ("done", "error"):
                    break
        except GatewayTimeoutError:
            pass  # answered below as 202 with the compaction still running
        finally:
            await services.jobs.discard(job.reply_id)
        record = await _owned_record(services, tenant, record["id"])  # 404 if deleted meanwhile
        if record["status"] == "failed":
            raise error_from_record(record["error"])
    if record["status"] != "completed":
        response.status_code = 202
    return _render(record, services.secret)


@router.get("/compactions/{compaction_id}", response_model=CompactionObject, responses=ERROR_RESPONSES,
            summary="Get a compaction's status (and token once completed)")
async def get_compaction(compaction_id: str, services: ServicesDep, tenant: TenantDep) -> CompactionObject:
    return _render(await _owned_record(services, tenant, compaction_id), services.secret)


@router.delete("/compactions/{compaction_id}", response_model=CompactionDeleted, responses=ERROR_RESPONSES,
               summary="Delete a compaction and its stored cache")
async def delete_compaction(compaction_id: str, services: ServicesDep, tenant: TenantDep) -> CompactionDeleted:
    """Drop the blob now; keep a `deleted` marker so a worker still running the job does not store it again."""
    record = await _owned_record(services, tenant, compaction_id)
    await run_in_threadpool(services.store.delete, record["handle"])
    record.update(status="deleted", usage=None, error=None)
    await run_in_threadpool(services.store.put_status, compaction_id, record, _status_ttl(record))
    return CompactionDeleted(id=compaction_id, deleted=True)
