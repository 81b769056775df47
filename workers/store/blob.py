"""Serialize a `CompactedKV` to one self-describing byte string (the value stored under a handle) and back.

Layout: ``MAGIC | u32 little-endian header length | msgpack header | tensor payload``. The payload holds, layer by
layer, only the real slots of each KV head (head-major): all keys, then all values in the model dtype, then beta as
float32. Tensors are written as their raw words in native byte order (little-endian on every platform torch ships
for; bfloat16 through ``view(torch.int16)``), so a round trip is bit-exact and no pickle is ever involved: a blob
from Redis is untrusted input.

The checksum is sha256 over the msgpack header without its ``checksum`` field followed by the tensor payload, so a
flipped byte anywhere (a header value such as ``original_length`` included) is caught, not only in the tensors.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import torch
from pydantic import ValidationError

from schemas.blob import BlobHeader, ModelIdentity
from workers.compaction.types import CompactedKV, CompactedLayer

BLOB_FORMAT_VERSION = 1
MAGIC = b"KVCBLOB\x00"
_HEADER_LEN = struct.Struct("<I")

# Same-width integer views: bytes are copied word for word, whatever the float format.
_WORD_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "bfloat16": (torch.bfloat16, torch.int16),
    "float16": (torch.float16, torch.int16),
    "float32": (torch.float32, torch.int32),
}
# Header fields the encoder derives from the cache itself; callers must not supply them.
_DERIVED_FIELDS = frozenset(
    {"format_version", "dtype", "num_layers", "num_kv_heads", "head_dim", "original_length", "lengths", "sliding",
     "roles", "checksum"}
)


class BlobError(Exception):
    """A stored blob that must not be used."""


class BlobCorruptError(BlobError):
    """Bad magic, truncated or oversized data, undecodable header, or checksum mismatch."""


class BlobVersionError(BlobError):
    """The blob was written in another format version."""


class BlobModelMismatchError(BlobError):
    """The blob was made for another model or tokenizer than the one asked to use it."""


def encode_blob(compacted: CompactedKV, header_fields: Mapping[str, Any]) -> bytes:
    """Encode a compacted cache; `header_fields` gives the identity, method, params (and optionally rope_offset,
    created_at), everything else (shapes, ragged lengths, roles from ``meta["roles"]``, checksum) is derived here."""
    clash = _DERIVED_FIELDS & header_fields.keys()
    if clash:
        raise ValueError(f"encode_blob derives these header fields itself: {sorted(clash)}")
    dtype_name = _layer_geometry(compacted.layers)
    payload = b"".join(_layer_bytes(layer) for layer in compacted.layers)
    first = compacted.layers[0]
    header = {
        "format_version": BLOB_FORMAT_VERSION,
        **header_fields,
        "dtype": dtype_name,
        "num_layers": len(compacted.layers),
        "num_kv_heads": int(first.keys.shape[0]),
        "head_dim": int(first.keys.shape[2]),
        "original_length": int(compacted.original_length),
        "rope_offset": int(header_fields.get("rope_offset", 0)),
        "lengths": [[int(n) for n in layer.lengths.tolist()] for layer in compacted.layers],
        "sliding": [bool(layer.sliding) for layer in compacted.layers],
        "roles": list(compacted.meta.get("roles", [])),
        "created_at": int(header_fields.get("created_at", time.time())),
    }
    header["checksum"] = _checksum(header, payload)
    BlobHeader.model_validate(header)  # fail at write time, not when a reader meets it
    packed = msgpack.packb(header, use_bin_type=True)
    return MAGIC + _HEADER_LEN.pack(len(packed)) + packed + payload


def decode_blob(data: bytes, expected: ModelIdentity | None) -> tuple[CompactedKV, BlobHeader]:
    """Check and decode a blob into a padded CompactedKV (CPU tensors); refuse anything damaged, of another format
    version, or (when `expected` is given) made for another model identity."""
    raw, payload = _split(data)
    if raw.get("format_version") != BLOB_FORMAT_VERSION:
        raise BlobVersionError(
            f"blob format version {raw.get('format_version')!r}, this server reads version {BLOB_FORMAT_VERSION}"
        )
    if _checksum(raw, payload) != raw.get("checksum"):
        raise BlobCorruptError("blob checksum mismatch")
    try:
        header = BlobHeader.model_validate(raw)
    except ValidationError as exc:
        raise BlobCorruptError(f"blob header is invalid: {exc.error_count()} error(s)") from exc
    if expected is not None and header.identity() != expected:
        raise BlobModelMismatchError(
            f"blob was made for model {header.model_name!r} (config {header.config_fingerprint}, tokenizer "
            f"{header.tokenizer_fingerprint}), not {expected.model_name!r} (config {expected.config_fingerprint}, "
            f"tokenizer {expected.tokenizer_fingerprint})"
        )
    layers = _read_layers(header, payload)
    return CompactedKV(layers=layers, original_length=header.original_length, meta={"roles": list(header.roles)}), header


def _layer_geometry(layers: list[CompactedLayer]) -> str:
    """Check all layers agree on heads, head_dim and dtype (the header stores them once); return the dtype name."""
    if not layers:
        raise ValueError("cannot encode a cache with no layers")
    heads, _, head_dim = layers[0].keys.shape
    dtype = layers[0].keys.dtype
    for i, layer in enumerate(layers):
        if layer.keys.shape != layer.values.shape or layer.keys.shape[0] != heads or layer.keys.shape[2] != head_dim:
            raise ValueError(f"layer {i}: keys {tuple(layer.keys.shape)} / values {tuple(layer.values.shape)} differ")
        if layer.keys.dtype != dtype or layer.values.dtype != dtype:
            raise ValueError(f"layer {i}: mixed dtypes {layer.keys.dtype}, {layer.values.dtype}, {dtype}")
        if tuple(layer.beta.shape) != tuple(layer.keys.shape[:2]) or tuple(layer.lengths.shape) != (heads,):
            raise ValueError(f"layer {i}: beta {tuple(layer.beta.shape)} or lengths {tuple(layer.lengths.shape)}")
        if int(layer.lengths.min()) < 0 or int(layer.lengths.max()) > layer.max_slots:
            raise ValueError(f"layer {i}: lengths {layer.lengths.tolist()} outside 0..{layer.max_slots}")
    for name, (float_dtype, _) in _WORD_DTYPES.items():
        if float_dtype == dtype:
            return name
    raise ValueError(f"unsupported cache dtype {dtype}")


def _real_slots(lengths: torch.Tensor, max_slots: int) -> torch.Tensor:
    """(heads, max_slots) bool mask of real slots; indexing with it yields head-major ragged rows."""
    return torch.arange(max_slots) < lengths.to("cpu", torch.int64)[:, None]


def _layer_bytes(layer: CompactedLayer) -> bytes:
    """Real slots of one layer: keys, values (raw words of the model dtype), then beta (float32)."""
    mask = _real_slots(layer.lengths, layer.max_slots)
    word = _WORD_DTYPES[str(layer.keys.dtype).removeprefix("torch.")][1]
    parts = [
        layer.keys.detach().cpu()[mask].contiguous().view(word),
        layer.values.detach().cpu()[mask].contiguous().view(word),
        layer.beta.detach().cpu().to(torch.float32)[mask].contiguous().view(torch.int32),
    ]
    return b"".join(part.numpy().tobytes() for part in parts)


def _checksum(header: Mapping[str, Any], payload: bytes) -> str:
    """sha256 of the header without its checksum field, then the payload."""
    unsigned = {k: v for k, v in header.items() if k != "checksum"}
    digest = hashlib.sha256(msgpack.packb(unsigned, use_bin_type=True))
    digest.update(payload)
    return digest.hexdigest()


def _split(data: bytes) -> tuple[dict, memoryview]:
    """Separate magic, header and payload; anything malformed is corruption."""
    prefix = len(MAGIC) + _HEADER_LEN.size
    if len(data) < prefix or not data.startswith(MAGIC):
        raise BlobCorruptError("not a compacted-cache blob (bad magic or truncated)")
    (header_len,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if prefix + header_len > len(data):
        raise BlobCorruptError("blob truncated inside its header")
    try:
        raw = msgpack.unpackb(data[prefix : prefix + header_len], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise BlobCorruptError(f"blob header is not valid msgpack: {exc}") from exc
    if not isinstance(raw, dict):
        raise BlobCorruptError("blob header is not a map")
    return raw, memoryview(data)[prefix + header_len :]


def _read_layers(header: BlobHeader, payload: memoryview) -> list[CompactedLayer]:
    """Rebuild padded layers (zero keys/values, beta -inf in padding) from the ragged payload."""
    if len(header.lengths) != header.num_layers or len(header.sliding) != header.num_layers:
        raise BlobCorruptError("blob header lengths/sliding do not match num_layers")
    if any(len(row) != header.num_kv_heads or min(row, default=0) < 0 for row in header.lengths):
        raise BlobCorruptError("blob header lengths do not match num_kv_heads")
    float_dtype, word = _WORD_DTYPES[header.dtype]
    width = word.itemsize * header.head_dim
    expected = sum(sum(row) * (2 * width + 4) for row in header.lengths)
    if expected != len(payload):
        raise BlobCorruptError(f"blob payload is {len(payload)} bytes, header describes {expected}")
    layers, offset = [], 0
    for row, sliding in zip(header.lengths, header.sliding):
        real = sum(row)
        keys_raw, offset = _take(payload, offset, real * width, word)
        values_raw, offset = _take(payload, offset, real * width, word)
        beta_raw, offset = _take(payload, offset, real * 4, torch.int32)
        lengths = torch.tensor(row, dtype=torch.int64)
        shape = (header.num_kv_heads, max(row, default=0))
        mask = _real_slots(lengths, shape[1])
        keys = torch.zeros(*shape, header.head_dim, dtype=float_dtype)
        values = torch.zeros_like(keys)
        beta = torch.full(shape, float("-inf"), dtype=torch.float32)
        keys[mask] = keys_raw.view(float_dtype).reshape(real, header.head_dim)
        values[mask] = values_raw.view(float_dtype).reshape(real, header.head_dim)
        beta[mask] = beta_raw.view(torch.float32)
        layers.append(CompactedLayer(keys=keys, values=values, beta=beta, lengths=lengths, sliding=sliding))
    return layers


def _take(payload: memoryview, offset: int, size: int, word: torch.dtype) -> tuple[torch.Tensor, int]:
    """Copy `size` bytes at `offset` into a tensor of integer words; return it and the next offset."""
    chunk = bytearray(payload[offset : offset + size])
    tensor = torch.frombuffer(chunk, dtype=word) if size else torch.empty(0, dtype=word)
    return tensor, offset + size
