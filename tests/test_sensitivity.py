"""Sensitivity head budgets (the paper's Algorithm 4): the budget solver, head splicing and a tiny-model calibration."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.core_helpers import DOCUMENT, tiny
from workers.cli import main
from workers.compaction import sensitivity
from workers.compaction.pipeline import CompactionConfig, compact_context, compact_prepared, prepare_context
from workers.compaction.types import CompactedLayer


def interpolated_cost(ratios: torch.Tensor, curve: torch.Tensor, ratio: float) -> float:
    return float(np.interp(ratio, ratios.numpy(), curve.numpy()))


def test_allocation_spends_the_target_and_favours_the_sensitive_head():
    ratios = torch.tensor([0.01, 0.05, 0.1, 0.5], dtype=torch.float64)
    curves = torch.tensor([[4.0, 2.0, 1.0, 0.0],     # sensitive: every extra slot pays
                           [0.2, 0.1, 0.05, 0.0],    # nearly indifferent
                           [1.0, 0.0, 0.0, 0.0]])    # needs 5% and nothing more
    allocation = sensitivity.allocate_ratios(ratios, curves, 0.1)
    assert allocation.mean().item() == pytest.approx(0.1)
    assert allocation[0] > allocation[1] and allocation[2] == pytest.approx(0.05)
    assert ((allocation >= 0.01 - 1e-12) & (allocation <= 0.5 + 1e-12)).all()


def test_allocation_matches_brute_force_on_convex_curves():
    ratios = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    # Convex decreasing curves: cumulative sums of shrinking positive savings.
    savings = torch.sort(torch.rand(3, 4, generator=generator, dtype=torch.float64), dim=1, descending=True).values
    curves = torch.cat([torch.zeros(3, 1, dtype=torch.float64), -savings.cumsum(dim=1)], dim=1)
    target = 0.2
    allocation = sensitivity.allocate_ratios(ratios, curves, target)
    cost = sum(interpolated_cost(ratios, curves[h], float(allocation[h])) for h in range(3))
    grid = [i / 100 for i in range(41)]
    best = min(sum(interpolated_cost(ratios, curves[h], r) for h, r in enumerate(choice))
               for choice in itertools.product(grid, repeat=3) if abs(sum(choice) - 3 * target) < 1e-9)
    assert cost <= best + 1e-9


def test_allocation_skips_points_above_the_hull_and_rejects_unreachable_targets():
    ratios = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64)
    # The middle point is worse than the straight line from 0 to 0.2: the hull ignores it.
    curves = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.5, 0.4]], dtype=torch.float64)
    allocation = sensitivity.allocate_ratios(ratios, curves, 0.1)
    assert allocation.tolist() == pytest.approx([0.2, 0.0])
    with pytest.raises(ValueError, match="outside"):
        sensitivity.allocate_ratios(ratios, curves, 0.3)
    proportions = sensitivity.sensitivity_proportions(ratios, curves, (0.05, 0.1))
    assert proportions.sum().item() == pytest.approx(1.0) and proportions[0] > proportions[1]


def test_splice_head_takes_one_head_and_repads():
    def layer(slots: list[int], fill: float) -> CompactedLayer:
        width = max(slots)
        beta = torch.full((len(slots), width), fill)
        for head, count in enumerate(slots):
            beta[head, count:] = float("-inf")
        block = torch.full((len(slots), width, 2), fill)
        return CompactedLayer(keys=block, values=block.clone(), beta=beta, lengths=torch.tensor(slots))

    base, donor = layer([3, 2], 1.0), layer([5, 1], 2.0)
    spliced = sensitivity.splice_head(base, donor, 0)
    assert spliced.lengths.tolist() == [5, 2] and spliced.max_slots == 5
    assert torch.equal(spliced.keys[0], donor.keys[0]) and torch.equal(spliced.beta[0], donor.beta[0])
    assert torch.equal(spliced.keys[1, :3], base.keys[1]) and (spliced.keys[1, 3:] == 0).all()
    assert torch.isinf(spliced.beta[1, 2:]).all() and torch.equal(base.lengths, torch.tensor([3, 2]))


def test_influence_curves_on_a_tiny_model():
    lm = tiny("llama")
    config = CompactionConfig(budget="uniform")
    prepared = prepare_context(lm, DOCUMENT, config)
    compactions = {ratio: compact_prepared(lm, prepared, replace(config, keep_ratio=ratio)).compacted
                   for ratio in (0.05, 0.2, 1.0)}
    rendered = prepared.rendered
    document = [t for t, compactable in zip(rendered.ids, rendered.compactable) if compactable]
    probes = sensitivity.recall_probes(lm.tokenizer, rendered.roles, document, count=3, answer_tokens=16)
    assert len(probes) == 3 and probes[-1].answer_ids == document[-16:]
    curves = sensitivity.influence_curves(lm, compactions, 0.05, [0, 1], probes)
    heads = lm.text_config.num_key_value_heads
    assert curves.shape == (2 * heads, 3)
    assert (curves[:, 0] == 0).all() and curves[:, 1:].abs().sum() > 0
    # Swapping a head for its own base block changes nothing: the curve's zero is the base loss itself.
    same = sensitivity.splice_head(compactions[0.05].layers[1], compactions[0.05].layers[1], 0)
    layers = list(compactions[0.05].layers)
    layers[1] = same
    assert sensitivity.probe_loss(lm, replace(compactions[0.05], layers=layers), probes) == pytest.approx(
        sensitivity.probe_loss(lm, compactions[0.05], probes), abs=1e-5)


def test_calibrate_sensitivity_writes_a_profile_that_budgets_follow(tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(DOCUMENT * 2)
    out = tmp_path / "sensitivity.json"
    assert main(["calibrate", "--text", str(text), "--model", "tiny-llama", "--measure", "sensitivity",
                 "--ratios", "0.02", "0.1", "0.5", "--out", str(out)]) == 0
    stored = json.loads(out.read_text())
    assert stored["measure"] == "sensitivity" and stored["ratios"] == [0.02, 0.05, 0.1, 0.5]
    assert len(stored["curves"]) == 4 and abs(sum(stored["proportions"]) - 1) < 1e-6
    result = compact_context(tiny("llama"), DOCUMENT, CompactionConfig(keep_ratio=0.2, budget="profile",
                                                                       profile_path=str(out)))
    budgets = torch.tensor([b for layer in result.budgets for b in layer], dtype=torch.float64)
    proportions = torch.tensor(stored["proportions"])
    # The heads the profile ranks first get at least as many slots as those it ranks last.
    assert budgets[proportions.argmax()] >= budgets[proportions.argmin()]
    # As a prior on the global budget: the profile's first head gains slots, the total stays the same.
    lm = tiny("llama")
    plain, prior = (compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2, profile_prior=strength,
                                                                   profile_path=str(out)))
                    for strength in (0.0, 2.0))
    plain_budgets = torch.tensor([b for layer in plain.budgets for b in layer])
    prior_budgets = torch.tensor([b for layer in prior.budgets for b in layer])
    assert prior_budgets.sum() == plain_budgets.sum()
    assert prior_budgets[proportions.argmax()] >= plain_budgets[proportions.argmax()]
    assert not torch.equal(prior_budgets, plain_budgets)
