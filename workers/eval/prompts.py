"""How a question is asked after a context, identically in-process, over HTTP and in the kvpress side run.

The document is the first user message on its own (that message is what gets compacted, so the compacted span never
holds the question); the question is a second user message. Answers are greedy and short: a letter for multiple
choice, the needle value(s) for RULER-style sets.
"""

from __future__ import annotations

from dataclasses import dataclass

from workers.eval.datasets import Document, Question

MC_MAX_NEW_TOKENS = 4
# Tokens a NIAH answer may take per gold value: at least 24, and the value's length in characters plus 12 (a
# tokenizer never needs more than one token per character of a UUID's hex; the bundled one needs ~30 for a
# 36-character UUID, so a flat 24 cut every UUID answer short).
NIAH_MIN_TOKENS_PER_VALUE = 24
NIAH_TOKENS_BEYOND_VALUE = 12
# A key-value answer often restates the key first ('The value corresponding to the key "<uuid>" ... is "<uuid>"'):
# two UUIDs of ~30 tokens each plus the words around them. 48 cut the bundled model's answers before the value.
KV_MAX_NEW_TOKENS = 96
QA_MAX_NEW_TOKENS = 32

SUMMARY_PROMPT = (
    "Summarize the document above. Keep every name, number, key, value and fact that a question about the document "
    "could ask for, exactly as written. Write only the summary."
)


@dataclass(frozen=True)
class QuestionPrompt:
    """The second user message and how many tokens the greedy answer may take."""

    text: str
    max_new_tokens: int


def context_message(document: Document) -> str:
    """The first user message: the document verbatim (what a service user would compact)."""
    return document.context


def _letters(n: int) -> str:
    return "".join(chr(ord("A") + i) for i in range(n))


def multiple_choice_prompt(question: Question) -> QuestionPrompt:
    letters = _letters(len(question.options))
    options = "\n".join(f"({letter}) {option.strip()}" for letter, option in zip(letters, question.options))
    text = f"{question.question.strip()}\n\n{options}\n\nAnswer with the letter only."
    return QuestionPrompt(text, MC_MAX_NEW_TOKENS)


def niah_prompt(document: Document, question: Question) -> QuestionPrompt:
    """RULER NIAH wording, with the preamble moved after the document so the compacted span is the text alone."""
    kind = "uuids" if document.task.endswith("uuids") else "numbers"
    text = (
        f"Some special magic {kind} are hidden within the text above. {question.question.strip()} "
        f"Answer with the special magic {kind} only."
    )
    budget = sum(max(NIAH_MIN_TOKENS_PER_VALUE, len(value) + NIAH_TOKENS_BEYOND_VALUE) for value in question.answers)
    return QuestionPrompt(text, max(NIAH_MIN_TOKENS_PER_VALUE, budget))


def kv_retrieval_prompt(question: Question) -> QuestionPrompt:
    """Lost-in-the-middle wording: the dataset's question already names the key; the value follows the colon."""
    return QuestionPrompt(f"{question.question.strip()}\nCorresponding value:", KV_MAX_NEW_TOKENS)


def open_qa_prompt(question: Question) -> QuestionPrompt:
    """RULER QA wording for any other open-ended set."""
    text = (
        "Answer the question based on the given documents. Only give me the answer and do not output any other words."
        f"\n\nQuestion: {question.question.strip()}\nAnswer:"
    )
    return QuestionPrompt(text, QA_MAX_NEW_TOKENS)


def question_prompt(document: Document, question: Question) -> QuestionPrompt:
    """The prompt for one question, chosen by question kind and the document's RULER task."""
    if question.is_multiple_choice:
        return multiple_choice_prompt(question)
    if document.task.startswith("niah"):
        return niah_prompt(document, question)
    if document.task.startswith("kv_retrieval"):
        return kv_retrieval_prompt(question)
    return open_qa_prompt(question)
