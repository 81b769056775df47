"""How often the beta / value solves fall off Cholesky on a degenerate block, and where they go then.

    python bench/solver_fallback.py                      # this checkout's solver
    PYTHONPATH=OLD_CHECKOUT python bench/solver_fallback.py   # another commit's solver, same measurement

Compacts the first part of a key-value retrieval document at keep 0.5 with fewer reference queries per head than a
head may keep keys, so grams are rank-deficient (the case that stalled the H200 eval: docs/quality.md), and counts
the solver's linear-algebra calls by wrapping them (each call still runs the real function): failed Cholesky
factorisations, CPU least-squares calls, eigendecompositions. Prints one line; run by path so that PYTHONPATH picks
the `workers` package measured.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

import workers
from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context
from workers.models.loading import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lostinmiddle_kv_retrieval.jsonl"


@contextmanager
def counted_linalg() -> Iterator[Counter]:
    """Count failed factorisations (heads), lstsq calls and eigendecomposed heads while the block runs."""
    counts: Counter = Counter()
    cholesky_ex, lstsq, eigh = torch.linalg.cholesky_ex, torch.linalg.lstsq, torch.linalg.eigh

    def counting_cholesky_ex(matrix, *args, **kwargs):
        result = cholesky_ex(matrix, *args, **kwargs)
        counts["failed factorisations"] += int((result.info != 0).sum())
        return result

    def counting_lstsq(*args, **kwargs):
        counts["lstsq calls"] += 1
        return lstsq(*args, **kwargs)

    def counting_eigh(matrix, *args, **kwargs):
        counts["eigendecomposed heads"] += matrix.shape[0]
        return eigh(matrix, *args, **kwargs)

    torch.linalg.cholesky_ex, torch.linalg.lstsq = counting_cholesky_ex, counting_lstsq
    torch.linalg.eigh = counting_eigh
    try:
        yield counts
    finally:
        torch.linalg.cholesky_ex, torch.linalg.lstsq, torch.linalg.eigh = cholesky_ex, lstsq, eigh


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=0.45, help="leading share of the document's characters")
    parser.add_argument("--queries-per-head", type=int, default=256)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    text = json.loads(DATA.read_text().splitlines()[0])["context"]
    lm = load_model("bundled")
    config = CompactionConfig(keep_ratio=args.keep_ratio, max_queries_per_head=args.queries_per_head,
                              chunk_tokens=args.chunk_tokens)
    prepared = prepare_context(lm, text[: int(len(text) * args.fraction)], config)
    with counted_linalg() as counts:
        start = time.perf_counter()
        result = compact_prepared(lm, prepared, config)
        seconds = time.perf_counter() - start
    print(f"workers from {Path(workers.__file__).parent}, {lm.dtype} on {lm.device}: span {prepared.span.numel()} "
          f"tokens, largest head budget {max(map(max, result.budgets))}, {dict(counts)}, "
          f"held-out output error {result.heldout_rel_error:.4f}, compaction {seconds:.1f} s")


if __name__ == "__main__":
    main()
