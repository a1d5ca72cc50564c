"""The policy-gradient pieces of MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543, "the paper"; the
released code is microsoft/LMOps `minillm/`, "LMOps"): per-token rewards, returns/advantages,
whitening, importance weights, the PPO clipped surrogate of the long-term term, the single-step
term and the pre-training loss L_PT, with the masked token reductions they use.

Per-token tensors are [B, T] (or flattened [N]) and come with an explicit `mask` (1 = a real response
token, 0 = padding); rewards, advantages and weights are constants (detached).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from .divergences import compute_dtype

Reduction = Literal["mean", "sum"]


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ mask·values / Σ mask (0 where the mask is empty); masked entries may hold NaN/inf."""
    m = mask.to(compute_dtype(values.dtype))
    clean = torch.where(mask > 0, values, 0.0)
    if dim is None:
        total, count = (clean * m).sum(), m.sum()
    else:
        total, count = (clean * m).sum(dim), m.sum(dim)
    return torch.where(count > 0, total / torch.where(count > 0, count, 1.0), 0.0)


def _reduce(per_token: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """Token mean over the whole batch as LMOps does ("mean"), or the plain sum ("sum")."""
    if reduction == "mean":
        return masked_mean(per_token, mask)
    if reduction == "sum":
        return (torch.where(mask > 0, per_token, 0.0) * mask.to(per_token.dtype)).sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def per_token_rewards(teacher_logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, *,
                      reward_scaling: float = 1.0, reward_clip: float | None = None) -> Tensor:
    """r_t = (log p(y_t|y_<t,x) - log q_old(y_t|y_<t,x)) / reward_scaling, clipped to ±reward_clip.

    Paper Eq. 2 (r_t with q_θ frozen at the rollout policy); LMOps forms them in `minillm/sampler.py`,
    scales by 1/0.5 and clips at ±100, both neutralised by whitening. Rewards are constants (detached)
    and exactly 0 where mask = 0.
    """
    rewards = (teacher_logprobs.detach() - old_logprobs.detach()).to(compute_dtype(old_logprobs.dtype))
    rewards = rewards / reward_scaling
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    return torch.where(mask > 0, rewards, 0.0)


def advantages(
    rewards: Tensor,
    mask: Tensor,
    *,
    gamma: float = 0.95,
    length_norm: bool = True,
    variant: Literal["lmops", "paper"] = "lmops",
    per_decision_weights: Tensor | None = None,
) -> Tensor:
    """Long-term advantages [B, T] from per-token rewards by a reverse scan (no critic, no whitening).

    variant="lmops" (released code, LMOps `losses.py: Loss._get_advantages_and_returns`):
        A_t = G_t = Σ_{k≥t} γ^{k-t} r_k, the current reward included; with `length_norm` divided by
        n_t = number of valid tokens from t to the end (inclusive).
    variant="paper" (Eq. 6/7):
        A_t = R_{t+1} = Σ_{k>t} γ^{k-t-1} r_k, excluding r_t (the single-step term accounts for it
        exactly); with `length_norm` divided by the number of valid tokens strictly after t, with
        0/0 := 0 at the last token. The paper writes the normaliser as T-t-1, but its sum has T-t
        terms (and T-t-1 is 0 for a one-token future), so we read Eq. 6 as the mean future reward.

    Positions are discounted by their index; rewards at masked positions count as 0 and outputs
    there are 0.

    per_decision_weights: the single-token ratios w_k = q_old(y_k)/p̃(y_k) of the rollout (NOT
    prefix products). When given, every future reward r_k in the return from t is multiplied by
    Π_{t<j≤k} w_j (per-decision importance sampling, Precup et al. 2000). Under teacher-mixed
    sampling the future tokens y_{>t} are drawn from p̃, not q, so the return is only an unbiased
    estimate of its on-policy value with this correction; paired with the exact prefix weight
    W_t = Π_{t'≤t} w_t' in the PPO ratio (`prefix_importance_weights`), the long-term term with
    variant="paper", γ = 1 and no length norm is then an unbiased estimator of the paper's gradient
    (tests/test_minillm_gradient.py checks this exactly). W_t in the ratio without this correction is
    biased. None (paper and LMOps) leaves future rewards unweighted.
    """
    if variant not in ("lmops", "paper"):
        raise ValueError(f"variant must be 'lmops' or 'paper', got {variant!r}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    valid = mask > 0
    r = torch.where(valid, rewards.detach(), 0.0).to(compute_dtype(rewards.dtype))
    w = None
    if per_decision_weights is not None:
        w = torch.where(valid, per_decision_weights.detach().to(r.dtype), 1.0)
    # future[:, t] = Σ_{k>t} γ^{k-t-1} (W_k / W_t) r_k, via H_t = w_t (r_t + γ H_{t+1}).
    future = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        future[..., t] = running
        running = r[..., t] + gamma * running
        if w is not None:
            running = w[..., t] * running
    counts_from_t = valid.to(r.dtype).flip(-1).cumsum(-1).flip(-1)
    if variant == "lmops":
        values = r + gamma * future
        counts = counts_from_t
    else:
        values = future
        counts = counts_from_t - valid.to(r.dtype)
    if length_norm:
        values = values / counts.clamp(min=1.0)
    return torch.where(valid, values, 0.0)


def whiten(
    values: Tensor,
    mask: Tensor,
    *,
    all_reduce: Callable[[Tensor], Tensor | None] | None = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (population) variance over the VALID tokens only.

    The baseline of the long-term term (LMOps whitens its advantages in
    `Loss._get_advantages_and_returns`). Deliberate departure from LMOps, whose statistics include the
    padding of the fixed 256-long buffer, so that they depended on how much padding a batch happened to
    carry.
    The mean shift acts as a constant baseline; the division rescales the long-term term relative
    to the single-step term (see tests/test_minillm_gradient.py).

    all_reduce: optional callable that sums a tensor across processes (for global statistics over
    all ranks). It is called once on the fp64 vector [Σx, Σx², n]; it may return the summed tensor
    or reduce in place and return None, so `torch.distributed.all_reduce` can be passed as is.
    Summing in fp64 keeps the one-pass variance free of cancellation.
    A fractional mask weights each token's share of the statistics. shift_mean=False adds the mean
    back (scale only). Outputs are 0 where mask = 0.
    """
    valid = mask > 0
    m = mask.to(torch.float64)
    x = torch.where(valid, values, 0.0).to(torch.float64)
    stats = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    if all_reduce is not None:
        reduced = all_reduce(stats)
        stats = stats if reduced is None else reduced
    total, total_sq, count = stats.unbind()
    count = torch.where(count > 0, count, 1.0)
    mean = total / count
    var = (total_sq / count - mean * mean).clamp(min=0.0)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(valid, whitened.to(compute_dtype(values.dtype)), 0.0)


def prefix_importance_weights(
    old_logprobs: Tensor, mix_logprobs: Tensor, mask: Tensor, *, include_current: bool = True
) -> Tensor:
    """Exact importance weights of the prefix, W_t = Π_{t'≤t} q_old(y_t')/p̃(y_t') (log-space cumsum).

    Teacher-mixed sampling (paper Eq. 4-5): the exact correction from p̃ to q for anything that depends
    on y_≤t, of which Eq. 5 keeps only the last factor w_t = q_old(y_t)/p̃(y_t) (lower variance, biased).
    Use W_t in the PPO ratio (with `advantages(per_decision_weights=w)` for the future rewards).

    include_current=False gives W_{t-1} = Π_{t'<t} (W_0 = 1): the weight of the prefix that the
    token-level distribution at t conditions on. That is the right weight for the single-step term,
    whose summand at t is an exact expectation over y_t and so depends on y_<t only (W_t would also
    be unbiased there, since E_{y_t~p̃}[w_t] = 1, but adds variance).

    Each factor is ≤ 1/(1-α), so W_t ≤ (1-α)^-t. Outputs are 0 where mask = 0.
    """
    valid = mask > 0
    log_w = torch.where(valid, old_logprobs.detach() - mix_logprobs.detach(), 0.0)
    log_w = log_w.to(compute_dtype(log_w.dtype))
    cumulative = log_w.cumsum(-1)
    if not include_current:
        cumulative = cumulative - log_w
    return torch.where(valid, cumulative.exp(), 0.0)


def ppo_clipped_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    importance_weights: Tensor,
    mask: Tensor,
    *,
    clip_eps: float | None = 0.2,
    reduction: Reduction = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Long-term term of MiniLLM (paper Eq. 7 second part, Algorithm 1 clipping; LMOps `Loss._pg_loss`).

        ρ_t  = exp(log q_θ(y_t) - log q_old(y_t)) · w_t    (= q_θ/p̃ when w_t = q_old/p̃)
        loss = Σ_t m_t · max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)) / Σ_t m_t

    The importance weight multiplies the ratio before clipping, as in LMOps (maintainers, LMOps
    #264/#265): with α > 0 a teacher-sampled token with w < 1-ε is clipped already at θ = θ_old and
    gets no gradient when A < 0. clip_eps=None disables clipping (then ∇loss = -A·w·∇log q_θ at
    θ = θ_old). `reduction="sum"` sums over tokens instead of the LMOps token mean.

    Returns the loss and detached statistics over valid tokens: clip_fraction (share of tokens where
    the clipped branch is active), ratio_mean / ratio_max (of ρ, w included) and approx_kl
    (k3 estimate of KL(q_old ‖ q_θ) from the policy ratio alone).
    """
    valid = mask > 0
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), 0.0)
    log_ratio = log_ratio.to(compute_dtype(log_ratio.dtype))
    weights = torch.where(valid, importance_weights.detach(), 0.0).to(log_ratio.dtype)
    adv = torch.where(valid, advantages.detach(), 0.0).to(log_ratio.dtype)
    ratio = log_ratio.exp() * weights
    unclipped = -adv * ratio
    if clip_eps is None:
        per_token = unclipped
        clipped_active = torch.zeros_like(valid)
    else:
        clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        per_token = torch.maximum(unclipped, clipped)
        clipped_active = clipped > unclipped
    loss = _reduce(per_token, mask, reduction)
    with torch.no_grad():
        policy_ratio = log_ratio.exp()
        stats = {
            "clip_fraction": masked_mean(clipped_active.to(log_ratio.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(valid, ratio, 0.0).max() if ratio.numel() else ratio.new_zeros(()),
            "approx_kl": masked_mean(policy_ratio - 1.0 - log_ratio, mask),
        }
    return loss, stats


def single_step_loss(
    divergence_per_token: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Single-step term of MiniLLM: Σ_t weight_t · KL(q_θ(·|y_<t) ‖ p(·|y_<t)) over visited prefixes.

    Paper Eq. 7 first part / (∇L)_Single; LMOps `Loss._reg_loss`. `divergence_per_token` is the exact
    token reverse KL over the vocabulary (`chunked_token_terms(..., divergence="rkl")`), differentiable
    through q_θ. LMOps uses no weight (the maintainers found it more stable, LMOps #255); the paper
    writes the single-token w_t, which has the same expectation (E_{y_t~p̃}[w_t] = 1) and adds
    variance. The unbiased weight under teacher-mixed sampling is the prefix weight W_{t-1}
    (`prefix_importance_weights(..., include_current=False)`). The denominator of "mean" is the token
    count (not Σ weights), as in LMOps.
    """
    values = divergence_per_token
    if weights is not None:
        values = values * torch.where(mask > 0, weights.detach(), 0.0).to(values.dtype)
    return _reduce(values, mask, reduction)


def pt_loss(ce_per_token: Tensor, kd_per_token: Tensor | None, mask: Tensor, kd_ratio: float) -> Tensor:
    """L_PT as released (LMOps `Loss.pt_loss`): (1 - kd_ratio)·CE + kd_ratio·KD, each a token mean.

    The paper's L_PT (Algorithm 1) is the plain CE (kd_ratio = 0); LMOps adds word-level KD on the
    pre-training text with kd_ratio = 0.5. LMOps' KD is the soft cross-entropy -Σ p log q; passing the
    token "fkl" instead gives identical gradients and a value lower by the constant teacher entropy H(p)
    (0 at a perfect match, which reads better in logs). `kd_per_token` may be None when kd_ratio = 0.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    loss = (1.0 - kd_ratio) * masked_mean(ce_per_token, mask)
    if kd_ratio > 0.0:
        if kd_per_token is None:
            raise ValueError(f"kd_ratio={kd_ratio} needs kd_per_token (per-token teacher KD values)")
        loss = loss + kd_ratio * masked_mean(kd_per_token, mask)
    return loss
