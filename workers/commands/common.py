"""Arguments shared by the core sub-commands, and turning them into a model and a CompactionConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.compaction.methods import METHOD_NAMES
from workers.compaction.pipeline import BUDGET_MODES, CompactionConfig
from workers.compaction.reference import QUERY_SOURCES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="'bundled' (default, or env KVC_MODEL), 'tiny-llama', or a HF dir")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def add_compaction_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--keep-ratio", type=float, default=None, help="fraction of document tokens kept (default 0.1)")
    size.add_argument("--target-tokens", type=int, default=None, help="document tokens kept per head on average")
    parser.add_argument("--method", default="am", choices=METHOD_NAMES)
    parser.add_argument("--query-sources", nargs="+", default=["repeat"], choices=QUERY_SOURCES)
    parser.add_argument("--budget", default="auto", choices=BUDGET_MODES)
    parser.add_argument("--chunk-tokens", type=int, default=CompactionConfig.chunk_tokens)
    parser.add_argument("--max-queries-per-head", type=int, default=CompactionConfig.max_queries_per_head)
    parser.add_argument("--on-policy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)


def config_from_args(args: argparse.Namespace) -> CompactionConfig:
    return CompactionConfig(method=args.method, keep_ratio=args.keep_ratio, target_tokens=args.target_tokens,
                            query_sources=tuple(args.query_sources), budget=args.budget,
                            chunk_tokens=args.chunk_tokens, max_queries_per_head=args.max_queries_per_head,
                            on_policy=args.on_policy, seed=args.seed)


def read_document(path: str) -> str | list[dict]:
    """A .json file holding a list of chat messages is compacted as messages; anything else as one document."""
    import json

    text = Path(path).read_text()
    if path.endswith(".json"):
        loaded = json.loads(text)
        if isinstance(loaded, list):
            return loaded
    return text
