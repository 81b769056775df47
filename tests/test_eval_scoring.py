"""Scoring: option letters, RULER string match, Wilson intervals."""

import pytest

from workers.eval.datasets import Question
from workers.eval.scoring import is_correct, parse_choice, string_match_all, string_match_part, wilson_interval


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("(C)", 2), ("Answer: D", 3), ("The answer is (A).", 0), ("answer is b", None), ("  D.", 3),
    ("A", 0), ("I think (B) is right", 1), ("", None), ("none of them", None), ("E", None), ("(B) or C", 1),
])
def test_parse_choice(text, expected):
    assert parse_choice(text, 4) == expected


def test_explicit_answer_wins_over_an_earlier_letter():
    assert parse_choice("A tricky one. Answer: C", 4) == 2


def test_string_match_metrics_are_case_insensitive():
    golds = ["4773545", "Blue-Cat"]
    assert string_match_all("numbers: 4773545 and blue-cat", golds)
    assert not string_match_all("only 4773545", golds)
    assert string_match_part("only 4773545", golds)
    assert not string_match_part("nothing", golds)


def test_is_correct_uses_the_question_metric():
    mc = Question("q", options=("x", "y", "z", "w"), answer_index=2)
    assert is_correct(mc, "C") and not is_correct(mc, "B") and not is_correct(mc, "no idea")
    part = Question("q", answers=("a1", "a2"), metric="string_match_part")
    assert is_correct(part, "it is A2")
    every = Question("q", answers=("a1", "a2"), metric="string_match_all")
    assert not is_correct(every, "it is A2") and is_correct(every, "a2, a1")


def test_wilson_interval():
    low, high = wilson_interval(17, 24)
    assert low == pytest.approx(0.5083, abs=1e-4) and high == pytest.approx(0.8509, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] > 0.2
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(10, 10)[0] < 0.8
    # the interval holds k/n for every count (0/11 rounded to a positive lower bound before the clamp)
    for trials in range(1, 120):
        for successes in range(trials + 1):
            low, high = wilson_interval(successes, trials)
            assert low <= successes / trials <= high, (successes, trials)
    assert wilson_interval(0, 0) == (0.0, 1.0)
