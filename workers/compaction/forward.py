"""Thin helpers around a causal LM forward pass that hide transformers' cache-argument churn.

transformers 5.24 calls the cache argument `cache`; earlier 5.x releases (the GPU machine has 5.17) call it
`past_key_values`. Everything in the project runs the model through `run_forward`.
"""

from __future__ import annotations

import copy
import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache

from workers.compaction.queries import QueryRecorder, StopForward


@lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def run_forward(model, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0, position_ids: torch.Tensor | None = None):
    """One forward over `input_ids` (B, S) appending to `cache`; returns the model output (logits of the last
    `logits_to_keep` positions, all when 0)."""
    kwargs = {_cache_argument(type(model)): cache, "use_cache": True, "logits_to_keep": logits_to_keep}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    return model(input_ids=input_ids, **kwargs)


def fork_cache(cache: DynamicCache) -> DynamicCache:
    """A cache sharing the same tensors: forwards through the fork append to it alone (layers rebind, never write
    in place), so one prefilled context serves many query passes without copies."""
    forked = copy.copy(cache)
    forked.layers = [copy.copy(layer) for layer in cache.layers]
    return forked


@torch.inference_mode()
def chunked_forward(model, ids: list[int], cache, chunk_tokens: int, recorder: QueryRecorder | None = None,
                    capture_positions: torch.Tensor | None = None) -> None:
    """Feed `ids` through the model in chunks (bounded activation memory at 64k+ tokens), appending to `cache`.

    With a recorder, queries are captured at `capture_positions` (indices into `ids`)."""
    device = next(model.parameters()).device
    for start in range(0, len(ids), chunk_tokens):
        stop = min(start + chunk_tokens, len(ids))
        if recorder is not None:
            wanted = capture_positions[(capture_positions >= start) & (capture_positions < stop)]
            recorder.positions = wanted - start
        chunk = torch.tensor([ids[start:stop]], device=device)
        try:
            run_forward(model, chunk, cache, logits_to_keep=1)
        except StopForward:
            # An on-policy capture stops before its layer's attention runs. Layers below it were all updated for
            # this chunk, and only they shape the captured queries of later chunks, so stopping here is safe.
            pass
