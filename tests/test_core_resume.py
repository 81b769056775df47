"""Resuming from a compacted cache: exactness at keep_ratio 1, transformers' generate, batching, ragged heads."""

from __future__ import annotations

import pytest
import torch

from tests.core_helpers import DOCUMENT, tiny
from workers.compaction.cache import CompactedCache
from workers.compaction.context import continuation_ids, render_context
from workers.compaction.forward import run_forward
from workers.compaction.generation import next_token_logprobs, stream_generate
from workers.compaction.pipeline import CompactionConfig, compact_context, full_context

QUESTION = [{"role": "user", "content": "Who built the lighthouse?"}]


def reference_logprobs(lm, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_keep_ratio_one_reproduces_full_cache_logits(family):
    lm = tiny(family)
    result = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=1.0, max_ratio_per_head=1.0))
    prompt = continuation_ids(lm.tokenizer, result.compacted.meta["roles"], QUESTION)
    expected = reference_logprobs(lm, render_context(lm.tokenizer, DOCUMENT).ids + prompt)
    assert (next_token_logprobs(lm, result.compacted, prompt) - expected).abs().max() < 1e-4
    assert (next_token_logprobs(lm, full_context(lm, DOCUMENT), prompt) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_compaction_changes_logits_at_low_ratio(family):
    """The exactness above is not vacuous: a real compaction does move the distribution."""
    lm = tiny(family)
    result = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.1))
    prompt = continuation_ids(lm.tokenizer, result.compacted.meta["roles"], QUESTION)
    expected = reference_logprobs(lm, render_context(lm.tokenizer, DOCUMENT).ids + prompt)
    assert (next_token_logprobs(lm, result.compacted, prompt) - expected).abs().max() > 1e-3


def test_transformers_generate_accepts_the_compacted_cache():
    """model.generate with our cache gives the same greedy tokens as our own decoder; positions continue from the
    original length (the input ids carry the logical prefix, as with any prefilled transformers cache)."""
    lm = tiny("llama")
    result = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.3))
    compacted = result.compacted
    prompt = continuation_ids(lm.tokenizer, compacted.meta["roles"], QUESTION)
    ours = list(stream_generate(lm, compacted, prompt, 8, stop_ids=set()))
    logical = [0] * compacted.original_length + prompt
    cache = CompactedCache(compacted, lm.model.config)
    generated = lm.model.generate(torch.tensor([logical]), cache=cache, max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=lm.tokenizer.pad_token_id)
    assert generated[0, len(logical):].tolist() == ours


def test_batch_of_left_padded_questions_matches_one_at_a_time():
    lm = tiny("qwen3")
    compacted = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.3)).compacted
    prompts = [continuation_ids(lm.tokenizer, compacted.meta["roles"], [{"role": "user", "content": text}])
               for text in ("Who built it?", "When did the last keeper leave the lighthouse?")]
    width = max(map(len, prompts))
    pad = lm.tokenizer.pad_token_id
    rows = [[pad] * (width - len(p)) + p for p in prompts]
    logical = torch.tensor([[0] * compacted.original_length + row for row in rows])
    mask = torch.ones_like(logical)
    for i, p in enumerate(prompts):
        mask[i, compacted.original_length:compacted.original_length + width - len(p)] = 0
    cache = CompactedCache(compacted, lm.model.config, batch_size=2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, compacted.original_length:]
    with torch.no_grad():
        logits = lm.model(input_ids=logical[:, compacted.original_length:], attention_mask=mask,
                          position_ids=positions, cache=cache).logits[:, -1].float()
    for i, p in enumerate(prompts):
        alone = next_token_logprobs(lm, compacted, p)
        assert (torch.log_softmax(logits[i], -1) - alone).abs().max() < 1e-4


def test_ragged_padding_slots_are_invisible():
    """Heads keep different numbers of slots; whatever sits in a padding slot never reaches the output."""
    lm = tiny("llama")
    compacted = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2)).compacted
    lengths = torch.stack([layer.lengths for layer in compacted.layers])
    assert lengths.unique().numel() > 1, "the global budget should give heads different lengths"
    prompt = continuation_ids(lm.tokenizer, compacted.meta["roles"], QUESTION)
    before = next_token_logprobs(lm, compacted, prompt)
    for layer in compacted.layers:
        padding = torch.arange(layer.max_slots)[None, :] >= layer.lengths[:, None]
        layer.keys[padding] = torch.randn_like(layer.keys[padding]) * 100
        layer.values[padding] = torch.randn_like(layer.values[padding]) * 100
    assert (next_token_logprobs(lm, compacted, prompt) - before).abs().max() < 1e-5


def test_cache_reports_logical_length_and_crops_only_new_tokens():
    lm = tiny("llama")
    compacted = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.2)).compacted
    cache = CompactedCache(compacted, lm.model.config)
    assert cache.get_seq_length() == compacted.original_length
    run_forward(lm.model, torch.tensor([[5, 6, 7]]), cache)
    assert cache.get_seq_length() == compacted.original_length + 3
    cache.crop(-2)
    assert cache.get_seq_length() == compacted.original_length + 1
    with pytest.raises(ValueError):
        cache.crop(-5)
