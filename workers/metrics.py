"""Every Prometheus metric the service exports (prefix `kvc_`), and one-line helpers to record them.

Names mirror vLLM's (`time_to_first_token_seconds`, `inter_token_latency_seconds`, `prompt_tokens_total`, ...) and
LMCache's (hit/miss counters, store latency histograms) under our own prefix, so operators who know those dashboards
read ours the same way. Labels stay low-cardinality: `model`, `method`, `phase`, `route`, `queue`, `stream`, `op`,
`worker` (one per worker process), never tenant or handle ids.

Two ways to collect, both supported:
- **Multiprocess**: set `PROMETHEUS_MULTIPROC_DIR` (an empty directory shared by every process of one host) before
  this module is imported; `render_metrics()` then merges all processes' values, so one `/metrics` route covers the
  API and its in-process or subprocess workers.
- **One endpoint per process**: a worker calls `start_metrics_server(port)` and Prometheus scrapes each worker.

Gauges declare how multiprocess mode merges them (`multiprocess_mode`); it is ignored in single-process mode.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess

# `*_created` series double the scrape size and no panel uses them (vLLM turns them off too).
disable_created_metrics()

# The `phase` values of one AM compaction: the pipeline's phases, then the worker's serialize and store.
COMPACTION_PHASES: tuple[str, ...] = (
    "prefill", "queries", "budgets", "key_selection", "beta_fit", "value_fit", "serialize", "store",
)
# Label values known before any traffic: pre-creating their children makes dashboards render (with zeros) at once.
QUEUES: tuple[str, ...] = ("compact", "chat")
JOB_OUTCOMES: tuple[str, ...] = ("ok", "error")
REDIS_OPS: tuple[str, ...] = ("put", "get", "delete", "ttl", "put_status", "get_status", "delete_status")  # BlobStore

# Buckets: latencies span sub-millisecond Redis calls to minutes-long CPU compactions of long documents.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 19))  # 16 .. 262144 tokens
_SLOT_BUCKETS = tuple(float(4**k) for k in range(2, 14))  # 16 .. 67M (layer, KV head, position) slots
_RATIO_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0)
_BYTES_BUCKETS = tuple(float(4**k) for k in range(5, 18))  # 1 KiB .. 16 GiB

# --- HTTP (API process) ------------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter("kvc_http_requests", "HTTP requests answered", ["route", "method", "status"])
HTTP_DURATION = Histogram("kvc_http_request_duration_seconds", "HTTP request latency, arrival to last byte",
                          ["route"], buckets=_LATENCY_BUCKETS)

# --- Chat (measured in the API from request arrival, as vLLM does in its frontend) ------------------------------
CHAT_TTFT = Histogram("kvc_chat_time_to_first_token_seconds", "Request arrival to first generated token",
                      ["model"], buckets=_TTFT_BUCKETS)
CHAT_ITL = Histogram("kvc_chat_inter_token_latency_seconds", "Gap between consecutive generated tokens",
                     ["model"], buckets=_ITL_BUCKETS)
CHAT_E2E = Histogram("kvc_chat_e2e_seconds", "Request arrival to last generated token", ["model"],
                     buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("kvc_prompt_tokens", "Prompt tokens, compacted prefix included", ["model"])
CACHED_TOKENS = Counter("kvc_cached_tokens", "Prompt tokens served from a compacted prefix", ["model"])
COMPLETION_TOKENS = Counter("kvc_completion_tokens", "Generated tokens", ["model"])

# --- Jobs and queues ---------------------------------------------------------------------------------------------
QUEUE_WAIT = Histogram("kvc_queue_wait_seconds", "Job enqueue to pick-up by a worker", ["queue"],
                       buckets=_LATENCY_BUCKETS)
JOBS = Counter("kvc_jobs", "Jobs finished by workers", ["kind", "outcome"])
JOBS_RECLAIMED = Counter("kvc_jobs_reclaimed", "Jobs claimed from a dead worker (XAUTOCLAIM)", ["kind"])
STREAM_PENDING = Gauge("kvc_stream_pending_jobs", "Delivered but not yet acknowledged entries (XPENDING)",
                       ["stream"], multiprocess_mode="mostrecent")
STREAM_LAG = Gauge("kvc_stream_lag", "Entries not yet delivered to the consumer group (XINFO GROUPS lag)",
                   ["stream"], multiprocess_mode="mostrecent")
WORKER_BUSY = Gauge("kvc_worker_busy", "1 while the worker runs a job, 0 while idle", ["worker"],
                    multiprocess_mode="livesum")
WORKERS_ALIVE = Gauge("kvc_workers_alive", "Workers with a fresh heartbeat in Redis", multiprocess_mode="mostrecent")

# --- Compaction (worker) -----------------------------------------------------------------------------------------
COMPACTION_PHASE = Histogram("kvc_compaction_phase_seconds", "Compaction time spent per phase",
                             ["model", "method", "phase"], buckets=_LATENCY_BUCKETS)
COMPACTION_SECONDS = Histogram("kvc_compaction_seconds", "Whole compaction, all phases", ["model", "method"],
                               buckets=_LATENCY_BUCKETS)
COMPACTION_INPUT_TOKENS = Histogram("kvc_compaction_input_tokens", "Tokens of the context given to compaction",
                                    ["model", "method"], buckets=_TOKEN_BUCKETS)
COMPACTION_RETAINED = Histogram("kvc_compaction_retained_slots", "KV slots kept, over all layers and KV heads",
                                ["model", "method"], buckets=_SLOT_BUCKETS)
COMPACTION_RATIO = Histogram("kvc_compaction_ratio", "Full KV slots / retained slots (usage.compaction_ratio)",
                             ["model", "method"], buckets=_RATIO_BUCKETS)
BLOB_BYTES = Histogram("kvc_blob_bytes", "Size of the stored compacted blob", ["model", "method"],
                       buckets=_BYTES_BUCKETS)
FULL_KV_BYTES = Histogram("kvc_full_kv_bytes", "Size the uncompacted KV cache of the same context would take",
                          ["model", "method"], buckets=_BYTES_BUCKETS)

# --- Redis store ---------------------------------------------------------------------------------------------------
REDIS_OP_SECONDS = Histogram("kvc_redis_op_seconds", "Redis call latency", ["op"], buckets=_REDIS_BUCKETS)
REDIS_ERRORS = Counter("kvc_redis_errors", "Redis calls that raised", ["op"])

# --- Worker device cache -------------------------------------------------------------------------------------------
HOT_CACHE_HITS = Counter("kvc_hot_cache_hits", "Compacted caches found in the worker's device LRU")
HOT_CACHE_MISSES = Counter("kvc_hot_cache_misses", "Compacted caches loaded from Redis into the device LRU")
HOT_CACHE_EVICTIONS = Counter("kvc_hot_cache_evictions", "Compacted caches evicted from the device LRU")
DEVICE_MEMORY = Gauge("kvc_device_memory_bytes", "Device memory in use by this process (CUDA allocated, or RSS)",
                      ["device"], multiprocess_mode="livesum")


def _precreate() -> None:
    """Create children for label values known up front, so every dashboard panel has a series before traffic."""
    for queue in QUEUES:
        QUEUE_WAIT.labels(queue=queue)
        JOBS_RECLAIMED.labels(kind=queue)
        for outcome in JOB_OUTCOMES:
            JOBS.labels(kind=queue, outcome=outcome)
    for op in REDIS_OPS:
        REDIS_OP_SECONDS.labels(op=op)
        REDIS_ERRORS.labels(op=op)


_precreate()


# --- recording helpers (one call per instrumentation point) ------------------------------------------------------
def track_http(route: str, method: str, status: int, seconds: float) -> None:
    """Record one answered HTTP request; `route` is the route template (`/v1/compactions/{id}`), never the raw path."""
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    HTTP_DURATION.labels(route=route).observe(seconds)


def observe_chat(model: str, *, ttft_seconds: float | None, inter_token_seconds: Iterable[float], e2e_seconds: float,
                 prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
    """Record a finished chat completion; `ttft_seconds` is None when no token was generated."""
    if ttft_seconds is not None:
        CHAT_TTFT.labels(model=model).observe(ttft_seconds)
    itl = CHAT_ITL.labels(model=model)
    for gap in inter_token_seconds:
        itl.observe(gap)
    CHAT_E2E.labels(model=model).observe(e2e_seconds)
    PROMPT_TOKENS.labels(model=model).inc(prompt_tokens)
    CACHED_TOKENS.labels(model=model).inc(cached_tokens)
    COMPLETION_TOKENS.labels(model=model).inc(completion_tokens)


def observe_queue_wait(queue: str, enqueued_at: float) -> None:
    """Record how long a job waited; `enqueued_at` is the `time.time()` the API stamped on the job."""
    QUEUE_WAIT.labels(queue=queue).observe(max(0.0, time.time() - enqueued_at))


def observe_compaction(model: str, method: str, *, phase_seconds: Mapping[str, float], input_tokens: int,
                       retained_slots: int, ratio: float, blob_bytes: int, full_kv_bytes: int,
                       total_seconds: float | None = None) -> None:
    """Record one finished compaction; the total defaults to the sum of the phases when not measured separately."""
    for phase, seconds in phase_seconds.items():
        COMPACTION_PHASE.labels(model=model, method=method, phase=phase).observe(seconds)
    total = sum(phase_seconds.values()) if total_seconds is None else total_seconds
    COMPACTION_SECONDS.labels(model=model, method=method).observe(total)
    COMPACTION_INPUT_TOKENS.labels(model=model, method=method).observe(input_tokens)
    COMPACTION_RETAINED.labels(model=model, method=method).observe(retained_slots)
    COMPACTION_RATIO.labels(model=model, method=method).observe(ratio)
    BLOB_BYTES.labels(model=model, method=method).observe(blob_bytes)
    FULL_KV_BYTES.labels(model=model, method=method).observe(full_kv_bytes)


def count_job(kind: str, outcome: str) -> None:
    """Count a job a worker finished: `kind` is the queue (`compact`/`chat`), `outcome` is `ok` or `error`."""
    JOBS.labels(kind=kind, outcome=outcome).inc()


def set_stream_state(stream: str, *, pending: int, lag: int | None) -> None:
    """Publish a stream's consumer-group state; `lag` is None when Redis cannot tell (it then stays unchanged)."""
    STREAM_PENDING.labels(stream=stream).set(pending)
    if lag is not None:
        STREAM_LAG.labels(stream=stream).set(lag)


