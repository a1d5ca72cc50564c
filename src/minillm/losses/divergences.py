"""Token-level divergences between the teacher p and the student q over the full vocabulary.

`token_divergence` is the fully materialised reference (logits in, one value per position out);
`divergence_from_logprobs` is its core on normalised log-distributions, shared with the chunked
head machinery (`minillm.losses.chunked`). Maths runs in at least fp32 (`compute_dtype`).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
Divergence = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16 inputs (log-softmax over 50k+ entries loses too much in 16 bits), else keep."""
    return torch.promote_types(dtype, torch.float32)


def vocab_log_probs(logits: Tensor, vocab_size: int | None, temperature: float) -> Tensor:
    """Log-softmax over the first `vocab_size` logits (the id range teacher and student share)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits.to(compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor, a: Tensor | None = None) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v - log b_v) over the last dim, from log-probabilities.

    Entries with a_v = 0 (a -inf logit, or underflow) contribute exactly 0 (0·log 0 = 0). The
    difference is zeroed *before* the multiplication so that no NaN appears in forward or backward
    (a `where` after `0 * (-inf)` would still send NaN gradients). a_v > 0 with b_v = 0 gives +inf,
    which is the true value. `a` may pass exp(log_a) when the caller has formed it already.
    """
    if a is None:
        a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, 0.0)
    return (a * diff).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1-w)·b) computed in log space (logsumexp of log-weights + log-probs).

    Where both a_v and b_v are 0 the inputs to logsumexp are replaced by 0 and the result set back to
    -inf: logsumexp's backward would otherwise compute exp(-inf - (-inf)) = NaN there.
    """
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    stacked = torch.stack([log_a + math.log(weight_a), log_b + math.log1p(-weight_a)])
    mixed = torch.logsumexp(torch.where(both_zero, 0.0, stacked), dim=0)
    return torch.where(both_zero, -math.inf, mixed)


def check_divergence_args(kind: str, beta: float, skew_alpha: float) -> None:
    """ValueError unless `kind` is one of DIVERGENCES and beta, skew_alpha lie in [0, 1]."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")


def divergence_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor, kind: Divergence, *,
                             beta: float = 0.5, skew_alpha: float = 0.1,
                             student_probs: Tensor | None = None) -> Tensor:
    """Divergence between two normalised log-distributions [..., V] -> [...]; see `token_divergence`.

    `student_probs` may pass exp(student_logprobs) when the caller has it already (it is then reused
    instead of formed again; gradients flow through it).
    """
    check_divergence_args(kind, beta, skew_alpha)
    ls, lt, q = student_logprobs, teacher_logprobs, student_probs
    if kind == "fkl":
        return _kl(lt, ls)
    if kind == "rkl":
        return _kl(ls, lt, q)
    if kind == "jsd":
        # Endpoints follow TRL's GKDTrainer: the interior formula is identically 0 at beta = 0 and 1.
        if beta == 0.0:
            return _kl(lt, ls)
        if beta == 1.0:
            return _kl(ls, lt, q)
        log_m = _log_mix(lt, ls, beta)
        return beta * _kl(lt, log_m) + (1.0 - beta) * _kl(ls, log_m, q)
    if kind == "tvd":
        return 0.5 * ((ls.exp() if q is None else q) - lt.exp()).abs().sum(-1)
    if kind == "skl":
        return _kl(lt, _log_mix(lt, ls, skew_alpha))
    return _kl(ls, _log_mix(lt, ls, 1.0 - skew_alpha), q)  # srkl


def check_logit_widths(student_width: int, teacher_width: int | None, vocab_size: int | None) -> None:
    """ValueError when the logit widths differ without a shared `vocab_size`, or it exceeds either."""
    if teacher_width is None:
        teacher_width = student_width
    if vocab_size is None and student_width != teacher_width:
        raise ValueError(
            f"student logits have {student_width} entries and teacher logits {teacher_width}; pass "
            f"vocab_size=<shared vocabulary size> (minillm.models.check_compatibility returns it) so "
            f"both are sliced to the token ids they share"
        )
    if vocab_size is not None and vocab_size > min(student_width, teacher_width):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds the logit width "
            f"(student {student_width}, teacher {teacher_width})"
        )


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, kind: Divergence, *, beta: float = 0.5,
                     skew_alpha: float = 0.1, temperature: float = 1.0,
                     vocab_size: int | None = None) -> Tensor:
    """Per-position divergence of teacher p and student q over the full vocabulary, [..., V] -> [...].

    The simple, fully materialised reference; training uses `chunked_token_terms`. Gradients flow into
    `student_logits` only (the teacher is a constant). Both logit tensors are divided by
    `temperature`, sliced to `vocab_size` when given, and normalised in at least fp32.

    kinds (p = teacher, q = student):
      fkl   KL(p ‖ q)                                   word-level KD (up to the constant H(p))
      rkl   KL(q ‖ p)                                   MiniLLM's single-step term (paper Eq. 7, first part)
      jsd   β·KL(p ‖ m) + (1-β)·KL(q ‖ m), m = β·p + (1-β)·q     generalised JSD, GKD/TRL convention
      tvd   ½ Σ_v |p_v - q_v|
      skl   KL(p ‖ α·p + (1-α)·q)                        DistiLLM skew KL,          α = skew_alpha
      srkl  KL(q ‖ (1-α)·p + α·q)                        DistiLLM skew reverse KL

    JSD endpoints: the interior formula tends to 0 at both ends (JSD_β ≈ β·KL(p‖q) as β→0 and
    ≈ (1-β)·KL(q‖p) as β→1), so taken literally β = 0 or 1 would be a zero loss. Like TRL we treat
    β exactly 0 as fkl and exactly 1 as rkl: the direction of the limit without its vanishing scale.
    The loss is therefore discontinuous at the endpoints; near them β scales the signal rather than
    choosing a direction. skl / srkl at α = 0 are exactly fkl / rkl (no special case needed).

    Mixtures are built in log space; -inf logits (tokens removed by masking) are exact zeros of the
    distribution and never produce NaN (0·log 0 = 0). A support mismatch that makes the divergence
    infinite (e.g. fkl where only the student masks a token) returns +inf.
    """
    check_divergence_args(kind, beta, skew_alpha)
    check_logit_widths(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    ls = vocab_log_probs(student_logits, vocab_size, temperature)
    lt = vocab_log_probs(teacher_logits.detach(), vocab_size, temperature)
    return divergence_from_logprobs(ls, lt, kind, beta=beta, skew_alpha=skew_alpha)
