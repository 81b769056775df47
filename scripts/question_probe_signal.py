"""Experiment (session 9, docs/quality.md): does a probe made of short answers pick the beta_prior that the questions
want better than the self-study probe does? The full cache writes questions about the document, then answers each
briefly; those (question, answer) pairs replace the probe answers of `beta_prior_choices`, whose fits and scoring are
otherwise unchanged. Compare the picks with the answer log-ppl each prior gets in the eval (docs/quality.md).

usage: python scripts/question_probe_signal.py DATASET.jsonl DOC_ID,DOC_ID,... RATIO,RATIO,... PRIOR,PRIOR,...
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


def greedy_text(lm, prepared, prompt: str, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, the full cache's greedy answer ids) for one user message after the context."""
    prompt_ids = continuation_ids(lm.tokenizer, prepared.rendered.roles, [{"role": "user", "content": prompt}])
    return prompt_ids, list(decode(lm, fork_cache(prepared.cache), prompt_ids, max_new_tokens))


def question_probes(lm, prepared) -> tuple[list[str], list[tuple[list[int], list[int]]]]:
    """The model's own questions about the document and its short answers to them, from the full cache."""
    _, listing = greedy_text(lm, prepared, QUESTION_TASK, QUESTION_TOKENS)
    lines = lm.tokenizer.decode(listing, skip_special_tokens=True).splitlines()
    questions = [re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip() for line in lines]
    questions = [question for question in dict.fromkeys(questions) if question.endswith("?")][:MAX_QUESTIONS]
    probes = [greedy_text(lm, prepared, question + ANSWER_SUFFIX, ANSWER_TOKENS) for question in questions]
    return questions, [(prompt, answer) for prompt, answer in probes if answer]


path, doc_ids = sys.argv[1], sys.argv[2].split(",")
ratios = [float(r) for r in sys.argv[3].split(",")]
priors = tuple(float(p) for p in sys.argv[4].split(","))
lm = load_model("bundled")
documents = {doc.id: doc for doc in load_dataset(path)}
for doc_id in doc_ids:
    started = time.time()
    prepared = prepare_context(lm, documents[doc_id].context, CompactionConfig(beta_prior_choices=priors))
    questions, prepared.probes = question_probes(lm, prepared)
    prepare_seconds = time.time() - started
    for ratio in ratios:
        started = time.time()
        result = compact_prepared(lm, prepared, CompactionConfig(keep_ratio=ratio, beta_prior_choices=priors))
        print(json.dumps({"doc_id": doc_id, "keep_ratio": ratio, "tokens": len(prepared.rendered.ids),
                          "question_probe_logprobs": result.compacted.meta["probe_logprobs"],
                          "chosen": result.compacted.meta["params"]["beta_prior"],
                          "questions": questions,
                          "answers": [lm.tokenizer.decode(answer) for _, answer in prepared.probes],
                          "prepare_seconds": round(prepare_seconds, 1),
                          "seconds": round(time.time() - started, 1)}), flush=True)
