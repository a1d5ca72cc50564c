"""Exact-gradient test of the MiniLLM estimator, built only from `minillm.losses`.

Setup: a tabular teacher p and student q_θ (θ = free logits for every prefix) over V = 5 tokens, one
of them EOS, responses of at most 3 tokens (EOS ends a response; at the cap it simply stops). There
are 21 prefixes and 85 responses, so every expectation is a finite sum. The target is the gradient of
the sequence-level reverse KL, KL[q_θ ‖ p] = Σ_y q_θ(y) log(q_θ(y)/p(y)), by autograd. The estimator's
expected gradient is Σ_y p̃(y) ∇S(y), with S(y) the surrogate on response y: single-step term
(`single_step_loss` of the token "rkl" from `chunked_token_terms`) + long-term term
(`ppo_clipped_loss` on `advantages` of `per_token_rewards`), both with reduction="sum".

The maths (at θ = θ_old; r_k = log p(y_k|y_<k) - log q(y_k|y_<k)):

    ∇KL = E_{y~q} Σ_t [ ∇KL(q_θ(·|y_<t) ‖ p(·|y_<t))  -  ∇log q_θ(y_t|y_<t) · Σ_{k>t} r_k ]

(the single-step decomposition: the k = t part of the score-function term is an expectation over
y_t that is computed exactly). With teacher-mixed sampling, y ~ p̃ = Π_t (α·p + (1-α)·q_old), and
W_t = Π_{t'≤t} q(y_t')/p̃(y_t'):

* single-step summand at t depends on y_<t only: weight W_{t-1}. (W_t is unbiased too, because
  E_{y_t~p̃}[w_t] = Σ_v q(v) = 1, but noisier; for the same reason the paper's single-token w_t on
  this term has exactly the expectation of no weight at all.)
* long-term summand ∇log q(y_t)·r_k, k > t, depends on y_≤k: weight W_k, i.e. W_t in the PPO ratio
  times Π_{t<j≤k} w_j on the future reward (per-decision importance sampling,
  `advantages(per_decision_weights=w)`). Putting W_t in the ratio alone — the paper's "exact"
  weight — is NOT unbiased: the future tokens of the return still come from p̃, not from q.

Measured (cosine with the exact gradient of the expected estimator gradient; tables seeded in
`problem()`; asserted to 1e-3 by `test_documented_cosines`):

    estimator                                                               cosine
    on-policy (α = 0), paper returns, γ = 1, no norm, no clip               1.000000  (exact)
    α = 0.2, ratio W_t, single-step W_{t-1}, per-decision returns           1.000000  (exact)
    α = 0.2, ratio W_t, single-step W_{t-1}, plain returns (paper's exact)  0.957
    α = 0.2, single-token w_t in the ratio, single-step W_{t-1}             0.950
    α = 0.2, exact weights except no weight on the single-step term         0.985
    α = 0.2, exact weights, PPO clip ε = 0.2                                0.880
    α = 0, return includes r_t (LMOps): exact + single-step gradient        0.914
    α = 0, γ = 0.95                                                         1.000 (0.99983)
    α = 0, length normalisation (mean future reward)                        0.947
    α = 0, whitening (population statistics)                                0.902
    Eq. 7 as written (α = 0.2, w_t on both terms, length norm, clip 0.2)    0.795
    LMOps as released (α = 0.2, r_t in return, γ = 0.95, n_t, whitening,
      w_t in the ratio, unweighted single-step term, clip 0.2)              0.721

What each released-code deviation does, and why it is accepted:
* r_t in the return (LMOps): the immediate reward is counted by the long-term term AND exactly by
  the single-step term, so the single-step gradient enters twice (checked exactly below). Biased;
  it only re-weights the two parts, both of which point downhill on their own.
* γ = 0.95: ignores distant credit; biased, a classic variance-for-bias trade.
* length normalisation (÷ remaining count): not the gradient of KL[q‖p] at all; it removes the
  objective's pull towards short answers (the paper's ablation: Dolly R-L 24.6 → 14.7 without it).
* whitening: the mean shift is a constant baseline and leaves the expected gradient unchanged
  (checked exactly below; with a finite batch it includes the sample itself, an O(1/N) effect);
  dividing by the std rescales the long-term term against the single-step term, changing direction.
* single-token w_t (Eq. 5): drops the prefix and future factors; biased but bounded by 1/(1-α),
  where the exact prefix product has variance growing exponentially with length.
* no w on the single-step term (LMOps #255): same expectation as the paper's w_t (above), lower
  variance; both miss W_{t-1}.
* clipping: inactive at θ = θ_old on-policy (ρ = 1, checked below), but with α > 0 the ratio starts at
  w ≠ 1, so tokens with w < 1-ε and A < 0 get no gradient from the first step (checked below).
The reduction is a sum per response here; LMOps' token mean over a large batch divides by a constant
(the expected token count), which does not change the direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import product

import pytest
import torch
from torch import Tensor

from minillm.losses import (
    advantages,
    chunked_token_terms,
    per_token_rewards,
    ppo_clipped_loss,
    prefix_importance_weights,
    single_step_loss,
    whiten,
)

VOCAB = 5
EOS = 0
MAX_LEN = 3
DTYPE = torch.float64


@dataclass(frozen=True)
class Problem:
    """Every prefix and response of the tabular problem, as padded [B, MAX_LEN] tensors."""

    student_table: Tensor  # θ: [P, V] logits, one row per prefix
    teacher_table: Tensor  # [P, V]
    response_ids: Tensor  # [B, T], EOS-padded
    mask: Tensor  # [B, T] float, 1 = token of the response
    prefix_ids: Tensor  # [B, T] row of the tables that predicts response_ids[:, t]
    responses: tuple[tuple[int, ...], ...]


@lru_cache(maxsize=1)
def problem() -> Problem:
    prefixes = [()]
    for length in range(1, MAX_LEN):
        prefixes += [p for p in product(range(1, VOCAB), repeat=length)]
    row = {p: i for i, p in enumerate(prefixes)}
    responses: list[tuple[int, ...]] = []

    def extend(prefix: tuple[int, ...]) -> None:
        for token in range(VOCAB):
            response = prefix + (token,)
            if token == EOS or len(response) == MAX_LEN:
                responses.append(response)
            else:
                extend(response)

    extend(())
    ids = torch.full((len(responses), MAX_LEN), EOS)
    mask = torch.zeros(len(responses), MAX_LEN, dtype=DTYPE)
    prefix_ids = torch.zeros(len(responses), MAX_LEN, dtype=torch.long)
    for b, response in enumerate(responses):
        ids[b, : len(response)] = torch.tensor(response)
        mask[b, : len(response)] = 1.0
        for t in range(len(response)):
            prefix_ids[b, t] = row[response[:t]]
    gen = torch.Generator().manual_seed(1234)
    student = torch.randn(len(prefixes), VOCAB, generator=gen, dtype=DTYPE)
    teacher = 2.0 * torch.randn(len(prefixes), VOCAB, generator=gen, dtype=DTYPE)
    return Problem(student, teacher, ids, mask, prefix_ids, tuple(responses))


def sequence_logprobs(table: Tensor, prob: Problem) -> Tensor:
    """log π(y) = Σ_t log π(y_t | y_<t) for every response, from a table of per-prefix logits."""
    token_lp = (
        torch.log_softmax(table[prob.prefix_ids], -1).gather(-1, prob.response_ids.unsqueeze(-1)).squeeze(-1)
    )
    return (token_lp * prob.mask).sum(-1)


def exact_gradient(prob: Problem) -> Tensor:
    """∇_θ KL[q_θ ‖ p] by enumerating every response."""
    theta = prob.student_table.clone().requires_grad_(True)
    log_q = sequence_logprobs(theta, prob)
    log_p = sequence_logprobs(prob.teacher_table, prob)
    kl = (log_q.exp() * (log_q - log_p)).sum()
    return torch.autograd.grad(kl, theta)[0]


@dataclass(frozen=True)
class Estimator:
    """One way of assembling the MiniLLM surrogate from the library pieces."""

    alpha: float = 0.0  # teacher-mix strength of the sampling distribution p̃
    variant: str = "paper"
    gamma: float = 1.0
    length_norm: bool = False
    whiten: bool = False
    whiten_shift_mean: bool = True
    ratio_weight: str = "prefix"  # "prefix" (W_t) | "token" (w_t)
    single_step_weight: str = (
        "prefix_prev"  # "prefix_prev" (W_{t-1}) | "prefix" (W_t) | "token" (w_t) | "none"
    )
    per_decision: bool = True  # weight future rewards by Π w (needed for unbiasedness with α > 0)
    clip_eps: float | None = None
    long_term: bool = True  # False: single-step term only


EXACT = Estimator()
MIXED_EXACT = Estimator(alpha=0.2)
RELEASED = Estimator(
    alpha=0.2,
    variant="lmops",
    gamma=0.95,
    length_norm=True,
    whiten=True,
    ratio_weight="token",
    single_step_weight="none",
    per_decision=False,
    clip_eps=0.2,
)
PAPER_EQ7 = Estimator(
    alpha=0.2,
    length_norm=True,
    ratio_weight="token",
    single_step_weight="token",
    per_decision=False,
    clip_eps=0.2,
)


def sampling_probs(prob: Problem, alpha: float) -> tuple[Tensor, Tensor]:
    """p̃ over the vocabulary at every prefix, [P, V], and p̃(y) of every response, [B]."""
    mix = alpha * torch.softmax(prob.teacher_table, -1) + (1 - alpha) * torch.softmax(prob.student_table, -1)
    token = mix[prob.prefix_ids].gather(-1, prob.response_ids.unsqueeze(-1)).squeeze(-1)
    return mix, torch.where(prob.mask > 0, token, 1.0).prod(-1)


def expected_estimator_gradient(
    prob: Problem, est: Estimator, response_probs: Tensor | None = None
) -> Tensor:
    """Σ_y P(y) ∇S(y) at θ = θ_old, with P = p̃ or the given `response_probs` (Monte-Carlo frequencies).

    Advantages and whitening only use the rollout's constants, so S(y) depends on the sample only
    through y and an average of per-sample gradients equals this frequency-weighted sum.
    """
    theta = prob.student_table.clone().requires_grad_(True)
    valid = prob.mask > 0
    hidden = torch.nn.functional.one_hot(prob.prefix_ids[valid], theta.shape[0]).to(DTYPE)
    terms = chunked_token_terms(
        hidden,
        lambda h: h @ theta,
        targets=prob.response_ids[valid],
        teacher_logits=prob.teacher_table[prob.prefix_ids[valid]],
        divergence="rkl",
        chunk_size=16,
    )

    def to_batch(flat: Tensor) -> Tensor:
        out = torch.zeros(prob.mask.shape, dtype=flat.dtype)
        out[valid] = flat
        return out

    logprobs, divergence, teacher_lp = (
        to_batch(terms.logprobs),
        to_batch(terms.divergence),
        to_batch(terms.teacher_logprobs),
    )
    old = logprobs.detach()
    if est.alpha > 0:
        mix_lp = torch.logaddexp(math.log(est.alpha) + teacher_lp, math.log1p(-est.alpha) + old)
    else:
        mix_lp = old
    token_w = torch.where(valid, (old - mix_lp).exp(), 0.0)
    behaviour = sampling_probs(prob, est.alpha)[1] if response_probs is None else response_probs
    prefix_w = prefix_importance_weights(old, mix_lp, prob.mask)
    weights = {
        "none": None,
        "token": token_w,
        "prefix": prefix_w,
        "prefix_prev": prefix_importance_weights(old, mix_lp, prob.mask, include_current=False),
    }

    rewards = per_token_rewards(teacher_lp, old, prob.mask)
    adv = advantages(
        rewards,
        prob.mask,
        gamma=est.gamma,
        length_norm=est.length_norm,
        variant=est.variant,
        per_decision_weights=token_w if est.per_decision else None,
    )
    if est.whiten:
        # Population statistics: the limit of whitening over an infinitely large batch.
        adv = whiten(adv, prob.mask * behaviour[:, None], shift_mean=est.whiten_shift_mean)
    ratio_w = weights[est.ratio_weight]
    single_w = weights[est.single_step_weight]

    objective = theta.new_zeros(())
    for b in range(len(prob.responses)):
        single = single_step_loss(
            divergence[b], prob.mask[b], None if single_w is None else single_w[b], reduction="sum"
        )
        long_term, _ = ppo_clipped_loss(
            logprobs[b], old[b], adv[b], ratio_w[b], prob.mask[b], clip_eps=est.clip_eps, reduction="sum"
        )
        objective = objective + behaviour[b] * (single + long_term if est.long_term else single)
    return torch.autograd.grad(objective, theta)[0]


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_enumeration_is_complete():
    prob = problem()
    assert len(prob.responses) == 85
    for table in (prob.student_table, prob.teacher_table):
        assert sequence_logprobs(table, prob).exp().sum().item() == pytest.approx(1.0, abs=1e-12)
    assert sampling_probs(prob, 0.2)[1].sum().item() == pytest.approx(1.0, abs=1e-12)


def test_on_policy_estimator_is_exact():
    prob = problem()
    exact, estimate = exact_gradient(prob), expected_estimator_gradient(prob, EXACT)
    assert cosine(estimate, exact) >= 0.9999
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("single_step_weight", ["prefix_prev", "prefix"])
def test_teacher_mixed_estimator_with_exact_weights_is_exact(single_step_weight):
    """W_{t-1} (the documented choice) and W_t on the single-step term are both unbiased."""
    prob = problem()
    est = Estimator(alpha=0.2, single_step_weight=single_step_weight)
    exact, estimate = exact_gradient(prob), expected_estimator_gradient(prob, est)
    assert cosine(estimate, exact) >= 0.9999
    torch.testing.assert_close(estimate, exact, rtol=1e-9, atol=1e-12)


def test_prefix_weight_in_ratio_alone_is_biased():
    """W_t on ∇log q(y_t) does not correct the future tokens that the return depends on."""
    prob = problem()
    est = Estimator(alpha=0.2, per_decision=False)
    assert cosine(expected_estimator_gradient(prob, est), exact_gradient(prob)) < 1 - 1e-6


def test_single_token_approximation_is_biased():
    prob = problem()
    est = Estimator(alpha=0.2, ratio_weight="token", per_decision=False)
    assert cosine(expected_estimator_gradient(prob, est), exact_gradient(prob)) < 1 - 1e-6


def test_single_step_token_weight_has_the_expectation_of_no_weight():
    """E_{y_t~p̃}[q(y_t)/p̃(y_t)] = 1: the paper's w_t on the single-step term only adds variance."""
    prob = problem()
    with_w = expected_estimator_gradient(prob, Estimator(alpha=0.2, single_step_weight="token"))
    without = expected_estimator_gradient(prob, Estimator(alpha=0.2, single_step_weight="none"))
    torch.testing.assert_close(with_w, without, rtol=1e-9, atol=1e-12)


