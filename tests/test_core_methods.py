"""The compaction math and its orchestration: AM beats eviction on held-out queries, batching and chunking are
exact re-arrangements, budgets behave, bad inputs get clear errors."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.core_helpers import DOCUMENT, tiny
from workers.compaction import budgets, solvers
from workers.compaction.context import ContextError
from workers.compaction.generation import stream_generate
from workers.compaction.methods import (METHOD_NAMES, FitSettings, HeadBlock, fit_block, keep_original,
                                       keep_whole_heads, make_method)
from workers.compaction.pipeline import (CompactionConfig, CompactionConfigError, compact_context, compact_prepared,
                                         full_context, prepare_context, probe_logprob)
from workers.compaction.timing import PhaseTimer
from workers.models import loading
from workers.models.loading import UnsupportedModelError, load_model

EVICTION = ("truncate", "h2o", "snapkv", "kvzip")


@pytest.fixture(scope="module")
def prepared_llama():
    lm = tiny("llama")
    return lm, prepare_context(lm, DOCUMENT, CompactionConfig(max_queries_per_head=1024))


def run(prepared_llama, method: str, **overrides):
    lm, prepared = prepared_llama
    config = CompactionConfig(method=method, keep_ratio=0.2, max_queries_per_head=1024, **overrides)
    return compact_prepared(lm, prepared, config)


def test_am_beats_every_eviction_baseline_per_head_on_heldout_queries(prepared_llama):
    am = run(prepared_llama, "am", budget="uniform")
    for baseline in EVICTION:
        other = run(prepared_llama, baseline, budget="uniform")
        assert other.budgets == am.budgets  # the same slots per head: a fair comparison
        for am_layer, other_layer in zip(am.heldout_head_errors, other.heldout_head_errors):
            for am_error, other_error in zip(am_layer, other_layer):
                assert am_error < other_error, (baseline, am.heldout_head_errors, other.heldout_head_errors)


def test_beta_lowers_log_mass_error_and_value_refit_lowers_output_error(prepared_llama):
    am = run(prepared_llama, "am")
    no_beta = run(prepared_llama, "am-no-beta")
    no_values = run(prepared_llama, "am-no-values")
    assert am.heldout_log_mass_error < no_beta.heldout_log_mass_error
    assert am.heldout_rel_error < no_values.heldout_rel_error


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_compacts_to_its_budget(prepared_llama, method):
    result = run(prepared_llama, method)
    _, prepared = prepared_llama
    document_slots = sum(map(sum, result.budgets))
    heads = len(result.budgets) * len(result.budgets[0])
    assert document_slots == round(0.2 * prepared.span.numel() * heads)
    verbatim = len(prepared.rendered.ids) - prepared.span.numel()
    assert result.retained_slots == document_slots + verbatim * heads
    assert result.compaction_ratio > 3
    assert set(result.phase_seconds) >= {"prefill", "queries", "budgets", "key_selection"}


def test_global_budget_is_ragged_and_respects_floor_and_cap(prepared_llama):
    result = run(prepared_llama, "am", max_ratio_per_head=0.3)
    flat = [b for layer in result.budgets for b in layer]
    _, prepared = prepared_llama
    floor, cap = budgets.per_head_limits(prepared.span.numel(), 0.2, 0.3, CompactionConfig().min_slots_per_head)
    assert len(set(flat)) > 1
    assert min(flat) >= floor and max(flat) <= cap


def test_uniform_floor_trades_the_global_budget_for_the_uniform_one(prepared_llama):
    _, prepared = prepared_llama
    share = int(0.2 * prepared.span.numel())
    spreads = {}
    for uniform_floor in (0.0, 0.9, 1.0):
        flat = [b for layer in run(prepared_llama, "am", uniform_floor=uniform_floor).budgets for b in layer]
        assert min(flat) >= int(uniform_floor * share)
        spreads[uniform_floor] = max(flat) - min(flat)
    # The pure global budget is the most ragged; a full uniform floor leaves only the rounding remainder to hand out.
    assert spreads[0.0] > spreads[0.9] > spreads[1.0]


def test_head_weights_move_the_global_budget_towards_the_weighted_head():
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 50, generator=generator)
    plain = budgets.global_budgets(scores, 60, 4, 50)
    assert torch.equal(budgets.global_budgets(scores, 60, 4, 50, torch.ones(4)), plain)
    weighted = budgets.global_budgets(scores, 60, 4, 50, torch.tensor([8.0, 1.0, 1.0, 1.0]))
    assert int(weighted.sum()) == 60 and weighted[0] > plain[0] and (weighted[1:] <= plain[1:]).all()


def test_one_chunk_equals_unchunked_and_chunks_bound_the_solve(prepared_llama):
    _, prepared = prepared_llama
    whole = run(prepared_llama, "am")
    one_chunk = run(prepared_llama, "am", chunk_tokens=prepared.span.numel())
    for a, b in zip(whole.compacted.layers, one_chunk.compacted.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.beta, b.beta)
    chunked = run(prepared_llama, "am", chunk_tokens=100)
    assert sum(map(sum, chunked.budgets)) == sum(map(sum, whole.budgets))
    assert chunked.heldout_rel_error < 1.0


def random_block(seed: int, heads: int, length: int, dim: int, queries: int) -> HeadBlock:
    """A HeadBlock of random keys, values, reference queries and context scores."""
    generator = torch.Generator().manual_seed(seed)
    return HeadBlock(keys=torch.randn(heads, length, dim, generator=generator),
                     values=torch.randn(heads, length, dim, generator=generator),
                     queries=torch.randn(heads, queries, dim, generator=generator), scaling=dim ** -0.5,
                     positions=torch.arange(length), context_scores=torch.rand(heads, length, generator=generator))


@pytest.mark.parametrize("method", ["am", "am-omp-fast", "h2o", "kvzip"])
def test_batched_over_heads_equals_one_head_at_a_time(method):
    heads = 3
    block = random_block(0, heads, length=60, dim=16, queries=200)
    head_budgets = torch.tensor([5, 12, 9])
    chosen = make_method(method)
    batched = chosen.fit(block, head_budgets, PhaseTimer())
    for h in range(heads):
        single_block = HeadBlock(block.keys[h:h + 1], block.values[h:h + 1], block.queries[h:h + 1], block.scaling,
                                 block.positions, block.context_scores[h:h + 1])
        single = chosen.fit(single_block, head_budgets[h:h + 1], PhaseTimer())
        kept = int(head_budgets[h])
        assert torch.equal(batched.indices[h, :kept], single.indices[0, :kept])
        assert torch.allclose(batched.beta[h, :kept], single.beta[0, :kept], atol=1e-4)
        assert torch.allclose(batched.values[h, :kept], single.values[0, :kept], atol=1e-3)
        assert not batched.active[h, kept:].any()


def test_one_head_at_a_time_cholesky_solve_equals_the_batched_one():
    """The CUDA path for large blocks (solvers.BATCHED_SOLVE_MAX_KEYS) is the same solve, head by head."""
    features = torch.rand(3, 40, 24, dtype=torch.float64)
    factor = torch.linalg.cholesky(features.mT @ features + 1e-3 * torch.eye(24, dtype=torch.float64))
    rhs = torch.rand(3, 24, 1, dtype=torch.float64)
    batched = solvers.cholesky_solve_heads(rhs, factor, one_head_at_a_time=False)
    assert torch.allclose(solvers.cholesky_solve_heads(rhs, factor, one_head_at_a_time=True), batched)
    assert torch.allclose(factor @ factor.mT @ batched, rhs)


def test_a_head_that_is_not_positive_definite_is_retried_with_a_larger_ridge_then_pseudo_solved():
    """Head 0 is positive definite (Cholesky). Head 1's smallest eigenvalue is -2e-3: with a ridge of 1e-4 it
    factorises only at the second retry (1e-2). Head 2 has a zero and a slightly negative eigenvalue, as rounding
    leaves in a large gram, and no ridge: no retry helps, and it gets the pseudo-inverse over its positive
    directions, the minimum-norm least-squares solution."""
    basis = torch.linalg.qr(torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))).Q

    def with_spectrum(*values):
        return basis @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ basis.mT

    gram = torch.stack([2 * torch.eye(4, dtype=torch.float64), with_spectrum(3, 2, 1, -2e-3),
                        with_spectrum(3, 2, 0, -1e-9)])
    rhs = torch.rand(3, 4, 1, dtype=torch.float64)
    solution = solvers._solve_spd(gram, rhs, torch.tensor([0.0, 1e-4, 0.0], dtype=torch.float64))
    assert torch.allclose(solution[0], rhs[0] / 2)
    retried = 1e-4 * solvers.RIDGE_GROWTH ** 2
    assert torch.allclose(solution[1], torch.linalg.solve(gram[1] + retried * torch.eye(4, dtype=torch.float64),
                                                          rhs[1]))
    assert torch.allclose(solution[2], with_spectrum(1 / 3, 1 / 2, 0, 0) @ rhs[2])
    assert torch.allclose(solvers.pseudo_solve(gram, rhs, one_head_at_a_time=True),
                          solvers.pseudo_solve(gram, rhs, one_head_at_a_time=False))


@pytest.mark.parametrize("method", ["am", "am-omp-fast", "kvzip"])
def test_heads_that_keep_their_whole_block_are_kept_exactly_and_the_rest_fitted_as_before(method):
    length = 40
    block = random_block(2, heads=3, length=length, dim=16, queries=120)
    head_budgets = torch.tensor([6, length, 11])
    chosen = make_method(method)
    fit = fit_block(chosen, block, head_budgets, PhaseTimer())
    reference = keep_whole_heads(block, chosen.fit(block, head_budgets, PhaseTimer()), head_budgets)
    assert fit.active.sum(dim=1).tolist() == head_budgets.tolist()
    assert torch.equal(fit.keys[1, :length], block.keys[1]) and torch.equal(fit.values[1, :length], block.values[1])
    assert torch.equal(fit.beta[1, :length], torch.zeros(length))
    for head in (0, 2):
        kept = int(head_budgets[head])
        assert torch.equal(fit.indices[head, :kept], reference.indices[head, :kept])
        assert torch.allclose(fit.beta[head, :kept], reference.beta[head, :kept], atol=1e-4)
        assert torch.allclose(fit.values[head, :kept], reference.values[head, :kept], atol=1e-3)


def test_fit_guard_keeps_per_head_whichever_of_fit_and_eviction_reproduces_the_attention_sum_better():
    heads, length = 4, 48
    block = random_block(3, heads, length, dim=16, queries=150)
    head_budgets = torch.tensor([3, 12, 40, 46])
    plain = make_method("am").fit(block, head_budgets, PhaseTimer())
    guarded = make_method("am", FitSettings(fit_guard=True)).fit(block, head_budgets, PhaseTimer())
    logits = solvers.attention_logits(block.queries, block.keys, block.scaling)
    features = solvers.mass_features(logits)
    targets = features @ block.values

    def error(fit):
        kept = solvers.gather_columns(features, fit.indices) * fit.active[:, None, :]
        return solvers.numerator_error(kept, targets, torch.exp(fit.beta), fit.values)

    evicted = keep_original(block, plain.indices, plain.active)
    assert torch.equal(guarded.indices, plain.indices)
    assert torch.allclose(error(guarded), torch.minimum(error(plain), error(evicted)))
    everything = torch.arange(length).expand(heads, -1)
    assert torch.allclose(error(keep_original(block, everything, torch.ones(heads, length, dtype=torch.bool))),
                          torch.zeros(heads), atol=1e-6)


def test_nnls_respects_bounds_and_recovers_exact_weights():
    generator = torch.Generator().manual_seed(1)
    features = torch.rand(2, 300, 6, generator=generator)
    true_weights = torch.tensor([[0.5, 1.0, 2.0, 3.0, 0.2, 1.5], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    target = (features * true_weights[:, None, :]).sum(-1)
    active = torch.ones(2, 6, dtype=torch.bool)
    fitted = solvers.solve_mass_weights(features, target, active, 1e-3, 10.0, iterations=2)
    assert torch.allclose(fitted, true_weights, atol=1e-3)
    clamped = solvers.solve_mass_weights(features, target, active, 0.9, 1.1, iterations=2)
    assert clamped.min() >= 0.9 and clamped.max() <= 1.1


def test_beta_prior_pulls_the_mass_weights_towards_one_by_its_strength():
    generator = torch.Generator().manual_seed(2)
    features = torch.rand(1, 300, 5, generator=generator)
    true_weights = torch.tensor([[4.0, 0.5, 2.0, 3.0, 0.0]])
    target = (features * true_weights[:, None, :]).sum(-1)
    active = torch.tensor([[True, True, True, True, False]])  # the padding slot stays 0 whatever the prior

    def fit(strength: float) -> torch.Tensor:
        return solvers.solve_mass_weights(features, target, active, 1e-3, 100.0, iterations=2,
                                          prior_strength=strength)

    free, mild, strong = fit(0.0), fit(1.0), fit(1e4)
    assert torch.allclose(free, true_weights, atol=1e-3)
    distance = [float((w - active.float()).abs().sum()) for w in (free, mild, strong)]
    assert distance[0] > distance[1] > distance[2]
    assert torch.allclose(strong, active.float(), atol=1e-2)
    assert torch.all(torch.stack([free, mild, strong])[..., 4] == 0)


def test_beta_prior_choices_keep_the_fit_that_best_predicts_the_full_caches_probe_answers(prepared_llama):
    """Each candidate prior is fitted; the kept cache is exactly that prior's own fit, chosen by the probe score."""
    lm, prepared = prepared_llama
    chosen = run(prepared_llama, "am", beta_prior_choices=("0", "1e4")).compacted
    scores = chosen.meta["probe_logprobs"]
    assert set(scores) == {"0", "10000"} and prepared.probes  # text overrides are read as numbers
    best = max(scores, key=scores.get)
    assert chosen.meta["params"]["beta_prior"] == float(best)
    for prior, score in scores.items():
        alone = run(prepared_llama, "am", beta_prior=float(prior)).compacted
        assert "probe_logprobs" not in alone.meta
        assert probe_logprob(lm, alone, prepared.probes) == pytest.approx(score, abs=1e-5)
        same = all(torch.equal(a.beta, b.beta) and torch.equal(a.values, b.values)
                   for a, b in zip(chosen.layers, alone.layers))
        assert same == (prior == best)  # the two priors give different betas, so only the chosen one matches


