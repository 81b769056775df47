"""Compaction end to end: render, prefill once, gather reference queries, allocate budgets, solve per layer.

Every layer's solve is batched over its KV heads; long documents are split into chunks of the compactable span that
are solved independently against the same queries (one prefill, per-chunk solves), so solver memory stays bounded
by chunk_tokens x queries whatever the document length. Sliding-window layers are kept verbatim.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import DynamicCache

from workers.compaction import budgets as budget_rules
from workers.compaction import solvers
from workers.compaction.cache import CompactedCache
from workers.compaction.context import RenderedContext, render_context
from workers.compaction.forward import chunked_forward
from workers.compaction.methods import METHOD_NAMES, BlockFit, FitSettings, HeadBlock, fit_block, make_method
from workers.compaction.queries import KeyImportance, QueryRecorder, attention_modules
from workers.compaction.reconstruction import ReconstructionMeter
from workers.compaction.generation import answer_logprob
from workers.compaction.reference import (QUERY_SOURCES, ReferenceQueries, capture_passes, context_positions,
                                          hint_passes, plan_passes, probe_answers)
from workers.compaction.timing import PhaseTimer
from workers.compaction.types import CompactedKV, CompactedLayer

BUDGET_MODES = ("auto", "uniform", "global", "profile")
KEY_BLOCK = 4096  # keys per matmul when scanning a whole context: bounds memory at (H, n, KEY_BLOCK)
DEFAULT_KEEP_RATIO = 0.1


class CompactionConfigError(ValueError):
    """A compaction request that cannot be satisfied as asked (bad ratio, budget, method or source)."""


@dataclass
class CompactionConfig:
    method: str = "am"
    keep_ratio: float | None = None  # fraction of the compactable (document) tokens kept, averaged over heads
    target_tokens: int | None = None  # alternatively: document tokens kept per head on average
    # Repeat-prefill alone: on RULER needle documents it beat repeat + context at most ratios (docs/quality.md).
    query_sources: tuple[str, ...] = ("repeat",)
    max_queries_per_head: int = 8192
    heldout_queries_per_head: int = 1024
    # Solve the compactable span in chunks of this many tokens (None: one solve), so solver memory stays bounded by
    # chunk x queries at 64k+ tokens; shorter documents are one chunk either way.
    chunk_tokens: int | None = 8192
    budget: str = "auto"  # auto = the method's own default (global for AM and KVzip, uniform for the rest)
    # No per-head cap (the paper's scripts use 0.75): on a UUID needle document at keep 0.5 the 0.75 cap cost AM 2 of
    # 4 answers (log-ppl 0.193 vs 0.023 uncapped, the full cache's) because heads that need their whole span were
    # cut; KVzip's global top-k has no cap either. The price is memory padding (`CompactedKV.padded_slots`).
    max_ratio_per_head: float = 1.0
    min_slots_per_head: int = 4
    # Fraction of its uniform share (keep_ratio x span) every head keeps before the global top-k hands out the rest:
    # 0 is the pure global budget, 1 the uniform one. The global budget wins on needles, H2O's uniform one on
    # QuALITY's story questions; 0.5 lost half the needles at keep 0.1 and stayed behind H2O on the stories
    # (docs/quality.md, session 5).
    uniform_floor: float = 0.0
    # Global budget only: weight each head's scores by (its profile share x heads) ** profile_prior, a measured
    # per-model prior (kvcompact calibrate) on top of the document's own attention; 0 ignores any profile.
    profile_prior: float = 0.0
    on_policy: bool = False
    self_study_tokens: int = 128
    # Relative to sigma_max(X)^2 and pulling towards the original values: on RULER needle documents 0.1 gave lower
    # answer log-perplexity than 1e-3 (0.32 vs 0.43 at keep 0.1) and than no value fit at all (0.42); docs/quality.md.
    value_ridge: float = 0.1
    beta_upper: float = solvers.DEFAULT_BETA_BOUNDS[1]
    # Pull of exp(beta) towards 1 in the mass fit, relative to the mass gram's mean diagonal; 0 is the paper's NNLS.
    # On the H200 sets (docs/quality.md, session 8) about 10 puts AM ahead of H2O on story questions from 10x to 50x
    # and costs needle answers at 10x (18/40 -> 11/40), so the default stays 0; POST /v1/compact exposes it.
    beta_prior: float = 0.0
    # Fit once per prior listed here and keep the fit under which the full cache's own greedy answers to the
    # self-study tasks are most likely (probe_answers): a per-document choice of beta_prior. Empty: beta_prior as set.
    beta_prior_choices: tuple[float, ...] = ()
    nnls_iterations: int = 2
    # Keys are chosen by the same context-normalised max-attention score the global budget is allocated from, so a
    # head keeps exactly its share of the global top-k; "rms" (the paper's within-head score) is the alternative.
    key_score: str = "max"
    # Max-pool each head's key importance over this many neighbouring tokens (odd; 0 = off) before budgets and key
    # selection, so multi-token facts are kept whole (solvers.pool_scores). Measured in docs/quality.md (session 10).
    score_pool: int = 0
    # The value fit's ridge pulls towards the kept keys' original values, so keys the reference queries barely
    # attend to keep their values; "zero" is plain ridge regression.
    value_prior: str = "original"
    # Per head, fall back to the kept keys' plain eviction where it reproduces the block's attention sum better on the
    # reference queries. Off: on two needle documents it raised the log-ppl in all four cells measured
    # (docs/quality.md).
    fit_guard: bool = False
    prefill_chunk_tokens: int = 4096
    profile_path: str | None = None
    seed: int = 0
    # Questions or tasks the caller expects to ask of the compacted context. Each is answered once from the full cache
    # and the keys that the hint and its answer attend to are scored like the repeat pass's, times hint_weight
    # (solvers.prioritise), so they come first in the budget and within each head. At weight 1000 the questions as
    # hints kept 10 of 40 needle answers at keep 0.02 where the repeat pass alone kept none, but cost the key-value
    # answers AM had at 5x-10x: nearly every key then ranks by the hints alone. Weight 10 keeps the repeat pass's
    # order for the keys the hints barely look at; on four needle documents it answered as many (13 of 40 over
    # keep 0.05 and 0.02) with lower log-ppl (docs/quality.md, session 13).
    hints: tuple[str, ...] = ()
    hint_weight: float = 10.0
    hint_answer_tokens: int = 64

    def __post_init__(self) -> None:
        # Overrides arrive as text (`am[beta_prior_choices=0+10]`); a bad number is a config error, not a crash.
        try:
            self.beta_prior_choices = tuple(float(prior) for prior in self.beta_prior_choices)
        except (TypeError, ValueError) as exc:
            raise CompactionConfigError(f"beta_prior_choices must be numbers: {exc}") from exc
        if isinstance(self.hints, str):  # one hint given bare
            self.hints = (self.hints,)
        self.hints = tuple(self.hints)

    def validate(self) -> None:
        if self.method not in METHOD_NAMES:
            raise CompactionConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHOD_NAMES)}")
        unknown = set(self.query_sources) - set(QUERY_SOURCES)
        if not self.query_sources or unknown:
            raise CompactionConfigError(f"query_sources must be a non-empty subset of {', '.join(QUERY_SOURCES)}")
        if self.keep_ratio is not None and self.target_tokens is not None:
            raise CompactionConfigError("give keep_ratio or target_tokens, not both")
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise CompactionConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise CompactionConfigError(f"target_tokens must be at least 1, got {self.target_tokens}")
        if self.budget not in BUDGET_MODES:
            raise CompactionConfigError(f"budget must be one of {', '.join(BUDGET_MODES)}")
        if self.key_score not in ("rms", "mean", "max"):
            raise CompactionConfigError("key_score must be rms, mean or max")
        if self.value_prior not in ("original", "zero"):
            raise CompactionConfigError("value_prior must be original or zero")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise CompactionConfigError("chunk_tokens must be positive")
        if self.beta_prior < 0 or any(prior < 0 for prior in self.beta_prior_choices):
            raise CompactionConfigError("beta_prior and beta_prior_choices must be >= 0")
        if self.score_pool < 0 or (self.score_pool > 1 and self.score_pool % 2 == 0):
            raise CompactionConfigError(f"score_pool must be 0 or an odd kernel size, got {self.score_pool}")
        if not all(isinstance(hint, str) and hint.strip() for hint in self.hints):
            raise CompactionConfigError("hints must be non-empty strings")
        if self.hint_weight < 1:
            raise CompactionConfigError(f"hint_weight must be >= 1, got {self.hint_weight}")
        if self.hint_answer_tokens < 1:
            raise CompactionConfigError(f"hint_answer_tokens must be at least 1, got {self.hint_answer_tokens}")
        if self.profile_prior < 0:
            raise CompactionConfigError(f"profile_prior must be >= 0, got {self.profile_prior}")
        if not 0 <= self.uniform_floor <= 1:
            raise CompactionConfigError(f"uniform_floor must be in [0, 1], got {self.uniform_floor}")
        if not 0 < self.max_ratio_per_head <= 1:
            raise CompactionConfigError(f"max_ratio_per_head must be in (0, 1], got {self.max_ratio_per_head}")

    def preparation_key(self) -> tuple:
        """The fields `prepare_context` depends on: contexts prepared under equal keys can be shared."""
        return (tuple(self.query_sources), self.max_queries_per_head, self.heldout_queries_per_head,
                self.self_study_tokens, self.prefill_chunk_tokens, self.seed, self.hints, self.hint_answer_tokens)

    def keep_ratio_for(self, compactable_tokens: int) -> float:
        """The fraction of compactable tokens to keep; a budget of zero slots or above the length is an error."""
        if self.target_tokens is not None:
            if self.target_tokens > compactable_tokens:
                raise CompactionConfigError(
                    f"target_tokens {self.target_tokens} exceeds the {compactable_tokens} compactable tokens")
            return self.target_tokens / compactable_tokens
        ratio = DEFAULT_KEEP_RATIO if self.keep_ratio is None else self.keep_ratio
        if math.floor(ratio * compactable_tokens) < 1:
            raise CompactionConfigError(
                f"keep_ratio {ratio} keeps no token of a {compactable_tokens}-token document; raise it")
        return ratio


@dataclass
class CompactionResult:
    compacted: CompactedKV
    input_tokens: int
    compactable_tokens: int
    retained_slots: int
    compaction_ratio: float  # full KV slots (tokens x layers x KV heads) / retained slots
    phase_seconds: dict[str, float]
    heldout_rel_error: float | None
    heldout_log_mass_error: float | None = None
    heldout_head_errors: list[list[float]] = field(default_factory=list)  # per compacted layer, per KV head
    budgets: list[list[int]] = field(default_factory=list)  # document slots kept, per compacted layer per KV head


def compactable_layer_indices(cache: DynamicCache) -> list[int]:
    """Indices of the layers that get compacted: every layer but the sliding-window ones (kept verbatim)."""
    return [i for i, layer in enumerate(cache.layers) if not getattr(layer, "is_sliding", False)]


@dataclass
class PreparedContext:
    """A rendered, prefilled context with its reference queries: shared by every method and ratio (the eval
    compacts one document many ways)."""

    rendered: RenderedContext
    cache: DynamicCache
    context_queries: ReferenceQueries
    pass_queries: ReferenceQueries
    passes: list
    seconds: dict[str, float]
    importance: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H, span) KVzip scores
    hint_importance: dict[int, torch.Tensor] = field(default_factory=dict)  # the same, over the hint passes only
    probes: list[tuple[list[int], list[int]]] | None = None  # probe_answers, made on first use
    probe_seconds: float = 0.0

    @property
    def span(self) -> torch.Tensor:
        return self.rendered.span()

    @property
    def compactable_layers(self) -> list[int]:
        return compactable_layer_indices(self.cache)

    def key_importance(self, lm, layer: int) -> torch.Tensor:
        """Every compactable key's largest attention weight over the reference queries, normalised over the whole
        context (KVzip's measure; comparable across heads and layers). Measured once per context and layer.

        With repeat or self-study passes the scores were taken during the passes from every pass token
        (`KeyImportance`); the document's own queries, which mostly look at nearby tokens, do not vote then. With
        context queries alone they are scored here from the captured subsample."""
        if layer not in self.importance:
            queries = self.fit_queries(layer)
            keys = self.cache.layers[layer].keys[0]
            scaling = attention_modules(lm.model)[layer].scaling
            normalizer = _context_log_normalizer(queries, keys, scaling)
            span_keys = keys[:, self.span.to(keys.device)]
            self.importance[layer] = torch.cat([
                solvers.key_scores(solvers.attention_logits(queries, span_keys[:, start:start + KEY_BLOCK], scaling),
                                   "max", normalizer)
                for start in range(0, span_keys.shape[1], KEY_BLOCK)], dim=1)
        return self.importance[layer]

    def context_scores(self, lm, layer: int, chunk: slice, pool: int, hint_weight: float) -> torch.Tensor:
        """One chunk's `key_importance`, raised by the hints' (`solvers.prioritise`) where there are any, then
        max-pooled over `pool` neighbouring keys of the whole span (so a chunk edge does not cut a pooling window)."""
        scores = self.key_importance(lm, layer)
        if layer in self.hint_importance:
            scores = solvers.prioritise(scores, self.hint_importance[layer], hint_weight)
        return solvers.pool_scores(scores, pool)[:, chunk]

    def probe_answers(self, lm, max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
        """The full cache's greedy answers to the self-study tasks (generated once per context)."""
        if self.probes is None:
            timer = PhaseTimer(lm.device)
            with timer.phase("probes"):
                self.probes = probe_answers(lm, self.cache, self.rendered, max_new_tokens)
            self.probe_seconds = timer.seconds["probes"]
        return self.probes

    def fit_queries(self, layer: int) -> torch.Tensor:
        parts = [refs.fit_queries(layer) for refs in (self.context_queries, self.pass_queries) if layer in refs.fit]
        return torch.cat(parts, dim=1)

    def heldout_queries(self, layer: int) -> torch.Tensor:
        parts = [refs.heldout_queries(layer) for refs in (self.context_queries, self.pass_queries)
                 if layer in refs.heldout]
        return torch.cat(parts, dim=1)


def _num_kv_heads(lm) -> int:
    return lm.text_config.num_key_value_heads


def _query_heads_per_kv(lm) -> int:
    return lm.text_config.num_attention_heads // _num_kv_heads(lm)


def prepare_context(lm, context: str | list[dict], config: CompactionConfig) -> PreparedContext:
    """Render and prefill the context and gather its reference queries (phases `prefill` and `queries`)."""
    config.validate()
    timer = PhaseTimer(lm.device)
    rendered = render_context(lm.tokenizer, context)
    config.keep_ratio_for(rendered.compactable_count)  # fail fast, before the expensive prefill
    generator = torch.Generator().manual_seed(config.seed)
    groups, num_kv_heads = _query_heads_per_kv(lm), _num_kv_heads(lm)
    tokens_per_source = max(1, math.ceil(config.max_queries_per_head / groups / len(config.query_sources)))
    heldout_tokens = max(1, math.ceil(config.heldout_queries_per_head / groups))
    only_context = set(config.query_sources) == {"context"}
    context_queries, pass_queries = ReferenceQueries(), ReferenceQueries()
    cache = DynamicCache(config=lm.model.config)
    with timer.phase("prefill"):
        recorder, capture, heldout_mask = None, None, None
        if "context" in config.query_sources:
            context_pass = context_positions(rendered, tokens_per_source, heldout_tokens if only_context else 0,
                                             generator)
            capture, heldout_mask = context_pass.capture_positions()
            recorder = QueryRecorder(lm.model)
        if recorder is None:
            chunked_forward(lm.model, rendered.ids, cache, config.prefill_chunk_tokens)
        else:
            with recorder.attached():
                chunked_forward(lm.model, rendered.ids, cache, config.prefill_chunk_tokens, recorder, capture)
            for layer, pieces in recorder.captured.items():
                context_queries.add(layer, torch.cat(pieces, dim=1), heldout_mask, num_kv_heads)
    with timer.phase("queries"):
        passes = plan_passes(lm, cache, rendered, tuple(config.query_sources), tokens_per_source, heldout_tokens,
                             config.self_study_tokens, generator, config.seed)
        context_keys = {i: cache.layers[i].keys[0] for i in compactable_layer_indices(cache)}
        importance = KeyImportance(lm.model, context_keys, rendered.span(), num_kv_heads)
        capture_passes(lm, cache, passes, pass_queries, num_kv_heads, config.prefill_chunk_tokens,
                       importance=importance)
    hint_scores = {}
    if config.hints:
        with timer.phase("hints"):
            hinted = KeyImportance(lm.model, context_keys, rendered.span(), num_kv_heads)
            capture_passes(lm, cache, hint_passes(lm, cache, rendered, config.hints, config.hint_answer_tokens), None,
                           num_kv_heads, config.prefill_chunk_tokens, importance=hinted)
            hint_scores = hinted.scores
    return PreparedContext(rendered, cache, context_queries, pass_queries, passes, timer.as_dict(),
                           importance=importance.scores, hint_importance=hint_scores)


def _chunks(span_length: int, chunk_tokens: int | None) -> list[slice]:
    """Slices of the compactable span solved independently."""
    size = span_length if chunk_tokens is None else chunk_tokens
    return [slice(start, min(start + size, span_length)) for start in range(0, span_length, size)]


def _context_log_normalizer(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum_j exp(s q.K_j) over every key of the context, in key blocks: (H, n)."""
    total = None
    for start in range(0, keys.shape[1], KEY_BLOCK):
        part = solvers.log_mass(solvers.attention_logits(queries, keys[:, start:start + KEY_BLOCK], scaling))
        total = part if total is None else torch.logaddexp(total, part)
    return total


def profile_file(lm, config: CompactionConfig) -> Path:
    if config.profile_path:
        return Path(config.profile_path)
    return Path(os.environ.get("KVC_DATA_DIR", "data")) / "profiles" / f"{lm.config_fingerprint[:16]}.json"


def load_profile(lm, config: CompactionConfig) -> torch.Tensor:
    path = profile_file(lm, config)
    if not path.is_file():
        raise CompactionConfigError(f"no head profile at {path}: run `kvcompact calibrate` for this model first")
    stored = json.loads(path.read_text())
    if stored.get("config_fingerprint") != lm.config_fingerprint:
        raise CompactionConfigError(f"head profile {path} was measured on another model")
    return torch.tensor(stored["proportions"], dtype=torch.float64)


def _block(lm, prepared: PreparedContext, layer: int, chunk: slice, queries: torch.Tensor,
           scoring: CompactionConfig | None) -> HeadBlock:
    """One layer's keys, values and queries for `chunk`; with its context scores as `scoring` sets them (None: the
    method does not use them)."""
    cache_layer = prepared.cache.layers[layer]
    positions = prepared.span[chunk]
    index = positions.to(cache_layer.keys.device)
    return HeadBlock(keys=cache_layer.keys[0][:, index], values=cache_layer.values[0][:, index],
                     queries=queries.to(cache_layer.keys.device), scaling=attention_modules(lm.model)[layer].scaling,
                     positions=positions,
                     context_scores=None if scoring is None else prepared.context_scores(
                         lm, layer, chunk, scoring.score_pool, scoring.hint_weight))


def budget_profile(lm, mode: str, config: CompactionConfig) -> torch.Tensor | None:
    """The stored head profile when `mode` and `config` use one (read once per compaction, not per chunk)."""
    if mode == "profile" or (mode == "global" and config.profile_prior > 0):
        return load_profile(lm, config)
    return None


def allocate_budgets(lm, prepared: PreparedContext, layers: list[int], chunk: slice, keep_ratio: float,
                     mode: str, config: CompactionConfig, profile: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Slots per KV head for each compactable layer, for one chunk of the span (phase `budgets`); `profile` is
    `budget_profile`'s answer for the same mode and config."""
    heads = _num_kv_heads(lm)
    length = chunk.stop - chunk.start
    total = max(heads * len(layers), round(keep_ratio * length * heads * len(layers)))
    floor, cap = budget_rules.per_head_limits(length, keep_ratio, config.max_ratio_per_head, config.min_slots_per_head,
                                              config.uniform_floor)
    if mode == "uniform":
        flat = budget_rules.uniform_budgets(heads * len(layers), length, total)
    elif mode == "profile":
        flat = budget_rules.profile_budgets(profile, total, floor, cap)
    else:
        scores = torch.cat([prepared.context_scores(lm, layer, chunk, config.score_pool, config.hint_weight).cpu()
                            for layer in layers])
        weights = None
        if config.profile_prior > 0:
            weights = (profile * len(layers) * heads) ** config.profile_prior
        flat = budget_rules.global_budgets(scores, total, floor, cap, weights)
    return {layer: flat[i * heads:(i + 1) * heads] for i, layer in enumerate(layers)}


def assemble_layer(verbatim_keys: torch.Tensor, verbatim_values: torch.Tensor, fits: list[BlockFit]) -> CompactedLayer:
    """[verbatim template slots (beta 0) | each chunk's kept slots], real slots moved to the front of every head."""
    heads, verbatim = verbatim_keys.shape[:2]
    device = verbatim_keys.device
    keys = torch.cat([verbatim_keys] + [fit.keys for fit in fits], dim=1)
    values = torch.cat([verbatim_values] + [fit.values for fit in fits], dim=1)
    beta = torch.cat([torch.zeros(heads, verbatim, device=device)] + [fit.beta.to(device) for fit in fits], dim=1)
    active = torch.cat([torch.ones(heads, verbatim, dtype=torch.bool, device=device)]
                       + [fit.active.to(device) for fit in fits], dim=1)
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)
    lengths = active.sum(dim=1)
    slots = int(lengths.max())
    order = order[:, :slots]
    keep = torch.gather(active, 1, order)
    keys = solvers.gather_keys(keys, order) * keep[..., None]
    values = solvers.gather_keys(values, order) * keep[..., None]
    beta = torch.gather(beta, 1, order).masked_fill(~keep, float("-inf"))
    return CompactedLayer(keys=keys, values=values, beta=beta.float(), lengths=lengths.cpu())


