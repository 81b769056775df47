"""Where reference queries come from: passes of tokens the model reads after (or as) the context.

- `context`: the document's own queries, captured during the prefill itself (free).
- `repeat`: "Repeat the previous context verbatim." then the document teacher-forced as the answer (no generation).
- `self-study`: the model answers a few synthetic tasks about the document (generation), then the prompt + answer
  tokens are read back and their queries captured.
Each source gets an equal share of the per-head query budget; tokens are subsampled uniformly, the same positions
for every layer and head. A disjoint set of tokens is held out to measure reconstruction on queries not fitted.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from workers.compaction.context import REPEAT_PROMPT, RenderedContext, continuation_ids
from workers.compaction.forward import chunked_forward, fork_cache
from workers.compaction.generation import decode
from workers.compaction.queries import KeyImportance, QueryRecorder, pool_gqa

QUERY_SOURCES = ("repeat", "self-study", "context")
SELF_STUDY_PROMPTS = (
    "Summarize the main points of the context.",
    "Aggregate all the key facts mentioned in the context.",
    "Structure the information in JSON form and include all important details like dates, times, names, and "
    "numerical values.",
    "Write 3 questions that test understanding of different parts of the context, and answer each of them.",
)


@dataclass
class QueryPass:
    """Tokens appended after the context, and which of their positions to capture (fitting / held out)."""

    ids: list[int]
    positions: torch.Tensor
    heldout: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def capture_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted union of fitting and held-out positions, and a mask of the held-out ones in that order."""
        union = torch.cat([self.positions, self.heldout]).sort().values
        return union, torch.isin(union, self.heldout)


@dataclass
class ReferenceQueries:
    """Per layer, (H_kv, n, d) float32 queries to fit on and (H_kv, m, d) held-out queries."""

    fit: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    heldout: dict[int, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, layer: int, raw_queries: torch.Tensor, heldout_mask: torch.Tensor, num_kv_heads: int) -> None:
        """raw_queries: (H_q, n, d) captured in position order; split, then pool query heads per KV head."""
        mask = heldout_mask.to(raw_queries.device)
        self.fit.setdefault(layer, []).append(pool_gqa(raw_queries[:, ~mask], num_kv_heads))
        self.heldout.setdefault(layer, []).append(pool_gqa(raw_queries[:, mask], num_kv_heads))

    def fit_queries(self, layer: int) -> torch.Tensor:
        return torch.cat(self.fit[layer], dim=1)

    def heldout_queries(self, layer: int) -> torch.Tensor:
        return torch.cat(self.heldout[layer], dim=1)


