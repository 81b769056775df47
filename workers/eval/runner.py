"""The eval loop: per document, the full cache and its reference answers once, then every method x keep ratio.

Each (dataset, document, method, ratio) result is a record in the ResultStore; records already there are reused, so
a stopped run resumes where it stopped and a larger run reuses a smaller one. The full cache's greedy answers are the
references: log_ppl is minus their mean log-prob under a method's cache, kl the next-token KL(full || method) at the
first answer position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tqdm import tqdm

from workers.eval.backends import Answer, Backend, BuiltContext, kl_divergence
from workers.eval.datasets import Document, Question, dataset_name, load_dataset
from workers.eval.methods import FULL, MethodSpec, SummaryMemo, build_context
from workers.eval.prompts import QuestionPrompt, context_message, question_prompt
from workers.eval.resultcache import ResultStore
from workers.eval.scoring import is_correct

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EvalPlan:
    """What to run: datasets x first `limit` documents x first `max_questions` questions x methods x keep ratios."""

    datasets: tuple[Path, ...]
    methods: tuple[MethodSpec, ...]
    keep_ratios: tuple[float, ...]
    limit: int | None = None
    max_questions: int | None = None
    shard: tuple[int, int] = (0, 1)  # (index, count): this process takes documents index, index + count, ...

    def units(self) -> list[tuple[MethodSpec, float]]:
        """(method, keep ratio) pairs run on every document; ratio-free methods appear once."""
        return [(spec, ratio) for spec in self.methods for ratio in spec.keep_ratios(list(self.keep_ratios))]

    def corpora(self) -> list[tuple[str, list[Document]]]:
        """(dataset name, this shard's documents) per dataset."""
        index, count = self.shard
        return [(dataset_name(path), load_dataset(path, self.limit)[index::count]) for path in self.datasets]


@dataclass
class _Reference:
    """What the full cache says for one question: its greedy answer and next-token log-probs."""

    prompt: QuestionPrompt
    answer: Answer
    next_token: torch.Tensor | None


class _DocumentEval:
    """Evaluates one document; builds the full cache and the references only if some unit is not cached."""

    def __init__(self, backend: Backend, document: Document, questions: tuple[Question, ...]) -> None:
        self.backend, self.document, self.questions = backend, document, questions
        self.summaries = SummaryMemo()
        self._full: BuiltContext | None = None
        self._references: list[_Reference] | None = None

    @property
    def full(self) -> BuiltContext:
        if self._full is None:
            self._full = self.backend.full(context_message(self.document))
        return self._full

    @property
    def references(self) -> list[_Reference]:
        if self._references is None:
            prompts = [question_prompt(self.document, question) for question in self.questions]
            answers = self._answers(self.full, prompts)
            self._references = [_Reference(prompt, answer, self.backend.next_token_logprobs(self.full, prompt.text))
                                for prompt, answer in zip(prompts, answers)]
        return self._references

    def _answers(self, context: BuiltContext, prompts: list[QuestionPrompt]) -> list[Answer]:
        return self.backend.generate_all(context, [(prompt.text, prompt.max_new_tokens) for prompt in prompts])

    def evaluate(self, spec: MethodSpec, keep_ratio: float) -> dict:
        """One record: build the method's cache, ask every question, score against gold and the full cache."""
        text = context_message(self.document)
        references = self.references
        bound = spec.with_questions(tuple(reference.prompt.text for reference in references))
        context = build_context(self.backend, bound, text, keep_ratio, self.full, self.summaries)
        if spec.kind == FULL:
            answers = [reference.answer for reference in references]
            next_tokens = [reference.next_token for reference in references]
        else:
            answers = self._answers(context, [reference.prompt for reference in references])
            next_tokens = [self.backend.next_token_logprobs(context, reference.prompt.text) for reference in references]
        rows = []
        for index, (question, reference, answer, next_token) in enumerate(
                zip(self.questions, references, answers, next_tokens)):
            prompt = reference.prompt
            logprob = self.backend.answer_logprob(context, prompt.text, reference.answer)
            kl = None if next_token is None else kl_divergence(reference.next_token, next_token)
            rows.append({"index": index, "prediction": answer.text, "reference": reference.answer.text,
                         "correct": is_correct(question, answer.text),
                         "log_ppl": None if logprob is None else -logprob, "kl": kl})
        return {"doc_id": self.document.id, "method": spec.name, "keep_ratio": keep_ratio, "dtype": self.backend.dtype,
                "input_tokens": self.full.input_tokens,  # the document's, whatever the method compacted
                "retained_slots": context.retained_slots, "padded_slots": context.padded_slots,
                "bytes": context.bytes,
                "compaction_seconds": context.seconds, "phase_seconds": context.phase_seconds,
                "probe_logprobs": context.probe_logprobs, "questions": rows}


def _plan_units(plan: EvalPlan) -> Iterator[tuple[str, Document, tuple[Question, ...], MethodSpec, float]]:
    """Every (dataset name, document, its questions, method, ratio) unit of the plan, documents in order."""
    for name, documents in plan.corpora():
        for document in documents:
            questions = document.questions[: plan.max_questions]
            for spec, ratio in plan.units():
                yield name, document, questions, spec, ratio


def run_eval(backend: Backend, plan: EvalPlan, store: ResultStore) -> list[dict]:
    """Run (or reuse) every unit of the plan; returns all records, cached ones included."""
    units = list(_plan_units(plan))
    records: list[dict] = []
    doc_eval: _DocumentEval | None = None
    with tqdm(total=len(units), desc="eval", unit="run") as bar:
        for name, document, questions, spec, ratio in units:
            bar.set_postfix_str(f"{name}/{document.id} {spec.name}@{ratio:g}")
            record = store.load(name, document.id, spec.name, ratio, len(questions))
            if record is None:
                if doc_eval is None or doc_eval.document is not document:
                    doc_eval = _DocumentEval(backend, document, questions)
                record = store.save({"dataset": name, **doc_eval.evaluate(spec, ratio)})
            records.append(record)
            bar.update(1)
    return records


def cached_records(plan: EvalPlan, store: ResultStore) -> tuple[list[dict], int]:
    """The plan's records already in the store, and how many units are missing: a report without the model, e.g.
    after several `--shard` processes filled one cache."""
    records, missing = [], 0
    for name, document, questions, spec, ratio in _plan_units(plan):
        record = store.load(name, document.id, spec.name, ratio, len(questions))
        if record is None:
            missing += 1
        else:
            records.append(record)
    return records, missing
