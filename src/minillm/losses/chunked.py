"""Full-vocabulary token terms through the LM heads, a chunk of positions at a time.

`chunked_token_terms` projects hidden states through the student (and teacher) head chunk by chunk
under activation checkpointing, so that N x V logits never exist at once, not even in backward.
`chunk_quantities` is the per-chunk body it shares with `fused_token_loss` (`minillm.losses.fused`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .divergences import (
    Divergence,
    check_divergence_args,
    check_logit_widths,
    divergence_from_logprobs,
    vocab_log_probs,
)

Head = Callable[[Tensor], Tensor]


class TokenTerms(NamedTuple):
    """Per-position quantities from `chunked_token_terms`, all [N].

    logprobs          log q(target), differentiable (None without targets)
    divergence        token divergence, differentiable (None without a divergence kind)
    teacher_logprobs  log p(target), no grad (None without targets or teacher)
    entropy           entropy of q, detached (for logging)
    """

    logprobs: Tensor | None
    divergence: Tensor | None
    teacher_logprobs: Tensor | None
    entropy: Tensor


def chunk_quantities(make_student_logits: Callable[[], Tensor], teacher_in: Tensor | None,
                     targets: Tensor | None, *, teacher_head: Head | None, divergence: Divergence | None,
                     vocab_size: int | None, temperature: float, beta: float, skew_alpha: float):
    """One chunk's (log q(target), divergence, log p(target), entropy of q): the shared body of
    `chunked_token_terms` and `fused_token_loss`.

    The student logits come from a callable so that no caller frame holds them: each [chunk, V] tensor is
    dropped as soon as the next one is formed (autograd keeps only what backward needs). The teacher is
    a constant (no grad); the entropy is detached and formed from the same q as the divergence.
    """
    student_logits = make_student_logits()
    t_logits = None
    if teacher_in is not None:
        with torch.no_grad():
            t_logits = teacher_head(teacher_in) if teacher_head is not None else teacher_in
    check_logit_widths(student_logits.shape[-1], None if t_logits is None else t_logits.shape[-1], vocab_size)
    ls = vocab_log_probs(student_logits, vocab_size, temperature)
    del student_logits
    lt = None if t_logits is None else vocab_log_probs(t_logits, vocab_size, temperature)
    del t_logits
    q = ls.exp()
    with torch.no_grad():
        entropy = torch.special.entr(q).sum(-1)  # -Σ q log q, 0·log 0 = 0
    logprobs = teacher_lp = div = None
    if targets is not None:
        index = targets.unsqueeze(-1)
        logprobs = ls.gather(-1, index).squeeze(-1)
        if lt is not None:
            teacher_lp = lt.gather(-1, index).squeeze(-1)
    if divergence is not None:
        div = divergence_from_logprobs(ls, lt, divergence, beta=beta, skew_alpha=skew_alpha, student_probs=q)
    return logprobs, div, teacher_lp, entropy


def check_token_args(
    student_hidden: Tensor,
    teacher_hidden: Tensor | None,
    teacher_head: Head | None,
    teacher_logits: Tensor | None,
    divergence: Divergence | None,
    temperature: float,
    chunk_size: int,
    beta: float,
    skew_alpha: float,
) -> Tensor | None:
    """Validate the arguments of `chunked_token_terms` / `fused_token_loss`; returns the teacher input."""
    if divergence is not None:
        check_divergence_args(divergence, beta, skew_alpha)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_hidden.dim() != 2:
        raise ValueError(
            f"student_hidden must be [N, H] (flatten valid positions), got {tuple(student_hidden.shape)}"
        )
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head must be given together")
    if teacher_hidden is not None and teacher_logits is not None:
        raise ValueError(
            "pass the teacher either as teacher_hidden + teacher_head or as teacher_logits, not both"
        )
    teacher_input = teacher_hidden if teacher_hidden is not None else teacher_logits
    if divergence is not None and teacher_input is None:
        raise ValueError(
            f"divergence={divergence!r} needs a teacher (teacher_hidden + teacher_head or teacher_logits)"
        )
    return None if teacher_input is None else teacher_input.detach()


def concat_pieces(pieces: list[tuple], i: int) -> Tensor | None:
    """The i-th per-position output of every chunk, concatenated ([N]; None when the output is None)."""
    parts = [p[i] for p in pieces]
    return None if parts[0] is None else torch.cat(parts)


def chunked_token_terms(student_hidden: Tensor, student_head: Head, *, targets: Tensor | None = None,
                        teacher_hidden: Tensor | None = None, teacher_head: Head | None = None,
                        teacher_logits: Tensor | None = None, divergence: Divergence | None = None,
                        vocab_size: int | None = None, temperature: float = 1.0, chunk_size: int = 256,
                        beta: float = 0.5, skew_alpha: float = 0.1) -> TokenTerms:
    """Student log-probs of targets, teacher log-probs and a token divergence, chunk by chunk.

    `student_hidden` [N, H] holds the post-norm hidden states of the positions to score (the caller
    selects valid positions and flattens); each head maps hidden -> logits. The teacher comes either
    as `teacher_hidden` [N, Ht] + `teacher_head` or as precomputed `teacher_logits` [N, Vt]; it is
    always a constant. Both logit tensors are sliced to `vocab_size` (teacher and student share token
    ids but may differ in width) and divided by `temperature`. Note that this renormalises q over the
    shared ids: the sampler must use the same `vocab_size` so that log q here and q_old there are the
    same distribution.

    Memory: each chunk of `chunk_size` positions runs under non-reentrant activation checkpointing,
    so only the chunk's inputs and its [chunk] outputs are kept; backward recomputes one chunk's
    logits at a time (including the teacher head, a cheap matmul next to the forward passes). Peak
    memory is O(chunk_size × V) in forward and backward, never O(N × V). When the loss is known per
    chunk, `fused_token_loss` avoids the recompute and autograd's per-chunk head-weight gradient sums.
    """
    teacher_input = check_token_args(student_hidden, teacher_hidden, teacher_head, teacher_logits, divergence,
                                     temperature, chunk_size, beta, skew_alpha)
    options = dict(teacher_head=teacher_head, divergence=divergence, vocab_size=vocab_size,
                   temperature=temperature, beta=beta, skew_alpha=skew_alpha)

    def terms(hidden: Tensor, teacher_in: Tensor | None, chunk_targets: Tensor | None):
        return chunk_quantities(lambda: student_head(hidden), teacher_in, chunk_targets, **options)

    n = student_hidden.shape[0]
    pieces = []
    for start in range(0, max(n, 1), chunk_size):
        stop = start + chunk_size
        args = (
            student_hidden[start:stop],
            None if teacher_input is None else teacher_input[start:stop],
            None if targets is None else targets[start:stop],
        )
        if torch.is_grad_enabled():
            # No randomness inside, so skip saving/restoring RNG state for every chunk.
            pieces.append(checkpoint(terms, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            pieces.append(terms(*args))
    return TokenTerms(*(concat_pieces(pieces, i) for i in range(4)))