def test_lmops_return_counts_the_single_step_term_twice():
    prob = problem()
    single_only = expected_estimator_gradient(prob, Estimator(long_term=False))
    lmops = expected_estimator_gradient(prob, Estimator(variant="lmops"))
    torch.testing.assert_close(lmops, exact_gradient(prob) + single_only, rtol=1e-9, atol=1e-12)
    assert single_only.norm() > 0.1 * lmops.norm()  # the check is not vacuous


def test_whitening_mean_shift_is_a_baseline():
    prob = problem()
    for alpha in (0.0, 0.2):
        shifted = expected_estimator_gradient(prob, Estimator(alpha=alpha, whiten=True))
        scaled_only = expected_estimator_gradient(
            prob, Estimator(alpha=alpha, whiten=True, whiten_shift_mean=False)
        )
        torch.testing.assert_close(shifted, scaled_only, rtol=1e-9, atol=1e-12)


def test_clipping_is_inactive_on_policy_but_not_under_teacher_mixing():
    prob = problem()
    on_policy = expected_estimator_gradient(prob, Estimator(clip_eps=0.2))
    torch.testing.assert_close(on_policy, exact_gradient(prob), rtol=1e-9, atol=1e-12)
    token = Estimator(alpha=0.2, ratio_weight="token", per_decision=False)
    clipped = expected_estimator_gradient(prob, Estimator(**{**token.__dict__, "clip_eps": 0.2}))
    assert (clipped - expected_estimator_gradient(prob, token)).abs().max() > 1e-4


