"""HttpBackend: the same eval through the running service, with the official `openai` client.

A context is the first chat message: the document itself (full), nothing (none), or a `compaction` content part holding
the `encrypted_content` that POST /v1/compact returned. Log-probs are not exposed over HTTP, so log_ppl and KL are
null in endpoint runs; accuracy, timings and sizes are comparable with in-process runs.
"""

from __future__ import annotations

import time
from typing import Any

from openai import OpenAI

from workers.eval.backends import Answer, BuiltContext
from workers.eval.methods import MethodSpec, coerce_overrides

# Compactions made by an eval run are only needed while that document is evaluated.
COMPACTION_TTL_SECONDS = 3600


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

    def config_class(self) -> type:
        from workers.compaction.pipeline import CompactionConfig

        return CompactionConfig

    def count_tokens(self, text: str) -> int:
        """Prompt tokens of the text as a one-message chat (includes the chat template's few wrapper tokens)."""
        response = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": text}],
                                                       max_tokens=1, temperature=0.0)
        return int(response.usage.prompt_tokens)

    def full(self, text: str) -> BuiltContext:
        return BuiltContext(handle=[{"role": "user", "content": text}], seconds=0.0, input_tokens=self.count_tokens(text))

    def empty(self) -> BuiltContext:
        return BuiltContext(handle=[], seconds=0.0, input_tokens=0)

    def compact(self, text: str, spec: MethodSpec, keep_ratio: float | None = None,
                target_tokens: int | None = None) -> BuiltContext:
        overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in coerce_overrides(spec, self.config_class()).items()}
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

    def answer_logprob(self, context: BuiltContext, prompt: str, answer: Answer) -> None:
        return None

    def next_token_logprobs(self, context: BuiltContext, prompt: str) -> None:
        return None
