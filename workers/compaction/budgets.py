"""How many slots each (layer, KV head) keeps: uniform, global (measured on the document), or a cached profile.

Heads differ enormously in how much of a document they need: on the bundled model at keep 0.1 about half of the 48
heads need a handful of keys while one middle layer needs nearly all of its own. A single global allocation across
layers and heads, driven by a sensitivity measurement, is the lever that matters most (early_findings.md).
The measurement here is KVzip's: every key's largest attention weight over the reference queries, normalised over the
whole context so that scores of different heads are comparable.
"""

from __future__ import annotations

import math

import torch


def per_head_limits(block_length: int, keep_ratio: float, max_ratio_per_head: float, min_slots: int,
                    uniform_floor: float = 0.0) -> tuple[int, int]:
    """(floor, cap) of slots for one head of a block: every head keeps a few keys, or `uniform_floor` of its uniform
    share (keep_ratio x block) when that is more; none keeps more than its cap."""
    cap = min(block_length, max(math.ceil(max_ratio_per_head * block_length), math.ceil(keep_ratio * block_length)))
    share = math.floor(keep_ratio * block_length)
    floor = max(1, min(max(min_slots, math.floor(uniform_floor * share)), share, cap))
    return floor, cap


def uniform_budgets(num_heads: int, block_length: int, total: int) -> torch.Tensor:
    """Spread `total` as evenly as possible: the first (total mod heads) heads get one slot more."""
    base, extra = divmod(total, num_heads)
    budgets = torch.full((num_heads,), base, dtype=torch.long)
    budgets[:extra] += 1
    return budgets.clamp(max=block_length)


def global_budgets(scores: torch.Tensor, total: int, floor: int, cap: int,
                   head_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One global top-k over every key of every head: (heads, T) comparable scores -> (heads,) slot counts.

    Each head first keeps its own `floor` best keys; the rest of the budget goes to the highest remaining scores
    anywhere, never past `cap` keys in one head. `head_weights` (heads,) multiply each head's scores first: a prior on
    how much a head matters beside what this document's attention says (a measured profile).
    """
    if head_weights is not None:
        scores = scores.float() * head_weights.reshape(-1, 1).to(scores.device, torch.float32)
    heads = scores.shape[0]
    remaining = total - floor * heads
    if remaining <= 0:
        return torch.full((heads,), floor, dtype=torch.long)
    ranked = torch.sort(scores.float(), dim=-1, descending=True).values[:, floor:cap]
    chosen = torch.topk(ranked.reshape(-1), min(remaining, ranked.numel())).indices
    extra = torch.bincount(chosen // ranked.shape[1], minlength=heads)
    return (floor + extra).cpu()


def profile_budgets(proportions: torch.Tensor, total: int, floor: int, cap: int) -> torch.Tensor:
    """Split `total` in the given per-head proportions, water-filling whatever the [floor, cap] clamps free up."""
    heads = proportions.numel()
    budgets = torch.full((heads,), floor, dtype=torch.long)
    free = torch.ones(heads, dtype=torch.bool)
    weights = proportions.reshape(-1).double().clamp_min(0) + 1e-12
    while True:
        left = total - int(budgets.sum())
        if left <= 0 or not bool(free.any()):
            return budgets
        share = torch.zeros(heads, dtype=torch.double)
        share[free] = weights[free] / weights[free].sum() * left
        grant = torch.minimum(share.floor().long(), cap - budgets)
        if int(grant.sum()) == 0:
            # Hand out the rounding remainder one slot at a time to the largest shares that still have room.
            order = torch.argsort(share, descending=True)
            for head in order.tolist():
                if left == 0:
                    break
                if free[head] and budgets[head] < cap:
                    budgets[head] += 1
                    left -= 1
            return budgets
        budgets += grant
        free &= budgets < cap


def proportions_from_budgets(budgets: torch.Tensor) -> torch.Tensor:
    """Normalise slot counts into a profile (sums to 1)."""
    budgets = budgets.double()
    return budgets / budgets.sum()
