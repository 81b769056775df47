"""The Attention Matching math, as pure functions over tensors batched over the KV heads of one layer.

Shapes: H KV heads, n reference queries per head, T keys in the block being compacted, t kept slots, d head dim.
Heads may keep different numbers of slots (ragged budgets): every function takes an `active` (H, t) mask and treats
inactive columns as absent. All fitting runs in float32/float64 whatever the model dtype.

For a compacted block (C_k, beta, C_v) of an original block (K, V), on every reference query q (scale s):
  mass    sum_j exp(s q.C_k_j + beta_j)            ~= sum_{j<=T} exp(s q.K_j)          (fit beta, NNLS on w = e^beta)
  output  softmax(s q C_k^T + beta) C_v            ~= softmax(s q K^T) V                (fit C_v, least squares)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RIDGE_FLOOR = 1e-12
# w = exp(beta) in [e^-3, e^7]: one kept key may stand in for up to ~1,100 dropped keys' mass (50x needs more
# than the e^3 the reference uses for highest-attention keys; e^7 is its OMP bound).
DEFAULT_BETA_BOUNDS = (math.exp(-3.0), math.exp(7.0))


def attention_logits(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """(H, n, d) x (H, T, d) -> (H, n, T) scaled logits in float32.

    The product runs in the keys' dtype (bf16 on real models, as the reference does: several times faster) and is
    upcast before any exp, softmax or solve."""
    return torch.matmul(queries.to(keys.dtype), keys.transpose(-1, -2)).float() * scaling


def mass_features(logits: torch.Tensor) -> torch.Tensor:
    """Phi = exp(s - rowmax(s)): each query's equation scaled by its own max so every row's largest feature is 1."""
    return torch.exp(logits - logits.amax(dim=-1, keepdim=True))


def attention_outputs(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ values in float32: (H, n, T) x (H, T, d) -> (H, n, d)."""
    return torch.matmul(torch.softmax(logits, dim=-1), values.float())


