"""`kvcompact eval`: accuracy / log-perplexity vs keep ratio for every method, in-process or through the HTTP API."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from workers.eval.datasets import parse_shard
from workers.eval.methods import MethodError, parse_method, validate_methods

DEFAULT_KEEP_RATIOS = (0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_METHODS = ("full", "none", "truncate", "h2o", "snapkv", "kvzip", "am", "am-omp-fast", "summary", "summary+am")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, nargs="+", type=Path, help="JSONL file(s) in shared/data format")
    parser.add_argument("--out", required=True, type=Path, help="output folder (results, plots, cache/ for resuming)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each dataset")
    parser.add_argument("--max-questions-per-doc", type=int, default=None, help="first K questions of each document")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help="method names, e.g. am 'am[budget=uniform]' summary+am (default: %(default)s)")
    parser.add_argument("--keep-ratios", nargs="+", type=float, default=list(DEFAULT_KEEP_RATIOS),
                        help="fractions of the KV cache kept (default: %(default)s)")
    parser.add_argument("--model", default=None,
                        help="model source: bundled | tiny-<family> | HF dir (in-process, default bundled); "
                             "the served model id with --endpoint (default: the first one listed)")
    parser.add_argument("--device", default="auto", help="in-process device (auto | cpu | cuda)")
    parser.add_argument("--dtype", default="auto", help="in-process dtype (auto | bfloat16 | float16 | float32)")
    parser.add_argument("--endpoint", default=None, help="run through the HTTP API at this URL instead of in-process")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"), help="API key for --endpoint")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="run only documents I, I+N, I+2N... (0-based), so N processes can share one OUT")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from OUT's cached results alone (no model, nothing computed)")
    parser.add_argument("--with-kvpress", action="store_true",
                        help="also run NVIDIA kvpress presses in their own virtual environment (in-process mode only)")
    parser.add_argument("--kvpress-python", type=Path, default=None,
                        help="with --with-kvpress: an interpreter that already has kvpress 0.5.5 (and transformers < 5.3) "
                             "instead of the venv the harness builds (for machines without a package index)")


def _validate(args: argparse.Namespace) -> str | None:
    """An error message for arguments that cannot work, before any model is loaded."""
    if any(not 0 < r <= 1 for r in args.keep_ratios):
        return "keep ratios must be in (0, 1]"
    if any(n is not None and n < 1 for n in (args.limit, args.max_questions_per_doc)):
        return "--limit and --max-questions-per-doc must be at least 1"
    if args.with_kvpress and args.endpoint:
        return "--with-kvpress runs in-process only (kvpress loads the model itself)"
    if args.kvpress_python and not args.with_kvpress:
        return "--kvpress-python only applies with --with-kvpress"
    if args.kvpress_python and not args.kvpress_python.is_file():
        return f"--kvpress-python {args.kvpress_python} is not a file"
    if args.report_only and args.endpoint and not args.model:
        return "--report-only with --endpoint needs --model: the served model names the cached results"
    if parse_shard(args.shard) is None:
        return f"--shard must be I/N with 0 <= I < N, got {args.shard!r}"
    return None


def store_label(model: str, over_http: bool) -> str:
    """The ResultStore label a run's records are filed under: the in-process model source, or `http-<served id>`."""
    return f"http-{model}" if over_http else model


def run(args: argparse.Namespace) -> int:
    # Imported here, not at the top: `kvcompact --help` imports every sub-command module and must stay fast.
    from workers.compaction.pipeline import CompactionConfig
    from workers.eval.backends import InProcessBackend
    from workers.eval.report import aggregate, write_report
    from workers.eval.resultcache import ResultStore
    from workers.eval.runner import EvalPlan, run_eval

    error = _validate(args)
    try:
        methods = tuple(parse_method(name) for name in args.methods)
        validate_methods(methods, CompactionConfig)
    except MethodError as exc:
        error = str(exc)
    if error:
        print(f"kvcompact eval: {error}", file=sys.stderr)
        return 2
    plan = EvalPlan(datasets=tuple(args.dataset), methods=methods, keep_ratios=tuple(args.keep_ratios),
                    limit=args.limit, max_questions=args.max_questions_per_doc, shard=parse_shard(args.shard))
    if args.report_only:
        from workers.eval.runner import cached_records

        store = ResultStore(args.out, store_label(args.model or "bundled", bool(args.endpoint)))
        records, missing = cached_records(plan, store)
        if args.with_kvpress:
            from workers.eval.kvpress_side import collect

            records += collect(plan, store, require_all=False)
        if missing:
            print(f"kvcompact eval: {missing} (document, method, ratio) results are not in {args.out} yet; "
                  "the report leaves them out", file=sys.stderr)
        print("\n".join(str(path) for path in write_report(aggregate(records), args.out)))
        return 0
    if args.endpoint:
        from workers.eval.endpoint import EndpointError, HttpBackend

        backend = HttpBackend(args.endpoint, args.model, args.api_key)
        try:
            for spec in methods:
                backend.check(spec)
        except EndpointError as exc:
            print(f"kvcompact eval: {exc}", file=sys.stderr)
            return 2
        label = store_label(backend.model, over_http=True)
    else:
        from workers.models.loading import load_model

        source = args.model or "bundled"
        backend = InProcessBackend(load_model(source, dtype=args.dtype, device=args.device))
        label = store_label(source, over_http=False)
    store = ResultStore(args.out, label)
    records = run_eval(backend, plan, store)
    if args.with_kvpress:
        from workers.eval.kvpress_side import run_kvpress

        records += run_kvpress(plan, args.model or "bundled", store, dtype=args.dtype, device=args.device,
                               python=args.kvpress_python)
    written = write_report(aggregate(records), args.out)
    print("\n".join(str(path) for path in written))
    return 0
