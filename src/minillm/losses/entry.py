"""`token_loss`: the one entry point for full-vocabulary token losses (SFT, KD, the divergence menu,
on-policy distillation, MiniLLM's single-step and long-term terms, L_PT).

It takes the fused path (`fused_token_loss`, gradients formed chunk by chunk in the forward pass)
whenever the head allows it, else the checkpointed `chunked_token_terms` path; both return the same
`FusedTerms` and agree to float rounding.
"""

from __future__ import annotations

from torch import Tensor

from .chunked import Head, chunked_token_terms
from .divergences import Divergence, compute_dtype
from .fused import FusedTerms, TokenLoss, can_fuse, check_chunk_terms, fused_token_loss


def chunk_share(start: int, stop: int, count: int) -> float:
    """(stop - start) / max(count, 1): the factor that turns the token mean over positions start:stop
    into that chunk's part of the token mean over all `count` positions (chunk means do not add up
    to the mean; chunk means times their shares do). `loss_fn(lp, div, start, stop)` typically returns
    `{"ce": -lp.mean() * chunk_share(start, stop, n)}`."""
    return (stop - start) / max(count, 1)


def _detached(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach()


def token_loss(student_hidden: Tensor, student_head: Head, loss_fn: TokenLoss, *,
               targets: Tensor | None = None, teacher_hidden: Tensor | None = None,
               teacher_head: Head | None = None, teacher_logits: Tensor | None = None,
               divergence: Divergence | None = None, vocab_size: int | None = None, temperature: float = 1.0,
               chunk_size: int = 256, beta: float = 0.5, skew_alpha: float = 0.1, fused: bool = True,
               head_parameters=None) -> FusedTerms:
    """A loss built from log q(target) and a token divergence over the full vocabulary, chunk by chunk.

    Inputs as `chunked_token_terms`; `loss_fn(logprobs_chunk, divergence_chunk, start, stop) ->
    {name: scalar tensor}` is `fused_token_loss`'s callback: the named contributions of positions
    start:stop, scaled so that their sums over chunks are the full terms (`chunk_share`).

    With `fused` (the default) and a head whose trainable parameters can be found (`can_fuse`:
    `head_parameters` given, an `lm_head_fn` head exposing `trainable_parameters`, or an nn.Module) this
    is `fused_token_loss`. Otherwise `chunked_token_terms` forms the [N] log-probs / divergences (checkpointed
    per chunk) and `loss_fn(logprobs, divergence, 0, N)` is called once; `loss` is then the plain sum of
    its terms, differentiable through autograd (so a plain-function head gets its gradients too), and
    `terms` and the per-token tensors are detached, as on the fused path. The two paths give the same
    values and gradients up to float rounding (the chunked one sums per-token values over all positions
    at once, the fused one per chunk).
    """
    kw = dict(targets=targets, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
              teacher_logits=teacher_logits, divergence=divergence, vocab_size=vocab_size,
              temperature=temperature, chunk_size=chunk_size, beta=beta, skew_alpha=skew_alpha)
    if fused and can_fuse(student_head, head_parameters):
        return fused_token_loss(student_hidden, student_head, loss_fn, head_parameters=head_parameters, **kw)
    t = chunked_token_terms(student_hidden, student_head, **kw)
    n = student_hidden.shape[0]
    out = loss_fn(t.logprobs, t.divergence, 0, n)
    check_chunk_terms(out, (), 0, n)
    if out:
        loss = sum(out.values())
    else:
        loss = student_hidden.new_zeros((), dtype=compute_dtype(student_hidden.dtype))
    return FusedTerms(loss=loss, terms={name: v.detach().reshape(()) for name, v in out.items()},
                      logprobs=_detached(t.logprobs), divergence=_detached(t.divergence),
                      teacher_logprobs=_detached(t.teacher_logprobs), entropy=t.entropy)
