"""The core's command-line entry points and the optional query sources, on a tiny model."""

from __future__ import annotations

import json

import torch

from tests.core_helpers import DOCUMENT, tiny
from workers.cli import main
from workers.compaction.pipeline import CompactionConfig, compact_context


def test_compact_json_reports_sizes_timings_and_heldout_error(tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text(DOCUMENT)
    assert main(["compact", str(document), "--model", "tiny-llama", "--keep-ratio", "0.2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["input_tokens"] > report["compactable_tokens"] > 0
    assert 3 < report["compaction_ratio"] < 10
    assert report["retained_slots"] > 0 and 0 < report["heldout_rel_error"] < 1
    assert {"prefill", "queries", "key_selection", "beta_fit", "value_fit"} <= set(report["phase_seconds"])


def test_ask_answers_from_the_compacted_cache(tmp_path, capsys):
    document = tmp_path / "doc.txt"
    document.write_text(DOCUMENT)
    assert main(["ask", str(document), "Who built it?", "--model", "tiny-llama", "--method", "kvzip",
                 "--max-tokens", "4"]) == 0
    assert "method kvzip" in capsys.readouterr().out


def test_calibrated_profile_drives_profile_budgets(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KVC_DATA_DIR", str(tmp_path))
    text = tmp_path / "calibration.txt"
    text.write_text(DOCUMENT)
    assert main(["calibrate", "--text", str(text), "--model", "tiny-llama"]) == 0
    profiles = list((tmp_path / "profiles").glob("*.json"))
    assert len(profiles) == 1
    stored = json.loads(profiles[0].read_text())
    assert abs(sum(stored["proportions"]) - 1) < 1e-6 and len(stored["proportions"]) == 4
    result = compact_context(tiny("llama"), DOCUMENT, CompactionConfig(keep_ratio=0.2, budget="profile"))
    flat = [b for layer in result.budgets for b in layer]
    assert len(set(flat)) > 1  # the profile is not uniform, so neither are the budgets


def test_self_study_and_on_policy_queries_compact():
    lm = tiny("qwen3")
    study = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2, query_sources=("self-study",),
                                                           self_study_tokens=6))
    on_policy = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2, on_policy=True))
    off_policy = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2))
    assert study.heldout_rel_error < 1 and on_policy.heldout_rel_error < 1
    # Layer 0 sees the same queries either way; layer 1's are re-read through an already compacted layer 0.
    assert torch.equal(on_policy.compacted.layers[0].values, off_policy.compacted.layers[0].values)
    assert not torch.equal(on_policy.compacted.layers[1].values, off_policy.compacted.layers[1].values)