def verbatim_layer(cache_layer) -> CompactedLayer:
    """A cache layer kept as is (beta 0): sliding-window layers, and the full-cache baseline."""
    keys, values = cache_layer.keys[0], cache_layer.values[0]
    heads, slots = keys.shape[:2]
    return CompactedLayer(keys=keys, values=values, beta=torch.zeros(heads, slots),
                          lengths=torch.full((heads,), slots, dtype=torch.long),
                          sliding=bool(getattr(cache_layer, "is_sliding", False)))


def _on_policy_queries(lm, prepared: PreparedContext, done: dict[int, CompactedLayer], layer: int,
                       config: CompactionConfig) -> torch.Tensor:
    """Layer `layer`'s queries re-read with every earlier layer already compacted (the pass-based sources only)."""
    layers = [done.get(i) or verbatim_layer(cache_layer) for i, cache_layer in enumerate(prepared.cache.layers)]
    hybrid = CompactedCache(CompactedKV(layers=layers, original_length=len(prepared.rendered.ids)),
                            lm.model.config, device=lm.device)
    fresh = ReferenceQueries()
    capture_passes(lm, hybrid, prepared.passes, fresh, _num_kv_heads(lm), config.prefill_chunk_tokens,
                   layers={layer}, stop_after_layer=layer)
    parts = [prepared.context_queries.fit_queries(layer)] if layer in prepared.context_queries.fit else []
    return torch.cat(parts + [fresh.fit_queries(layer)], dim=1)