@contextmanager
def timed_redis_op(op: str) -> Iterator[None]:
    """Time a Redis call; an exception counts as an error for `op` and propagates."""
    start = time.perf_counter()
    try:
        yield
    except Exception:
        REDIS_ERRORS.labels(op=op).inc()
        raise
    finally:
        REDIS_OP_SECONDS.labels(op=op).observe(time.perf_counter() - start)


@contextmanager
def worker_busy(worker: str) -> Iterator[None]:
    """Mark `worker` busy for the duration of a job."""
    gauge = WORKER_BUSY.labels(worker=worker)
    gauge.set(1)
    try:
        yield
    finally:
        gauge.set(0)


def sample_device_memory(device: str) -> None:
    """Publish the memory this process holds on `device` ("cuda:0", "cpu", ...): CUDA allocated bytes, else RSS."""
    if device.startswith("cuda"):
        import torch  # the API process never samples a CUDA device, so it need not import torch at start

        used = torch.cuda.memory_allocated(device)
    else:
        used = _rss_bytes()
    DEVICE_MEMORY.labels(device=device).set(used)


def _rss_bytes() -> int:
    """Resident set size of this process from /proc (Linux); 0 where /proc is absent."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


# --- exposition ---------------------------------------------------------------------------------------------------
def multiprocess_enabled() -> bool:
    """True when values live in `PROMETHEUS_MULTIPROC_DIR` files shared by several processes."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _scrape_registry() -> CollectorRegistry:
    """The registry to expose: all processes' files merged in multiprocess mode, else this process's registry."""
    if not multiprocess_enabled():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def render_metrics() -> tuple[bytes, str]:
    """Body and content type for a `/metrics` HTTP response."""
    return generate_latest(_scrape_registry()), CONTENT_TYPE_LATEST


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> None:
    """Serve `/metrics` from a background thread, for processes without an HTTP app of their own (workers)."""
    start_http_server(port, addr=addr, registry=_scrape_registry())


def mark_process_dead(pid: int) -> None:
    """Drop a finished process's live gauges (multiprocess mode); the parent calls it when a worker child exits."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)
