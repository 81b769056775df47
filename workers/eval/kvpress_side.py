"""Side-by-side run of NVIDIA kvpress presses, in a virtual environment of their own.

kvpress 0.5.5 pins transformers < 5.3 while this project pins 5.24, so the presses run in `.cache/kvpress-venv`
(created once; a marker file listing the requirements says it is complete) by `kvpress_script.py`, which imports
only the standard-library eval modules (datasets, prompts, scoring, resultcache) from this checkout: same documents,
same prompts, same scoring, same result records (methods named `kvpress-<press>`), same cache folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from workers.eval.resultcache import ResultStore
from workers.eval.runner import EvalPlan

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_DIR = REPO_ROOT / ".cache" / "kvpress-venv"
SCRIPT = Path(__file__).with_name("kvpress_script.py")
READY_MARKER = ".kvc-ready"
# torch comes from this machine's local wheel index; the transformers bound is kvpress's own pin.
REQUIREMENTS = ("kvpress==0.5.5", "transformers<5.3", "torch==2.13.0")
# eval method name -> kvpress press class. Full-cache answers in the side venv are recorded as `kvpress-full`.
PRESSES = {
    "kvpress-snapkv": "SnapKVPress",
    "kvpress-expected-attention": "ExpectedAttentionPress",
    "kvpress-kvzip": "KVzipPress",
    "kvpress-knorm": "KnormPress",
    "kvpress-streaming-llm": "StreamingLLMPress",
}
FULL_METHOD = "kvpress-full"


class KvpressError(RuntimeError):
    """The kvpress environment could not be built, or the model cannot be given to it."""


def venv_python(venv_dir: Path = VENV_DIR) -> Path:
    return venv_dir / "bin" / "python"


def ensure_venv(venv_dir: Path = VENV_DIR) -> Path:
    """The side venv's python, creating the venv and installing REQUIREMENTS unless a matching marker is there."""
    marker = venv_dir / READY_MARKER
    wanted = "\n".join(REQUIREMENTS)
    if marker.is_file() and marker.read_text() == wanted:
        return venv_python(venv_dir)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv_dir)], check=True)
    install = [str(venv_python(venv_dir)), "-m", "pip", "install", "--quiet", *REQUIREMENTS]
    if subprocess.run(install).returncode != 0:
        raise KvpressError(f"could not install {' '.join(REQUIREMENTS)} into {venv_dir}")
    marker.write_text(wanted)
    return venv_python(venv_dir)


def model_directory(source: str) -> Path:
    """The Hugging Face directory kvpress loads: the bundled model's converted dir, or a local HF dir."""
    from workers.models.loading import BUNDLED_SOURCES

    if source in BUNDLED_SOURCES:
        from workers.models.bundled import bundled_model_dir

        return bundled_model_dir(BUNDLED_SOURCES[source])
    if source.startswith("tiny-"):
        raise KvpressError("kvpress needs a model directory; tiny random models exist only in memory")
    path = Path(source)
    if not (path / "config.json").is_file():
        raise KvpressError(f"{source!r} is not a Hugging Face model directory")
    return path


def run_kvpress(plan: EvalPlan, source: str, store: ResultStore, dtype: str = "auto",
                device: str = "auto", python: Path | None = None) -> list[dict]:
    """Run every press at every ratio of the plan (records already in `store` are skipped); return their records.

    `python`: an interpreter that already imports kvpress (a machine without network cannot build the side venv);
    None builds or reuses `.cache/kvpress-venv`."""
    from workers.models.loading import DTYPES, resolve_device, resolve_dtype

    # The side script gets the dtype this harness would pick (auto is fp32 on CPUs without bf16 hardware).
    target = resolve_device(device)
    dtype = next(name for name, value in DTYPES.items() if value == resolve_dtype(dtype, target))
    python = python or ensure_venv()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    ratios = [str(r) for r in plan.keep_ratios]
    for dataset in plan.datasets:
        command = [str(python), str(SCRIPT), "--dataset", str(dataset), "--model-dir", str(model_directory(source)),
                   "--out", str(store.out_dir), "--label", store.label, "--keep-ratios", *ratios,
                   "--dtype", dtype, "--device", target.type, "--full-method", FULL_METHOD,
                   "--presses", *(f"{m}={c}" for m, c in PRESSES.items())]
        if plan.limit is not None:
            command += ["--limit", str(plan.limit)]
        command += ["--shard", "/".join(map(str, plan.shard))]
        if plan.max_questions is not None:
            command += ["--max-questions-per-doc", str(plan.max_questions)]
        if subprocess.run(command, env=env).returncode != 0:
            raise KvpressError(f"the kvpress run on {dataset} failed (see its output above)")
    return collect(plan, store)


def collect(plan: EvalPlan, store: ResultStore, require_all: bool = True) -> list[dict]:
    """The kvpress records of the plan's documents, read back from the store (`require_all`: a missing one is an
    error; otherwise it is skipped, for reports of partial runs)."""
    records = []
    for name, documents in plan.corpora():
        for document in documents:
            n_questions = len(document.questions[: plan.max_questions])
            units = [(FULL_METHOD, 1.0)] + [(m, r) for m in PRESSES for r in plan.keep_ratios]
            for method, ratio in units:
                record = store.load(name, document.id, method, ratio, n_questions)
                if record is None and not require_all:
                    continue
                if record is None:
                    raise KvpressError(f"kvpress left no result for {name}/{document.id} {method}@{ratio:g}")
                records.append(record)
    return records