def test_probe_answers_are_the_full_caches_greedy_answers(prepared_llama):
    lm, prepared = prepared_llama
    probes = prepared.probe_answers(lm, 128)
    assert probes and all(prompt and answer for prompt, answer in probes)
    prompt, answer = probes[0]
    assert list(stream_generate(lm, full_context(lm, DOCUMENT), prompt, len(answer))) == answer


def test_value_fit_shrinks_unattended_keys_towards_their_original_values():
    """A kept key no reference query attends to (a needle, say) keeps its original value under the default prior;
    plain ridge would zero it. Attended keys are fitted to the targets either way."""
    generator = torch.Generator().manual_seed(2)
    weights = torch.softmax(torch.randn(1, 200, 4, generator=generator), dim=-1)
    weights = torch.cat([weights, torch.zeros(1, 200, 1)], dim=-1)  # column 4: never attended
    true_values = torch.randn(1, 5, 8, generator=generator)
    targets = weights @ true_values
    original = true_values + 0.1 * torch.randn(1, 5, 8, generator=generator)
    with_prior = solvers.fit_values(weights, targets, 1e-3, prior=original)
    plain = solvers.fit_values(weights, targets, 1e-3)
    assert torch.allclose(with_prior[0, 4], original[0, 4], atol=1e-5)
    assert plain[0, 4].abs().max() < 1e-5
    for fitted in (with_prior, plain):
        assert torch.allclose(weights @ fitted, targets, atol=2e-2)


