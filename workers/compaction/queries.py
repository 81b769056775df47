"""Reference queries: the attention queries a model actually issues, captured after q_norm and RoPE.

A forward pre-hook on each attention module recomputes q = RoPE(q_norm(q_proj(h))) from the hidden states and the
position embeddings the layer receives, at a chosen subset of token positions, so the captured queries live in the
same space as the cached (post-RoPE) keys. Queries of the G query heads sharing a KV head are pooled per KV head.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import ContextManager, Iterator

import torch
from torch import nn

from workers.compaction.solvers import max_attention_weights


@contextmanager
def _pre_hooks(owner, modules: list[nn.Module], hook) -> Iterator:
    """`hook` as a forward pre-hook (with kwargs) on every module while the block runs; yields `owner`."""
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield owner
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a recorder hook to end a forward pass early once the last wanted layer has been captured."""


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    modules = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    return sorted(modules, key=lambda m: m.layer_idx)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def project_queries(module: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(B, S, hidden) -> (B, H_q, S, head_dim): the queries exactly as the attention module computes them."""
    batch, length, _ = hidden_states.shape
    queries = module.q_proj(hidden_states).view(batch, length, -1, module.head_dim)
    if hasattr(module, "q_norm"):
        queries = module.q_norm(queries)
    queries = queries.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return queries * cos + rotate_half(queries) * sin


def pool_gqa(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(H_q, n, d) -> (H_kv, G*n, d): every KV head is matched on the queries of all its query heads."""
    query_heads, count, dim = queries.shape
    groups = query_heads // num_kv_heads
    return queries.reshape(num_kv_heads, groups * count, dim)


class QueryRecorder:
    """Collects queries (batch row 0) at `positions` of each forward for the layers in `layers`.

    Set `positions` before each forward (chunked prefills call it once per chunk); captures accumulate per layer.
    """

    def __init__(self, model: nn.Module, layers: set[int] | None = None, stop_after_layer: int | None = None):
        self.modules = attention_modules(model)
        self.positions = torch.zeros(0, dtype=torch.long)
        self.layers = set(range(len(self.modules))) if layers is None else layers
        self.stop_after_layer = stop_after_layer
        self.captured: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}

    def queries(self, layer: int, num_kv_heads: int) -> torch.Tensor:
        """All queries captured at `layer`, GQA-pooled: (H_kv, n, d) float32."""
        return pool_gqa(torch.cat(self.captured[layer], dim=1), num_kv_heads)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        layer = module.layer_idx
        if layer in self.layers and self.positions.numel():
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cos, sin = kwargs["position_embeddings"]
            index = self.positions.to(hidden.device)
            queries = project_queries(module, hidden[:1, index], cos[:1, index], sin[:1, index])
            self.captured[layer].append(queries[0].float())
        if self.stop_after_layer is not None and layer >= self.stop_after_layer:
            raise StopForward

    def attached(self) -> ContextManager["QueryRecorder"]:
        return _pre_hooks(self, self.modules, self._hook)



class KeyImportance:
    """KVzip's key importance, measured while a query pass runs: every key of the context span scored by the largest
    attention weight that any query of the pass (every position, every query head sharing its KV head) gives it,
    normalised over the whole context, so scores compare across heads and layers.

    Unlike the reference queries, which are subsampled for the fits, no position is skipped here: a needle is looked
    at by the few repeat-pass tokens that copy it, and a subsample would miss them. Only a running max per key is
    kept, so memory stays at one score per key whatever the pass length.
    """

    # Queries are scored in blocks of at most this many float32 logits (two copies live at once: the logits and
    # the weights), 1 GiB per block on a GPU; a CPU gains nothing from large blocks.
    LOGIT_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 24}

    def __init__(self, model: nn.Module, context_keys: dict[int, torch.Tensor], span: torch.Tensor,
                 num_kv_heads: int):
        self.modules = attention_modules(model)
        self.context_keys = context_keys  # layer -> (H_kv, T, d) post-RoPE keys of the whole context
        self.span = span
        self.num_kv_heads = num_kv_heads
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (H_kv, span) running max

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        layer = module.layer_idx
        if layer not in self.context_keys:
            return
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        queries = pool_gqa(project_queries(module, hidden[:1], cos[:1], sin[:1])[0], self.num_kv_heads)
        keys = self.context_keys[layer]
        span = self.span.to(keys.device)
        budget = self.LOGIT_ELEMENTS.get(keys.device.type, self.LOGIT_ELEMENTS["cpu"])
        block = max(1, budget // (keys.shape[0] * keys.shape[1]))
        best = self.scores.get(layer)
        for start in range(0, queries.shape[1], block):
            top = max_attention_weights(queries[:, start:start + block], keys, module.scaling)[:, span]
            best = top if best is None else torch.maximum(best, top)
        self.scores[layer] = best

    def attached(self) -> ContextManager["KeyImportance"]:
        return _pre_hooks(self, self.modules, self._hook)
