"""Experiment (session 8, docs/quality.md): does the fit's error on the document's own queries (held out from a
repeat-only fit) predict, per document, whether pulling beta towards 0 helps the answers?

usage: python scripts/beta_signal.py DATASET.jsonl LIMIT OUT.json RATIO,RATIO,...  (one JSON row per line on stdout)
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from workers.models.loading import load_model
from workers.eval.datasets import load_dataset
from workers.compaction.pipeline import CompactionConfig, prepare_context, compact_prepared
from workers.compaction.reference import ReferenceQueries

torch.set_num_threads(2)
path, limit, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ratios = [float(r) for r in sys.argv[4].split(",")]
priors = [0.0, 10.0]
lm = load_model("bundled")
base = CompactionConfig(method="am", keep_ratio=0.1)
rows = []
for doc in load_dataset(path, limit):
    t0 = time.time()
    prep_cfg = dataclasses.replace(base, query_sources=("repeat", "context"),
                                   max_queries_per_head=2 * base.max_queries_per_head)
    prepared = prepare_context(lm, doc.context, prep_cfg)
    refs = ReferenceQueries(fit=prepared.pass_queries.fit, heldout=prepared.context_queries.fit)
    on_context = dataclasses.replace(prepared, context_queries=ReferenceQueries(), pass_queries=refs)
    on_repeat = dataclasses.replace(prepared, context_queries=ReferenceQueries())
    for ratio in ratios:
        for prior in priors:
            cfg = dataclasses.replace(base, keep_ratio=ratio, beta_prior=prior)
            ctx = compact_prepared(lm, on_context, cfg)
            rep = compact_prepared(lm, on_repeat, cfg)
            row = dict(doc=doc.id, ratio=ratio, prior=prior, ctx_rel=ctx.heldout_rel_error,
                       ctx_logmass=ctx.heldout_log_mass_error, rep_rel=rep.heldout_rel_error,
                       rep_logmass=rep.heldout_log_mass_error)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"# {doc.id} {time.time() - t0:.0f}s", flush=True)
    Path(out).write_text(json.dumps(rows))
