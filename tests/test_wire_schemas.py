"""Wire schemas and error bodies, checked against what the official `openai` client sends and parses."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai.types import Model as OpenAIModel
from openai.types.chat import ChatCompletion as OpenAIChatCompletion
from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk
from pydantic import ValidationError

from app.errors import ConflictError, NotFoundError, RateLimitError, install_error_handlers
from schemas.wire import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompactionObject,
    CompactionUsage,
    CompactRequest,
    ErrorResponse,
    Model,
    ModelList,
    PromptTokensDetails,
    Usage,
)

USAGE = Usage(prompt_tokens=120, completion_tokens=3, total_tokens=123,
              prompt_tokens_details=PromptTokensDetails(cached_tokens=100))


def completion() -> ChatCompletion:
    return ChatCompletion(id="chatcmpl-1", created=1_700_000_000, model="tiny-llama", usage=USAGE,
                          choices=[Choice(message=AssistantMessage(content="Paris."), finish_reason="stop")])


def chunks() -> list[ChatCompletionChunk]:
    common = {"id": "chatcmpl-2", "created": 1_700_000_000, "model": "tiny-llama"}
    return [
        ChatCompletionChunk(**common, choices=[ChunkChoice(delta=ChunkDelta(role="assistant", content=""))]),
        ChatCompletionChunk(**common, choices=[ChunkChoice(delta=ChunkDelta(content="Par"))]),
        ChatCompletionChunk(**common, choices=[ChunkChoice(delta=ChunkDelta(content="is."), finish_reason="stop")]),
        ChatCompletionChunk(**common, choices=[], usage=USAGE),
    ]


# --- compaction requests ------------------------------------------------------------------------------------------


def test_compact_request_defaults():
    request = CompactRequest(model="m", input="a long document")
    assert request.keep_ratio == 0.1 and request.target_tokens is None
    assert request.method == "am" and request.query_sources == ["repeat"]
    assert request.ttl_seconds == 86400 and request.background is False and request.metadata is None


def test_compact_request_budget_is_one_of_two():
    assert CompactRequest(model="m", input="x", target_tokens=64).keep_ratio is None
    assert CompactRequest(model="m", input="x", keep_ratio=1).keep_ratio == 1
    for bad in ({"keep_ratio": 0.2, "target_tokens": 10}, {"keep_ratio": 0}, {"keep_ratio": 1.5},
                {"target_tokens": 0}):
        with pytest.raises(ValidationError):
            CompactRequest(model="m", input="x", **bad)


@pytest.mark.parametrize("bad", [
    {"method": "magic"}, {"query_sources": ["oracle"]}, {"query_sources": []}, {"ttl_seconds": 0},
    {"ttl_seconds": 10**9}, {"chunk_tokens": 0}, {"keep_ration": 0.1}, {"input": ""}, {"input": []},
    {"beta_prior": -1.0}, {"beta_prior": 1e9}, {"hints": []}, {"hints": [""]}, {"hints": ["q"] * 33},
    {"hints": ["q" * 4001]}, {"hints": "one bare string"},
    {"hints": ["q"], "hint_weight": 0.5}, {"hints": ["q"], "hint_weight": 1e9},
    {"input": [{"role": "user", "content": [{"type": "compaction", "encrypted_content": "kvc1.x"}]}]},
])
def test_compact_request_refuses(bad):
    with pytest.raises(ValidationError):
        CompactRequest.model_validate({"model": "m", "input": "x", **bad})


def test_compact_request_messages_and_tool_outputs():
    request = CompactRequest.model_validate({"model": "m", "input": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Read "}, {"type": "text", "text": "this."}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42 rows"},
    ]})
    assert [m.text() for m in request.input] == ["Be brief.", "Read this.", "42 rows"]


def test_metadata_limits_follow_openai():
    ok = {f"k{i}": "v" * 512 for i in range(15)} | {"k" * 64: "v"}
    assert CompactRequest(model="m", input="x", metadata=ok).metadata == ok
    for bad in ({f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(ValidationError, match="metadata"):
            CompactRequest(model="m", input="x", metadata=bad)


def test_compaction_object_serializes_completed_and_failed():
    done = CompactionObject(id="cmp_1", model="m", created_at=1, status="completed", encrypted_content="kvc1.x",
                            expires_at=2, usage=CompactionUsage(input_tokens=10, retained_slots=3,
                                                                compaction_ratio=0.3, blob_bytes=99))
    body = json.loads(done.model_dump_json())
    assert body["object"] == "compaction" and body["usage"]["phase_seconds"] == {}
    failed = CompactionObject.model_validate({"id": "cmp_2", "model": "m", "created_at": 1, "status": "failed",
                                              "error": {"message": "too long", "type": "invalid_request_error"}})
    assert failed.error.param is None and failed.encrypted_content is None


# --- chat requests, as the openai client sends them ---------------------------------------------------------------


def capture_requests(responder) -> tuple[openai.OpenAI, list[dict]]:
    """An openai client whose HTTP layer records request bodies and answers with `responder(body)`."""
    seen: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return responder(seen[-1])

    client = openai.OpenAI(api_key="sk-test", base_url="http://kvc.test/v1", max_retries=0,
                           http_client=httpx.Client(transport=httpx.MockTransport(handle)))
    return client, seen


def test_openai_client_request_parses_and_our_completion_parses_back():
    client, seen = capture_requests(lambda body: httpx.Response(200, json=completion().model_dump(mode="json")))
    answer = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": [{"type": "compaction", "encrypted_content": "kvc1.abc"},
                                                {"type": "text", "text": "Capital?"}]}],
        max_completion_tokens=8, temperature=0, top_p=1, seed=7, stop=["\n"], n=1, user="u1", presence_penalty=0,
    )
    assert answer.choices[0].message.content == "Paris." and answer.usage.prompt_tokens_details.cached_tokens == 100
    request = ChatCompletionRequest.model_validate(seen[0])
    assert request.compaction_token() == "kvc1.abc" and request.messages[0].text() == "Capital?"
    assert request.max_new_tokens(64) == 8 and request.stop_sequences() == ["\n"] and request.seed == 7


def test_openai_client_stream_parses_our_chunks():
    def sse(body: dict) -> httpx.Response:
        events = [f"data: {chunk.model_dump_json()}\n\n" for chunk in chunks()] + ["data: [DONE]\n\n"]
        return httpx.Response(200, text="".join(events), headers={"content-type": "text/event-stream"})

    client, seen = capture_requests(sse)
    stream = client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "Capital?"}], stream=True,
        stream_options={"include_usage": True}, extra_body={"compaction": {"encrypted_content": "kvc1.top"}},
    )
    received = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in received if c.choices) == "Paris."
    assert received[-1].usage.prompt_tokens_details.cached_tokens == 100
    request = ChatCompletionRequest.model_validate(seen[0])
    assert request.stream and request.include_usage() and request.compaction_token() == "kvc1.top"


def test_response_models_parse_as_openai_types():
    OpenAIChatCompletion.model_validate(completion().model_dump(mode="json"))
    for chunk in chunks():
        parsed = OpenAIChatCompletionChunk.model_validate_json(chunk.model_dump_json())
        assert parsed.id == "chatcmpl-2"
    listed = ModelList(data=[Model(id="tiny-llama", created=1, owned_by="kvcompact")]).model_dump(mode="json")
    assert OpenAIModel.model_validate(listed["data"][0]).id == "tiny-llama" and listed["object"] == "list"


@pytest.mark.parametrize("bad", [
    {"n": 2}, {"temperature": 2.5}, {"top_p": 1.1}, {"stop": ["a", "b", "c", "d", "e"]}, {"max_tokens": 0},
    {"messages": []}, {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": "a"},
                  {"role": "user", "content": [{"type": "compaction", "encrypted_content": "kvc1.x"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "compaction", "encrypted_content": "kvc1.x"}]}],
     "compaction": {"encrypted_content": "kvc1.y"}},
])
def test_chat_request_refuses(bad):
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad})


def test_chat_request_defaults():
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    assert request.compaction_token() is None and request.max_new_tokens(32) == 32
    assert request.stop_sequences() == [] and not request.include_usage() and not request.stream


# --- error bodies -------------------------------------------------------------------------------------------------


@pytest.fixture
def api() -> TestClient:
    """A small app with our handlers: body validation, raised APIErrors, routing errors and a crash."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    def chat(request: ChatCompletionRequest) -> ChatCompletion:
        if request.model == "other-model":
            raise ConflictError("This compaction was made for model 'tiny-llama'.", param="model")
        if request.model == "gone":
            raise NotFoundError("No such compaction.")
        if request.model == "busy":
            raise RateLimitError("Queue full.", headers={"Retry-After": "1"})
        if request.model == "crash":
            raise RuntimeError("secret internal detail")
        return completion()

    @app.post("/v1/compact")
    def compact(request: CompactRequest) -> dict:
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


