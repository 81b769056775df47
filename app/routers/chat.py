"""POST /v1/chat/completions: OpenAI Chat Completions, continuing a compacted context when one is given.

The route resolves the compaction token to a handle (never trusting the client with the handle itself), queues a
chat job, and relays the worker's records from the per-request reply stream, either collected into one
`chat.completion` or as SSE `chat.completion.chunk` events. It waits for the worker's first record before
answering, so a handle or model problem found by the worker is a real HTTP status even for a streaming request.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.deps import RequestIdDep, ServicesDep, TenantDep
from app.errors import APIError, NotFoundError
from app.jobs import JobQueue, error_from_record
from app.routers.compact import ERROR_RESPONSES
from app.tokens import InvalidTokenError, is_expired, open_token
from schemas.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    ChunkDelta,
    PromptTokensDetails,
    Usage,
)
from workers import metrics
from workers.queue import NOT_FOUND_CODE, NOT_FOUND_MESSAGE, ChatJob

router = APIRouter(prefix="/v1", tags=["chat"])


def resolve_handle(secret: bytes, tenant: str, token: str) -> str:
    """The handle inside a valid, unexpired token of this tenant; every other case is the same 404."""
    try:
        claims = open_token(secret, token)
    except InvalidTokenError:
        claims = None
    if claims is None or is_expired(claims, time.time()) or claims.tenant != tenant:
        raise NotFoundError(NOT_FOUND_MESSAGE, param="encrypted_content", code=NOT_FOUND_CODE)
    return claims.handle


def continuation_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The messages that follow the compacted prefix, as plain role/content dicts.

    The compaction part is removed from the first message; that message's other parts, if any, stay as a message
    of the same role right after the compacted context.
    """
    first, rest = messages[0], messages[1:]
    keep_first = not first.compaction_tokens() or bool(first.text())
    return [{"role": m.role, "content": m.text()} for m in ([first] if keep_first else []) + rest]


@dataclass
class Relay:
    """Reads one chat job's reply stream; tracks text already relayed and the timings the metrics want."""

    jobs: JobQueue
    completion_id: str
    model: str
    wait_seconds: float
    arrived: float = field(default_factory=time.perf_counter)
    # Filled in from the worker's records:
    prompt_tokens: int = field(default=0, init=False)
    cached_tokens: int = field(default=0, init=False)
    completion_tokens: int = field(default=0, init=False)
    finish_reason: str = field(default="stop", init=False)
    finished: bool = field(default=False, init=False)
    sent_chars: int = field(default=0, init=False)
    token_times: list[float] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._records = self.jobs.replies(self.completion_id, self.wait_seconds)

    async def start(self) -> None:
        """Wait for the worker's start record; an error record becomes the HTTP error of this request."""
        record = await self._next()
        self.prompt_tokens, self.cached_tokens = record["prompt_tokens"], record["cached_tokens"]

    async def text(self) -> AsyncIterator[str]:
        """New answer text until the end record. A job replayed after a worker died starts over from offset 0:
        what was already relayed is skipped, so the client sees each character once."""
        while True:
            record = await self._next()
            if record["kind"] == "delta" and record["offset"] <= self.sent_chars:
                fresh = record["text"][self.sent_chars - record["offset"]:]
                if fresh:
                    self.token_times.append(time.perf_counter())
                    self.sent_chars += len(fresh)
                    yield fresh
            elif record["kind"] == "end":
                self.finish_reason = record["finish_reason"]
                self.completion_tokens = record["completion_tokens"]
                self.finished = True
                self._observe()
                return

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=self.cached_tokens))

    async def close(self) -> None:
        """Stop a generation nobody will read and drop the reply stream.

        Shielded: it runs when a client disconnect has cancelled the response, where an unshielded await would be
        cancelled at once and the worker would go on generating for nobody.
        """
        with anyio.CancelScope(shield=True):
            await self._records.aclose()
            if not self.finished:
                await self.jobs.cancel(self.completion_id)
            await self.jobs.discard(self.completion_id)

    async def _next(self) -> dict[str, Any]:
        record = await anext(self._records)
        if record["kind"] == "error":
            raise error_from_record(record)
        return record

    def _observe(self) -> None:
        times = self.token_times
        metrics.observe_chat(
            self.model,
            ttft_seconds=times[0] - self.arrived if times else None,
            inter_token_seconds=[b - a for a, b in zip(times, times[1:])],
            e2e_seconds=time.perf_counter() - self.arrived,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
        )


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "a chat.completion, or with stream=true SSE chat.completion.chunk events"},
               **ERROR_RESPONSES},
    summary="Chat completion, optionally continuing a compacted context",
)
async def create_chat_completion(body: ChatCompletionRequest, services: ServicesDep, tenant: TenantDep,
                                 request_id: RequestIdDep) -> Any:
    token = body.compaction_token()
    handle = resolve_handle(services.secret, tenant, token) if token else None
    model = await services.jobs.resolve_model(body.model)
    job = ChatJob(
        completion_id=f"chatcmpl-{secrets.token_hex(12)}",
        request_id=request_id,
        enqueued_at=time.time(),
        model=model,
        handle=handle,
        messages=continuation_messages(body.messages),
        max_tokens=body.max_new_tokens(services.settings.default_max_tokens),
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
        max_input_tokens=services.settings.max_input_tokens,
    )
    relay = Relay(services.jobs, job.completion_id, model, services.settings.chat_wait_seconds)
    await services.jobs.submit("chat", model, job)
    try:
        await relay.start()
    except BaseException:
        await relay.close()
        raise
    if body.stream:
        return StreamingResponse(_sse(relay, created=int(time.time()), include_usage=body.include_usage()),
                                 media_type="text/event-stream", headers={"cache-control": "no-cache"})
    try:
        answer = "".join([piece async for piece in relay.text()])
    finally:
        await relay.close()
    return ChatCompletion(
        id=job.completion_id,
        created=int(time.time()),
        model=model,
        choices=[Choice(message=AssistantMessage(content=answer), finish_reason=relay.finish_reason)],
        usage=relay.usage(),
    )


async def _sse(relay: Relay, created: int, include_usage: bool) -> AsyncIterator[str]:
    """SSE events: a role chunk, content chunks, the finish chunk, the usage chunk if asked, then [DONE].

    An error after the stream started can no longer change the HTTP status; it is sent as an `error` event, which
    the openai client raises as an APIError.
    """

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=relay.completion_id, created=created, model=relay.model, choices=choices,
                                    usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    try:
        yield event([ChunkChoice(delta=ChunkDelta(role="assistant", content=""))])
        async for piece in relay.text():
            yield event([ChunkChoice(delta=ChunkDelta(content=piece))])
        yield event([ChunkChoice(delta=ChunkDelta(), finish_reason=relay.finish_reason)])
        if include_usage:
            yield event([], relay.usage())
        yield "data: [DONE]\n\n"
    except APIError as error:
        yield f"data: {json.dumps(error.to_body())}\n\n"
    finally:
        await relay.close()
