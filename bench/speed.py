"""Compaction and chat-from-handle speed against plain prefill, measured side by side in one process.

    python -m bench.speed --shape llama-8b --context-tokens 65536 --out bench/out      # GPU (random 8B-shaped model)
    python -m bench.speed --shape tiny-llama --context-tokens 2048 --out bench/out     # CPU smoke run

A randomly initialised model of a real shape measures speed as well as the real weights. The document is random
bytes through a byte-level tokenizer (one token per byte). Reported ratios compare numbers from the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from workers.compaction.cache import KVC_ATTENTION
from workers.compaction.context import continuation_ids
from workers.compaction.generation import decode, stream_generate
from workers.compaction.pipeline import CompactionConfig, compact_context, full_context
from workers.models.loading import LoadedModel, config_fingerprint, load_model, tokenizer_fingerprint
from workers.models.tiny import byte_tokenizer

SHAPES = {
    "llama-8b": lambda vocab: LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=14336,
                                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=131072, rope_theta=500000.0),
    "qwen3-4b": lambda vocab: Qwen3Config(vocab_size=vocab, hidden_size=2560, intermediate_size=9728,
                                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                          head_dim=128, max_position_embeddings=131072),
}


def build(shape: str, device: str) -> LoadedModel:
    if shape.startswith("tiny-"):
        return load_model(shape, device=device)
    tokenizer = byte_tokenizer()
    config = SHAPES[shape](32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.set_attn_implementation(KVC_ATTENTION)
    return LoadedModel(model=model, tokenizer=tokenizer, name=shape, config_fingerprint=config_fingerprint(model),
                       tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), device=torch.device(device),
                       dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, action):
    synchronize(device)
    start = time.perf_counter()
    result = action()
    synchronize(device)
    return result, time.perf_counter() - start


def random_document(tokens: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    letters = torch.randint(97, 123, (tokens,), generator=generator)
    letters[torch.randint(0, tokens, (tokens // 6,), generator=generator)] = 32
    return bytes(letters.tolist()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny-llama", help=f"tiny-<family> or one of {', '.join(SHAPES)}")
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--chunk-tokens", type=int, default=8192)
    parser.add_argument("--max-queries-per-head", type=int, default=CompactionConfig.max_queries_per_head)
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args(argv)

    lm = build(args.shape, args.device)
    device = lm.device
    document = random_document(args.context_tokens)
    question = random_document(args.question_tokens, seed=1)
    rows: dict[str, float] = {}

    full_context(lm, document[:512])  # warm-up: kernels, allocator
    full, rows["prefill_s"] = timed(device, lambda: full_context(lm, document))
    # The document's own queries (free: captured during the prefill) and the default sources (the repeat pass).
    for sources in (("context",), CompactionConfig().query_sources):
        label = "+".join(sources)
        config = CompactionConfig(keep_ratio=args.keep_ratio, query_sources=sources, chunk_tokens=args.chunk_tokens,
                                  max_queries_per_head=args.max_queries_per_head)
        result, seconds = timed(device, lambda: compact_context(lm, document, config))
        rows[f"compact[{label}]_s"] = seconds
        rows[f"compact[{label}]_overhead_vs_prefill"] = (seconds - result.phase_seconds["prefill"]) / rows["prefill_s"]
        for phase, value in result.phase_seconds.items():
            rows[f"compact[{label}].{phase}_s"] = value
    compacted = result.compacted
    rows["compaction_ratio"] = result.compaction_ratio
    rows["heldout_rel_error"] = result.heldout_rel_error

    prompt = continuation_ids(lm.tokenizer, compacted.meta["roles"], [{"role": "user", "content": question}])

    def first_token_from_handle():
        return next(stream_generate(lm, compacted, prompt, 1, stop_ids=set()))

    def first_token_rereading():
        return next(stream_generate(lm, full_context(lm, document), prompt, 1, stop_ids=set()))

    _, rows["ttft_from_handle_s"] = timed(device, first_token_from_handle)
    _, rows["ttft_rereading_s"] = timed(device, first_token_rereading)
    rows["ttft_speedup"] = rows["ttft_rereading_s"] / rows["ttft_from_handle_s"]
    _, rows["answer_from_handle_s"] = timed(
        device, lambda: list(stream_generate(lm, compacted, prompt, args.answer_tokens, stop_ids=set())))
    _, rows["answer_full_cache_s"] = timed(
        device, lambda: list(stream_generate(lm, full, prompt, args.answer_tokens, stop_ids=set())))
    if device.type == "cuda":
        rows["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    record = {"shape": args.shape, "context_tokens": args.context_tokens, "keep_ratio": args.keep_ratio,
              "device": device_name, "torch": torch.__version__, "results": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"speed_{args.shape}_{args.context_tokens}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"\n{args.shape}, {args.context_tokens} tokens, keep {args.keep_ratio}, on {device_name}")
    for key, value in rows.items():
        print(f"{key:45s} {value:12.4f}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
