"""End-to-end API tests: the real `kvcompact serve` process, one real worker, embedded Redis, the official client.

One service is shared by the module (starting processes is the expensive part on 2 cores); each test creates the
compactions it needs, so the order of tests does not matter.
"""

from __future__ import annotations

import secrets
import time

import httpx
import openai
import pytest

from app.tokens import mint_token
from tests.service_helpers import (
    DOCUMENT,
    KEY_A,
    KEY_B,
    SECRET,
    TEST_MODEL,
    Service,
    chat,
    compact,
    wait_until,
)
from workers.queue import NOT_FOUND_MESSAGE
from workers.store.blob import decode_blob

MAX_INPUT_BYTES = 64_000
MAX_INPUT_TOKENS = 3_000


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("svc-api"), {"KVC_MAX_INPUT_BYTES": str(MAX_INPUT_BYTES),
                                                       "KVC_MAX_INPUT_TOKENS": str(MAX_INPUT_TOKENS)})
    try:
        yield svc.start(workers=1)
    finally:
        svc.close()


@pytest.fixture(scope="module")
def client(service):
    return service.client(KEY_A, max_retries=0)


@pytest.fixture(scope="module")
def compaction(client):
    return compact(client, DOCUMENT, keep_ratio=0.5)


def assert_not_found(excinfo: pytest.ExceptionInfo) -> None:
    """The one 404 every handle problem gets: same status, code and message (no oracle)."""
    assert excinfo.value.status_code == 404
    assert excinfo.value.body["message"] == NOT_FOUND_MESSAGE
    assert excinfo.value.body["code"] == "compaction_not_found"


def test_compact_returns_completed_object_with_opaque_token(compaction):
    assert compaction["object"] == "compaction"
    assert compaction["status"] == "completed"
    assert compaction["model"] == TEST_MODEL
    assert compaction["id"].startswith("cmp_")
    token = compaction["encrypted_content"]
    assert token.startswith("kvc1.")
    usage = compaction["usage"]
    assert usage["input_tokens"] > len(DOCUMENT) // 2  # byte tokenizer: about one token per character
    assert 0 < usage["retained_slots"]
    assert usage["blob_bytes"] > 0 and "total" in usage["phase_seconds"]
    assert compaction["expires_at"] > time.time()
    assert "handle" not in compaction and "tenant" not in compaction


def test_compaction_options_reach_the_worker_and_the_blob(service, client):
    """beta_prior and hints (like query_sources) are compaction options: the worker fits with them and the blob
    records them."""
    made = compact(client, DOCUMENT, keep_ratio=0.5, beta_prior=10.0, hints=["What is the code?"], hint_weight=1000.0)
    handle = service.store().get_status(made["id"])["handle"]
    _, header = decode_blob(service.store().get(handle), None)
    assert header.params["beta_prior"] == 10.0 and header.params["keep_ratio"] == 0.5
    assert list(header.params["hints"]) == ["What is the code?"] and made["usage"]["phase_seconds"]["hints"] > 0
    assert header.params["hint_weight"] == 1000.0


def test_chat_stream_and_non_stream_agree_and_count_cached_tokens(client, compaction):
    token = compaction["encrypted_content"]
    full = chat(client, token, "What is the code?", max_tokens=10)
    assert full.object == "chat.completion"
    assert full.model == TEST_MODEL
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens_details.cached_tokens == compaction["usage"]["input_tokens"]
    assert full.usage.prompt_tokens > full.usage.prompt_tokens_details.cached_tokens
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(chat(client, token, "What is the code?", max_tokens=10, stream=True,
                       stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_compaction_as_content_part_equals_extra_field(client, compaction):
    token = compaction["encrypted_content"]
    as_part = client.chat.completions.create(
        model=TEST_MODEL, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": [{"type": "compaction", "encrypted_content": token},
                                               {"type": "text", "text": "What is the code?"}]}])
    assert as_part.choices[0].message.content == chat(client, token, "What is the code?", max_tokens=8) \
        .choices[0].message.content


def test_request_id_is_propagated(service, compaction):
    with service.http() as http:
        response = http.post("/v1/chat/completions", headers={"x-request-id": "req-test-42"}, json={
            "model": TEST_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
            "compaction": {"encrypted_content": compaction["encrypted_content"]}})
        generated = http.get("/v1/models")
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-test-42"
    assert len(generated.headers["x-request-id"]) == 32
    wait_until(lambda: "req-test-42" in service.workers["w1"].log(), 10, "the request id in the worker log")


def test_plain_chat_without_compaction(client):
    reply = client.chat.completions.create(model=TEST_MODEL, max_tokens=5, temperature=0,
                                           messages=[{"role": "user", "content": "hello"}])
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.completion_tokens <= 5