def key_scores(logits: torch.Tensor, reduction: str, log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of every key from the attention weights it receives, reduced over queries: (H, n, T) -> (H, T).

    reduction: "rms" (AM's default), "mean" (H2O / SnapKV), "max" (KVzip). With `log_normalizer` (H, n), the weights
    are normalised over the whole context instead of this block, which makes scores comparable across heads and
    layers (what a global budget needs).
    """
    if log_normalizer is None:
        weights = torch.softmax(logits, dim=-1)
    else:
        weights = torch.exp(logits - log_normalizer[..., None])
    if reduction == "rms":
        return weights.square().mean(dim=1).sqrt()
    if reduction == "mean":
        return weights.mean(dim=1)
    if reduction == "max":
        return weights.amax(dim=1)
    raise ValueError(f"unknown score reduction {reduction!r}")


def max_attention_weights(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """KVzip's importance of every key, max_i softmax(s q_i K^T)_j over the queries: (H, n, d) x (H, T, d) -> (H, T).

    This runs on every token of a repeat pass against the whole context, the largest cost of a compaction, and it
    decides the global budget, so it stays in the plain float32 softmax on every device. A fused bf16 form that
    subtracted each query's log-mass inside a second matmul (session 6) was 1.8x faster on an H200 but cost AM most
    of its needle log-likelihood at 50x (log-ppl 1.577 -> 2.409 on eight RULER documents, docs/quality.md), so it was
    withdrawn."""
    logits = attention_logits(queries, keys, scaling)
    return key_scores(logits, "max", log_mass(logits))


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Each key's score raised to the best within `kernel` neighbouring keys (odd; 0 or 1: unchanged): (H, T).

    SnapKV's clustering: a kept key brings its neighbours, so a multi-token fact (a 7-digit number is 7 tokens) is
    kept whole or not at all instead of losing the digits the reference queries happened to look at least."""
    if kernel <= 1:
        return scores
    return F.max_pool1d(scores[:, None].float(), kernel, stride=1, padding=kernel // 2)[:, 0].to(scores.dtype)


def prioritise(scores: torch.Tensor, hint_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """Each key's importance raised to `weight` x its importance to the hint passes where that is larger: (H, T).

    Scores are max attention weights in [0, 1], so with weight w every key that a hint pass gives more than 1/w of
    some query's attention outranks every key the repeat pass alone wants, in the global budget and within each head.
    The factor is needed because the repeat pass's copying heads give nearly every key a weight near 1: at weight 1
    the hinted keys were lost among them (0 of 20 needle answers at keep 0.02; weight 2: 3 of 20; the hints' own
    importance alone: 8 of 20, docs/quality.md, session 12). Too large a factor loses the repeat pass's order
    altogether: at 1000 the hints answered no key-value question at keep 0.2, where the repeat pass alone answers 7
    of 16 (session 13)."""
    return torch.maximum(scores, weight * hint_scores.to(scores.dtype))


def select_top(scores: torch.Tensor, budgets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the indices of its budgets[h] highest-scoring keys, padded to max(budgets): (indices, active)."""
    slots = int(budgets.max())
    indices = torch.topk(scores, slots, dim=-1, sorted=True).indices
    active = torch.arange(slots, device=scores.device)[None, :] < budgets[:, None].to(scores.device)
    return indices, active


def gather_keys(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (H, T, ...) gathered along T with indices (H, t)."""
    expanded = indices.reshape(*indices.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return torch.gather(tensor, 1, expanded)


def gather_columns(matrix: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """matrix (H, n, T) -> (H, n, t) columns at indices (H, t)."""
    return torch.gather(matrix, 2, indices[:, None, :].expand(-1, matrix.shape[1], -1))


def _spectral_norm_sq(gram: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Largest eigenvalue of each symmetric PSD (H, t, t) matrix by power iteration: (H,)."""
    vector = torch.ones(gram.shape[0], gram.shape[1], 1, dtype=gram.dtype, device=gram.device)
    for _ in range(iterations):
        vector = gram @ vector
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(RIDGE_FLOOR)
    return (vector.transpose(1, 2) @ gram @ vector).reshape(-1).clamp_min(RIDGE_FLOOR)


# Largest kept-key count per head that batched cholesky_solve is known to handle on CUDA: a sweep on the H200 (torch
# 2.11, CUDA 13; heads 1-48, t up to 4096) passed, while a (2, ~6100, ~6100) float64 block (an 8k-token key-value
# document, one head at its 0.75 cap) failed with "CUDA error: invalid argument". Larger blocks go one head at a time.
BATCHED_SOLVE_MAX_KEYS = 4096


def cholesky_solve_heads(rhs: torch.Tensor, factor: torch.Tensor, one_head_at_a_time: bool) -> torch.Tensor:
    """torch.cholesky_solve over a (H, t, t) batch, optionally as H single-matrix solves (same result)."""
    if not one_head_at_a_time:
        return torch.cholesky_solve(rhs, factor)
    return torch.cat([torch.cholesky_solve(rhs[head:head + 1], factor[head:head + 1]) for head in range(len(factor))])


def pseudo_solve(system: torch.Tensor, rhs: torch.Tensor, one_head_at_a_time: bool) -> torch.Tensor:
    """Minimum-norm least-squares solution of symmetric (H, t, t) systems, by eigendecomposition on their device.

    Directions whose eigenvalue is at most t * eps * the largest one (rounding noise, including the slightly negative
    eigenvalues that float32 rounding in a gram of thousands of correlated columns produces) are dropped, as a
    least-squares solver's rank cut-off would drop them. The CPU lstsq this replaces takes 73.7 s for one 8,192-key
    head on one CPU thread, as eval processes run (docs/quality.md), the likely reason an 8k-token block at keep 0.5
    without the per-head cap never finished on the H200 (the longest attempt ran 570 s)."""
    if one_head_at_a_time:
        return torch.cat([pseudo_solve(system[head:head + 1], rhs[head:head + 1], False)
                          for head in range(len(system))])
    eigenvalues, eigenvectors = torch.linalg.eigh(system)
    cutoff = eigenvalues.amax(dim=-1, keepdim=True).clamp_min(0) * system.shape[-1] * torch.finfo(system.dtype).eps
    inverse = torch.where(eigenvalues > cutoff, 1 / eigenvalues, torch.zeros_like(eigenvalues))
    return eigenvectors @ (inverse[..., None] * (eigenvectors.mT @ rhs))


# A head whose (gram + ridge I) is not positive definite in floating point is first retried with the ridge this many
# times larger, up to RIDGE_RETRIES times (Cholesky is cheap), and only then solved by `pseudo_solve`. On a 4,256-token
# key-value document at keep 0.5 on the CPU every failed head factorised within the retries, with the same held-out
# error as the least-squares fallback (docs/quality.md).
RIDGE_GROWTH = 10.0
RIDGE_RETRIES = 6


def _solve_spd(gram: torch.Tensor, rhs: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    """(gram + ridge I) x = rhs for each head by Cholesky; a head whose factorisation fails (not positive definite
    in floating point) is retried with a growing ridge, and if that fails too solved by `pseudo_solve`, all on the
    same device."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    one_at_a_time = gram.is_cuda and gram.shape[-1] > BATCHED_SOLVE_MAX_KEYS
    solution = torch.zeros_like(rhs)
    pending = torch.arange(gram.shape[0], device=gram.device)
    for attempt in range(RIDGE_RETRIES + 1):
        system = gram[pending] + (ridge[pending] * RIDGE_GROWTH ** attempt)[:, None, None] * eye
        factor, info = torch.linalg.cholesky_ex(system)
        solved = info == 0
        if bool(solved.any()):
            solution[pending[solved]] = cholesky_solve_heads(rhs[pending[solved]], factor[solved], one_at_a_time)
        pending = pending[~solved]
        if pending.numel() == 0:
            return solution
    system = gram[pending] + ridge[pending][:, None, None] * eye
    solution[pending] = pseudo_solve(system, rhs[pending], one_at_a_time)
    return solution


def solve_mass_weights(features: torch.Tensor, target: torch.Tensor, active: torch.Tensor, lower: float,
                       upper: float, iterations: int, prior_strength: float = 0.0) -> torch.Tensor:
    """Box-constrained least squares  min ||M w - y||^2 + lambda ||w - 1||^2  s.t.  lower <= w <= upper  for
    w = exp(beta), with lambda = prior_strength x the mean diagonal of M^T M (0: the paper's plain NNLS).

    features M (H, n, t) are the mass features of the kept keys, target y (H, n) the row sums over *all* original
    keys. Start from the unconstrained least-squares solution, clamp it into the box, then take `iterations`
    projected-gradient steps of size 1/||M||^2. Inactive columns come back as 0. The prior pulls each weight
    towards 1 (beta 0, plain eviction) as far as the reference queries leave it free: on story questions beta fitted
    on repeat-pass queries alone costs AM log-likelihood that no beta at all keeps (docs/quality.md, session 7).
    """
    design = features * active[:, None, :]
    # Products in float32 (the n x t^2 bulk of the work), the t x t solve in float64.
    gram = (design.transpose(1, 2) @ design).double()
    rhs = (design.transpose(1, 2) @ target[..., None]).double()
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
    if prior_strength > 0:
        prior = prior_strength * scale
        gram.diagonal(dim1=1, dim2=2).add_(prior[:, None] * active.double())  # in place: no (H, t, t) temporary
        rhs = rhs + prior[:, None, None] * active[..., None].double()
    clamped_lstsq = _solve_spd(gram, rhs, 1e-9 * scale + RIDGE_FLOOR).clamp(lower, upper)
    # When the kept keys' features are nearly collinear (flat attention) the unconstrained solution swings to huge
    # positive and negative weights and clamping wrecks it; the best *uniform* weight is then far better. Start from
    # whichever of the two fits the mass better.
    ones = active[..., None].double()
    uniform = ((ones.transpose(1, 2) @ rhs) / (ones.transpose(1, 2) @ gram @ ones).clamp_min(RIDGE_FLOOR))
    uniform = (uniform * ones).clamp(lower, upper)

    def objective(w: torch.Tensor) -> torch.Tensor:  # the minimised sum, up to its constant terms
        return (w.transpose(1, 2) @ gram @ w - 2 * w.transpose(1, 2) @ rhs).reshape(-1)

    use_uniform = (objective(uniform) < objective(clamped_lstsq))[:, None, None]
    weights = torch.where(use_uniform, uniform, clamped_lstsq)
    if iterations > 0:
        step = 1.0 / _spectral_norm_sq(gram)
        for _ in range(iterations):
            weights = (weights - step[:, None, None] * (gram @ weights - rhs)).clamp(lower, upper)
    return (weights[..., 0] * active).float()


def compacted_weights(queries: torch.Tensor, c_keys: torch.Tensor, beta: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(s q C_k^T + beta) over the kept slots: (H, n, t). Padding slots (beta = -inf) get weight 0."""
    return torch.softmax(attention_logits(queries, c_keys, scaling) + beta[:, None, :], dim=-1)


def fit_values(weights: torch.Tensor, target_outputs: torch.Tensor, ridge: float,
               prior: torch.Tensor | None = None) -> torch.Tensor:
    """C_v = argmin ||X C_v - Y||^2 + lambda ||C_v - P||^2 with lambda = ridge * sigma_max(X)^2: (H, t, d) float32.

    A small ridge (relative to X's spectral norm, so it is scale free) keeps columns whose weights are nearly zero on
    every reference query from being inflated by least squares. It pulls such a column towards the prior P: the kept
    keys' original values when given (a key the reference queries hardly attend to, a needle say, then keeps the
    value it had instead of losing it to zero), else zero. Padding columns (all-zero weights) come back as P or 0.
    """
    gram = (weights.transpose(1, 2) @ weights).double()
    rhs = (weights.transpose(1, 2) @ target_outputs.float()).double()
    regulariser = ridge * _spectral_norm_sq(gram) + RIDGE_FLOOR
    if prior is not None:
        rhs = rhs + regulariser[:, None, None] * prior.double()
    return _solve_spd(gram, rhs, regulariser).float()


def numerator_error(features: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                    c_values: torch.Tensor) -> torch.Tensor:
    """Per head, || Phi_S diag(w) C_v - Phi V || / || Phi V || over the queries: (H,).

    Phi V (targets, (H, n, d)) is the block's un-normalised attention sum, mass times output, in the row-max-scaled
    units of `mass_features`; Phi_S (features, (H, n, t)) holds the kept keys' columns. This is what the block adds
    to any later query's attention next to other tokens, so it scores a mass error and an output error together.
    """
    approx = (features * weights[:, None, :]) @ c_values.float()
    return (approx - targets).flatten(1).norm(dim=1) / targets.flatten(1).norm(dim=1).clamp_min(RIDGE_FLOOR)


def log_weights(weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """beta = log w on active slots, -inf on padding."""
    beta = torch.log(weights.clamp_min(torch.finfo(torch.float32).tiny))
    return torch.where(active, beta, torch.full_like(beta, float("-inf")))


def omp_select(features: torch.Tensor, target: torch.Tensor, budgets: torch.Tensor, keys_per_step: int,
               refit_interval: int, lower: float, upper: float, drop_below_beta: float = -7.0,
               refinement_rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit on the mass features (the paper's Algorithms 1/2), batched over heads.

    Repeatedly adds, per head, the `keys_per_step` keys most correlated (signed) with the mass residual y - M_S w,
    refitting w (least squares + clamp) every `refit_interval` steps; new keys get the lower bound in between.
    Afterwards keys whose beta ends below `drop_below_beta` are dropped, excluded for good and replaced (at most
    `refinement_rounds` times). Returns (indices (H, t), active (H, t), weights (H, t)).
    """
    heads, _, length = features.shape
    device = features.device
    slots = int(budgets.max())
    budgets = budgets.to(device)
    indices = torch.zeros(heads, slots, dtype=torch.long, device=device)
    counts = torch.zeros(heads, dtype=torch.long, device=device)
    excluded = torch.zeros(heads, length, dtype=torch.bool, device=device)
    weights = torch.zeros(heads, slots, device=device)
    column = torch.arange(slots, device=device)
    head_index = torch.arange(heads, device=device)[:, None]
    for _ in range(refinement_rounds + 1):
        step = 0
        while bool((counts < budgets).any()):
            active = column[None, :] < counts[:, None]
            residual = target - (gather_columns(features, indices) * (weights * active)[:, None, :]).sum(-1)
            correlation = torch.einsum("hnt,hn->ht", features, residual)
            taken = excluded.clone()
            taken[head_index.expand(-1, slots)[active], indices[active]] = True
            correlation = correlation.masked_fill(taken, float("-inf"))
            new_keys = torch.topk(correlation, keys_per_step, dim=-1).indices
            take = (budgets - counts).clamp(min=0, max=keys_per_step)
            offsets = torch.arange(keys_per_step, device=device)[None, :]
            valid = offsets < take[:, None]
            destination = (counts[:, None] + offsets).clamp(max=slots - 1)
            indices[head_index.expand(-1, keys_per_step)[valid], destination[valid]] = new_keys[valid]
            weights[head_index.expand(-1, keys_per_step)[valid], destination[valid]] = lower
            counts = counts + take
            active = column[None, :] < counts[:, None]
            if step % refit_interval == 0:
                weights = solve_mass_weights(gather_columns(features, indices), target, active, lower, upper, 0)
            step += 1
        active = column[None, :] < counts[:, None]
        weights = solve_mass_weights(gather_columns(features, indices), target, active, lower, upper, 0)
        dropped = active & (torch.log(weights.clamp_min(RIDGE_FLOOR)) < drop_below_beta)
        if not bool(dropped.any()):
            break
        excluded[head_index.expand(-1, slots)[dropped], indices[dropped]] = True
        # Keep the surviving keys in front, then let the loop refill the freed slots.
        order = torch.argsort((~active | dropped).to(torch.int8), dim=1, stable=True)
        indices, weights = torch.gather(indices, 1, order), torch.gather(weights, 1, order)
        counts = counts - dropped.sum(dim=1)
        available = (~excluded).sum(dim=1)
        budgets = torch.minimum(budgets, available)
    active = column[None, :] < counts[:, None]
    return indices, active, weights * active


def log_mass(logits: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(logits): (H, n, T) -> (H, n)."""
    return torch.logsumexp(logits, dim=-1)

