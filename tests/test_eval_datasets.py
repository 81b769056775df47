"""The dataset reader: the shared data files parse, malformed lines raise errors that say where and why."""

import json
from pathlib import Path

import pytest

from workers.eval.datasets import DatasetError, dataset_name, load_dataset
from workers.eval.prompts import question_prompt

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# file -> (documents, questions), as listed in shared/data/README.md
EXPECTED = {"quality_leval.jsonl": (15, 202), "ruler_niah.jsonl": (90, 450),
            "lostinmiddle_kv_retrieval.jsonl": (50, 200)}


@pytest.mark.skipif(not DATA.is_dir(), reason="shared/data is not next to this checkout")
@pytest.mark.parametrize("file_name", sorted(EXPECTED))
def test_shared_datasets_parse(file_name):
    documents = load_dataset(DATA / file_name)
    n_docs, n_questions = EXPECTED[file_name]
    assert len(documents) == n_docs
    assert sum(len(d.questions) for d in documents) == n_questions
    for document in documents:
        for question in document.questions:
            prompt = question_prompt(document, question)
            assert question.question.strip() in prompt.text and prompt.max_new_tokens > 0


def test_quality_is_multiple_choice_and_niah_is_open():
    if not DATA.is_dir():
        pytest.skip("shared/data is not next to this checkout")
    quality = load_dataset(DATA / "quality_leval.jsonl", limit=1)[0].questions[0]
    assert quality.is_multiple_choice and len(quality.options) == 4 and quality.answer_index is not None
    niah = load_dataset(DATA / "ruler_niah.jsonl", limit=1)[0]
    assert niah.task == "niah_essay_numbers" and not niah.questions[0].is_multiple_choice
    assert "Answer with the special magic numbers only." in question_prompt(niah, niah.questions[0]).text


def _write(tmp_path, lines):
    path = tmp_path / "set.v1.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = {"id": "d1", "context": "text",
        "questions": [{"question": "q?", "answers": ["a"], "metric": "string_match_all"}]}


def test_limit_blank_lines_and_name(tmp_path):
    path = _write(tmp_path, [GOOD, "", {**GOOD, "id": "d2"}, {**GOOD, "id": "d3"}])
    assert [d.id for d in load_dataset(path, limit=2)] == ["d1", "d2"]
    assert dataset_name(path) == "set"


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({**GOOD, "id": ""}, "'id'"),
    ({**GOOD, "context": "  "}, "'context'"),
    ({**GOOD, "questions": []}, "'questions'"),
    ({**GOOD, "questions": [{"question": "q", "options": ["a", "b"], "answer_index": 2}]}, "answer_index"),
    ({**GOOD, "questions": [{"question": "q", "options": ["a", "b"], "answer_index": True}]}, "answer_index"),
    ({**GOOD, "questions": [{"question": "q", "answers": ["a"], "metric": "exact"}]}, "'metric'"),
    ({**GOOD, "questions": [{"question": "q", "answers": [], "metric": "string_match_all"}]}, "'answers'"),
    ({**GOOD, "questions": [{"question": "", "answers": ["a"], "metric": "string_match_all"}]}, "'question'"),
])
def test_malformed_line_raises_with_its_location(tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(path)
    assert f"{path}:2" in str(info.value)


def test_duplicate_ids_and_missing_or_empty_files(tmp_path):
    with pytest.raises(DatasetError, match="duplicate"):
        load_dataset(_write(tmp_path, [GOOD, GOOD]))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetError, match="no documents"):
        load_dataset(_write(tmp_path, [""]))


def test_niah_answer_budget_fits_every_gold_value():
    """A flat 24 tokens per value cut the bundled model's UUID answers short (~30 tokens each): the budget grows with
    the gold values' length, one token per character at worst."""
    if not DATA.is_dir():
        pytest.skip("shared/data is not next to this checkout")
    for document in load_dataset(DATA / "ruler_niah.jsonl", limit=2):
        for question in document.questions:
            longest = max(len(value) for value in question.answers)
            assert question_prompt(document, question).max_new_tokens >= len(question.answers) * longest
