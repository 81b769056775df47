"""`kvcompact calibrate --text FILE`: measure a model's head-budget profile once and cache it.

Two measurements (`--measure`):
- `allocation` (default): the global allocation itself. Compact the calibration text at several ratios with one
  global budget (KVzip-style key importance, comparable across heads) and record each (layer, KV head)'s average
  share of the slots.
- `sensitivity`: the paper's Algorithm 4 (`workers.compaction.sensitivity`): per head, the change in reference-answer
  log-perplexity when that head alone is compacted harder or softer, and the split that minimises the summed change.
Documents later compacted with `budget="profile"` split their budget in these proportions, without measuring anything
on the document. The paper found head sensitivity stable across inputs, so one text suffices.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from workers.commands.common import add_model_arguments

DEFAULT_RATIOS = (0.02, 0.05, 0.1, 0.2)
MEASURES = ("allocation", "sensitivity")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="calibration document (plain text, a few thousand tokens)")
    add_model_arguments(parser)
    parser.add_argument("--measure", choices=MEASURES, default="allocation")
    parser.add_argument("--ratios", nargs="+", type=float, default=None,
                        help=f"allocation: ratios averaged (default {' '.join(map(str, DEFAULT_RATIOS))}); "
                             "sensitivity: ratios probed per head (default 0.005 0.01 0.02 0.05 0.1 0.2 0.5)")
    parser.add_argument("--out", default=None, help="profile path (default: $KVC_DATA_DIR/profiles/<model>.json)")


def measure_head_profile(lm, text: str, ratios: list[float]) -> dict:
    import torch

    from workers.compaction import budgets as budget_rules
    from workers.compaction.pipeline import CompactionConfig, allocate_budgets, budget_profile, prepare_context

    config = CompactionConfig()
    prepared = prepare_context(lm, text, config)
    layers = prepared.compactable_layers
    whole = slice(0, prepared.span.numel())
    profile = budget_profile(lm, "global", config)
    shares = []
    for ratio in ratios:
        allocation = allocate_budgets(lm, prepared, layers, whole, ratio, "global", config, profile)
        shares.append(budget_rules.proportions_from_budgets(torch.cat([allocation[layer] for layer in layers])))
    proportions = torch.stack(shares).mean(dim=0)
    return {"model": lm.name, "config_fingerprint": lm.config_fingerprint, "layers": layers, "ratios": ratios,
            "calibration_tokens": prepared.span.numel(), "proportions": proportions.tolist()}


def measure_sensitivity_profile(lm, text: str, ratios: list[float]) -> dict:
    """Influence curves of every compactable head on `text` and the proportions solved from them."""
    import torch

    from workers.compaction import sensitivity
    from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context

    config = CompactionConfig(budget="uniform")
    prepared = prepare_context(lm, text, config)
    layers = prepared.compactable_layers
    probed = sorted(set(ratios) | {sensitivity.BASE_RATIO})
    compactions = {ratio: compact_prepared(lm, prepared, replace(config, keep_ratio=ratio)).compacted
                   for ratio in probed}
    rendered = prepared.rendered
    probes = sensitivity.recall_probes(lm.tokenizer, rendered.roles, rendered.compactable_ids())
    curves = sensitivity.influence_curves(lm, compactions, sensitivity.BASE_RATIO, layers, probes)
    targets = tuple(t for t in sensitivity.DEFAULT_TARGETS if probed[0] <= t <= probed[-1])
    proportions = sensitivity.sensitivity_proportions(torch.tensor(probed), curves, targets)
    return {"model": lm.name, "config_fingerprint": lm.config_fingerprint, "layers": layers, "measure": "sensitivity",
            "ratios": probed, "targets": list(targets), "calibration_tokens": prepared.span.numel(),
            "probes": len(probes), "curves": curves.tolist(), "proportions": proportions.tolist()}


def run(args: argparse.Namespace) -> int:
    from workers.compaction.pipeline import CompactionConfig, profile_file
    from workers.compaction.sensitivity import DEFAULT_PROBE_RATIOS
    from workers.models.loading import load_model

    lm = load_model(args.model, args.dtype, args.device)
    text = Path(args.text).read_text()
    if args.measure == "sensitivity":
        profile = measure_sensitivity_profile(lm, text, args.ratios or list(DEFAULT_PROBE_RATIOS))
    else:
        profile = measure_head_profile(lm, text, args.ratios or list(DEFAULT_RATIOS))
    out = Path(args.out) if args.out else profile_file(lm, CompactionConfig())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1))
    print(f"head profile of {lm.name} ({len(profile['proportions'])} heads) written to {out}")
    return 0
