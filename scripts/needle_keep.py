"""Experiment (session 10, docs/quality.md): does AM keep a RULER needle's value tokens whole in some KV head?

Per ratio and needle value: in how many (layer, KV head) pairs all of the value's tokens are kept, and the best
head's kept fraction. Kept indices are read by wrapping `pipeline.fit_block` (the compacted cache does not record
which original keys it kept).

usage: python scripts/needle_keep.py DATASET.jsonl DOC_ID RATIO,RATIO,... [SCORE_POOL]   (one JSON line per ratio)
"""
import json
import sys

import torch

from workers.compaction import pipeline
from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context
from workers.eval.datasets import load_dataset
from workers.models.loading import load_model

path, doc_id = sys.argv[1], sys.argv[2]
ratios = [float(r) for r in sys.argv[3].split(",")]
score_pool = int(sys.argv[4]) if len(sys.argv) > 4 else 0
lm = load_model("bundled")
document = {doc.id: doc for doc in load_dataset(path)}[doc_id]
prepared = prepare_context(lm, document.context, CompactionConfig())
ids = prepared.rendered.ids
pieces = [lm.tokenizer.decode([token]) for token in ids]
starts = [sum(len(piece) for piece in pieces[:i]) for i in range(len(pieces))]
text = "".join(pieces)


def value_tokens(value: str) -> list[int]:
    """Token indices whose text overlaps the first occurrence of `value` in the rendered context."""
    begin = text.find(value)
    return [i for i, start in enumerate(starts) if start < begin + len(value) and start + len(pieces[i]) > begin]


values = [value for question in document.questions for value in question.answers if value in text]
kept_blocks = []
fit_block = pipeline.fit_block


def recording_fit_block(method, block, budgets, timer):
    fit = fit_block(method, block, budgets, timer)
    kept_blocks.append([block.positions[fit.indices[h][fit.active[h]].cpu()] for h in range(fit.indices.shape[0])])
    return fit


pipeline.fit_block = recording_fit_block
for ratio in ratios:
    kept_blocks.clear()
    compact_prepared(lm, prepared, CompactionConfig(keep_ratio=ratio, score_pool=score_pool))
    kept = torch.zeros(len(kept_blocks), len(kept_blocks[0]), len(ids), dtype=torch.bool)  # one chunk per layer
    for layer, heads in enumerate(kept_blocks):
        for head, positions in enumerate(heads):
            kept[layer, head, positions] = True
    rows = []
    for value in values:
        fraction = kept[:, :, value_tokens(value)].float().mean(-1)
        rows.append({"value": value, "heads_whole": int((fraction == 1).sum()),
                     "best_head_fraction": round(float(fraction.max()), 2)})
    print(json.dumps({"score_pool": score_pool, "keep_ratio": ratio,
                      "values_whole_in_some_head": sum(row["heads_whole"] > 0 for row in rows), "values": rows}),
          flush=True)
