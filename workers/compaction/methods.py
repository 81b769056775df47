"""Compaction methods, one class each, all behind one interface: fit(block, budgets) -> BlockFit.

AM variants select keys, fit beta and refit values; the eviction baselines only select keys (beta = 0, original
values), exactly as the paper runs them. Every method works on a `HeadBlock`: one layer's compactable keys for all
KV heads at once, so there is no Python loop over heads on the hot path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from workers.compaction import solvers
from workers.compaction.timing import PhaseTimer


@dataclass
class HeadBlock:
    """One layer's block of compactable tokens, batched over KV heads."""

    keys: torch.Tensor  # (H, T, d) post-RoPE, model dtype
    values: torch.Tensor  # (H, T, d)
    queries: torch.Tensor  # (H, n, d) reference queries, float32
    scaling: float
    positions: torch.Tensor  # (T,) original token positions of the block's keys
    context_scores: torch.Tensor | None = None  # (H, T) KVzip importance: max weight, normalised over the context


@dataclass
class BlockFit:
    """The compacted block: per head the first active slots are real, the rest padding (beta = -inf)."""

    indices: torch.Tensor  # (H, t) which original keys were kept
    active: torch.Tensor  # (H, t) bool
    keys: torch.Tensor  # (H, t, d) model dtype: C_k = K[indices]
    beta: torch.Tensor  # (H, t) float32
    values: torch.Tensor  # (H, t, d) model dtype: C_v


@dataclass
class FitSettings:
    """Solver knobs shared by the AM variants (defaults follow the reference configs and early_findings.md)."""

    beta_lower: float = solvers.DEFAULT_BETA_BOUNDS[0]
    beta_upper: float = solvers.DEFAULT_BETA_BOUNDS[1]
    beta_prior: float = 0.0  # pull of exp(beta) towards 1 in the mass fit (solvers.solve_mass_weights)
    nnls_iterations: int = 2
    value_ridge: float = 0.1
    key_score: str = "max"  # "max": context-normalised max (KVzip's, what global budgets use); "rms": the paper's
    value_prior: str = "original"  # what the value ridge shrinks towards: "original" values or "zero"
    fit_guard: bool = False  # per head, the kept keys' plain eviction (beta 0, original values) where it fits better


def keep_original(block: HeadBlock, indices: torch.Tensor, active: torch.Tensor) -> BlockFit:
    """Eviction: the kept keys with beta = 0 and their original values."""
    beta = torch.where(active, 0.0, float("-inf")).float()
    return BlockFit(indices, active, solvers.gather_keys(block.keys, indices), beta,
                    solvers.gather_keys(block.values, indices))


def keep_whole_heads(block: HeadBlock, fit: BlockFit, budgets: torch.Tensor) -> BlockFit:
    """A head whose budget covers its whole block is left exactly as it was (all keys, beta 0, original values):
    that is the exact optimum of both AM objectives, so fitting could only add rounding error."""
    whole = budgets.to(fit.active.device) >= block.keys.shape[1]
    if not bool(whole.any()):
        return fit
    length = block.keys.shape[1]
    slots = max(fit.indices.shape[1], length)
    pad = slots - fit.indices.shape[1]
    indices = F.pad(fit.indices, (0, pad))
    active = F.pad(fit.active, (0, pad))
    keys, values = F.pad(fit.keys, (0, 0, 0, pad)), F.pad(fit.values, (0, 0, 0, pad))
    beta = F.pad(fit.beta, (0, pad), value=float("-inf"))
    everything = torch.arange(slots, device=indices.device).clamp(max=length - 1)
    original = keep_original(block, everything.expand(block.keys.shape[0], -1),
                             torch.arange(slots, device=indices.device)[None, :] < length)
    pick = whole[:, None]
    return BlockFit(indices=torch.where(pick, original.indices, indices),
                    active=torch.where(pick, original.active, active),
                    keys=torch.where(pick[..., None], original.keys, keys),
                    beta=torch.where(pick, original.beta, beta),
                    values=torch.where(pick[..., None], original.values, values))