@dataclass
class _Fitted:
    """One fit of every compactable layer, before it is reported."""

    compacted: CompactedKV
    meter: ReconstructionMeter
    budgets: list[list[int]]  # document slots kept, per compacted layer per KV head


def _fit_layers(lm, prepared: PreparedContext, config: CompactionConfig, timer: PhaseTimer) -> _Fitted:
    """Budgets, then every compactable layer's fit (chunk by chunk), assembled into a CompactedKV."""
    method = make_method(config.method, FitSettings(beta_upper=config.beta_upper, beta_prior=config.beta_prior,
                                                    value_ridge=config.value_ridge,
                                                    nnls_iterations=config.nnls_iterations,
                                                    key_score=config.key_score,
                                                    value_prior=config.value_prior,
                                                    fit_guard=config.fit_guard))
    span = prepared.span
    keep_ratio = config.keep_ratio_for(span.numel())
    mode = method.default_budget if config.budget == "auto" else config.budget
    cache_layers = prepared.cache.layers
    layers = prepared.compactable_layers
    chunks = _chunks(span.numel(), config.chunk_tokens)
    with timer.phase("budgets"):
        profile = budget_profile(lm, mode, config)
        chunk_budgets = [allocate_budgets(lm, prepared, layers, chunk, keep_ratio, mode, config, profile)
                         for chunk in chunks]
    verbatim = torch.tensor([i for i, c in enumerate(prepared.rendered.compactable) if not c], dtype=torch.long)
    needs_context_scores = method.name == "kvzip" or config.key_score == "max"
    done: dict[int, CompactedLayer] = {}
    meter = ReconstructionMeter()
    for layer in layers:
        if config.on_policy and prepared.passes and layer != layers[0]:
            with timer.phase("queries"):
                queries = _on_policy_queries(lm, prepared, done, layer, config)
        else:
            queries = prepared.fit_queries(layer)
        heldout = prepared.heldout_queries(layer)
        fits = []
        for chunk, budgets in zip(chunks, chunk_budgets):
            block = _block(lm, prepared, layer, chunk, queries, config if needs_context_scores else None)
            fit = fit_block(method, block, budgets[layer], timer)
            fits.append(fit)
            if heldout.shape[1]:
                meter.add_block(layer, heldout.to(block.keys.device), block, fit)
        index = verbatim.to(cache_layers[layer].keys.device)
        done[layer] = assemble_layer(cache_layers[layer].keys[0][:, index], cache_layers[layer].values[0][:, index],
                                     fits)
    compacted_layers = [done.get(i) or verbatim_layer(layer) for i, layer in enumerate(cache_layers)]
    params = {k: v for k, v in asdict(config).items() if k not in ("profile_path",)}
    compacted = CompactedKV(layers=compacted_layers, original_length=len(prepared.rendered.ids),
                            meta={"roles": prepared.rendered.roles, "method": config.method, "params": params})
    heads = _num_kv_heads(lm)
    return _Fitted(compacted, meter,
                   [[int(sum(b[layer][h] for b in chunk_budgets)) for h in range(heads)] for layer in layers])