def error_of(response: httpx.Response) -> dict:
    return ErrorResponse.model_validate(response.json()).error.model_dump()


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 3}, "n", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_value"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text",
     "missing_required_parameter"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": "maybe"}},
     "stream_options.include_usage", "invalid_value"),
])
def test_validation_errors_name_the_field(api, body, param, code):
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert param in error["message"]


def test_model_level_validation_and_bad_json(api):
    both = api.post("/v1/compact", json={"model": "m", "input": "x", "keep_ratio": 0.5, "target_tokens": 3})
    assert both.status_code == 400 and "not both" in error_of(both)["message"] and error_of(both)["param"] is None
    garbage = api.post("/v1/compact", content=b"{not json", headers={"content-type": "application/json"})
    assert garbage.status_code == 400 and error_of(garbage)["code"] == "invalid_json"
    empty = api.post("/v1/compact")
    assert empty.status_code == 400 and error_of(empty)["message"] == "Missing request body."


def test_api_errors_routing_errors_and_crashes(api):
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    conflict = api.post("/v1/chat/completions", json={"model": "other-model", **chat})
    assert conflict.status_code == 409 and error_of(conflict)["code"] == "model_mismatch"
    busy = api.post("/v1/chat/completions", json={"model": "busy", **chat})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    missing_route = api.get("/v1/nothing-here")
    assert missing_route.status_code == 404 and error_of(missing_route)["type"] == "invalid_request_error"
    wrong_method = api.get("/v1/compact")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()
    crash = api.post("/v1/chat/completions", json={"model": "crash", **chat})
    assert crash.status_code == 500 and error_of(crash)["type"] == "server_error"
    assert "secret internal detail" not in crash.text and "Traceback" not in crash.text


def test_openai_client_raises_the_matching_exceptions(api):
    client = openai.OpenAI(api_key="sk-test", base_url="http://testserver/v1", max_retries=0, http_client=api)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="m", messages=messages, n=2)
    assert bad.value.param == "n" and bad.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gone", messages=messages)
    with pytest.raises(openai.ConflictError) as conflict:
        client.chat.completions.create(model="other-model", messages=messages)
    assert conflict.value.code == "model_mismatch"
    assert client.chat.completions.create(model="m", messages=messages).choices[0].message.content == "Paris."


def test_openapi_spec_holds_the_wire_models(api):
    schemas = api.app.openapi()["components"]["schemas"]
    for name in ("ChatCompletionRequest", "ChatCompletion", "CompactRequest", "ChatMessage", "CompactionPart"):
        assert name in schemas
    assert schemas["CompactRequest"]["properties"]["method"]["default"] == "am"