def fit_block(method: "CompactionMethod", block: HeadBlock, budgets: torch.Tensor, timer: PhaseTimer) -> BlockFit:
    """`method`'s fit of the heads that are compacted; a head whose budget covers the block keeps it exactly
    (keep_whole_heads) and is not solved for: its solve would be the largest of the block (all T keys) and the most
    singular, only to be thrown away."""
    whole = budgets >= block.keys.shape[1]
    return keep_whole_heads(block, method.fit(block, torch.where(whole, 1, budgets), timer), budgets)


class CompactionMethod(ABC):
    name: ClassVar[str]
    default_budget: ClassVar[str] = "uniform"

    @abstractmethod
    def fit(self, block: HeadBlock, budgets: torch.Tensor, timer: PhaseTimer) -> BlockFit: ...


class Truncate(CompactionMethod):
    """Keep the most recent tokens of the block."""

    name = "truncate"

    def fit(self, block: HeadBlock, budgets: torch.Tensor, timer: PhaseTimer) -> BlockFit:
        with timer.phase("key_selection"):
            recency = block.positions.float().to(block.keys.device).expand(block.keys.shape[0], -1)
            indices, active = solvers.select_top(recency, budgets)
        return keep_original(block, indices, active)


class ScoredEviction(CompactionMethod):
    """Keep the keys with the highest attention score over the reference queries."""

    reduction: ClassVar[str]
    pool_kernel: ClassVar[int] = 0

    def scores(self, block: HeadBlock) -> torch.Tensor:
        logits = solvers.attention_logits(block.queries, block.keys, block.scaling)
        return solvers.key_scores(logits, self.reduction)

    def fit(self, block: HeadBlock, budgets: torch.Tensor, timer: PhaseTimer) -> BlockFit:
        with timer.phase("key_selection"):
            indices, active = solvers.select_top(solvers.pool_scores(self.scores(block), self.pool_kernel), budgets)
        return keep_original(block, indices, active)


class H2O(ScoredEviction):
    """H2O-style: mean attention received, uniform budget."""

    name = "h2o"
    reduction = "mean"


class SnapKV(ScoredEviction):
    """SnapKV-style: mean attention, max-pooled over neighbouring keys (kernel 7), uniform budget."""

    name = "snapkv"
    reduction = "mean"
    pool_kernel = 7


class KVzip(ScoredEviction):
    """KVzip-style: max attention normalised over the whole context, one global budget."""

    name = "kvzip"
    reduction = "max"
    default_budget = "global"

    def scores(self, block: HeadBlock) -> torch.Tensor:
        # The context-normalised scores are the ones the global budget was allocated from: measured once per context.
        return block.context_scores


