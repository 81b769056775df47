"""HttpBackend: the same eval through the running service, with the official `openai` client.

A context is the first chat message: the document itself (full), nothing (none), or a `compaction` content part holding
the `encrypted_content` that POST /v1/compact returned. Log-probs are not exposed over HTTP, so log_ppl and KL are
null in endpoint runs; accuracy, timings and sizes are comparable with in-process runs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from openai import OpenAI

from schemas.wire import CompactRequest
from workers.compaction.pipeline import CompactionConfig
from workers.eval.backends import Answer, BuiltContext
from workers.eval.methods import MethodSpec, coerce_overrides

# Compactions made by an eval run are only needed while that document is evaluated.
COMPACTION_TTL_SECONDS = 3600
# CompactionConfig fields the wire API accepts (it refuses unknown fields); other overrides work in-process only.
WIRE_FIELDS = frozenset(CompactRequest.model_fields) & {f.name for f in dataclasses.fields(CompactionConfig)}


class EndpointError(RuntimeError):
    """The service answered something the eval cannot use (a failed compaction, a missing token)."""


def base_url(endpoint: str) -> str:
    """The openai client's base URL: the endpoint with /v1 (given with or without it)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1") else f"{endpoint}/v1"


class HttpBackend:
    def __init__(self, endpoint: str, model: str | None, api_key: str, client: OpenAI | None = None) -> None:
        self.client = client or OpenAI(base_url=base_url(endpoint), api_key=api_key)
        self.model = model or self.client.models.list().data[0].id
        self._template_tokens: int | None = None
        self.dtype: str | None = None  # the service does not say

    def check(self, spec: MethodSpec) -> None:
        """Refuse, before any request, a method whose overrides POST /v1/compact cannot carry."""
        unsupported = sorted({key for key, _ in spec.overrides} - WIRE_FIELDS)
        if unsupported:
            raise EndpointError(f"method {spec.name!r}: the HTTP API does not take {', '.join(unsupported)}; "
                                f"it takes {', '.join(sorted(WIRE_FIELDS))}")

    def _prompt_tokens(self, text: str) -> int:
        response = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": text}],
                                                       max_tokens=1, temperature=0.0)
        return int(response.usage.prompt_tokens)

    def count_tokens(self, text: str) -> int:
        """Content tokens of the text, as the core counts them in-process (so budgets match): the prompt tokens of a
        one-message chat minus those of the same chat with an empty message (the chat template's wrapper)."""
        if self._template_tokens is None:
            self._template_tokens = self._prompt_tokens("")
        return self._prompt_tokens(text) - self._template_tokens

    def full(self, text: str) -> BuiltContext:
        message = {"role": "user", "content": text}
        return BuiltContext(handle=[message], seconds=0.0, input_tokens=self.count_tokens(text))

    def empty(self) -> BuiltContext:
        return BuiltContext(handle=[], seconds=0.0, input_tokens=0)

    def compact(self, text: str, spec: MethodSpec, keep_ratio: float | None = None,
                target_tokens: int | None = None) -> BuiltContext:
        self.check(spec)
        typed = coerce_overrides(spec, CompactionConfig)
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in typed.items()}  # JSON has no tuples
        budget = {"keep_ratio": keep_ratio} if keep_ratio is not None else {"target_tokens": target_tokens}
        body = {"model": self.model, "input": text, "method": spec.core_method, "ttl_seconds": COMPACTION_TTL_SECONDS,
                **budget, **overrides}
        start = time.perf_counter()
        compaction: dict[str, Any] = self.client.post("/compact", body=body, cast_to=object)
        seconds = time.perf_counter() - start
        if compaction.get("status") != "completed" or not compaction.get("encrypted_content"):
            raise EndpointError(f"compaction for {spec.name!r} did not complete: {compaction}")
        usage = compaction.get("usage") or {}
        part = {"type": "compaction", "encrypted_content": compaction["encrypted_content"]}
        return BuiltContext(handle=[{"role": "user", "content": [part]}], seconds=seconds,
                            input_tokens=int(usage.get("input_tokens", 0)),
                            phase_seconds=dict(usage.get("phase_seconds") or {}),
                            retained_slots=usage.get("retained_slots"), bytes=usage.get("blob_bytes"))

    def generate(self, context: BuiltContext, prompt: str, max_new_tokens: int) -> Answer:
        messages = [*context.handle, {"role": "user", "content": prompt}]
        response = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_new_tokens,
                                                       temperature=0.0)
        return Answer(response.choices[0].message.content or "")

    def generate_all(self, context: BuiltContext, prompts: list[tuple[str, int]]) -> list[Answer]:
        """One chat call per prompt: the service batches concurrent requests itself, the client need not."""
        return [self.generate(context, prompt, budget) for prompt, budget in prompts]

    def answer_logprob(self, context: BuiltContext, prompt: str, answer: Answer) -> None:
        return None

    def next_token_logprobs(self, context: BuiltContext, prompt: str) -> None:
        return None
