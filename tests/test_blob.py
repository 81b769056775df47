"""Blob encode/decode: bit-exact round trips and refusal of anything damaged, foreign or from another version."""

from __future__ import annotations

import msgpack
import pytest
import torch

from schemas.blob import ModelIdentity
from workers.compaction.types import CompactedKV, CompactedLayer
from workers.store.blob import (
    BLOB_FORMAT_VERSION,
    MAGIC,
    BlobCorruptError,
    BlobError,
    BlobModelMismatchError,
    BlobVersionError,
    decode_blob,
    encode_blob,
)

IDENTITY = ModelIdentity(model_name="tiny-llama", config_fingerprint="cfg123", tokenizer_fingerprint="tok456")
FIELDS = {**IDENTITY.model_dump(), "method": "am", "params": {"keep_ratio": 0.1, "query_sources": ["repeat"]}}


def make_cache(dtype: torch.dtype, lengths: list[list[int]], sliding: list[bool], head_dim: int = 4) -> CompactedKV:
    """A random ragged cache whose padding follows the CompactedLayer contract (zeros, beta -inf)."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for row, slide in zip(lengths, sliding):
        heads, slots = len(row), max(row)
        lens = torch.tensor(row, dtype=torch.int64)
        real = torch.arange(slots) < lens[:, None]
        keys = torch.randn(heads, slots, head_dim, generator=gen).to(dtype).masked_fill(~real[..., None], 0.0)
        values = torch.randn(heads, slots, head_dim, generator=gen).to(dtype).masked_fill(~real[..., None], 0.0)
        beta = torch.randn(heads, slots, generator=gen).masked_fill(~real, float("-inf"))
        layers.append(CompactedLayer(keys=keys, values=values, beta=beta, lengths=lens, sliding=slide))
    return CompactedKV(layers=layers, original_length=57, meta={"roles": ["system", "user"]})


def assert_same(a: CompactedKV, b: CompactedKV) -> None:
    """Bit-exact equality (compared as integer words, so -inf and signed zeros count too)."""
    assert a.original_length == b.original_length and a.meta["roles"] == b.meta["roles"]
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x.sliding == y.sliding and x.keys.dtype == y.keys.dtype
        assert torch.equal(x.lengths, y.lengths)
        word = torch.int16 if x.keys.element_size() == 2 else torch.int32
        assert torch.equal(x.keys.view(word), y.keys.view(word))
        assert torch.equal(x.values.view(word), y.values.view(word))
        assert torch.equal(x.beta.view(torch.int32), y.beta.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact_with_ragged_heads_and_sliding_layer(dtype):
    cache = make_cache(dtype, [[3, 0, 5], [2, 2, 2], [0, 1, 4]], [False, True, False])
    blob = encode_blob(cache, FIELDS)
    decoded, header = decode_blob(blob, IDENTITY)
    assert_same(cache, decoded)
    assert header.lengths == [[3, 0, 5], [2, 2, 2], [0, 1, 4]]
    assert header.sliding == [False, True, False]
    assert header.dtype == str(dtype).removeprefix("torch.")
    assert (header.num_layers, header.num_kv_heads, header.head_dim) == (3, 3, 4)
    assert header.method == "am" and header.params == FIELDS["params"] and header.roles == ["system", "user"]
    assert header.format_version == BLOB_FORMAT_VERSION and len(header.checksum) == 64


def test_padding_is_not_stored():
    fields = {**FIELDS, "created_at": 1700000000}
    cache = make_cache(torch.float32, [[1, 9]], [False])
    layer = cache.layers[0]
    padded = CompactedKV(
        layers=[CompactedLayer(
            keys=torch.cat([layer.keys, torch.full((2, 50, 4), 7.0)], dim=1),
            values=torch.cat([layer.values, torch.full((2, 50, 4), 7.0)], dim=1),
            beta=torch.cat([layer.beta, torch.zeros(2, 50)], dim=1),
            lengths=layer.lengths,
        )],
        original_length=cache.original_length,
        meta=cache.meta,
    )
    assert encode_blob(padded, fields) == encode_blob(cache, fields)


def test_decode_pads_with_zero_keys_values_and_minus_inf_beta():
    decoded, _ = decode_blob(encode_blob(make_cache(torch.bfloat16, [[1, 3]], [False]), FIELDS), None)
    layer = decoded.layers[0]
    assert layer.keys.shape == (2, 3, 4)
    assert torch.isinf(layer.beta[0, 1:]).all() and (layer.beta[0, 1:] < 0).all()
    assert (layer.keys[0, 1:] == 0).all() and (layer.values[0, 1:] == 0).all()


def test_every_flipped_byte_is_refused():
    blob = encode_blob(make_cache(torch.bfloat16, [[2, 0], [1, 1]], [False, True], head_dim=2), FIELDS)
    header_end = len(MAGIC) + 4 + int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 4], "little")
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(BlobError):
            decode_blob(bytes(bad), None)
        if i >= header_end:
            with pytest.raises(BlobCorruptError, match="checksum"):
                decode_blob(bytes(bad), None)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", MAGIC, MAGIC + b"\x05\x00\x00\x00\xc1\xc1\xc1\xc1\xc1", MAGIC + b"\xff\xff\xff\x00abc"],
)
def test_garbage_is_corrupt(data):
    with pytest.raises(BlobCorruptError):
        decode_blob(data, None)


def test_truncated_blob_is_corrupt():
    blob = encode_blob(make_cache(torch.float32, [[2, 3]], [False]), FIELDS)
    with pytest.raises(BlobCorruptError):
        decode_blob(blob[:-1], None)
    with pytest.raises(BlobCorruptError):
        decode_blob(blob + b"\x00", None)


def test_other_format_version_is_refused():
    blob = encode_blob(make_cache(torch.float32, [[2]], [False]), FIELDS)
    start = len(MAGIC) + 4
    header = msgpack.unpackb(blob[start : start + int.from_bytes(blob[len(MAGIC) : start], "little")])
    header["format_version"] = BLOB_FORMAT_VERSION + 1
    packed = msgpack.packb(header)
    payload = blob[start + int.from_bytes(blob[len(MAGIC) : start], "little") :]
    with pytest.raises(BlobVersionError):
        decode_blob(MAGIC + len(packed).to_bytes(4, "little") + packed + payload, None)


@pytest.mark.parametrize("field", ["model_name", "config_fingerprint", "tokenizer_fingerprint"])
def test_other_model_is_refused(field):
    blob = encode_blob(make_cache(torch.float32, [[2]], [False]), FIELDS)
    other = IDENTITY.model_copy(update={field: "something-else"})
    with pytest.raises(BlobModelMismatchError):
        decode_blob(blob, other)


def test_derived_fields_cannot_be_supplied():
    with pytest.raises(ValueError, match="lengths"):
        encode_blob(make_cache(torch.float32, [[2]], [False]), {**FIELDS, "lengths": [[9]]})
