"""How well a compacted cache reproduces the original on held-out queries (queries it was not fitted on).

Two numbers, the two things AM matches: the relative error of each head's attention output over the compacted
span, and the error of its log attention mass (what decides how much weight the span gets next to future tokens).
"""

from __future__ import annotations

import math

import torch

from workers.compaction import solvers
from workers.compaction.methods import BlockFit, HeadBlock


class ReconstructionMeter:
    def __init__(self) -> None:
        self.error_sq: dict[int, torch.Tensor] = {}
        self.norm_sq: dict[int, torch.Tensor] = {}
        self.log_mass: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add_block(self, layer: int, queries: torch.Tensor, block: HeadBlock, fit: BlockFit) -> None:
        """Accumulate one chunk: output error per head, and each query's log-mass over the span so far."""
        original_logits = solvers.attention_logits(queries, block.keys, block.scaling)
        compacted_logits = solvers.attention_logits(queries, fit.keys, block.scaling) + fit.beta[:, None, :]
        exact = solvers.attention_outputs(original_logits, block.values)
        approx = torch.softmax(compacted_logits, dim=-1) @ fit.values.float()
        self.error_sq[layer] = self.error_sq.get(layer, 0) + (approx - exact).square().sum(dim=(1, 2)).cpu()
        self.norm_sq[layer] = self.norm_sq.get(layer, 0) + exact.square().sum(dim=(1, 2)).cpu()
        original_mass, compacted_mass = solvers.log_mass(original_logits), solvers.log_mass(compacted_logits)
        if layer in self.log_mass:
            previous_original, previous_compacted = self.log_mass[layer]
            original_mass = torch.logaddexp(previous_original, original_mass)
            compacted_mass = torch.logaddexp(previous_compacted, compacted_mass)
        self.log_mass[layer] = (original_mass, compacted_mass)

    def head_rel_errors(self) -> list[list[float]]:
        return [(self.error_sq[layer] / self.norm_sq[layer].clamp_min(1e-30)).sqrt().tolist()
                for layer in sorted(self.error_sq)]

    def rel_error(self) -> float | None:
        total_norm = sum(float(v.sum()) for v in self.norm_sq.values())
        if total_norm == 0:
            return None
        return math.sqrt(sum(float(v.sum()) for v in self.error_sq.values()) / total_norm)

    def log_mass_error(self) -> float | None:
        """Mean |log mass(compacted) - log mass(original)| over layers, heads and held-out queries."""
        if not self.log_mass:
            return None
        gaps = [(compacted - original).abs().mean() for original, compacted in self.log_mass.values()]
        return float(torch.stack(gaps).mean())
