"""Pydantic models of the stored blob header (the msgpack part of a blob in Redis).

The header is what lets a worker refuse a blob it must not use: another format version, another model or tokenizer,
or a damaged tensor payload (checksum). It also carries everything needed to rebuild the padded in-memory
`CompactedKV` from the ragged tensors that follow it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

BlobDtype = Literal["bfloat16", "float16", "float32"]


class ModelIdentity(BaseModel):
    """What a compacted cache is only valid for: the model weights' config and the tokenizer that produced its ids."""

    model_config = ConfigDict(frozen=True, protected_namespaces=())

    model_name: str
    config_fingerprint: str
    tokenizer_fingerprint: str


class BlobHeader(ModelIdentity):
    """Versioned description of one stored compacted cache; `lengths` describe the ragged payload after it.

    `checksum` is the sha256 hex of this header without the checksum field followed by the tensor payload
    (see workers/store/blob.py), so a damaged header value is caught as well as a damaged tensor.
    """

    model_config = ConfigDict(frozen=True, protected_namespaces=(), extra="forbid")

    format_version: int
    dtype: BlobDtype
    num_layers: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    method: str
    params: dict[str, Any]
    original_length: int = Field(ge=0)
    rope_offset: int = Field(ge=0)
    lengths: list[list[int]]
    sliding: list[bool]
    roles: list[str]
    created_at: int
    checksum: str

    def identity(self) -> ModelIdentity:
        """The model identity this blob was made for."""
        return ModelIdentity(
            model_name=self.model_name,
            config_fingerprint=self.config_fingerprint,
            tokenizer_fingerprint=self.tokenizer_fingerprint,
        )
