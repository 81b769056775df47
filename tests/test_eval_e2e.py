"""A tiny end-to-end `kvcompact eval` run on a random tiny model: rows, table, plots, and resuming from the cache."""

import json

import pytest

from workers.cli import main
from workers.eval.backends import InProcessBackend
from workers.eval.report import PLOTS

DOCUMENT = {
    "id": "doc-1",
    "task": "niah_essay_numbers",
    "context": " ".join(f"Sentence {i} is about nothing much." for i in range(12))
    + " One of the special magic numbers for quiet-river is: 1234567.",
    "questions": [
        {"question": "What is the special magic number for quiet-river mentioned in the provided text?",
         "answers": ["1234567"], "metric": "string_match_all", "options": [], "answer_index": None},
        {"question": "Which sentence is first?", "options": ["Sentence 0", "Sentence 9", "None", "All"],
         "answer_index": 0},
    ],
}
METHODS = ["full", "none", "truncate", "am", "summary+am", "am[hints=@questions]"]


def _eval(dataset, out):
    return main(["eval", "--dataset", str(dataset), "--model", "tiny-llama", "--methods", *METHODS,
                 "--keep-ratios", "0.1", "--out", str(out)])


def test_tiny_end_to_end_and_resume(tmp_path, monkeypatch):
    dataset = tmp_path / "tiny.jsonl"
    dataset.write_text(json.dumps(DOCUMENT) + "\n")
    out = tmp_path / "out"
    assert _eval(dataset, out) == 0

    rows = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [("full", 1.0), ("none", 0.0), ("truncate", 0.1),
                                                            ("am", 0.1), ("summary+am", 0.1),
                                                            ("am[hints=@questions]", 0.1)]
    for row in rows:
        assert row["dataset"] == "tiny" and row["n_questions"] == 2 and 0.0 <= row["accuracy"] <= 1.0
        assert row["ci_low"] <= row["accuracy"] <= row["ci_high"]
        assert row["kl"] is not None and row["kl"] >= -1e-4
        assert row["dtype"] == "float32"  # recorded as resolved: tiny models run in float32 whatever --dtype says
    by_method = {r["method"]: r for r in rows}
    assert by_method["full"]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert by_method["am"]["retained_slots"] < by_method["full"]["retained_slots"]
    assert by_method["am"]["bytes"] < by_method["full"]["bytes"]
    # In memory every head of a layer is as long as the layer's longest: never fewer slots than the real ones.
    assert by_method["full"]["padded_slots"] == by_method["full"]["retained_slots"]
    assert by_method["am"]["retained_slots"] <= by_method["am"]["padded_slots"] <= by_method["full"]["padded_slots"]
    assert by_method["am"]["compaction_seconds"] > 0
    assert by_method["summary+am"]["phase_seconds"]["summarize"] > 0
    assert by_method["summary+am"]["retained_slots"] <= by_method["am"]["retained_slots"]
    # The document's two questions were answered as hints before that compaction, and only before that one.
    hinted = by_method["am[hints=@questions]"]
    assert hinted["phase_seconds"]["hints"] > 0 and "hints" not in by_method["am"]["phase_seconds"]
    table = (out / "results.md").read_text()
    assert all(f"| {method} |" in table for method in METHODS)
    assert all((out / f"{name}_tiny.png").stat().st_size > 0 for name in PLOTS)

    cached = sorted((out / "cache").rglob("*.json"))
    assert len(cached) == len(METHODS)
    stamps = [p.stat().st_mtime_ns for p in cached]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    monkeypatch.setattr(InProcessBackend, "full", refuse)
    monkeypatch.setattr(InProcessBackend, "compact", refuse)
    monkeypatch.setattr(InProcessBackend, "generate", refuse)
    (out / "results.json").unlink()
    assert _eval(dataset, out) == 0
    assert json.loads((out / "results.json").read_text()) == rows
    assert [p.stat().st_mtime_ns for p in cached] == stamps


def test_shards_fill_one_cache_and_report_only_reads_it(tmp_path, monkeypatch):
    """Two `--shard` runs split the documents between them; `--report-only` then builds the report from their cache
    without a model, and says what is missing when a shard has not run."""
    dataset = tmp_path / "two.jsonl"
    dataset.write_text("".join(json.dumps({**DOCUMENT, "id": f"doc-{i}"}) + "\n" for i in range(2)))
    out = tmp_path / "out"
    common = ["eval", "--dataset", str(dataset), "--model", "tiny-llama", "--methods", "full", "truncate",
              "--keep-ratios", "0.1", "--out", str(out)]
    assert main(common + ["--shard", "1/2"]) == 0
    done = sorted(p.parent.name for p in (out / "cache").rglob("*.json"))
    assert done == ["doc-1", "doc-1"]

    def refuse(*args, **kwargs):
        raise AssertionError("--report-only loaded a model")

    monkeypatch.setattr("workers.models.loading.load_model", refuse)
    assert main(common + ["--report-only"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"]: r["n_questions"] for r in rows} == {"full": 2, "truncate": 2}  # doc-1 only so far

    monkeypatch.undo()
    assert main(common + ["--shard", "0/2"]) == 0
    assert main(common + ["--report-only"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"]: r["n_questions"] for r in rows} == {"full": 4, "truncate": 4}
    assert main(common + ["--shard", "2/2"]) == 2


def test_kvpress_python_is_checked_before_any_model_loads(tmp_path, capsys):
    """`--kvpress-python` (an interpreter that already has kvpress) needs `--with-kvpress` and an existing file."""
    dataset = tmp_path / "one.jsonl"
    dataset.write_text(json.dumps(DOCUMENT) + "\n")
    common = ["eval", "--dataset", str(dataset), "--methods", "full", "--out", str(tmp_path / "out")]
    assert main(common + ["--kvpress-python", str(dataset)]) == 2
    assert "only applies with --with-kvpress" in capsys.readouterr().err
    assert main(common + ["--with-kvpress", "--kvpress-python", str(tmp_path / "missing")]) == 2
    assert "is not a file" in capsys.readouterr().err
