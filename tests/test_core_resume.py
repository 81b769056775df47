"""Resuming from a compacted cache: exactness at keep_ratio 1, transformers' generate, batching, ragged heads."""

from __future__ import annotations

import pytest
import torch

from tests.core_helpers import DOCUMENT, tiny
from workers.compaction.cache import CompactedCache
from workers.compaction.context import continuation_ids, render_context
from workers.compaction.forward import run_forward
from workers.compaction.generation import greedy_batch, next_token_logprobs, stream_generate
from workers.compaction.pipeline import CompactionConfig, compact_context, full_context
from workers.eval.backends import empty_kv

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


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
@pytest.mark.parametrize("keep_ratio", [0.3, None])
def test_batch_of_left_padded_questions_matches_one_at_a_time(family, keep_ratio):
    """greedy_batch (the eval's decoder) gives every prompt the tokens it gets alone, on a compacted context and on
    an empty one (keep_ratio None: zero slots, as the eval's `none` method)."""
    lm = tiny(family)
    if keep_ratio is None:
        compacted, roles = empty_kv(lm), []
    else:
        compacted = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=keep_ratio)).compacted
        roles = compacted.meta["roles"]
    questions = ("Who built it?", "When did the last keeper leave the lighthouse, and why did nobody replace him?",
                 "Name the town.")
    prompts = [continuation_ids(lm.tokenizer, roles, [{"role": "user", "content": text}]) if roles
               else lm.tokenizer.encode(text) for text in questions]
    assert len(set(map(len, prompts))) == 3, "the prompts must differ in length for padding to be exercised"
    together = greedy_batch(lm, compacted, prompts, max_new_tokens=6, stop_ids=set())
    alone = [list(stream_generate(lm, compacted, p, max_new_tokens=6, stop_ids=set())) for p in prompts]
    assert together == alone
    assert all(len(tokens) == 6 for tokens in together)


def test_batch_rows_stop_at_their_own_stop_token():
    lm = tiny("llama")
    compacted = compact_context(lm, DOCUMENT, CompactionConfig(keep_ratio=0.3)).compacted
    prompts = [continuation_ids(lm.tokenizer, compacted.meta["roles"], [{"role": "user", "content": text}])
               for text in ("Who built it?", "Where is it?")]
    free = greedy_batch(lm, compacted, prompts, max_new_tokens=5, stop_ids=set())
    stop = free[0][2]
    stopped = greedy_batch(lm, compacted, prompts, max_new_tokens=5, stop_ids={stop})
    assert stopped == [tokens[:tokens.index(stop)] if stop in tokens else tokens for tokens in free]
    assert len(stopped[0]) <= 2


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
