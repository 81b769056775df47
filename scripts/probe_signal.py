"""Experiment (session 9, docs/quality.md): which beta_prior does the probe score (the full cache's greedy answers to
the self-study tasks, teacher-forced under each candidate's cache) pick per document and ratio? Compare the picks
with the answer log-ppl each prior gets in the eval.

usage: python scripts/probe_signal.py DATASET.jsonl DOC_ID,DOC_ID,... RATIO,RATIO,... PRIOR,PRIOR,...
(one JSON line per document and ratio on stdout)
"""
import json
import sys
import time

from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context
from workers.eval.datasets import load_dataset
from workers.models.loading import load_model

path, doc_ids = sys.argv[1], sys.argv[2].split(",")
ratios = [float(r) for r in sys.argv[3].split(",")]
priors = tuple(float(p) for p in sys.argv[4].split(","))
lm = load_model("bundled")
documents = {doc.id: doc for doc in load_dataset(path)}
for doc_id in doc_ids:
    started = time.time()
    prepared = prepare_context(lm, documents[doc_id].context, CompactionConfig(beta_prior_choices=priors))
    prepare_seconds = time.time() - started
    for ratio in ratios:
        started = time.time()
        result = compact_prepared(lm, prepared, CompactionConfig(keep_ratio=ratio, beta_prior_choices=priors))
        print(json.dumps({"doc_id": doc_id, "keep_ratio": ratio, "tokens": len(prepared.rendered.ids),
                          "probe_logprobs": result.compacted.meta["probe_logprobs"],
                          "chosen": result.compacted.meta["params"]["beta_prior"],
                          "probe_answer_tokens": [len(answer) for _, answer in prepared.probes],
                          "prepare_seconds": round(prepare_seconds, 1),
                          "seconds": round(time.time() - started, 1)}), flush=True)
