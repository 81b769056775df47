"""The Redis store: one key per compacted-cache handle, and one per compaction job status record.

Each blob is a single value written with one ``SET ... EX`` so a reader sees either the whole blob or nothing (no
separate header/payload keys that could expire or be written apart). Every Redis round trip goes through
`BlobStore._timed`, the one place a latency histogram hooks in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")
LatencyObserver = Callable[[str, float], None]


def _ignore_latency(operation: str, seconds: float) -> None:
    """Default observer: timing is measured but not recorded until metrics are wired in."""


class BlobStore:
    """Blobs by handle and job-status records by compaction id, under a key prefix, in a bytes-mode client."""

    def __init__(self, redis: redis.Redis, prefix: str = "kvc:", observe: LatencyObserver = _ignore_latency) -> None:
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("BlobStore needs a bytes-mode Redis client (decode_responses=False)")
        self.redis = redis
        self.prefix = prefix
        self.observe = observe

    def blob_key(self, handle: str) -> str:
        """Redis key of a handle's blob."""
        return f"{self.prefix}blob:{handle}"

    def status_key(self, compaction_id: str) -> str:
        """Redis key of a compaction's status record."""
        return f"{self.prefix}status:{compaction_id}"

    def put(self, handle: str, blob: bytes, ttl_seconds: int) -> None:
        """Store (or replace) a blob that expires after `ttl_seconds`."""
        _check_ttl(ttl_seconds)
        self._timed("put", self.redis.set, self.blob_key(handle), blob, ex=ttl_seconds)

    def get(self, handle: str) -> bytes | None:
        """The blob, or None when the handle is unknown, expired or deleted."""
        return self._timed("get", self.redis.get, self.blob_key(handle))

    def delete(self, handle: str) -> bool:
        """Delete a blob; True when it existed."""
        return bool(self._timed("delete", self.redis.delete, self.blob_key(handle)))

    def ttl(self, handle: str) -> int | None:
        """Seconds the blob has left, or None when it does not exist (put always sets an expiry)."""
        seconds = self._timed("ttl", self.redis.ttl, self.blob_key(handle))
        return int(seconds) if seconds >= 0 else None

    def put_status(self, compaction_id: str, record: dict[str, Any], ttl_seconds: int) -> None:
        """Store (or replace) a JSON-serializable job-status record, e.g. the compaction object as served."""
        _check_ttl(ttl_seconds)
        self._timed("put_status", self.redis.set, self.status_key(compaction_id), json.dumps(record), ex=ttl_seconds)

    def get_status(self, compaction_id: str) -> dict[str, Any] | None:
        """The status record, or None when unknown or expired."""
        raw = self._timed("get_status", self.redis.get, self.status_key(compaction_id))
        return None if raw is None else json.loads(raw)

    def delete_status(self, compaction_id: str) -> bool:
        """Delete a status record; True when it existed."""
        return bool(self._timed("delete_status", self.redis.delete, self.status_key(compaction_id)))

    def _timed(self, operation: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one Redis call and report its wall time (also when it raises) to the latency observer."""
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.observe(operation, time.perf_counter() - start)


def _check_ttl(ttl_seconds: int) -> None:
    """Redis refuses EX 0 or below with a cryptic error; say what is wrong instead."""
    if ttl_seconds < 1:
        raise ValueError(f"ttl_seconds must be >= 1, got {ttl_seconds}")
