"""Data types shared by the compaction core, the blob store and the generator.

A compacted cache is *ragged*: every (layer, KV head) keeps its own number of slots. In memory each layer is padded
to its longest head (padding slots carry beta = -inf so attention never sees them); on the wire (the blob) only the
real slots are stored. Slot order inside a head does not matter because keys already carry their RoPE rotation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class CompactedLayer:
    """One layer of a compacted cache (batch size 1).

    keys, values: (num_kv_heads, max_slots, head_dim) in the model dtype, post-RoPE keys.
    beta: (num_kv_heads, max_slots) float32 additive attention-logit bias; 0 for verbatim (uncompacted) slots,
        the fitted log-weight for compacted slots, -inf for padding slots at index >= lengths[h].
    lengths: (num_kv_heads,) int64, real slots per head.
    sliding: True for a sliding-window layer (Gemma3 local layers): kept verbatim, holds the last window-1 tokens.
    """

    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor
    lengths: torch.Tensor
    sliding: bool = False

    @property
    def max_slots(self) -> int:
        return int(self.keys.shape[1])


@dataclass
class CompactedKV:
    """A whole compacted cache: one CompactedLayer per decoder layer.

    original_length is the logical number of tokens the cache stands for; the next token gets RoPE position
    original_length, whatever the physical slot counts are.
    """

    layers: list[CompactedLayer]
    original_length: int
    meta: dict = field(default_factory=dict)

    def retained_slots(self) -> int:
        """Real (non-padding) slots summed over layers and KV heads."""
        return int(sum(int(layer.lengths.sum()) for layer in self.layers))

    def padded_slots(self) -> int:
        """Slots the in-memory cache occupies: every head of a layer padded to the layer's longest head. A head
        that keeps most of its keys makes the whole layer that long, so this is what GPU memory pays (the blob
        stores only the real slots)."""
        return int(sum(layer.keys.shape[0] * layer.keys.shape[1] for layer in self.layers))
