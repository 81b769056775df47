"""bench/speed.py's CPU smoke run: the GPU benchmark's code path on a tiny model, so it cannot rot between GPU runs."""

import json

from bench.speed import main


def test_speed_bench_runs_on_a_tiny_model_and_writes_its_table(tmp_path, capsys):
    assert main(["--shape", "tiny-llama", "--context-tokens", "384", "--answer-tokens", "4", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "speed_tiny-llama_384.json").read_text())
    results = record["results"]
    for sources in ("context", "repeat"):  # the document's own queries and the default sources, side by side
        assert results[f"compact[{sources}]_s"] >= results[f"compact[{sources}].prefill_s"] > 0
    assert results["compact[repeat].queries_s"] > 0  # the repeat pass ran
    assert 3 < results["compaction_ratio"] < 20  # keep 0.1 of a 384-token document plus the template tokens
    assert results["ttft_speedup"] > 0 and results["heldout_rel_error"] < 1.5
    assert "written to" in capsys.readouterr().out