def probe_logprob(lm, compacted: CompactedKV, probes: list[tuple[list[int], list[int]]]) -> float:
    """Mean per-token log-prob of the probe answers under `compacted` (higher: closer to the full cache)."""
    return sum(answer_logprob(lm, compacted, prompt, answer) for prompt, answer in probes) / len(probes)


def _fit_choosing_prior(lm, prepared: PreparedContext, config: CompactionConfig, timer: PhaseTimer) -> _Fitted:
    """One fit per prior of `beta_prior_choices`; the one whose cache best predicts the probe answers is kept, with
    every prior's score in its meta (`probe_logprobs`). Only beta and the values depend on the prior, but each
    candidate is fitted whole: the key selection is a small share of the fit."""
    probes = prepared.probe_answers(lm, config.self_study_tokens)
    if not probes:  # the model answered no task: nothing to choose with
        return _fit_layers(lm, prepared, replace(config, beta_prior_choices=()), timer)
    scores: dict[float, float] = {}
    best, best_score = None, float("-inf")
    for prior in dict.fromkeys(config.beta_prior_choices):
        fitted = _fit_layers(lm, prepared, replace(config, beta_prior=prior), timer)
        with timer.phase("probes"):
            scores[prior] = probe_logprob(lm, fitted.compacted, probes)
        if best is None or scores[prior] > best_score:  # ties keep the earlier prior
            best, best_score = fitted, scores[prior]
    best.compacted.meta["probe_logprobs"] = {f"{prior:g}": round(score, 6) for prior, score in scores.items()}
    return best


