"""Aggregation, results.json / results.md / PNG writing, and the resumable result store."""

import json

import pytest

from workers.eval.combine import combined_rows, main
from workers.eval.report import PLOTS, RESULTS_JSON, RESULTS_MD, aggregate, ratio_matrix, write_report
from workers.eval.resultcache import ResultStore


def _record(method, ratio, doc, correct, log_ppl, seconds=1.0, slots=100):
    questions = [{"index": i, "prediction": "x", "reference": "x", "correct": c, "log_ppl": log_ppl, "kl": 0.5}
                 for i, c in enumerate(correct)]
    return {"dataset": "set", "doc_id": doc, "method": method, "keep_ratio": ratio, "model": "m", "input_tokens": 1000,
            "retained_slots": slots, "bytes": slots * 8, "compaction_seconds": seconds,
            "phase_seconds": {"prefill": seconds / 2}, "questions": questions}


RECORDS = [
    _record("full", 1.0, "d1", [True, True], 0.1), _record("full", 1.0, "d2", [True, False], 0.3),
    _record("none", 0.0, "d1", [False, False], 3.0), _record("none", 0.0, "d2", [False, False], None),
    _record("am", 0.1, "d1", [True, False], 1.0, seconds=2.0), _record("am", 0.1, "d2", [True, True], 2.0, seconds=4.0),
    _record("am", 0.02, "d1", [False, False], 2.5), _record("am", 0.02, "d2", [True, False], 3.5),
]


def test_aggregate_rows():
    rows = aggregate(RECORDS)
    assert [(r["method"], r["keep_ratio"]) for r in rows] == [("full", 1.0), ("none", 0.0), ("am", 0.02), ("am", 0.1)]
    am = rows[3]
    assert am["n_questions"] == 4 and am["n_correct"] == 3 and am["accuracy"] == 0.75 and am["n_docs"] == 2
    assert am["ci_low"] < 0.75 < am["ci_high"]
    assert am["log_ppl"] == pytest.approx(1.5) and am["kl"] == pytest.approx(0.5)
    assert am["compaction_seconds"] == pytest.approx(3.0) and am["phase_seconds"] == {"prefill": pytest.approx(1.5)}
    assert am["retained_slots"] == 100 and am["bytes"] == 800
    assert rows[1]["log_ppl"] == pytest.approx(3.0)  # a null log_ppl (HTTP) is left out, not counted as zero


def test_write_report(tmp_path):
    written = write_report(aggregate(RECORDS), tmp_path)
    rows = json.loads((tmp_path / RESULTS_JSON).read_text())
    required = {"dataset", "method", "keep_ratio", "n_questions", "accuracy", "ci_low", "ci_high", "log_ppl", "kl",
                "compaction_seconds", "retained_slots", "bytes"}
    assert all(required <= set(row) for row in rows)
    table = (tmp_path / RESULTS_MD).read_text()
    assert "### set" in table and "| am | 0.1 | 4 | 0.750 [" in table
    for name in PLOTS:
        png = tmp_path / f"{name}_set.png"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratio_matrix_puts_every_method_of_one_budget_in_one_column():
    matrix = ratio_matrix(aggregate(RECORDS)).splitlines()
    assert matrix[2] == "| method | keep 0.1 | keep 0.02 |"
    assert "| full | 3/4, 0.200 | 3/4, 0.200 |" in matrix  # ratio-free rows repeat across the columns
    assert "| none | 0/4, 3.000 | 0/4, 3.000 |" in matrix
    assert "| am | 3/4, 1.500 | 1/4, 3.000 |" in matrix


def test_result_store_round_trip_and_question_count(tmp_path):
    store = ResultStore(tmp_path, "/models/My Model")
    record = RECORDS[4]
    assert store.save(record) == {**record, "model": "/models/My Model"}
    path = store.path("set", "d1", "am", 0.1)
    assert path.is_file() and str(path).startswith(str(tmp_path / "cache"))
    assert store.load("set", "d1", "am", 0.1, 2)["questions"] == record["questions"]
    assert store.load("set", "d1", "am", 0.1, 1)["questions"] == record["questions"][:1]
    assert store.load("set", "d1", "am", 0.1, 3) is None  # asked for more questions than cached
    assert store.load("set", "d1", "am", 0.2, 1) is None
    store.save({**record, "method": "am[budget=uniform,query_sources=a+b]", "doc_id": "x/y"})
    odd = store.path("set", "x/y", "am[budget=uniform,query_sources=a+b]", 0.1)
    assert odd.is_file() and odd.parent.parent == store.root / "set"
    assert store.load("set", "x/y", "am[budget=uniform,query_sources=a+b]", 0.1, 2) is not None


def test_plots_accept_old_rows_whose_interval_misses_the_accuracy_by_rounding(tmp_path):
    """results.json files written before wilson_interval's clamp hold bounds like 0/11's 1e-17 (combine reads them)."""
    rows = aggregate(RECORDS)
    rows[2] = dict(rows[2], n_correct=0, accuracy=0.0, ci_low=1e-17)
    written = write_report(rows, tmp_path)
    assert (tmp_path / "accuracy_vs_ratio_set.png") in written


def test_combine_takes_selected_rows_from_each_run_and_relabels_them(tmp_path):
    new = [_record("full", 1.0, "d1", [True, True], 0.1), _record("am", 0.1, "d1", [True, True], 0.5)]
    old = [_record("none", 0.0, "d1", [False, False], 3.0), _record("am", 0.1, "d1", [False, True], 1.5),
           _record("h2o", 0.1, "d1", [False, False], 2.0)]
    (tmp_path / "new.json").write_text(json.dumps(aggregate(new)))
    (tmp_path / "old.json").write_text(json.dumps(aggregate(old)))
    main([str(tmp_path / "out"), str(tmp_path / "new.json"), f"{tmp_path / 'old.json'}:none,am=am[cap]"])
    rows = json.loads((tmp_path / "out" / RESULTS_JSON).read_text())
    assert [(r["method"], r["n_correct"]) for r in rows] == [("full", 2), ("am", 2), ("none", 0), ("am[cap]", 1)]
    assert "| am[cap] | 1/2, 1.500 |" in (tmp_path / "out" / RESULTS_MD).read_text()
    with pytest.raises(ValueError, match="already taken"):  # the same (dataset, method, ratio) from two runs
        combined_rows([str(tmp_path / "new.json"), f"{tmp_path / 'old.json'}:am"])
    # Names with overrides select and relabel whole: commas and '=' inside brackets belong to the name.
    labelled = tmp_path / "out" / RESULTS_JSON
    rows = combined_rows([f"{labelled}:am[cap]=am[a=1,b=2],none"])
    assert [r["method"] for r in rows] == ["none", "am[a=1,b=2]"]
