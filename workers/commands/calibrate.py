"""`kvcompact calibrate --text FILE`: measure a model's head-budget profile once and cache it.

The measurement is the global allocation itself: compact a calibration text at several ratios with one global
budget (KVzip-style key importance, comparable across heads), and record each (layer, KV head)'s average share of
the slots. Documents later compacted with `budget="profile"` split their budget in these proportions, without
measuring anything on the document. The paper found head sensitivity stable across inputs, so one text suffices.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.commands.common import add_model_arguments

DEFAULT_RATIOS = (0.02, 0.05, 0.1, 0.2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="calibration document (plain text, a few thousand tokens)")
    add_model_arguments(parser)
    parser.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    parser.add_argument("--out", default=None, help="profile path (default: $KVC_DATA_DIR/profiles/<model>.json)")


def measure_head_profile(lm, text: str, ratios: list[float]) -> dict:
    import torch

    from workers.compaction import budgets as budget_rules
    from workers.compaction.pipeline import CompactionConfig, allocate_budgets, prepare_context

    config = CompactionConfig()
    prepared = prepare_context(lm, text, config)
    layers = [i for i, layer in enumerate(prepared.cache.layers) if not getattr(layer, "is_sliding", False)]
    whole = slice(0, prepared.span.numel())
    shares = []
    for ratio in ratios:
        allocation = allocate_budgets(lm, prepared, layers, whole, ratio, "global", config)
        shares.append(budget_rules.proportions_from_budgets(torch.cat([allocation[layer] for layer in layers])))
    proportions = torch.stack(shares).mean(dim=0)
    return {"model": lm.name, "config_fingerprint": lm.config_fingerprint, "layers": layers, "ratios": ratios,
            "calibration_tokens": prepared.span.numel(), "proportions": proportions.tolist()}


def run(args: argparse.Namespace) -> int:
    from workers.compaction.pipeline import CompactionConfig, profile_file
    from workers.models.loading import load_model

    lm = load_model(args.model, args.dtype, args.device)
    profile = measure_head_profile(lm, Path(args.text).read_text(), args.ratios)
    out = Path(args.out) if args.out else profile_file(lm, CompactionConfig())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1))
    print(f"head profile of {lm.name} ({len(profile['proportions'])} heads) written to {out}")
    return 0
