"""workers/metrics.py records what its helpers promise, merges processes in multiprocess mode, and serves a scrape
endpoint; workers/logging_setup.py writes JSON lines that carry the bound request id."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from prometheus_client import REGISTRY

from workers import metrics
from workers.logging_setup import JsonFormatter, bind_request_id, configure_logging, request_id_var


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_observe_compaction_records_every_phase_and_size():
    labels = {"model": "m-test", "method": "am"}
    metrics.observe_compaction("m-test", "am", phase_seconds={"prefill": 0.5, "beta_fit": 0.25}, input_tokens=1000,
                               retained_slots=100, ratio=10.0, blob_bytes=4096, full_kv_bytes=40960)
    assert _value("kvc_compaction_phase_seconds_sum", **labels, phase="prefill") == 0.5
    assert _value("kvc_compaction_seconds_sum", **labels) == 0.75, "the total defaults to the sum of the phases"
    assert _value("kvc_compaction_ratio_sum", **labels) == 10.0
    assert _value("kvc_full_kv_bytes_sum", **labels) - _value("kvc_blob_bytes_sum", **labels) == 36864


def test_observe_chat_counts_tokens_and_each_gap():
    metrics.observe_chat("m-chat", ttft_seconds=0.2, inter_token_seconds=[0.01, 0.02, 0.03], e2e_seconds=0.3,
                         prompt_tokens=50, cached_tokens=40, completion_tokens=4)
    assert _value("kvc_chat_inter_token_latency_seconds_count", model="m-chat") == 3
    assert _value("kvc_chat_time_to_first_token_seconds_count", model="m-chat") == 1
    assert _value("kvc_cached_tokens_total", model="m-chat") == 40


def test_timed_redis_op_counts_errors_and_still_times_them():
    before = _value("kvc_redis_op_seconds_count", op="get")
    errors_before = _value("kvc_redis_errors_total", op="get")
    with pytest.raises(ConnectionError):
        with metrics.timed_redis_op("get"):
            raise ConnectionError("redis down")
    with metrics.timed_redis_op("get"):
        pass
    assert _value("kvc_redis_op_seconds_count", op="get") == before + 2
    assert _value("kvc_redis_errors_total", op="get") == errors_before + 1


def test_worker_busy_resets_after_a_failed_job():
    with pytest.raises(RuntimeError):
        with metrics.worker_busy("w-test"):
            assert _value("kvc_worker_busy", worker="w-test") == 1
            raise RuntimeError("job failed")
    assert _value("kvc_worker_busy", worker="w-test") == 0


def test_known_label_values_render_before_any_traffic():
    body, content_type = metrics.render_metrics()
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert 'kvc_jobs_total{kind="chat",outcome="error"} 0.0' in text
    assert 'kvc_queue_wait_seconds_count{queue="compact"}' in text
    assert "_created" not in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_multiprocess_mode_merges_processes_and_serves_them(tmp_path):
    """Two processes record into one PROMETHEUS_MULTIPROC_DIR; a third serves the merged values over HTTP."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    record = "from workers import metrics; metrics.count_job('compact', 'ok'); metrics.WORKERS_ALIVE.set({n})"
    for n in (1, 2):
        subprocess.run([sys.executable, "-c", record.format(n=n)], env=env, check=True, timeout=60)
    port = _free_port()
    serve = textwrap.dedent(f"""
        import urllib.request
        from workers import metrics
        metrics.start_metrics_server({port}, addr="127.0.0.1")
        print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    """)
    text = subprocess.run([sys.executable, "-c", serve], env=env, check=True, timeout=60, capture_output=True,
                          text=True).stdout
    assert 'kvc_jobs_total{kind="compact",outcome="ok"} 2.0' in text
    assert "kvc_workers_alive 2.0" in text, "mostrecent: the last process's value, not a sum"


def test_single_process_scrape_endpoint():
    port = _free_port()
    metrics.start_metrics_server(port, addr="127.0.0.1")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "# TYPE kvc_compaction_phase_seconds histogram" in text


def test_json_logs_carry_the_bound_request_id_and_extras():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("worker"))
    logger = logging.getLogger("kvcompact.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = bind_request_id("req-123")
    try:
        logger.info("compacted %d tokens", 42, extra={"handle_prefix": "ab12"})
    finally:
        request_id_var.reset(token)
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "compacted 42 tokens"
    assert (entry["service"], entry["logger"], entry["level"]) == ("worker", "kvcompact.test", "INFO")
    assert entry["request_id"] == "req-123" and entry["handle_prefix"] == "ab12"
    assert entry["ts"].endswith("+00:00")


def test_configure_logging_routes_everything_as_json(capsys):
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    token = bind_request_id()
    try:
        configure_logging("api", level="debug")
        logging.getLogger("uvicorn.access").info("GET /health 200")
        entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert entry["service"] == "api" and entry["logger"] == "uvicorn.access" and len(entry["request_id"]) == 32
    finally:
        request_id_var.reset(token)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
