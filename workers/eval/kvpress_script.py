"""Runs inside the kvpress virtual environment (see kvpress_side.py); not imported by the main package.

Per document: the context alone (first user message, chat template included, as kvpress compresses it) is prefilled
once without a press for the full-cache reference answers, then once per press and keep ratio with
compression_ratio = 1 - keep_ratio. Each question (second user message, same prompt as the main harness) is answered
greedily from a copy of the compressed cache, with positions continuing from the original context length as kvpress's
own pipeline does. Records go to the same ResultStore as the in-process run.
"""

from __future__ import annotations

import argparse
import copy
import time

import kvpress
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as transformers_logging

from workers.eval.datasets import Document, dataset_name, load_dataset, parse_shard
from workers.eval.prompts import context_message, question_prompt
from workers.eval.resultcache import ResultStore
from workers.eval.scoring import is_correct

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Session:
    """One model and tokenizer; prefill with or without a press, then answer from copies of the cache."""

    def __init__(self, model_dir: str, dtype: str, device: str) -> None:
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype], attn_implementation="sdpa")
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer.encode(text, return_tensors="pt", add_special_tokens=False).to(self.device)

    def context_ids(self, context: str) -> tuple[str, torch.Tensor]:
        """The rendered first turn (its text is the prefix of every question's rendering) and its token ids."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": context}], tokenize=False)
        return text, self._ids(text)

    def question_ids(self, context_text: str, context: str, prompt: str) -> torch.Tensor:
        messages = [{"role": "user", "content": context}, {"role": "user", "content": prompt}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not text.startswith(context_text):
            raise RuntimeError("the chat template renders the first turn differently once a second one follows")
        return self._ids(text[len(context_text):])

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, press) -> tuple[DynamicCache, float, int]:
        """(cache, seconds, retained slots) for the context, compressed by `press` when given."""
        cache = DynamicCache()
        start = time.perf_counter()
        if press is None:
            self.model(input_ids=ids, past_key_values=cache)
        else:
            with press(self.model):
                self.model(input_ids=ids, past_key_values=cache)
        seconds = time.perf_counter() - start
        slots = 0
        for layer_cache, layer in zip(cache.layers, self.model.model.layers):
            _, heads, length, _ = layer_cache.keys.shape
            masked = getattr(layer.self_attn, "masked_key_indices", None)  # per-head eviction (KVzip, AdaKV)
            slots += heads * length - (0 if masked is None else int(masked[0].numel()))
        return cache, seconds, slots

    @torch.no_grad()
    def _forward(self, cache: DynamicCache, start: int, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        return self.model(input_ids=ids, past_key_values=cache, position_ids=positions).logits[0].float()

    def generate(self, cache: DynamicCache, context_length: int, q_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
        cache = copy.deepcopy(cache)
        logits = self._forward(cache, context_length, q_ids)
        position, tokens = context_length + q_ids.shape[1], []
        for _ in range(max_new_tokens):
            token = int(logits[-1].argmax())
            if token in self.stop_ids:
                break
            tokens.append(token)
            logits = self._forward(cache, position, torch.tensor([[token]], device=self.device))
            position += 1
        return tokens

    def scores(self, cache: DynamicCache, context_length: int, q_ids: torch.Tensor,
               answer: list[int]) -> tuple[torch.Tensor, float | None]:
        """(next-token log-probs after the question, mean log-prob of `answer` teacher-forced)."""
        ids = torch.cat([q_ids, torch.tensor([answer], dtype=q_ids.dtype, device=self.device)], dim=1)
        logprobs = torch.log_softmax(self._forward(copy.deepcopy(cache), context_length, ids), dim=-1)
        first = q_ids.shape[1] - 1
        if not answer:
            return logprobs[first], None
        picked = logprobs[first: first + len(answer)].gather(1, torch.tensor(answer, device=self.device).unsqueeze(1))
        return logprobs[first], float(picked.mean())


def evaluate_document(session: Session, document: Document, max_questions: int | None,
                      units: list[tuple[str, float, object]], store: ResultStore, dataset: str) -> None:
    """Store a record per (method, ratio, press) unit not yet in the store; press None is the full-cache reference."""
    questions = document.questions[:max_questions]
    todo = [(m, r, p) for m, r, p in units if store.load(dataset, document.id, m, r, len(questions)) is None]
    if not todo:
        return
    context = context_message(document)
    context_text, ctx_ids = session.context_ids(context)
    prompts = [question_prompt(document, q) for q in questions]
    q_ids = [session.question_ids(context_text, context, p.text) for p in prompts]
    full_cache, _, _ = session.prefill(ctx_ids, None)
    length = ctx_ids.shape[1]
    references = [session.generate(full_cache, length, ids, p.max_new_tokens) for ids, p in zip(q_ids, prompts)]
    reference_next = [session.scores(full_cache, length, ids, [])[0] for ids in q_ids]
    for method, ratio, press in todo:
        cache, seconds, slots = session.prefill(ctx_ids, press)
        rows = []
        for index, (question, prompt, ids) in enumerate(zip(questions, prompts, q_ids)):
            answer = references[index] if press is None else session.generate(cache, length, ids, prompt.max_new_tokens)
            next_token, logprob = session.scores(cache, length, ids, references[index])
            text = session.tokenizer.decode(answer, skip_special_tokens=True)
            kl = float(torch.sum(reference_next[index].exp() * (reference_next[index] - next_token)))
            rows.append({"index": index, "prediction": text,
                         "reference": session.tokenizer.decode(references[index], skip_special_tokens=True),
                         "correct": is_correct(question, text), "log_ppl": None if logprob is None else -logprob,
                         "kl": kl})
        head_dim, elem = cache.layers[0].keys.shape[-1], cache.layers[0].keys.element_size()
        store.save({"dataset": dataset, "doc_id": document.id, "method": method, "keep_ratio": ratio,
                    "dtype": str(session.model.dtype).removeprefix("torch."), "input_tokens": length,
                    "retained_slots": slots, "bytes": slots * 2 * head_dim * elem,
                    "compaction_seconds": seconds, "phase_seconds": {"prefill+press": seconds}, "questions": rows})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--keep-ratios", nargs="+", type=float, required=True)
    parser.add_argument("--presses", nargs="+", required=True, help="method=PressClass pairs")
    parser.add_argument("--full-method", required=True, help="method name of the uncompressed reference run")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-questions-per-doc", type=int, default=None)
    parser.add_argument("--shard", default="0/1", help="I/N: documents I, I+N, ... of the first --limit (as the eval)")
    parser.add_argument("--dtype", required=True, choices=sorted(DTYPES))
    parser.add_argument("--device", required=True, help="cpu | cuda (the harness resolves auto)")
    args = parser.parse_args()
    shard = parse_shard(args.shard)
    if shard is None:
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    index, count = shard
    transformers_logging.disable_progress_bar()  # one weight-loading bar per parameter would flood the eval's output
    session = Session(args.model_dir, args.dtype, args.device)
    store = ResultStore(args.out, args.label)
    units: list[tuple[str, float, object]] = [(args.full_method, 1.0, None)]
    for pair in args.presses:
        method, _, class_name = pair.partition("=")
        units += [(method, r, getattr(kvpress, class_name)(compression_ratio=1.0 - r)) for r in args.keep_ratios]
    dataset = dataset_name(args.dataset)
    documents = load_dataset(args.dataset, args.limit)[index::count]
    for number, document in enumerate(documents, start=1):
        print(f"kvpress {dataset} {number}/{len(documents)} {document.id}", flush=True)
        evaluate_document(session, document, args.max_questions_per_doc, units, store, dataset)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