def test_get_and_delete_compaction(client):
    created = compact(client, DOCUMENT, keep_ratio=0.5, metadata={"doc": "ledger"})
    got = client.get(f"/compactions/{created['id']}", cast_to=dict)
    assert got["status"] == "completed" and got["metadata"] == {"doc": "ledger"}
    assert got["usage"] == created["usage"]
    token = got["encrypted_content"]
    assert chat(client, token, "code?", max_tokens=2).choices[0].message is not None  # a fresh token works too

    deleted = client.delete(f"/compactions/{created['id']}", cast_to=dict)
    assert deleted == {"id": created["id"], "object": "compaction.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.get(f"/compactions/{created['id']}", cast_to=dict)
    with pytest.raises(openai.NotFoundError) as excinfo:
        chat(client, created["encrypted_content"], "code?")
    assert_not_found(excinfo)


def test_background_compaction_answers_202_then_completes(service, client):
    with service.http() as http:
        response = http.post("/v1/compact", json={"model": TEST_MODEL, "input": DOCUMENT, "background": True,
                                                  "target_tokens": 16})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] in ("queued", "in_progress") and body["encrypted_content"] is None

    def completed():
        current = client.get(f"/compactions/{body['id']}", cast_to=dict)
        return current if current["status"] == "completed" else None

    done = wait_until(completed, 60, "the background compaction to complete", 0.2)
    assert chat(client, done["encrypted_content"], "code?", max_tokens=2).usage.completion_tokens >= 1


def test_tampered_unknown_expired_and_foreign_tokens_get_the_same_404(service, client, compaction):
    token = compaction["encrypted_content"]
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    unknown = mint_token(SECRET.encode(), secrets.token_hex(16), "tenant-a", int(time.time()) + 600)  # worker 404
    expired = compact(client, DOCUMENT, keep_ratio=0.5, ttl_seconds=1)["encrypted_content"]
    time.sleep(1.2)
    for bad in (tampered, unknown, expired, "kvc1.garbage"):
        with pytest.raises(openai.NotFoundError) as excinfo:
            chat(client, bad, "code?")
        assert_not_found(excinfo)
    with pytest.raises(openai.NotFoundError) as excinfo:
        chat(service.client(KEY_B, max_retries=0), token, "code?")
    assert_not_found(excinfo)
    with pytest.raises(openai.NotFoundError):  # nor can another tenant read the compaction object
        service.client(KEY_B, max_retries=0).get(f"/compactions/{compaction['id']}", cast_to=dict)


def test_streaming_request_with_bad_token_fails_before_the_stream(client):
    with pytest.raises(openai.NotFoundError):
        list(chat(client, "kvc1.nothing", "q", stream=True))


def test_wrong_api_key_is_401(service):
    with pytest.raises(openai.AuthenticationError):
        service.client("sk-wrong", max_retries=0).models.list()


@pytest.mark.parametrize("body, param", [
    ({"input": DOCUMENT}, "model"),
    ({"model": TEST_MODEL, "input": DOCUMENT, "keep_ratio": 1.5}, "keep_ratio"),
    ({"model": TEST_MODEL, "input": DOCUMENT, "keep_ratio": 0.5, "target_tokens": 4}, None),
    ({"model": TEST_MODEL, "input": DOCUMENT, "method": "magic"}, "method"),
    ({"model": TEST_MODEL, "input": [{"role": "wizard", "content": "x"}]}, "input.0.role"),
    ({"model": TEST_MODEL, "input": DOCUMENT, "unknown_option": 1}, "unknown_option"),
])
def test_malformed_compact_bodies_get_openai_400(service, body, param):
    with service.http() as http:
        response = http.post("/v1/compact", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_malformed_chat_bodies_get_openai_errors(service, client, compaction):
    with service.http() as http:
        not_json = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.chat.completions.create(model=TEST_MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert excinfo.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TEST_MODEL, messages=[])
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    assert excinfo.value.body["code"] == "model_not_found"


def test_a_budget_the_document_cannot_meet_is_a_400_from_the_worker(client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        compact(client, "short text", target_tokens=10_000)
    assert excinfo.value.body["code"] == "invalid_request"


def test_oversized_documents_get_413_and_the_worker_survives(service, client):
    with pytest.raises(openai.APIStatusError) as too_many_bytes:
        compact(client, "x" * (MAX_INPUT_BYTES + 1))
    assert too_many_bytes.value.status_code == 413
    with service.http() as http:  # a chunked body declares no length: it is counted as it arrives
        chunked = http.post("/v1/compact", content=iter([b'{"model": "tiny-llama", "input": "', b"z" * MAX_INPUT_BYTES,
                                                         b'"}']), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as too_many_tokens:  # under the byte limit, over the token limit
        compact(client, "y" * (MAX_INPUT_TOKENS + 10))
    assert too_many_tokens.value.status_code == 413
    assert too_many_tokens.value.body["code"] == "input_too_large"
    assert service.workers["w1"].alive()
    assert compact(client, DOCUMENT, target_tokens=8)["status"] == "completed"


def test_models_health_ready_metrics_and_openapi(service, client):
    assert [m.id for m in client.models.list().data] == [TEST_MODEL]
    assert client.models.retrieve(TEST_MODEL).id == TEST_MODEL
    with httpx.Client(base_url=service.base_url) as http:
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/ready").json()["workers"] == 1
        assert "kvc_http_requests_total" in http.get("/metrics").text
        paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/compact", "/v1/compactions/{compaction_id}", "/v1/chat/completions", "/v1/models"} <= set(paths)
