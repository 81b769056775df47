"""Backends: where an eval method's cache is built and questions are answered.

`InProcessBackend` calls the compaction core directly (docs/architecture.md "Core API") and can score log-probs and
next-token distributions; `workers.eval.endpoint.HttpBackend` drives the HTTP service and cannot. The runner and the
methods only see the `Backend` protocol, so both paths evaluate the same methods the same way.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from workers.compaction.context import continuation_ids
from workers.compaction.generation import answer_logprob, greedy_batch, next_token_logprobs, stream_generate
from workers.compaction.pipeline import (CompactionConfig, PreparedContext, compact_prepared, full_context,
                                         prepare_context)
from workers.compaction.types import CompactedKV, CompactedLayer
from workers.eval.methods import make_config

if TYPE_CHECKING:
    from workers.eval.methods import MethodSpec
    from workers.models.loading import LoadedModel

BETA_BYTES = 4  # beta is float32


@dataclass(frozen=True)
class BuiltContext:
    """A context cache plus what building it cost; `handle` is backend-specific (a CompactedKV, or a chat message)."""

    handle: Any
    seconds: float
    input_tokens: int
    phase_seconds: dict[str, float] = field(default_factory=dict)
    retained_slots: int | None = None
    padded_slots: int | None = None
    bytes: int | None = None
    probe_logprobs: dict[str, float] | None = None  # per beta_prior candidate, where the compaction chose one

    def with_phase(self, phase: str, seconds: float) -> BuiltContext:
        """A copy that also counts an earlier phase (e.g. generating the summary that was then cached)."""
        phases = {phase: seconds, **self.phase_seconds}
        return dataclasses.replace(self, seconds=self.seconds + seconds, phase_seconds=phases)


@dataclass(frozen=True)
class Answer:
    """A greedy answer; token ids where the backend has them (needed to score it under another cache)."""

    text: str
    token_ids: tuple[int, ...] | None = None


class Backend(Protocol):
    """Build context caches and answer from them; log-prob scoring returns None where the backend cannot score."""

    dtype: str | None  # the model's compute dtype where known (recorded with every result)

    def full(self, text: str) -> BuiltContext: ...

    def empty(self) -> BuiltContext: ...

    def compact(self, text: str, spec: MethodSpec, keep_ratio: float | None = None,
                target_tokens: int | None = None) -> BuiltContext: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, context: BuiltContext, prompt: str, max_new_tokens: int) -> Answer: ...

    def generate_all(self, context: BuiltContext, prompts: list[tuple[str, int]]) -> list[Answer]:
        """Greedy answers to several (prompt, max_new_tokens) after one context, in order."""
        ...

    def answer_logprob(self, context: BuiltContext, prompt: str, answer: Answer) -> float | None: ...

    def next_token_logprobs(self, context: BuiltContext, prompt: str) -> torch.Tensor | None: ...


def cache_bytes(kv: CompactedKV) -> int:
    """Bytes a cache needs: real slots x (key + value) x head_dim x dtype size, plus float32 beta when it is used.

    Beta is counted only when some real slot has a non-zero beta: an eviction cache or a full cache carries none.
    """
    total = 0
    for layer in kv.layers:
        slots = int(layer.lengths.sum())
        total += slots * 2 * int(layer.keys.shape[-1]) * layer.keys.element_size()
        real = torch.arange(layer.beta.shape[1]).unsqueeze(0) < layer.lengths.unsqueeze(1).to("cpu")
        if bool((layer.beta.cpu()[real] != 0).any()):
            total += slots * BETA_BYTES
    return total


def empty_kv(lm: LoadedModel) -> CompactedKV:
    """A CompactedKV with no slots in any layer (sliding layers flagged as the model declares them)."""
    config = lm.text_config
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    empty = torch.zeros(heads, 0, head_dim, dtype=lm.dtype, device=lm.device)
    layers = [CompactedLayer(keys=empty, values=empty.clone(), beta=torch.zeros(heads, 0, device=lm.device),
                             lengths=torch.zeros(heads, dtype=torch.int64), sliding=kind == "sliding_attention")
              for kind in layer_types]
    return CompactedKV(layers=layers, original_length=0, meta={"roles": []})


def kl_divergence(reference: torch.Tensor, other: torch.Tensor) -> float:
    """KL(reference || other) between two next-token distributions given as log-probabilities."""
    reference, other = reference.float(), other.float()
    return float(torch.sum(reference.exp() * (reference - other)))


class InProcessBackend:
    """The core API in this process: one loaded model, CompactedKV handles."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.dtype = str(lm.dtype).removeprefix("torch.")  # what `--dtype auto` resolved to on this machine
        # The last prepared context (prefill + reference queries): every method and ratio of one document reuses it.
        self._prepared: tuple[tuple, PreparedContext] | None = None

    def _prepare(self, text: str, config: CompactionConfig) -> PreparedContext:
        key = (text, config.preparation_key())
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, prepare_context(self.lm, text, config))
        return self._prepared[1]

    def _built(self, kv: CompactedKV, seconds: float, input_tokens: int, phases: dict[str, float]) -> BuiltContext:
        return BuiltContext(handle=kv, seconds=seconds, input_tokens=input_tokens, phase_seconds=phases,
                            retained_slots=kv.retained_slots(), padded_slots=kv.padded_slots(),
                            bytes=cache_bytes(kv), probe_logprobs=kv.meta.get("probe_logprobs"))

    def full(self, text: str) -> BuiltContext:
        start = time.perf_counter()
        kv = full_context(self.lm, text)
        seconds = time.perf_counter() - start
        return self._built(kv, seconds, self.count_tokens(text), {"prefill": seconds})

    def empty(self) -> BuiltContext:
        """A cache of zero slots: the question is then the whole conversation (the core refuses empty documents)."""
        return self._built(empty_kv(self.lm), 0.0, 0, {})

    def compact(self, text: str, spec: MethodSpec, keep_ratio: float | None = None,
                target_tokens: int | None = None) -> BuiltContext:
        config = make_config(spec, CompactionConfig, keep_ratio=keep_ratio, target_tokens=target_tokens)
        result = compact_prepared(self.lm, self._prepare(text, config), config)
        # Phase times include the shared prefill and query passes, so every row reports the full compaction cost.
        seconds = sum(result.phase_seconds.values())
        return self._built(result.compacted, seconds, int(result.compactable_tokens), dict(result.phase_seconds))

    def count_tokens(self, text: str) -> int:
        return len(self.lm.tokenizer.encode(text, add_special_tokens=False))

    def _prompt_ids(self, context: BuiltContext, prompt: str) -> list[int]:
        message = {"role": "user", "content": prompt}
        roles = context.handle.meta["roles"]
        if roles:
            return continuation_ids(self.lm.tokenizer, roles, [message])
        # Nothing to continue (the `none` method): transformers cannot render an empty conversation as a prefix.
        tokenizer = self.lm.tokenizer
        text = tokenizer.apply_chat_template([message], tokenize=False, add_generation_prompt=True) \
            if tokenizer.chat_template else prompt
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, context: BuiltContext, prompt: str, max_new_tokens: int) -> Answer:
        ids = self._prompt_ids(context, prompt)
        tokens = tuple(int(t) for t in stream_generate(self.lm, context.handle, ids, max_new_tokens=max_new_tokens,
                                                        temperature=0.0, top_p=1.0, seed=None))
        return self._answer(tokens)

    def generate_all(self, context: BuiltContext, prompts: list[tuple[str, int]]) -> list[Answer]:
        """One left-padded batch (see greedy_batch); each answer is cut at its own prompt's token budget."""
        ids = [self._prompt_ids(context, prompt) for prompt, _ in prompts]
        longest = max(budget for _, budget in prompts)
        batch = greedy_batch(self.lm, context.handle, ids, max_new_tokens=longest)
        return [self._answer(tuple(tokens[:budget])) for tokens, (_, budget) in zip(batch, prompts)]

    def _answer(self, tokens: tuple[int, ...]) -> Answer:
        return Answer(self.lm.tokenizer.decode(list(tokens), skip_special_tokens=True), tokens)

    def answer_logprob(self, context: BuiltContext, prompt: str, answer: Answer) -> float | None:
        if not answer.token_ids:
            return None
        return float(answer_logprob(self.lm, context.handle, self._prompt_ids(context, prompt), list(answer.token_ids)))

    def next_token_logprobs(self, context: BuiltContext, prompt: str) -> torch.Tensor | None:
        return next_token_logprobs(self.lm, context.handle, self._prompt_ids(context, prompt)).flatten()