def test_profile_budgets_follow_proportions_within_limits():
    proportions = torch.tensor([0.7, 0.2, 0.05, 0.05])
    allocated = budgets.profile_budgets(proportions, total=100, floor=4, cap=50)
    assert int(allocated.sum()) == 100
    assert allocated.max() <= 50 and allocated.min() >= 4
    assert allocated[0] == 50 and allocated[1] > allocated[2]


@pytest.mark.parametrize("config, message", [
    (CompactionConfig(keep_ratio=0.0), "keep_ratio"),
    (CompactionConfig(keep_ratio=1.5), "keep_ratio"),
    (CompactionConfig(target_tokens=0), "target_tokens"),
    (CompactionConfig(target_tokens=10 ** 6), "exceeds"),
    (CompactionConfig(keep_ratio=1e-6), "keeps no token"),
    (CompactionConfig(method="magic"), "unknown method"),
    (CompactionConfig(query_sources=("telepathy",)), "query_sources"),
    (CompactionConfig(keep_ratio=0.1, target_tokens=5), "not both"),
    (CompactionConfig(keep_ratio=0.1, max_ratio_per_head=0), "max_ratio_per_head"),
    (CompactionConfig(keep_ratio=0.1, uniform_floor=1.5), "uniform_floor"),
    (CompactionConfig(keep_ratio=0.1, profile_prior=-1.0), "profile_prior"),
    (CompactionConfig(keep_ratio=0.1, beta_prior_choices=("0", "-1")), "beta_prior_choices"),
])
def test_bad_budgets_and_options_get_clear_errors(config, message):
    with pytest.raises(CompactionConfigError, match=message):
        compact_context(tiny("llama"), DOCUMENT, config)


