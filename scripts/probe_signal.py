"""Experiment (session 9, docs/quality.md): which beta_prior does a probe pick per document and ratio? Compare the
picks with the answer log-ppl each prior gets in the eval.

Two probes, both scored by `beta_prior_choices` (teacher-forced under each candidate's cache):
- self-study (what the compaction uses): the full cache's greedy answers to the self-study tasks;
- questions: the full cache writes questions about the document, then answers each briefly (the eval's answers are
  short); these pairs replace the probe answers, the fits are unchanged.

usage: python scripts/probe_signal.py DATASET.jsonl DOC_ID,DOC_ID,... RATIO,RATIO,... PRIOR,PRIOR,... [self-study|questions]
(one JSON line per document and ratio on stdout)
"""
import json
import re
import sys
import time

from workers.compaction.context import continuation_ids
from workers.compaction.forward import fork_cache
from workers.compaction.generation import decode
from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context
from workers.eval.datasets import load_dataset
from workers.models.loading import load_model

QUESTION_TASK = ("Write 8 short questions about specific details of the context (people, places, events, reasons), "
                 "one per line, without answers.")
ANSWER_SUFFIX = " Answer in a few words."
QUESTION_TOKENS, ANSWER_TOKENS, MAX_QUESTIONS = 200, 16, 8


def greedy_answer(lm, prepared, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, the full cache's greedy answer ids) for one user message after the context."""
    prompt_ids = continuation_ids(lm.tokenizer, prepared.rendered.roles, [{"role": "user", "content": prompt}])
    return prompt_ids, list(decode(lm, fork_cache(prepared.cache), prompt_ids, max_new_tokens))


def question_probes(lm, prepared) -> list[tuple[list[int], list[int]]]:
    """The model's own questions about the document (distinct ones) and its short answers, from the full cache."""
    _, listing = greedy_answer(lm, prepared, QUESTION_TASK, QUESTION_TOKENS)
    lines = lm.tokenizer.decode(listing, skip_special_tokens=True).splitlines()
    questions = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip() for line in lines]
    questions = [question for question in dict.fromkeys(questions) if question.endswith("?")][:MAX_QUESTIONS]
    probes = [greedy_answer(lm, prepared, question + ANSWER_SUFFIX, ANSWER_TOKENS) for question in questions]
    return [(prompt, answer) for prompt, answer in probes if answer]


path, doc_ids = sys.argv[1], sys.argv[2].split(",")
ratios = [float(r) for r in sys.argv[3].split(",")]
priors = tuple(float(p) for p in sys.argv[4].split(","))
probe_kind = sys.argv[5] if len(sys.argv) > 5 else "self-study"
if probe_kind not in ("self-study", "questions"):
    sys.exit(f"unknown probe {probe_kind!r}: self-study or questions")
lm = load_model("bundled")
documents = {doc.id: doc for doc in load_dataset(path)}
for doc_id in doc_ids:
    started = time.time()
    prepared = prepare_context(lm, documents[doc_id].context, CompactionConfig(beta_prior_choices=priors))
    if probe_kind == "questions":
        prepared.probes = question_probes(lm, prepared)  # else made on first use: the self-study probe
    prepare_seconds = time.time() - started
    for ratio in ratios:
        started = time.time()
        result = compact_prepared(lm, prepared, CompactionConfig(keep_ratio=ratio, beta_prior_choices=priors))
        print(json.dumps({"doc_id": doc_id, "keep_ratio": ratio, "tokens": len(prepared.rendered.ids),
                          "probe": probe_kind, "probe_logprobs": result.compacted.meta["probe_logprobs"],
                          "chosen": result.compacted.meta["params"]["beta_prior"],
                          "probes": [lm.tokenizer.decode(prompt[-40:] + answer) for prompt, answer in prepared.probes],
                          "prepare_seconds": round(prepare_seconds, 1),
                          "seconds": round(time.time() - started, 1)}), flush=True)