def split_positions(candidates: torch.Tensor, fit_count: int, heldout_count: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint uniform subsamples of `candidates` for fitting and for held-out evaluation. Short passes give at
    most a quarter of their tokens to the held-out set, so fitting always keeps most of them."""
    heldout_count = min(heldout_count, candidates.numel() // 4)
    shuffled = candidates[torch.randperm(candidates.numel(), generator=generator)]
    heldout = shuffled[:heldout_count].sort().values
    fit = shuffled[heldout_count:heldout_count + fit_count].sort().values
    return fit, heldout


def repeat_pass_ids(tokenizer, rendered: RenderedContext) -> list[int]:
    prompt = continuation_ids(tokenizer, rendered.roles, [{"role": "user", "content": REPEAT_PROMPT}])
    return prompt + rendered.compactable_ids()


def answers_from_context(lm, cache, rendered: RenderedContext, prompts: tuple[str, ...] | list[str],
                         max_new_tokens: int, temperature: float, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the model's own answer ids) for each prompt asked as the next user turn, answered from the full
    `cache`: what the model does with the whole context, which a compaction should keep it able to do."""
    pairs = []
    for index, prompt in enumerate(prompts):
        prompt_ids = continuation_ids(lm.tokenizer, rendered.roles, [{"role": "user", "content": prompt}])
        answer = list(decode(lm, fork_cache(cache), prompt_ids, max_new_tokens, temperature=temperature, top_p=0.8,
                             seed=seed + index))
        pairs.append((prompt_ids, answer))
    return pairs


def self_study_answers(lm, cache, rendered: RenderedContext, max_new_tokens: int, temperature: float,
                       seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the model's own answer ids) for every synthetic task, answered from the full `cache`."""
    return answers_from_context(lm, cache, rendered, SELF_STUDY_PROMPTS, max_new_tokens, temperature, seed)


def hint_passes(lm, cache, rendered: RenderedContext, hints: tuple[str, ...], max_new_tokens: int) -> list[QueryPass]:
    """One pass per hint (a question or task the caller expects to ask): the hint plus the full cache's greedy answer
    to it, so the keys that answering it attends to can be scored. Only scored: no query of it is captured."""
    return [QueryPass(ids=prompt + answer, positions=torch.zeros(0, dtype=torch.long))
            for prompt, answer in answers_from_context(lm, cache, rendered, hints, max_new_tokens, 0.0, 0)]


def self_study_pass_ids(lm, cache, rendered: RenderedContext, max_new_tokens: int, seed: int) -> list[list[int]]:
    """One pass per synthetic task: its prompt plus the model's own (sampled) answer."""
    return [prompt + answer for prompt, answer in
            self_study_answers(lm, cache, rendered, max_new_tokens, temperature=0.7, seed=seed)]


def probe_answers(lm, cache, rendered: RenderedContext, max_new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """The full cache's greedy answers to the synthetic tasks: what a compacted cache should still predict. Greedy,
    so they are not the (sampled) self-study passes the fit may have used, and the eval's log-ppl is of greedy
    answers too. Tasks the model answers with nothing are dropped."""
    pairs = self_study_answers(lm, cache, rendered, max_new_tokens, temperature=0.0, seed=0)
    return [(prompt, answer) for prompt, answer in pairs if answer]


def plan_passes(lm, cache, rendered: RenderedContext, sources: tuple[str, ...], tokens_per_source: int,
                heldout_tokens: int, self_study_tokens: int, generator: torch.Generator, seed: int) -> list[QueryPass]:
    """The appended-token passes (repeat, self-study) with their capture positions. The first pass also supplies
    the held-out tokens."""
    sequences: list[tuple[list[int], int]] = []
    if "repeat" in sources:
        sequences.append((repeat_pass_ids(lm.tokenizer, rendered), tokens_per_source))
    if "self-study" in sources:
        share = math.ceil(tokens_per_source / len(SELF_STUDY_PROMPTS))
        sequences += [(ids, share) for ids in self_study_pass_ids(lm, cache, rendered, self_study_tokens, seed)]
    passes = []
    for index, (ids, count) in enumerate(sequences):
        held = heldout_tokens if index == 0 else 0
        fit, heldout = split_positions(torch.arange(len(ids)), count, held, generator)
        passes.append(QueryPass(ids=ids, positions=fit, heldout=heldout))
    return passes


def capture_passes(lm, cache, passes: list[QueryPass], into: ReferenceQueries | None, num_kv_heads: int,
                   chunk_tokens: int, layers: set[int] | None = None, stop_after_layer: int | None = None,
                   importance: KeyImportance | None = None) -> None:
    """Run every pass on a fork of `cache` and add its queries (all layers, or `layers`) to `into` (None: capture
    nothing); with `importance`, also score the context's keys on every token of the passes."""
    for query_pass in passes:
        recorder = None if into is None else QueryRecorder(lm.model, layers=layers, stop_after_layer=stop_after_layer)
        capture, heldout_mask = query_pass.capture_positions()
        with (recorder.attached() if recorder else nullcontext()), \
                (importance.attached() if importance else nullcontext()):
            chunked_forward(lm.model, query_pass.ids, fork_cache(cache), chunk_tokens, recorder, capture)
        for layer, pieces in (recorder.captured.items() if recorder else ()):
            into.add(layer, torch.cat(pieces, dim=1), heldout_mask, num_kv_heads)


def context_positions(rendered: RenderedContext, count: int, heldout_count: int,
                      generator: torch.Generator) -> QueryPass:
    """The document's own tokens as a query source (captured during the prefill)."""
    fit, heldout = split_positions(rendered.span(), count, heldout_count, generator)
    return QueryPass(ids=rendered.ids, positions=fit, heldout=heldout)

