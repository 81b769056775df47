"""Scoring of model answers: option letters for multiple choice, RULER string match for open answers, Wilson CIs."""

from __future__ import annotations

import math
import re

from workers.eval.datasets import Question

# An explicit "Answer: C" / "answer is C" wins, then "(B)", then the first standalone capital letter.
_EXPLICIT = re.compile(r"(?i:answer)\s*(?:is)?\s*[:\-]?\s*\(?([A-Z])\b")
_PARENTHESISED = re.compile(r"\(([A-Z])\)")
_STANDALONE = re.compile(r"\b([A-Z])\b")


def parse_choice(text: str, n_options: int) -> int | None:
    """0-based option index named by the answer text, or None when no valid letter is found (scored as wrong)."""
    for pattern in (_EXPLICIT, _PARENTHESISED, _STANDALONE):
        for match in pattern.finditer(text):
            index = ord(match.group(1)) - ord("A")
            if 0 <= index < n_options:
                return index
    return None


def string_match_all(prediction: str, golds: tuple[str, ...] | list[str]) -> bool:
    """RULER's NIAH metric: every gold string appears in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return all(gold.lower() in lowered for gold in golds)


def string_match_part(prediction: str, golds: tuple[str, ...] | list[str]) -> bool:
    """RULER's QA metric: at least one gold string appears in the prediction (case-insensitive)."""
    lowered = prediction.lower()
    return any(gold.lower() in lowered for gold in golds)


def is_correct(question: Question, prediction: str) -> bool:
    """Score one answer with the question's own metric."""
    if question.is_multiple_choice:
        return parse_choice(prediction, len(question.options)) == question.answer_index
    if question.metric == "string_match_all":
        return string_match_all(prediction, question.answers)
    return string_match_part(prediction, question.answers)


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion: sane at 0/n and n/n, where the normal interval collapses. The
    bounds are clamped to contain k/n: at 0/n and n/n rounding can put them a few ulps on the wrong side (0/11 gave a
    positive lower bound), which error bars reject as a negative length."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
