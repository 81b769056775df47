"""`kvcompact ask FILE QUESTION`: compact a document, then answer a question from the compacted cache alone."""

from __future__ import annotations

import argparse

from workers.commands.common import add_compaction_arguments, add_model_arguments, config_from_args, read_document


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="document (text), or a .json list of chat messages")
    parser.add_argument("question")
    add_model_arguments(parser)
    add_compaction_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    from workers.compaction.context import continuation_ids
    from workers.compaction.generation import stream_generate
    from workers.compaction.pipeline import compact_context
    from workers.models.loading import load_model

    lm = load_model(args.model, args.dtype, args.device)
    result = compact_context(lm, read_document(args.file), config_from_args(args))
    ids = continuation_ids(lm.tokenizer, result.compacted.meta["roles"], [{"role": "user", "content": args.question}])
    for token in stream_generate(lm, result.compacted, ids, args.max_tokens):
        print(lm.tokenizer.decode([token]), end="", flush=True)
    print()
    print(f"[{result.input_tokens} tokens -> {result.retained_slots} slots, {result.compaction_ratio:.1f}x, "
          f"method {args.method}]")
    return 0