def compact_prepared(lm, prepared: PreparedContext, config: CompactionConfig) -> CompactionResult:
    """Compact an already prepared context with `config` (method, budget, ratio...)."""
    config.validate()
    timer = PhaseTimer(lm.device)
    seconds = dict(prepared.seconds)
    if config.beta_prior_choices:
        fitted = _fit_choosing_prior(lm, prepared, config, timer)
        seconds["probes"] = prepared.probe_seconds  # generated once per context, charged to every row that uses it
    else:
        fitted = _fit_layers(lm, prepared, config, timer)
    for name, value in timer.as_dict().items():
        seconds[name] = seconds.get(name, 0.0) + value
    compacted = fitted.compacted
    input_tokens = len(prepared.rendered.ids)
    retained = compacted.retained_slots()
    full_slots = input_tokens * len(prepared.cache.layers) * _num_kv_heads(lm)
    return CompactionResult(
        compacted=compacted, input_tokens=input_tokens, compactable_tokens=prepared.span.numel(),
        retained_slots=retained, compaction_ratio=full_slots / retained, phase_seconds=seconds,
        heldout_rel_error=fitted.meter.rel_error(), heldout_log_mass_error=fitted.meter.log_mass_error(),
        heldout_head_errors=fitted.meter.head_rel_errors(), budgets=fitted.budgets)


def compact_context(lm, context: str | list[dict], config: CompactionConfig) -> CompactionResult:
    """Compact a document / messages / tool outputs. Raises CompactionConfigError or ContextError on bad input."""
    return compact_prepared(lm, prepare_context(lm, context, config), config)


@torch.inference_mode()
def full_context(lm, context: str | list[dict], prefill_chunk_tokens: int = 4096) -> CompactedKV:
    """The uncompacted cache of a context in the same form (beta 0 everywhere): the full-cache baseline."""
    rendered = render_context(lm.tokenizer, context)
    cache = DynamicCache(config=lm.model.config)
    chunked_forward(lm.model, rendered.ids, cache, prefill_chunk_tokens)
    return CompactedKV(layers=[verbatim_layer(layer) for layer in cache.layers], original_length=len(rendered.ids),
                       meta={"roles": rendered.roles, "method": "full", "params": {}})
