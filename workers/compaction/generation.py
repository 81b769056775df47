"""Continue from a compacted cache: streaming generation, teacher-forced answer log-probs, next-token distributions.

All of them build a `CompactedCache` (workers/compaction/cache.py) from a `CompactedKV` and run the model's ordinary
forward on the new tokens; RoPE positions continue from the original (logical) length.
"""

from __future__ import annotations

from typing import Iterator

import torch

from workers.compaction.cache import CompactedCache
from workers.compaction.forward import run_forward
from workers.compaction.types import CompactedKV


def eos_token_ids(lm) -> set[int]:
    """Every id that ends an answer: the tokenizer's eos plus the generation config's (chat models list several)."""
    ids = set()
    configured = lm.model.generation_config.eos_token_id
    for value in (lm.tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])):
        if value is not None:
            ids.add(int(value))
    return ids


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling over the temperature-scaled distribution."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def decode(lm, cache, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           seed: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Feed `ids` after whatever `cache` holds, then yield up to `max_new_tokens` sampled tokens (stop ids
    excluded; generation ends at the first one)."""
    if not ids:
        raise ValueError("generation needs at least one prompt token after the context")
    stop_ids = eos_token_ids(lm) if stop_ids is None else stop_ids
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    inputs = torch.tensor([ids], device=lm.device)
    for _ in range(max_new_tokens):
        logits = run_forward(lm.model, inputs, cache, logits_to_keep=1).logits[0, -1]
        token = sample_next(logits, temperature, top_p, generator)
        if token in stop_ids:
            return
        yield token
        inputs = torch.tensor([[token]], device=lm.device)


def stream_generate(lm, compacted: CompactedKV, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, seed: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
    cache = CompactedCache(compacted, lm.model.config, device=lm.device)
    yield from decode(lm, cache, ids, max_new_tokens, temperature, top_p, seed, stop_ids)


def greedy_batch(lm, compacted: CompactedKV, prompts: list[list[int]], max_new_tokens: int,
                 stop_ids: set[int] | None = None) -> list[list[int]]:
    """Greedy answers to several prompts after the same context, decoded as batches.

    Decoding is bound by per-step overhead (kernel launches), not arithmetic, so answering a document's questions
    together costs about as much as answering one. Each row gets the answer it gets alone. Sliding-window layers
    count left padding as positions (a padded row's window would cover padding instead of the context's end), so
    on models with such layers only prompts of equal length share a batch.
    """
    if not prompts or not all(prompts):
        raise ValueError("greedy_batch needs at least one prompt, each of at least one token")
    if not any(layer.sliding for layer in compacted.layers):
        return _greedy_padded(lm, compacted, prompts, max_new_tokens, stop_ids)
    answers: dict[int, list[int]] = {}
    for length in {len(prompt) for prompt in prompts}:
        rows = [row for row, prompt in enumerate(prompts) if len(prompt) == length]
        same_length = _greedy_padded(lm, compacted, [prompts[row] for row in rows], max_new_tokens, stop_ids)
        answers.update(zip(rows, same_length))
    return [answers[row] for row in range(len(prompts))]


@torch.inference_mode()
def _greedy_padded(lm, compacted: CompactedKV, prompts: list[list[int]], max_new_tokens: int,
                   stop_ids: set[int] | None) -> list[list[int]]:
    """One left-padded batch: padding is masked and every row gets the positions it would get alone (T, T+1, ...
    after the original length T). A row stops at its first stop id (excluded); the batch when every row has."""
    stop_ids = eos_token_ids(lm) if stop_ids is None else stop_ids
    width, prefix = max(map(len, prompts)), compacted.original_length
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    inputs = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=lm.device)
    # Attention mask over logical positions: the whole context, then each row's own tokens (its padding masked).
    mask = torch.ones(len(prompts), prefix + width, dtype=torch.long, device=lm.device)
    for row, prompt in enumerate(prompts):
        mask[row, prefix:prefix + width - len(prompt)] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prefix:]
    cache = CompactedCache(compacted, lm.model.config, batch_size=len(prompts), device=lm.device)
    answers: list[list[int]] = [[] for _ in prompts]
    running = [True] * len(prompts)
    for _ in range(max_new_tokens):
        logits = run_forward(lm.model, inputs, cache, attention_mask=mask, position_ids=positions,
                             logits_to_keep=1).logits[:, -1]
        tokens = logits.argmax(-1)
        for row, token in enumerate(tokens.tolist()):
            if running[row]:
                if token in stop_ids:
                    running[row] = False
                else:
                    answers[row].append(token)
        if not any(running):
            break
        inputs = tokens[:, None]
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=-1)
        positions = positions[:, -1:] + 1
    return answers


@torch.inference_mode()
def answer_logprob(lm, compacted: CompactedKV, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Mean log-probability per token of `answer_ids` after `prompt_ids`, teacher forced (the paper's
    log-perplexity metric, negated)."""
    if not prompt_ids or not answer_ids:
        raise ValueError("answer_logprob needs a non-empty prompt and answer")
    cache = CompactedCache(compacted, lm.model.config, device=lm.device)
    inputs = torch.tensor([prompt_ids + answer_ids], device=lm.device)
    logits = run_forward(lm.model, inputs, cache, logits_to_keep=len(answer_ids) + 1).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(answer_ids, device=logprobs.device)
    return float(logprobs.gather(-1, targets[:, None]).mean())


@torch.inference_mode()
def next_token_logprobs(lm, compacted: CompactedKV, prompt_ids: list[int]) -> torch.Tensor:
    """log p(next token | compacted context, prompt): (vocab,) float32 on the CPU."""
    cache = CompactedCache(compacted, lm.model.config, device=lm.device)
    logits = run_forward(lm.model, torch.tensor([prompt_ids], device=lm.device), cache, logits_to_keep=1).logits
    return torch.log_softmax(logits[0, -1].float(), dim=-1).cpu()