def test_monte_carlo_estimate_matches_exact_gradient():
    """20k responses sampled token by token from p̃ (α = 0.2), exact weights, surrogate gradients averaged."""
    prob = problem()
    alpha, num_samples = 0.2, 20_000
    mix_table, _ = sampling_probs(prob, alpha)
    row = {
        tuple(r[:t]): int(prob.prefix_ids[b, t]) for b, r in enumerate(prob.responses) for t in range(len(r))
    }
    index = {r: b for b, r in enumerate(prob.responses)}
    gen = torch.Generator().manual_seed(0)
    sampled: list[tuple[int, ...]] = [()] * num_samples
    for _ in range(MAX_LEN):
        open_ = [i for i, s in enumerate(sampled) if not (s and (s[-1] == EOS or len(s) == MAX_LEN))]
        rows = torch.tensor([row[sampled[i]] for i in open_])
        tokens = torch.multinomial(mix_table[rows], 1, generator=gen).squeeze(-1).tolist()
        for i, token in zip(open_, tokens):
            sampled[i] = sampled[i] + (token,)
    counts = torch.bincount(torch.tensor([index[s] for s in sampled]), minlength=len(prob.responses))
    frequencies = counts.to(DTYPE) / num_samples
    estimate = expected_estimator_gradient(prob, MIXED_EXACT, response_probs=frequencies)
    assert cosine(estimate, exact_gradient(prob)) >= 0.95


DOCUMENTED = {
    "paper exact weights": (MIXED_EXACT, 1.0),
    "prefix weight in ratio only": (Estimator(alpha=0.2, per_decision=False), 0.957),
    "single-token w in ratio": (Estimator(alpha=0.2, ratio_weight="token", per_decision=False), 0.950),
    "no weight on single step": (Estimator(alpha=0.2, single_step_weight="none"), 0.985),
    "clip with exact weights": (Estimator(alpha=0.2, clip_eps=0.2), 0.880),
    "lmops return": (Estimator(variant="lmops"), 0.914),
    "gamma 0.95": (Estimator(gamma=0.95), 0.9998),
    "length norm": (Estimator(length_norm=True), 0.947),
    "whitening": (Estimator(whiten=True), 0.902),
    "paper eq 7": (PAPER_EQ7, 0.795),
    "lmops released": (RELEASED, 0.721),
}


@pytest.mark.parametrize("name", DOCUMENTED)
def test_documented_cosines(name):
    """Keeps the table in the module docstring honest."""
    prob = problem()
    est, documented = DOCUMENTED[name]
    assert cosine(expected_estimator_gradient(prob, est), exact_gradient(prob)) == pytest.approx(
        documented, abs=1e-3
    )
