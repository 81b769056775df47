"""Resuming from a compacted cache: a transformers `Cache` plus the beta-aware "kvc" attention implementation.

Physical vs logical length: layer l holds P_l compacted slots (its longest head; shorter heads are padded with
beta = -inf) followed by the N tokens appended since. The cache reports the *logical* length T + N (T = the original
token count) to transformers, so new tokens get RoPE positions continuing from T and the causal mask is built over
logical positions. The "kvc" attention function then keeps only the mask's last N columns (the new tokens) and puts
beta in front of them for the P_l compacted slots. Without a compacted layer it is plain SDPA.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workers.compaction.types import CompactedKV, CompactedLayer

KVC_ATTENTION = "kvc"
# Name of the attribute carrying a compacted layer's bias on the key tensor that Cache.update returns: the one object
# that travels from the cache to the attention function in every transformers model's attention module.
BIAS_ATTRIBUTE = "kvc_prefix_bias"


def _query_length(query_length_or_positions: int | torch.Tensor) -> int:
    # transformers 5.24 passes the query length; older 5.x pass cache_position (a tensor of new positions).
    if isinstance(query_length_or_positions, torch.Tensor):
        return int(query_length_or_positions.shape[-1])
    return int(query_length_or_positions)


class CompactedPrefixLayer(DynamicLayer):
    """A full-attention layer: a compacted prefix of P physical slots with a per-slot bias, then appended tokens."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor, logical_prefix_length: int):
        super().__init__()
        self.keys, self.values, self.bias = keys, values, bias  # (B, H, P, d), (B, H, P, d), (B, H, P) float32
        self.logical_prefix_length = logical_prefix_length
        self.device = keys.device
        self.is_initialized = True

    @property
    def prefix_slots(self) -> int:
        return int(self.bias.shape[-1])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        setattr(self.keys, BIAS_ATTRIBUTE, self.bias)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.logical_prefix_length + self.keys.shape[-2] - self.prefix_slots

    def get_mask_sizes(self, query_length: int | torch.Tensor, *args) -> tuple[int, int]:
        return self.get_seq_length() + _query_length(query_length), 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` appended tokens; the compacted prefix itself is never cropped."""
        appended = self.keys.shape[-2] - self.prefix_slots
        if tokens_to_remove > 0 or -tokens_to_remove > appended:
            raise ValueError(f"can only crop appended tokens (negative count up to {appended}), got {tokens_to_remove}")
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.bias = self.bias.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.bias = self.bias[indices, ...]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.bias = self.bias.index_select(0, beam_idx.to(self.bias.device))


def _sliding_layer(layer: CompactedLayer, batch_size: int, sliding_window: int, original_length: int,
                   device: torch.device) -> DynamicSlidingWindowLayer:
    """Sliding-window layers are kept verbatim: their window cache continues exactly as transformers' own."""
    sliding = DynamicSlidingWindowLayer(sliding_window=sliding_window)
    keys = layer.keys[None].expand(batch_size, -1, -1, -1).to(device)
    values = layer.values[None].expand(batch_size, -1, -1, -1).to(device)
    sliding.lazy_initialization(keys, values)
    sliding.keys, sliding.values = keys.contiguous(), values.contiguous()
    sliding.cumulative_length = original_length
    return sliding


class CompactedCache(DynamicCache):
    """A cache that `model(...)`, `model.generate(...)` and our generator accept, built from a `CompactedKV`.

    `batch_size` copies of the same compacted prefix are made so several continuations (questions) of one document
    run in one batch; rows may be left-padded as usual with a 2-D attention_mask over logical positions.
    """

    def __init__(self, compacted: CompactedKV, config, batch_size: int = 1, device: torch.device | str | None = None):
        text_config = config.get_text_config(decoder=True)
        sliding_window = getattr(text_config, "sliding_window", None)
        device = torch.device(device) if device is not None else compacted.layers[0].keys.device
        layers: list[DynamicLayer] = []
        for layer in compacted.layers:
            if layer.sliding:
                layers.append(_sliding_layer(layer, batch_size, sliding_window, compacted.original_length, device))
                continue
            keys = layer.keys[None].expand(batch_size, -1, -1, -1).to(device).contiguous()
            values = layer.values[None].expand(batch_size, -1, -1, -1).to(device).contiguous()
            bias = layer.beta[None].expand(batch_size, -1, -1).to(device=device, dtype=torch.float32).contiguous()
            layers.append(CompactedPrefixLayer(keys, values, bias, compacted.original_length))
        super().__init__()
        self.layers = layers
        self.layer_class_to_replicate = None


def _new_token_mask(attention_mask: torch.Tensor | None, query: torch.Tensor, appended: int) -> torch.Tensor:
    """Additive mask (B or 1, 1, q, N) over the N appended tokens, from transformers' mask or plain causality."""
    q_len = query.shape[2]
    if attention_mask is None:
        # transformers skips the mask when it is purely causal (e.g. one decoding token): rebuild causality.
        new_pos = torch.arange(appended, device=query.device)
        query_pos = torch.arange(appended - q_len, appended, device=query.device)
        allowed = (new_pos[None, :] <= query_pos[:, None])[None, None]
    else:
        allowed = attention_mask[..., -appended:]
        if allowed.dtype != torch.bool:
            return allowed.to(query.dtype)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=query.dtype, device=query.device))


def biased_attention_mask(bias: torch.Tensor, attention_mask: torch.Tensor | None, query: torch.Tensor,
                          key: torch.Tensor) -> torch.Tensor:
    """Full additive mask (B, H_q, q, P + N): beta (repeated to the query heads) for the compacted slots, then
    transformers' causal/padding mask for the appended tokens."""
    batch, query_heads, q_len, _ = query.shape
    prefix_slots = bias.shape[-1]
    appended = key.shape[-2] - prefix_slots
    groups = query_heads // bias.shape[1]
    prefix = bias.repeat_interleave(groups, dim=1)[:, :, None, :].to(query.dtype).expand(batch, query_heads, q_len, prefix_slots)
    new = _new_token_mask(attention_mask, query, appended).expand(batch, query_heads, q_len, appended)
    return torch.cat([prefix, new], dim=-1)


# cuDNN's SDPA builds an execution plan per new key length; ragged compacted layers give every layer its own length
# at every decoding step, so on GPU that planning dominated (measured: ~1 s per token on an 8B shape). Flash and
# memory-efficient kernels need no plan and take the float mask as is.
GPU_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def kvc_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """SDPA, with the compacted-prefix bias of the layer (if any) folded into the additive mask."""
    bias = getattr(key, BIAS_ATTRIBUTE, None)
    if bias is not None:
        attention_mask = biased_attention_mask(bias, attention_mask, query, key)
    if query.is_cuda:
        with sdpa_kernel(GPU_BACKENDS):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KVC_ATTENTION, kvc_attention_forward)
AttentionMaskInterface.register(KVC_ATTENTION, sdpa_mask)
