"""Head budgets from measured sensitivity: the paper's Algorithm 4 (influence curves, then a budget solver).

The global budget (`budgets.global_budgets`) spends slots where KVzip's attention score is highest on *this*
document. The paper instead measures, once per model, what each (layer, KV head) costs in answer log-perplexity when
only that head is compacted harder or softer, and splits every later budget in the proportions that minimise the
summed cost. Heads are assumed separable (the total cost is the sum of per-head costs), as in the paper.

1. `influence_curves`: compact the whole cache at a uniform base ratio; for each head and each probed ratio, swap
   that one head's block for its block compacted at the probed ratio and record the change in reference-answer
   log-perplexity.
2. `allocate_ratios`: for a target average ratio, the per-head ratios minimising the summed (linearly interpolated)
   cost, exactly, by spending budget on the steepest segments of each curve's lower convex hull first.
3. `sensitivity_proportions`: the allocations for several targets, each normalised to proportions and averaged
   (the paper's "ratio-agnostic" vector is one allocation good across targets; averaging is our simplification).

The reference answers here are *recall probes* (repeat the passage that starts with a few words of the document),
not the paper's QuALITY questions: they need no dataset and ask for what long-document questions need, content from
anywhere in the context.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from workers.compaction.context import continuation_ids
from workers.compaction.generation import answer_logprob
from workers.compaction.types import CompactedKV, CompactedLayer

DEFAULT_PROBE_RATIOS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_TARGETS = (0.01, 0.02, 0.05, 0.1)
BASE_RATIO = 0.05  # the paper's uniform baseline schedule


@dataclass
class Probe:
    """One reference answer: prompt tokens after the context and the answer tokens it is scored on."""

    prompt_ids: list[int]
    answer_ids: list[int]


def recall_probes(tokenizer, roles: list[str], document_ids: list[int], count: int = 8, cue_tokens: int = 8,
                  answer_tokens: int = 48) -> list[Probe]:
    """`count` evenly spaced passages of the document: cued by their first `cue_tokens` tokens, answered by the
    next `answer_tokens` (teacher forced, so the tokenisation of the answer is the document's own)."""
    span = cue_tokens + answer_tokens
    if len(document_ids) < span:
        raise ValueError(f"a recall probe needs a document of at least {span} tokens, got {len(document_ids)}")
    last_start = len(document_ids) - span
    starts = sorted({round(i * last_start / max(1, count - 1)) for i in range(count)})
    probes = []
    for start in starts:
        cue = tokenizer.decode(document_ids[start:start + cue_tokens]).strip()
        request = f'Repeat the part of the text above that begins with "{cue}", word for word.'
        prompt = continuation_ids(tokenizer, roles, [{"role": "user", "content": request}])
        probes.append(Probe(prompt_ids=prompt, answer_ids=document_ids[start + cue_tokens:start + span]))
    return probes


def splice_head(base: CompactedLayer, donor: CompactedLayer, head: int) -> CompactedLayer:
    """`base` with KV head `head` taken from `donor` (same layer compacted another way), re-padded to the longer
    of the two: padding slots are zero with beta -inf, as everywhere."""
    slots = max(base.max_slots, donor.max_slots)

    def padded(layer: CompactedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        extra = slots - layer.max_slots
        keys = torch.nn.functional.pad(layer.keys, (0, 0, 0, extra))
        values = torch.nn.functional.pad(layer.values, (0, 0, 0, extra))
        beta = torch.nn.functional.pad(layer.beta, (0, extra), value=float("-inf"))
        return keys, values, beta

    keys, values, beta = padded(base)
    donor_keys, donor_values, donor_beta = padded(donor)
    keys[head], values[head], beta[head] = donor_keys[head], donor_values[head], donor_beta[head]
    lengths = base.lengths.clone()
    lengths[head] = donor.lengths[head]
    return CompactedLayer(keys=keys, values=values, beta=beta, lengths=lengths, sliding=base.sliding)


def probe_loss(lm, compacted: CompactedKV, probes: list[Probe]) -> float:
    """Mean answer log-perplexity over the probes (the paper's metric; lower is better)."""
    return -sum(answer_logprob(lm, compacted, p.prompt_ids, p.answer_ids) for p in probes) / len(probes)


def influence_curves(lm, compactions: dict[float, CompactedKV], base_ratio: float, layers: list[int],
                     probes: list[Probe]) -> torch.Tensor:
    """(len(layers) x KV heads, len(ratios)) change in probe log-perplexity when one head alone moves from the base
    ratio to each ratio of `compactions` (keyed by keep ratio, the base among them; rows in layer-major order)."""
    base = compactions[base_ratio]
    base_loss = probe_loss(lm, base, probes)
    ratios = sorted(compactions)
    heads = base.layers[layers[0]].keys.shape[0]
    curves = torch.zeros(len(layers) * heads, len(ratios), dtype=torch.float64)
    for row, (layer, head) in enumerate((layer, head) for layer in layers for head in range(heads)):
        for column, ratio in enumerate(ratios):
            if ratio == base_ratio:
                continue  # the base itself: no change by definition
            swapped = list(base.layers)
            swapped[layer] = splice_head(base.layers[layer], compactions[ratio].layers[layer], head)
            curves[row, column] = probe_loss(lm, replace(base, layers=swapped), probes) - base_loss
    return curves


def _lower_hull(ratios: torch.Tensor, costs: torch.Tensor) -> list[int]:
    """Indices of the lower convex hull of the points (ratios[i], costs[i]), ratios ascending."""
    hull: list[int] = []
    for i in range(len(ratios)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b when it lies on or above the segment a -> i.
            cross = (ratios[b] - ratios[a]) * (costs[i] - costs[a]) - (costs[b] - costs[a]) * (ratios[i] - ratios[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate_ratios(ratios: torch.Tensor, curves: torch.Tensor, target: float) -> torch.Tensor:
    """Per-head keep ratios in [ratios[0], ratios[-1]] averaging `target` and minimising the summed cost of the
    curves (heads x ratios, linearly interpolated between probed ratios, convexified).

    Every head starts at the smallest ratio; the budget above that goes to hull segments in order of cost saved per
    unit of ratio, the last one partially. On convex piecewise-linear costs this greedy order is optimal."""
    ratios = ratios.double()
    heads = curves.shape[0]
    if not ratios[0] <= target <= ratios[-1]:
        raise ValueError(f"target ratio {target} is outside the probed range [{ratios[0]}, {ratios[-1]}]")
    allocation = torch.full((heads,), float(ratios[0]), dtype=torch.float64)
    segments = []  # (saving per unit ratio, head, width)
    for head in range(heads):
        hull = _lower_hull(ratios, curves[head].double())
        for a, b in zip(hull, hull[1:]):
            width = float(ratios[b] - ratios[a])
            segments.append((float(curves[head, a] - curves[head, b]) / width, head, width))
    left = (target - float(ratios[0])) * heads
    for _, head, width in sorted(segments, key=lambda segment: -segment[0]):
        if left <= 0:
            break
        step = min(width, left)
        allocation[head] += step
        left -= step
    return allocation


def sensitivity_proportions(ratios: torch.Tensor, curves: torch.Tensor,
                            targets: tuple[float, ...] = DEFAULT_TARGETS) -> torch.Tensor:
    """One proportion vector (sums to 1) for every target: the mean of each target's normalised allocation."""
    shares = [allocation / allocation.sum() for allocation in (allocate_ratios(ratios, curves, t) for t in targets)]
    return torch.stack(shares).mean(dim=0)