@pytest.mark.parametrize("context", ["", "   ", [], [{"role": "wizard", "content": "x"}], [{"role": "user"}]])
def test_empty_or_malformed_documents_get_clear_errors(context):
    with pytest.raises(ContextError):
        compact_context(tiny("llama"), context, CompactionConfig())


def test_unsupported_architecture_and_missing_directory_are_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("flags, expected", [("fpu avx2 avx512f", torch.float32),
                                             ("fpu avx2 avx512f avx512_bf16", torch.bfloat16),
                                             ("fpu amx_tile amx_bf16", torch.bfloat16)])
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert loading.cpu_has_native_bf16(cpuinfo) == (expected == torch.bfloat16)
    reads_this_file = functools.partial(loading.cpu_has_native_bf16, cpuinfo)
    monkeypatch.setattr(loading, "cpu_has_native_bf16", reads_this_file)
    assert loading.resolve_dtype("auto", torch.device("cpu")) == expected
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert loading.resolve_dtype("float32", torch.device("cuda")) == torch.float32


def test_messages_and_tool_outputs_compact_only_their_content():
    lm = tiny("qwen2")
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Summarise the tool output."},
                {"role": "tool", "content": DOCUMENT}]
    result = compact_context(lm, messages, CompactionConfig(keep_ratio=0.2))
    assert result.compacted.meta["roles"] == ["system", "user", "tool"]
    assert result.compactable_tokens == sum(len(lm.tokenizer(m["content"])["input_ids"]) for m in messages)


