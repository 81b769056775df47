"""The `kvcompact` console script: one sub-command per job, each implemented in the module that owns it.

Sub-commands import their module lazily so `kvcompact --help` stays fast and a missing optional piece only breaks
its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help). Each module exposes `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.serve", "run the HTTP API (embedded Redis + in-process worker unless KVC_REDIS_URL is set)"),
    "worker": ("workers.worker", "run one GPU/CPU worker consuming jobs from Redis"),
    "compact": ("workers.commands.compact", "compact a document file and report sizes, timings and errors"),
    "ask": ("workers.commands.ask", "compact a document and answer a question from the compacted cache"),
    "calibrate": ("workers.commands.calibrate", "measure and cache a model's head-budget profile"),
    "eval": ("workers.eval.cli", "quality evaluation: accuracy / log-perplexity vs compaction ratio"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompact", description="KV-cache compaction service (Attention Matching)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        # Only import the chosen command's module: the others may pull heavy dependencies.
        module_name, help_text = SUBCOMMANDS[argv[0]]
        module = importlib.import_module(module_name)
        sub = argparse.ArgumentParser(prog=f"kvcompact {argv[0]}", description=help_text)
        module.add_arguments(sub)
        return int(module.run(sub.parse_args(argv[1:])) or 0)
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