class AttentionMatching(CompactionMethod):
    """AM with highest-attention (RMS) keys; `fit_beta` / `fit_values` off give the paper's ablations."""

    default_budget = "global"

    def __init__(self, name: str, settings: FitSettings, fit_beta: bool = True, fit_values: bool = True):
        self.name, self.settings, self.fit_beta, self.fit_values = name, settings, fit_beta, fit_values

    def select(self, block: HeadBlock, logits: torch.Tensor, budgets: torch.Tensor,
               timer: PhaseTimer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(indices, active, mass weights or None when beta is fitted separately)."""
        with timer.phase("key_selection"):
            if self.settings.key_score == "max":
                scores = block.context_scores
            else:
                scores = solvers.key_scores(logits, self.settings.key_score)
            indices, active = solvers.select_top(scores, budgets)
        return indices, active, None

    def fit(self, block: HeadBlock, budgets: torch.Tensor, timer: PhaseTimer) -> BlockFit:
        logits = solvers.attention_logits(block.queries, block.keys, block.scaling)
        indices, active, weights = self.select(block, logits, budgets, timer)
        with timer.phase("beta_fit"):
            if not self.fit_beta:
                beta = torch.where(active, 0.0, float("-inf")).float()
            else:
                if weights is None:
                    features = solvers.mass_features(logits)
                    weights = solvers.solve_mass_weights(
                        solvers.gather_columns(features, indices), features.sum(-1), active,
                        self.settings.beta_lower, self.settings.beta_upper, self.settings.nnls_iterations,
                        self.settings.beta_prior)
                beta = solvers.log_weights(weights, active)
        c_keys = solvers.gather_keys(block.keys, indices)
        with timer.phase("value_fit"):
            if self.fit_values:
                weights_c = solvers.compacted_weights(block.queries, c_keys, beta, block.scaling)
                targets = solvers.attention_outputs(logits, block.values)
                prior = solvers.gather_keys(block.values, indices) if self.settings.value_prior == "original" else None
                c_values = solvers.fit_values(weights_c, targets, self.settings.value_ridge,
                                              prior).to(block.values.dtype)
            else:
                c_values = solvers.gather_keys(block.values, indices)
        fit = BlockFit(indices, active, c_keys, beta, c_values)
        if self.settings.fit_guard:
            with timer.phase("value_fit"):
                fit = self.guarded(block, logits, fit)
        return fit

    @staticmethod
    def guarded(block: HeadBlock, logits: torch.Tensor, fit: BlockFit) -> BlockFit:
        """Per head, the fit or the plain eviction of the same keys, whichever reproduces the block's attention sum
        (`solvers.numerator_error`) better on the reference queries. A head that keeps most of its span is nearly
        exact as it is, and its fit can only trade that for rounding and ridge error."""
        features = solvers.mass_features(logits)
        targets = features @ block.values.float()
        kept = solvers.gather_columns(features, fit.indices) * fit.active[:, None, :]
        evicted = keep_original(block, fit.indices, fit.active)
        fitted_error = solvers.numerator_error(kept, targets, torch.exp(fit.beta), fit.values)
        evicted_error = solvers.numerator_error(kept, targets, fit.active.float(), evicted.values)
        pick = (evicted_error < fitted_error)[:, None]
        return BlockFit(fit.indices, fit.active, fit.keys, torch.where(pick, evicted.beta, fit.beta),
                        torch.where(pick[..., None], evicted.values, fit.values))


class AttentionMatchingOMP(AttentionMatching):
    """AM with keys chosen by orthogonal matching pursuit on the mass (beta comes out of OMP itself)."""

    def __init__(self, name: str, settings: FitSettings, keys_per_step: int, refit_interval: int):
        super().__init__(name, settings)
        self.keys_per_step, self.refit_interval = keys_per_step, refit_interval

    def select(self, block: HeadBlock, logits: torch.Tensor, budgets: torch.Tensor,
               timer: PhaseTimer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with timer.phase("key_selection"):
            features = solvers.mass_features(logits)
            return solvers.omp_select(features, features.sum(-1), budgets, self.keys_per_step, self.refit_interval,
                                      lower=1e-12, upper=self.settings.beta_upper)


METHOD_FACTORIES: dict[str, Callable[[FitSettings], CompactionMethod]] = {
    "am": lambda s: AttentionMatching("am", s),
    "am-omp": lambda s: AttentionMatchingOMP("am-omp", s, keys_per_step=1, refit_interval=1),
    "am-omp-fast": lambda s: AttentionMatchingOMP("am-omp-fast", s, keys_per_step=4, refit_interval=2),
    "am-no-beta": lambda s: AttentionMatching("am-no-beta", s, fit_beta=False),
    "am-no-values": lambda s: AttentionMatching("am-no-values", s, fit_values=False),
    "truncate": lambda s: Truncate(),
    "h2o": lambda s: H2O(),
    "snapkv": lambda s: SnapKV(),
    "kvzip": lambda s: KVzip(),
}
METHOD_NAMES = tuple(METHOD_FACTORIES)


def make_method(name: str, settings: FitSettings | None = None) -> CompactionMethod:
    if name not in METHOD_FACTORIES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return METHOD_FACTORIES[name](settings or FitSettings())
