"""The HTTP path of the eval against a fake OpenAI-style service: request shapes, and null log-probs."""

import json

import httpx
import openai
import pytest

from workers.eval.endpoint import EndpointError, HttpBackend, base_url
from workers.eval.datasets import load_dataset
from workers.eval.methods import parse_method
from workers.eval.prompts import question_prompt
from workers.eval.resultcache import ResultStore
from workers.eval.runner import EvalPlan, run_eval

DOCUMENT = {"id": "d1", "context": "The code is 4242.", "questions": [
    {"question": "What is the code?", "answers": ["4242"], "metric": "string_match_part"}]}


class FakeService:
    """Answers 4242 only when the document or a compaction of it comes first; records every request body."""

    def __init__(self):
        self.requests = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append((request.url.path, body))
        if request.url.path == "/v1/compact":
            return httpx.Response(200, json={
                "id": "cmp_1", "object": "compaction", "status": "completed", "encrypted_content": "tok",
                "usage": {"input_tokens": 6, "retained_slots": 48, "compaction_ratio": 4.0, "blob_bytes": 999,
                          "phase_seconds": {"select": 0.1}}})
        first = body["messages"][0]["content"]
        knows = len(body["messages"]) > 1 and ("4242" in str(first) or "tok" in str(first))
        return httpx.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "4242" if knows else "unknown"}}],
            "usage": {"prompt_tokens": 10 + len(str(first)), "completion_tokens": 1, "total_tokens": 11}})


def test_overrides_the_wire_api_lacks_are_refused_up_front():
    backend = HttpBackend("http://svc", "m", "k", client=openai.OpenAI(base_url="http://svc/v1", api_key="k"))
    backend.check(parse_method("am[query_sources=repeat,chunk_tokens=512]"))
    with pytest.raises(EndpointError, match="does not take budget"):
        backend.check(parse_method("am[budget=uniform]"))


def test_base_url():
    assert base_url("http://h:8000") == "http://h:8000/v1" and base_url("http://h:8000/v1/") == "http://h:8000/v1"


def test_endpoint_eval(tmp_path):
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps(DOCUMENT) + "\n")
    service = FakeService()
    client = openai.OpenAI(base_url="http://svc/v1", api_key="k",
                           http_client=httpx.Client(transport=httpx.MockTransport(service)))
    backend = HttpBackend("http://svc", "m", "k", client=client)
    methods = ("full", "none", "am[query_sources=repeat]", "am[hints=@questions]")
    plan = EvalPlan(datasets=(dataset,), methods=tuple(parse_method(m) for m in methods), keep_ratios=(0.25,))
    records = {r["method"]: r for r in run_eval(backend, plan, ResultStore(tmp_path, "http-m"))}

    assert [q["correct"] for q in records["full"]["questions"]] == [True]
    assert [q["correct"] for q in records["none"]["questions"]] == [False]
    am = records["am[query_sources=repeat]"]
    assert am["questions"][0]["correct"] and am["questions"][0]["log_ppl"] is None and am["questions"][0]["kl"] is None
    assert am["input_tokens"] == len(DOCUMENT["context"])  # the fake counts a character as a token
    assert am["retained_slots"] == 48 and am["bytes"] == 999 and am["phase_seconds"] == {"select": 0.1}
    compact = [body for path, body in service.requests if path == "/v1/compact"]
    document = load_dataset(dataset)[0]
    prompt = question_prompt(document, document.questions[0]).text
    assert compact == [{"model": "m", "input": DOCUMENT["context"], "method": "am", "ttl_seconds": 3600,
                        "keep_ratio": 0.25, "query_sources": ["repeat"]},
                       {"model": "m", "input": DOCUMENT["context"], "method": "am", "ttl_seconds": 3600,
                        "keep_ratio": 0.25, "hints": [prompt]}]
    chats = [body for path, body in service.requests if path == "/v1/chat/completions"]
    assert any(c["messages"][0]["content"] == [{"type": "compaction", "encrypted_content": "tok"}] for c in chats)
    assert all(c["temperature"] == 0.0 for c in chats)
