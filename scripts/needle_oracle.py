"""Experiment (sessions 11-12, docs/quality.md): is AM's miss at 50x the key selection or the fit?

Compacts one document at the given ratios several ways and answers its questions under each:
- `am`: the default (keys scored and fitted on the repeat pass);
- `oracle-keys`: key importance (budgets and selection) from the full cache's own question + answer tokens, fit on the
  repeat pass: what a selection that knew the questions would keep;
- `oracle-keys+fit`: the same keys, and the question + answer tokens' queries added to the fit;
- `oracle-budgets` / `oracle-selection`: the oracle's importance for the per-head budgets only / for the choice of
  keys within each head only (the other from the repeat pass), to tell which of the two the miss is;
- `ss-keys` / `ss-budgets` / `ss-selection`: the same three splits with key importance from the self-study passes
  (the model's own summary, fact list, JSON extraction and quiz of the document, sampled from the full cache) instead
  of the oracle's: a query-agnostic candidate for what the oracle knows; `rs-selection`: keys chosen within each head
  by the larger of the repeat and self-study importance, budgets from the repeat pass;
- `oracle-union` / `oracle-priority`: importance the larger of the repeat pass's and the oracle's (x1 / x2), for
  budgets and selection: the repeat pass's coverage with the questions' keys first; `question-priority`: the same x2
  with the question tokens alone (no answer);
- `hints`: the implementation of the above (reference.hint_passes: the question prompts answered greedily from the
  full cache) at hint_weight 1000 (the default of session 12); `hints-w10` / `hints-w100` at weight 10 (the
  default since session 13) / 100;
- `am[max_ratio_per_head=CAP]` for each CAP given: the default with each head capped at CAP x its block;
- `surprise-Q` / `surprise-Q-w2` (session 13, query-agnostic): key importance over the repeat-pass queries that read
  or predict the document's hardest tokens only (the top Q fraction by the full prefill's surprisal: random digits,
  UUIDs, names), put first like hints (hint_weight 1000, or 2 for `-w2`). Q in 0.02, 0.05, 0.1.
The oracle variants see the test questions: they bound what query-agnostic selection could reach, nothing more.

usage: python scripts/needle_oracle.py DATASET.jsonl DOC_ID RATIO,RATIO,... [CAP,CAP,...] [--only NAME,NAME,...]
(one JSON line per run)
"""
import json
import sys
from dataclasses import replace
from functools import cache

import torch

from workers.compaction import pipeline, solvers
from workers.compaction.pipeline import CompactionConfig, compact_prepared, prepare_context
from workers.compaction.queries import KeyImportance
from workers.compaction.reference import (QueryPass, ReferenceQueries, capture_passes, hint_passes, plan_passes,
                                         repeat_pass_ids)
from workers.eval.backends import InProcessBackend
from workers.eval.datasets import load_dataset
from workers.eval.prompts import context_message, question_prompt
from workers.eval.scoring import is_correct
from workers.models.loading import load_model

arguments = sys.argv[1:]
only = None
if "--only" in arguments:
    at = arguments.index("--only")
    only = set(arguments[at + 1].split(","))
    del arguments[at:at + 2]
path, doc_id = arguments[0], arguments[1]
ratios = [float(r) for r in arguments[2].split(",")]
caps = [float(c) for c in arguments[3].split(",")] if len(arguments) > 3 else []
lm = load_model("bundled")
backend = InProcessBackend(lm)
document = {doc.id: doc for doc in load_dataset(path)}[doc_id]
text = context_message(document)
full = backend.full(text)
prompts = [question_prompt(document, question) for question in document.questions]
references = backend.generate_all(full, [(p.text, p.max_new_tokens) for p in prompts])
prepared = prepare_context(lm, text, CompactionConfig())
heads = lm.text_config.num_key_value_heads
layers = prepared.compactable_layers
context_keys = {i: prepared.cache.layers[i].keys[0] for i in layers}


def importance_of(passes: list[QueryPass], into: ReferenceQueries | None = None) -> dict[int, torch.Tensor]:
    """KVzip key importance of the context's keys over every token of `passes` (run on forks of the full cache),
    their queries added to `into` where given."""
    importance = KeyImportance(lm.model, context_keys, prepared.span, heads)
    capture_passes(lm, prepared.cache, passes, into, heads, 4096, importance=importance)
    return importance.scores


def wanted(*names: str) -> bool:
    """Whether any variant that starts with one of `names` will run (the costly passes run only then)."""
    return not only or any(n.startswith(name) for n in only for name in names)


