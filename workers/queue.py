"""The Redis protocol between the API and the workers: key names, job payloads and reply records.

Both sides import this one module so a key name or a record field can never drift between them. Everything here
is plain data (pydantic models, string helpers); the code that talks to Redis lives in `app/jobs.py` (producer
side) and `workers/worker.py` (consumer side).

Layout (all keys under the prefix, default ``kvc:``):

- ``jobs:compact:{model}`` / ``jobs:chat:{model}``: Redis Streams consumed by the consumer group ``workers``. One
  pair per served model, so a worker only ever receives jobs for the model it has loaded. A worker deletes an entry
  (XACK + XDEL) once it is finished, so the stream length is the number of jobs queued or in flight.
- ``reply:{reply_id}``: a short-lived stream per job (keyed by its compaction or completion id) that carries the
  worker's answer back to the API process waiting on it (compaction: one terminal record; chat: start, deltas, then end or error).
- ``cancel:{reply_id}``: set by the API when a streaming client goes away, so the worker stops generating.
- ``workers:{worker_id}``: a heartbeat key with a TTL; its presence is what `/ready` and `/v1/models` call a live
  worker.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

GROUP = "workers"
JOB_FIELD = "job"
RECORD_FIELD = "r"
JobKind = Literal["compact", "chat"]

# One message for every way a handle can fail to resolve (unknown, expired, deleted, tampered, other tenant) so a
# caller cannot tell them apart: the response must not be an oracle for which handles exist.
NOT_FOUND_MESSAGE = "No compaction matches this encrypted_content (it may be unknown, expired or deleted)."
NOT_FOUND_CODE = "compaction_not_found"
# A compaction's status record outlives its blob a little, so GET can still say what happened to it.
STATUS_GRACE_SECONDS = 3600


class Keys:
    """Key names under one prefix; the API and every worker of a deployment must use the same prefix."""

    def __init__(self, prefix: str = "kvc:") -> None:
        self.prefix = prefix

    def job_stream(self, kind: JobKind, model: str) -> str:
        return f"{self.prefix}jobs:{kind}:{model}"

    def reply_stream(self, reply_id: str) -> str:
        return f"{self.prefix}reply:{reply_id}"

    def cancel(self, reply_id: str) -> str:
        return f"{self.prefix}cancel:{reply_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}workers:{worker_id}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}workers:*"


class CompactJob(BaseModel):
    """Compact `input` with `config` and store the blob under `handle` for `ttl_seconds`."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["compact"] = "compact"
    compaction_id: str
    handle: str
    tenant: str
    model: str
    input: str | list[dict[str, Any]]
    config: dict[str, Any] = Field(default_factory=dict)
    ttl_seconds: int = Field(ge=1)
    max_input_tokens: int = Field(ge=1)
    request_id: str  # for logs only: clients choose it, so it is not unique
    enqueued_at: float

    @property
    def reply_id(self) -> str:
        return self.compaction_id


class ChatJob(BaseModel):
    """Generate a reply to `messages`, continuing the compacted cache stored under `handle` when one is given."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["chat"] = "chat"
    completion_id: str
    request_id: str  # for logs only: clients choose it, so it is not unique
    enqueued_at: float
    model: str
    handle: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0)
    top_p: float = Field(ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    max_input_tokens: int = Field(ge=1)

    @property
    def reply_id(self) -> str:
        return self.completion_id


class JobFailure(Exception):
    """A job that cannot succeed; carries the HTTP status and OpenAI error code the API should answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def record(self) -> dict[str, Any]:
        return {"kind": "error", "status": self.status, "code": self.code, "message": self.message}


def not_found() -> JobFailure:
    return JobFailure(404, NOT_FOUND_CODE, NOT_FOUND_MESSAGE)


def encode(payload: BaseModel | dict[str, Any]) -> str:
    """Serialize a job or reply record for a stream field (JSON: small, debuggable with redis-cli)."""
    if isinstance(payload, BaseModel):
        return payload.model_dump_json()
    return json.dumps(payload, separators=(",", ":"))


def decode_record(fields: dict[bytes | str, bytes | str]) -> dict[str, Any]:
    """Parse one reply-stream entry written with `encode` under RECORD_FIELD."""
    raw = fields.get(RECORD_FIELD) or fields.get(RECORD_FIELD.encode())
    if raw is None:
        raise ValueError("reply record without payload")
    return json.loads(raw)
