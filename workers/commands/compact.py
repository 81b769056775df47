"""`kvcompact compact FILE`: compact a document and report sizes, phase timings and held-out error."""

from __future__ import annotations

import argparse
import json
import sys

from workers.commands.common import add_compaction_arguments, add_model_arguments, config_from_args, read_document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="document (text), or a .json list of chat messages")
    add_model_arguments(parser)
    add_compaction_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def report(result, method: str) -> dict:
    return {
        "method": method,
        "input_tokens": result.input_tokens,
        "compactable_tokens": result.compactable_tokens,
        "retained_slots": result.retained_slots,
        "compaction_ratio": round(result.compaction_ratio, 3),
        "phase_seconds": result.phase_seconds,
        "heldout_rel_error": result.heldout_rel_error,
    }


def run(args: argparse.Namespace) -> int:
    from workers.compaction.pipeline import compact_context
    from workers.models.loading import load_model

    lm = load_model(args.model, args.dtype, args.device)
    result = compact_context(lm, read_document(args.file), config_from_args(args))
    summary = report(result, args.method)
    if args.json:
        json.dump(summary, sys.stdout)
        sys.stdout.write("\n")
        return 0
    for key in ("method", "input_tokens", "compactable_tokens", "retained_slots", "compaction_ratio",
                "heldout_rel_error"):
        print(f"{key:20s} {summary[key]}")
    for phase, seconds in summary["phase_seconds"].items():
        print(f"  {phase:18s} {seconds:8.3f} s")
    return 0