class MaskedImportance(KeyImportance):
    """KeyImportance over the queries at chosen positions of the pass only (offsets tracked across chunks)."""

    def __init__(self, positions: torch.Tensor, *args) -> None:
        super().__init__(*args)
        self.keep = positions
        self.offset: dict[int, int] = {}

    def _hook(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        start = self.offset.get(module.layer_idx, 0)
        self.offset[module.layer_idx] = start + hidden.shape[1]
        chosen = self.keep[(self.keep >= start) & (self.keep < start + hidden.shape[1])] - start
        if len(chosen) == 0:
            return
        cos, sin = kwargs["position_embeddings"]
        kwargs = {**kwargs, "hidden_states": hidden[:, chosen], "position_embeddings": (cos[:, chosen], sin[:, chosen])}
        super()._hook(module, (), kwargs)


@cache
def surprisal() -> torch.Tensor:
    """Per compactable token, -log p(token | everything before it) under the full prefill."""
    ids = torch.tensor([prepared.rendered.ids])
    with torch.no_grad():
        hidden = lm.model.model(input_ids=ids).last_hidden_state[0]
        span = prepared.span
        logits = lm.model.lm_head(hidden[span - 1]).float()
    return -torch.log_softmax(logits, -1).gather(1, ids[0, span].unsqueeze(1))[:, 0]


def hard_token_importance(fraction: float) -> dict[int, torch.Tensor]:
    """Importance over the repeat-pass queries that read or predict the top `fraction` of tokens by surprisal."""
    repeat = repeat_pass_ids(lm.tokenizer, prepared.rendered)
    prompt_length = len(repeat) - len(prepared.span)
    hard = surprisal().topk(max(1, round(fraction * len(prepared.span)))).indices
    positions = torch.cat([prompt_length + hard - 1, prompt_length + hard]).clamp(min=0).unique()
    importance = MaskedImportance(positions, lm.model, context_keys, prepared.span, heads)
    capture_passes(lm, prepared.cache, [QueryPass(ids=repeat, positions=torch.zeros(0, dtype=torch.long))], None,
                   heads, 1 << 20, importance=importance)
    return importance.scores


# name -> (prepared context, the one budgets are allocated from (None: the same), config overrides)
variants = {"am": (prepared, None, {})}
for fraction in (0.02, 0.05, 0.1):
    if wanted(f"surprise-{fraction:g}"):
        hard_prepared = replace(prepared, hint_importance=hard_token_importance(fraction))
        variants[f"surprise-{fraction:g}"] = (hard_prepared, None, {"hint_weight": 1000.0})
        variants[f"surprise-{fraction:g}-w2"] = (hard_prepared, None, {"hint_weight": 2.0})
variants.update({f"am[max_ratio_per_head={cap:g}]": (prepared, None, {"max_ratio_per_head": cap}) for cap in caps})
if wanted("oracle", "ss-", "rs-", "question"):
    question_passes = [QueryPass(ids=backend._prompt_ids(full, p.text) + list(r.token_ids),
                                 positions=torch.arange(len(backend._prompt_ids(full, p.text)) + len(r.token_ids)))
                       for p, r in zip(prompts, references)]
    oracle_queries = ReferenceQueries()
    oracle = replace(prepared, importance=importance_of(question_passes, oracle_queries))
    self_study = plan_passes(lm, prepared.cache, prepared.rendered, ("self-study",), 1, 0, 128, torch.Generator(), 0)
    combined = ReferenceQueries(fit={layer: prepared.pass_queries.fit[layer] + oracle_queries.fit[layer]
                                     for layer in layers},
                                heldout=prepared.pass_queries.heldout)
    studied = replace(prepared, importance=importance_of(self_study))

    def merged(extra: dict[int, torch.Tensor], weight: float) -> pipeline.PreparedContext:
        """The repeat pass's importance, raised to `weight` x `extra`'s where that is larger."""
        return replace(prepared, importance={layer: solvers.prioritise(prepared.importance[layer], extra[layer], weight)
                                             for layer in layers})

    question_only = [QueryPass(ids=backend._prompt_ids(full, p.text), positions=torch.zeros(0, dtype=torch.long))
                     for p in prompts]
    either = merged(studied.importance, 1.0)
    variants.update({"oracle-keys": (oracle, None, {}),
                     "oracle-budgets": (prepared, oracle, {}),
                     "oracle-selection": (oracle, prepared, {}),
                     "oracle-keys+fit": (replace(oracle, pass_queries=combined), None, {}),
                     "ss-keys": (studied, None, {}),
                     "ss-budgets": (prepared, studied, {}),
                     "ss-selection": (studied, prepared, {}),
                     "rs-selection": (either, prepared, {}),
                     "oracle-union": (merged(oracle.importance, 1.0), None, {}),
                     "oracle-priority": (merged(oracle.importance, 2.0), None, {}),
                     "question-priority": (merged(importance_of(question_only), 2.0), None, {})})
if wanted("hints"):
    hinted = hint_passes(lm, prepared.cache, prepared.rendered, tuple(p.text for p in prompts),
                         CompactionConfig.hint_answer_tokens)
    variants["hints"] = (replace(prepared, hint_importance=importance_of(hinted)), None, {"hint_weight": 1000.0})
    variants.update({f"hints-w{weight:g}": (variants["hints"][0], None, {"hint_weight": weight})
                     for weight in (10.0, 100.0)})


allocate_budgets = pipeline.allocate_budgets
budgets_from = None


def allocate_from(lm, prepared, *args):
    """pipeline.allocate_budgets, on `budgets_from`'s importance when a variant sets it."""
    return allocate_budgets(lm, budgets_from or prepared, *args)


pipeline.allocate_budgets = allocate_from


def evaluate(kv) -> dict:
    context = backend._built(kv, 0.0, full.input_tokens, {})
    answers = backend.generate_all(context, [(p.text, p.max_new_tokens) for p in prompts])
    logprobs = [backend.answer_logprob(context, p.text, r) for p, r in zip(prompts, references)]
    return {"correct": sum(is_correct(q, a.text) for q, a in zip(document.questions, answers)),
            "log_ppl": round(-sum(logprobs) / len(logprobs), 3), "answers": [a.text for a in answers]}


print(json.dumps({"method": "full", **evaluate(full.handle)}), flush=True)
for ratio in ratios:
    for name, (context, budgets_from, overrides) in variants.items():
        if only and name not in only:
            continue
        result = compact_prepared(lm, context, CompactionConfig(keep_ratio=ratio, **overrides))
        top = sorted(((b, f"{layers[i]}.{h}") for i, row in enumerate(result.budgets) for h, b in enumerate(row)),
                     reverse=True)[:4]
        print(json.dumps({"method": name, "keep_ratio": ratio, "top_budgets": top, **evaluate(result.compacted)}),
              flush=True)
