"""The compaction core on the real bundled model and a real document from shared/data (CPU, a few minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workers.compaction.context import continuation_ids
from workers.compaction.generation import next_token_logprobs
from workers.compaction.pipeline import CompactionConfig, compact_context, full_context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "quality_leval.jsonl"

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def bundled():
    from workers.models.loading import load_model

    return load_model("bundled")


def shortest_quality_document() -> dict:
    """The shortest QuALITY story (~2.9k tokens, 17 multiple-choice questions)."""
    if not DATA.is_file():
        pytest.fail(f"evaluation data missing at {DATA}")
    with DATA.open() as lines:
        return min(map(json.loads, lines), key=lambda d: d["approx_tokens"])


def first_half(text: str) -> str:
    """The story up to the first line break past its middle (about half its ~2.9k tokens): the test compares the
    compacted cache with the full cache of the same text, so half a story serves, and CI's slowest test costs less
    CPU (the repeat pass and the 17 questions' forwards scale with the context)."""
    cut = text.find("\n", len(text) // 2)
    return text if cut < 0 else text[:cut]


def multiple_choice(question: dict) -> str:
    options = "\n".join(f"({letter}) {text.strip()}" for letter, text in zip("ABCD", question["options"]))
    return f"{question['question']}\n\n{options}\n\nAnswer with the letter of the correct option only."


def test_compacted_answers_match_full_cache_at_keep_ratio_0_1(bundled):
    document = shortest_quality_document()
    context = first_half(document["context"])
    full = full_context(bundled, context)
    result = compact_context(bundled, context, CompactionConfig(keep_ratio=0.1, max_queries_per_head=4096))
    assert 8 < result.compaction_ratio < 12
    agree, kl_values = 0, []
    for question in document["questions"]:
        prompt = continuation_ids(bundled.tokenizer, full.meta["roles"],
                                  [{"role": "user", "content": multiple_choice(question)}])
        # The greedy answer's first token is the option letter: one forward per cache decides the answer.
        full_lp = next_token_logprobs(bundled, full, prompt)
        compact_lp = next_token_logprobs(bundled, result.compacted, prompt)
        agree += int(full_lp.argmax()) == int(compact_lp.argmax())
        kl_values.append(float((full_lp.exp() * (full_lp - compact_lp)).sum()))
    print(f"\nkeep 0.1: {agree}/{len(document['questions'])} answers equal the full cache's; "
          f"next-token KL(full || compacted) mean {sum(kl_values) / len(kl_values):.4f}, per question {kl_values}")
    assert agree > len(document["questions"]) / 2
    assert all(kl >= -1e-4 for kl in kl_values)