def test_pool_scores_keeps_a_top_key_neighbours_and_bad_kernels_are_config_errors():
    scores = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 1.0]])
    assert solvers.pool_scores(scores, 3).tolist() == [[0.0, 5.0, 5.0, 5.0, 1.0, 1.0]]
    assert torch.equal(solvers.pool_scores(scores, 0), scores)
    for kernel in (-1, 4):
        with pytest.raises(CompactionConfigError):
            CompactionConfig(score_pool=kernel).validate()


def test_prioritise_puts_hinted_keys_first_and_keeps_the_rest_in_order():
    scores = torch.tensor([[0.9, 0.95, 0.2, 0.8]])
    hint = torch.tensor([[0.0, 0.0, 0.6, 0.001]])
    raised = solvers.prioritise(scores, hint, 1000.0)
    assert raised.argsort(descending=True).tolist() == [[2, 3, 1, 0]]  # hinted first, then the repeat pass's order
    assert torch.equal(solvers.prioritise(scores, hint, 1.0), torch.tensor([[0.9, 0.95, 0.6, 0.8]]))


def test_hints_are_answered_from_the_full_cache_and_steer_the_kept_keys():
    """A hint's pass scores keys; the compaction with hints keeps other keys than without, and only through the
    scores: the prepared reference queries (what the fit uses) are the same."""
    lm = tiny("llama")
    config = CompactionConfig(max_queries_per_head=1024, hints=("Which colour is mentioned?",), hint_answer_tokens=8)
    hinted = prepare_context(lm, DOCUMENT, config)
    plain = prepare_context(lm, DOCUMENT, CompactionConfig(max_queries_per_head=1024))
    assert "hints" in hinted.seconds and set(hinted.hint_importance) == set(hinted.importance) and not plain.hint_importance
    layer = hinted.compactable_layers[0]
    assert torch.equal(hinted.fit_queries(layer), plain.fit_queries(layer))
    assert hinted.hint_importance[layer].shape == hinted.importance[layer].shape
    kept = [compact_prepared(lm, prepared, CompactionConfig(keep_ratio=0.2, max_queries_per_head=1024)).budgets
            for prepared in (hinted, plain)]
    assert kept[0] != kept[1]
    for bad in ({"hints": ("",)}, {"hint_weight": 0.5}, {"hint_answer_tokens": 0}):
        with pytest.raises(CompactionConfigError):
            CompactionConfig(**bad).validate()

