"""End-to-end worker tests: several real worker processes on one embedded Redis behind the real API.

Every compaction sleeps KVC_FAULT_SLEEP_SECONDS inside the worker, and every generated token
KVC_FAULT_TOKEN_SLEEP_SECONDS (fault-injection knobs only workers read), so jobs overlap and a worker can be
`kill -9`-ed while it is provably in the middle of one.
"""

from __future__ import annotations

import openai
import pytest

from tests.service_helpers import DOCUMENT, TEST_MODEL, Service, chat, compact, wait_until
from workers.queue import GROUP, JOB_FIELD, Keys

QUEUE_DEPTH = 4


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("svc-workers"), {
        "KVC_FAULT_SLEEP_SECONDS": "1.5", "KVC_FAULT_TOKEN_SLEEP_SECONDS": "0.2",
        "KVC_MAX_QUEUE_DEPTH": str(QUEUE_DEPTH)})
    try:
        yield svc.start(workers=3, others={"qwen": "tiny-qwen2"})
    finally:
        svc.close()


@pytest.fixture(scope="module")
def client(service):
    return service.client(max_retries=0)


def submit_background(service: Service, count: int) -> list:
    with service.http() as http:
        return [http.post("/v1/compact", json={"model": TEST_MODEL, "input": DOCUMENT, "target_tokens": 8,
                                               "background": True}) for _ in range(count)]


def wait_status(service: Service, compaction_id: str, wanted: str, timeout: float = 60) -> dict:
    store = service.store()
    return wait_until(lambda: (r := store.get_status(compaction_id)) and r["status"] == wanted and r, timeout,
                      f"{compaction_id} to be {wanted}")


def test_two_workers_share_the_load_and_a_full_queue_answers_429(service):
    responses = submit_background(service, QUEUE_DEPTH + 2)
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) == QUEUE_DEPTH and len(refused) == 2
    assert refused[0].json()["error"]["type"] == "rate_limit_error"
    done = [wait_status(service, cid, "completed") for cid in accepted]
    assert len({record["worker"] for record in done}) >= 2  # 4 jobs, 3 workers: shared, never one worker alone


def test_malformed_job_is_acknowledged_and_the_worker_keeps_serving(service, client):
    stream = Keys().job_stream("compact", TEST_MODEL)
    service.redis.xadd(stream, {JOB_FIELD: b"{definitely not a job"})
    wait_until(lambda: service.redis.xlen(stream) == 0, 30, "the malformed job to be consumed")
    assert service.redis.xpending(stream, GROUP)["pending"] == 0
    assert all(proc.alive() for proc in service.workers.values())
    assert compact(client, DOCUMENT, target_tokens=8)["status"] == "completed"


def test_a_handle_made_for_another_model_is_409(service, client):
    token = compact(client, DOCUMENT, target_tokens=8)["encrypted_content"]
    with pytest.raises(openai.ConflictError) as excinfo:
        client.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "code?"}],
                                       max_tokens=4, extra_body={"compaction": {"encrypted_content": token}})
    assert excinfo.value.body["code"] == "model_mismatch"
    assert chat(client, token, "code?", max_tokens=2).choices[0].message is not None  # the right model still can


def test_kill_9_mid_compaction_is_finished_by_the_other_worker(service, client):
    (response,) = submit_background(service, 1)
    compaction_id = response.json()["id"]
    victim = wait_status(service, compaction_id, "in_progress")["worker"]
    service.workers[victim].kill9()
    done = wait_status(service, compaction_id, "completed", timeout=60)
    assert done["worker"] != victim
    token = client.get(f"/compactions/{compaction_id}", cast_to=dict)["encrypted_content"]
    assert chat(client, token, "What is the code?", max_tokens=3).usage.prompt_tokens_details.cached_tokens > 0


def test_kill_9_mid_answer_the_stream_resumes_without_repeating_text(service, client):
    """The chat job is replayed from the start by another worker; the API skips the text already sent."""
    token = compact(client, DOCUMENT, target_tokens=8)["encrypted_content"]
    expected = chat(client, token, "What is the code?", max_tokens=12).choices[0].message.content
    stream = Keys().job_stream("chat", TEST_MODEL)
    chunks = chat(client, token, "What is the code?", max_tokens=12, stream=True)
    pieces = [next(chunks).choices[0].delta.content, next(chunks).choices[0].delta.content]  # role, first text
    (pending,) = service.redis.xpending_range(stream, GROUP, min="-", max="+", count=1)
    service.workers[pending["consumer"].decode()].kill9()
    pieces += [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(p or "" for p in pieces) == expected


def test_a_client_that_goes_away_stops_the_generation(service, client):
    token = compact(client, DOCUMENT, target_tokens=8)["encrypted_content"]
    stream = Keys().job_stream("chat", TEST_MODEL)
    chunks = chat(client, token, "Tell me everything.", max_tokens=500, stream=True,  # 100 s at 0.2 s a token
                  extra_headers={"x-request-id": "req-goes-away"})
    next(chunks), next(chunks)
    chunks.close()
    wait_until(lambda: service.redis.xlen(stream) == 0, 15, "the abandoned chat job to stop")
    logs = "".join(proc.log() for proc in service.workers.values()).splitlines()
    assert any("chat cancelled" in line and "req-goes-away" in line for line in logs)
