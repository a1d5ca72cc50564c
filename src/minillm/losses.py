"""Loss terms for MiniLLM and its baselines: pure tensor maths, no models, no files.

Two families live here.

* Token-level divergences between the teacher p and the student q over the full vocabulary
  (`token_divergence`, and `chunked_token_terms`, which projects hidden states through the LM heads
  a chunk of positions at a time so that N x V logits never exist at once, not even in backward;
  `fused_token_loss` does the same for a loss that is a sum of per-chunk terms and computes its
  gradients during the forward pass, so that backward recomputes no head).
* The policy-gradient pieces of MiniLLM (Gu et al., ICLR 2024, arXiv 2306.08543, "the paper"; the
  released code is microsoft/LMOps `minillm/`, "LMOps"): per-token rewards, returns/advantages,
  whitening, importance weights, the PPO clipped surrogate of the long-term term, the single-step
  term and the pre-training loss L_PT.

Conventions. p = teacher, q = student, q_old = the student that produced the rollout, p̃ = the
teacher-mixed sampling distribution α·p + (1-α)·q_old. Per-token tensors are [B, T] (or flattened
[N]) and come with an explicit `mask` (1 = a real response token, 0 = padding); masks are never
derived from token ids. Maths runs in at least fp32: lower-precision inputs are upcast, fp64 inputs
stay fp64 (the tests use that to compare against brute force at 1e-10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd", "skl", "srkl")
Divergence = Literal["fkl", "rkl", "jsd", "tvd", "skl", "srkl"]
Reduction = Literal["mean", "sum"]
Head = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# Token-level divergences
# ------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16 inputs (log-softmax over 50k+ entries loses too much in 16 bits), else keep."""
    return torch.promote_types(dtype, torch.float32)


def _log_probs(logits: Tensor, vocab_size: int | None, temperature: float) -> Tensor:
    """Log-softmax over the first `vocab_size` logits (the id range teacher and student share)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logits = logits.to(_compute_dtype(logits.dtype))
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


def _check_divergence_args(kind: str, beta: float, skew_alpha: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if not 0.0 <= skew_alpha <= 1.0:
        raise ValueError(f"skew_alpha must be in [0, 1], got {skew_alpha}")


def divergence_from_logprobs(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    kind: Divergence,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    student_probs: Tensor | None = None,
) -> Tensor:
    """Divergence between two normalised log-distributions [..., V] -> [...]; see `token_divergence`.

    `student_probs` may pass exp(student_logprobs) when the caller has it already (it is then reused
    instead of formed again; gradients flow through it).
    """
    _check_divergence_args(kind, beta, skew_alpha)
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


def _check_widths(student_width: int, teacher_width: int | None, vocab_size: int | None) -> None:
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


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: Divergence,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> Tensor:
    """Per-position divergence of teacher p and student q over the full vocabulary, [..., V] -> [...].

    The simple, fully materialised reference; training uses `chunked_token_terms`. Gradients flow into
    `student_logits` only (the teacher is a constant). Both logit tensors are divided by
    `temperature`, sliced to `vocab_size` when given, and normalised in at least fp32.

    kinds (p = teacher, q = student):
      fkl   KL(p ‖ q)                                   word-level KD (up to the constant H(p))
      rkl   KL(q ‖ p)                                   MiniLLM's single-step term (spec §1 step G)
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
    _check_divergence_args(kind, beta, skew_alpha)
    _check_widths(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    ls = _log_probs(student_logits, vocab_size, temperature)
    lt = _log_probs(teacher_logits.detach(), vocab_size, temperature)
    return divergence_from_logprobs(ls, lt, kind, beta=beta, skew_alpha=skew_alpha)


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


def _chunk_quantities(make_student_logits: Callable[[], Tensor], teacher_in: Tensor | None, teacher_head: Head | None,
                      targets: Tensor | None, divergence: Divergence | None, vocab_size: int | None,
                      temperature: float, beta: float, skew_alpha: float):
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
    _check_widths(student_logits.shape[-1], None if t_logits is None else t_logits.shape[-1], vocab_size)
    ls = _log_probs(student_logits, vocab_size, temperature)
    del student_logits
    lt = None if t_logits is None else _log_probs(t_logits, vocab_size, temperature)
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


def _check_token_args(
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
        _check_divergence_args(divergence, beta, skew_alpha)
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


def chunked_token_terms(
    student_hidden: Tensor,
    student_head: Head,
    *,
    targets: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    teacher_logits: Tensor | None = None,
    divergence: Divergence | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> TokenTerms:
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
    teacher_input = _check_token_args(student_hidden, teacher_hidden, teacher_head, teacher_logits, divergence,
                                      temperature, chunk_size, beta, skew_alpha)

    def terms(hidden: Tensor, teacher_in: Tensor | None, chunk_targets: Tensor | None):
        return _chunk_quantities(lambda: student_head(hidden), teacher_in, teacher_head, chunk_targets, divergence,
                                 vocab_size, temperature, beta, skew_alpha)

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

    def cat(i: int) -> Tensor | None:
        parts = [p[i] for p in pieces]
        return None if parts[0] is None else torch.cat(parts)

    return TokenTerms(logprobs=cat(0), divergence=cat(1), teacher_logprobs=cat(2), entropy=cat(3))


TokenLoss = Callable[[Tensor | None, Tensor | None, int, int], dict[str, Tensor]]


class FusedTerms(NamedTuple):
    """Result of `fused_token_loss`.

    loss              scalar total (Σ over chunks and terms), differentiable w.r.t. the student hidden
                      states and the head's trainable parameters; call `.backward()` on it (or on
                      anything built from it) as usual
    terms             the per-term values, summed over chunks, detached (for logging)
    logprobs          log q(target) [N], detached (None without targets)
    divergence        token divergence [N], detached (None without a divergence kind)
    teacher_logprobs  log p(target) [N], detached (None without targets or teacher)
    entropy           entropy of q [N], detached
    """

    loss: Tensor
    terms: dict[str, Tensor]
    logprobs: Tensor | None
    divergence: Tensor | None
    teacher_logprobs: Tensor | None
    entropy: Tensor


def _head_parameters(head: Head, head_parameters) -> list[Tensor]:
    if head_parameters is None:
        head_parameters = getattr(head, "trainable_parameters", None)
    if head_parameters is None:
        if not isinstance(head, torch.nn.Module):
            raise ValueError(
                "fused_token_loss computes the head's parameter gradients itself and cannot see the "
                "parameters of a plain function: pass head_parameters=[...] (() if it has none), or a head "
                "from minillm.models.lm_head_fn / an nn.Module"
            )
        head_parameters = head.parameters()
    params, seen = [], set()
    for p in head_parameters:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def _linear_split(head: Head):
    """(weight, bias, postprocess, cast, linear) when head(h) == postprocess(linear(cast(h), weight, bias)).

    `linear` is the head's own projection (`LMHead.linear`: fp32 with autocast disabled when autocast is
    on), else F.linear; postprocess and cast may be None (identity).
    """
    split = getattr(head, "linear_split", None)
    if callable(split):
        parts = split()
        if parts is None:
            return None
        weight, bias, post = parts
        return (weight, bias, post, getattr(head, "cast_input", None),
                getattr(head, "linear", torch.nn.functional.linear))
    if type(head) is torch.nn.Linear:
        return head.weight, head.bias, None, None, torch.nn.functional.linear
    return None


class _FusedLossFunction(torch.autograd.Function):
    """Autograd node whose forward runs the fused loop and whose backward returns its stored gradients."""

    @staticmethod
    def forward(ctx, run, hidden, *params):  # noqa: ARG004 - inputs only connect the node to the graph
        loss, grad_hidden, grad_params = run()
        ctx.has_hidden = grad_hidden is not None
        ctx.dtypes = (hidden.dtype, [p.dtype for p in params])
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []), *grad_params)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        hidden_dtype, param_dtypes = ctx.dtypes
        grad_hidden = saved.pop(0) if ctx.has_hidden else None
        # In place: these buffers belong to this node and are freed right after (a second backward
        # through the same graph, retain_graph=True, then fails with autograd's in-place error).
        g = grad_output.detach()
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(g.to(grad_hidden.dtype)).to(hidden_dtype)
        grads = [buf.mul_(g.to(buf.dtype)).to(dtype) for buf, dtype in zip(saved, param_dtypes)]
        return (None, grad_hidden, *grads)


def fused_token_loss(
    student_hidden: Tensor,
    student_head: Head,
    token_loss: TokenLoss,
    *,
    targets: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head: Head | None = None,
    teacher_logits: Tensor | None = None,
    divergence: Divergence | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    head_parameters=None,
) -> FusedTerms:
    """A loss that is a sum of per-chunk terms of log q(target) and a token divergence, fused chunk by chunk.

    Same inputs and per-position quantities as `chunked_token_terms`, plus a callback

        token_loss(logprobs_chunk, divergence_chunk, start, stop) -> {name: scalar tensor}

    which gets the differentiable [stop - start] log-probs / divergences of positions start:stop
    (None where not requested) and returns named scalar contributions of that chunk, scaled so that
    their sum over chunks is the full loss (e.g. a token sum divided by the global token count: a
    per-chunk mean is not additive). Statistics that are not additive over chunks (maxima, clip
    fractions) are best computed afterwards from the returned detached per-token values.

    The positions are visited once, in the forward pass. For each chunk the head logits are formed,
    the callback is called, and the gradients of the chunk's loss w.r.t. the chunk's hidden states
    and the head's trainable parameters are computed at once (`torch.autograd.grad` within the chunk);
    the hidden gradient is written into an [N, H] buffer, the parameter gradients are added into one
    buffer per parameter (fp32 or wider), and the chunk's logits are freed. A
    `torch.autograd.Function` taking (hidden, *head params) returns the total as `FusedTerms.loss`;
    its backward hands the stored gradients (times the incoming gradient) to autograd, which adds
    them to whatever else reaches the same tensors (e.g. a head weight tied to the input embedding).
    Compared with `chunked_token_terms`, neither head is recomputed in backward and no per-chunk
    head-weight gradients are summed by autograd; peak memory is O(chunk_size × V) + one gradient
    buffer per head parameter + [N, H].

    When the head is a plain `nn.Linear` (or an `lm_head_fn` head over one, `linear_split()`), the
    chunk's logits are formed from the detached weight and a hook on them adds the weight (and bias)
    gradient into the buffer in place (addmm) when the chunk's backward reaches them, so no [V, H]
    temporary is created per chunk; autograd gives the input gradient. The logits are formed as the
    head forms them: an `lm_head_fn` head projects in fp32 with autocast disabled even under autocast
    (`LMHead.linear`); a bare `nn.Linear` under autocast gives logits in the autocast dtype (and one
    [V, H] temporary in that dtype per chunk). Other heads (e.g. LoRA-wrapped) use autograd for the
    head parameters as well (one [V, H] temporary per chunk). The trainable parameters are
    `head_parameters`, else `student_head.trainable_parameters` (`lm_head_fn` heads), else the parameters
    of an nn.Module head; a plain function without them is an error (its weights would silently get no
    gradient).
    Parameters that do not require grad get none; a head without trainable parameters still gives
    the hidden gradient.

    Only the hidden states and the head parameters receive gradients: the terms returned by
    `token_loss` must depend on trainable tensors only through the chunk tensors it is given (anything
    else it closes over is a constant). The loss may be backpropagated once (the stored gradients are
    consumed; a second backward through a retained graph raises). Without grad mode, or when neither
    the hidden states nor a head parameter requires grad, only values are computed.
    """
    teacher_input = _check_token_args(student_hidden, teacher_hidden, teacher_head, teacher_logits, divergence,
                                      temperature, chunk_size, beta, skew_alpha)
    params = _head_parameters(student_head, head_parameters)
    split = _linear_split(student_head)
    if split is not None:
        weight, bias = split[0], split[1]
        known = {id(weight)} | ({id(bias)} if bias is not None else set())
        if any(id(p) not in known for p in params):
            split = None  # parameters beyond the linear weight/bias: differentiate the head generically
    hidden = student_hidden
    n = hidden.shape[0]
    track = torch.is_grad_enabled() and (hidden.requires_grad or bool(params))
    pieces: list[tuple] = []
    term_sums: dict[str, Tensor] = {}

    def forward_chunk(start: int, stop: int, grad_params: list[Tensor] | None):
        """The chunk's terms and per-token values; returns (terms, per-token values, autograd inputs).

        A function of its own so that no Python reference keeps the chunk's [chunk, V] tensors alive:
        only the autograd graph does, which frees each one as soon as backward has used it.
        """
        h = hidden[start:stop].detach()
        inputs: list[Tensor] = []
        if track and split is not None:
            # The head's projection on a detached weight; the hook adds the weight/bias gradients into the
            # buffers in place when backward reaches the logits (autograd gives only the input gradient).
            w, b, post, cast, linear = split
            x = (cast(h) if cast is not None else h).detach().requires_grad_(True)
            inputs.append(x)
            accumulate = [(p, buf) for p, buf in zip(params, grad_params)]

            def head_grads(g_z: Tensor) -> None:
                for p, buf in accumulate:
                    if p is w:
                        xx = x.detach().to(g_z.dtype)
                        if g_z.dtype == buf.dtype:
                            buf.addmm_(g_z.t(), xx)
                        else:  # e.g. bf16 logits under autocast: one [V, H] temporary in that dtype
                            buf.add_(torch.mm(g_z.t(), xx))
                    else:
                        buf.add_(g_z.sum(0))

            def make_student_logits() -> Tensor:
                z = linear(x, w.detach(), None if b is None else b.detach())
                if accumulate:
                    z.register_hook(head_grads)
                return post(z) if post is not None else z
        else:
            if track and hidden.requires_grad:
                h.requires_grad_(True)
                inputs.append(h)
            if track:
                inputs.extend(params)

            def make_student_logits() -> Tensor:
                return student_head(h)
        logprobs, div, teacher_lp, entropy = _chunk_quantities(
            make_student_logits, None if teacher_input is None else teacher_input[start:stop], teacher_head,
            None if targets is None else targets[start:stop], divergence, vocab_size, temperature, beta, skew_alpha)
        out = token_loss(logprobs, div, start, stop)
        if not isinstance(out, dict) or not all(isinstance(v, Tensor) and v.numel() == 1 for v in out.values()):
            raise TypeError("token_loss must return a dict of scalar tensors")
        if term_sums and out.keys() != term_sums.keys():
            raise ValueError(f"token_loss returned terms {sorted(out)} for positions {start}:{stop} but "
                             f"{sorted(term_sums)} before; every chunk must return the same names")
        values = tuple(None if v is None else v.detach() for v in (logprobs, div, teacher_lp)) + (entropy,)
        return out, values, inputs

    def chunk(start: int, grad_hidden: Tensor | None, grad_params: list[Tensor] | None) -> None:
        stop = min(start + chunk_size, n)
        with torch.enable_grad() if track else torch.no_grad():
            out, values, inputs = forward_chunk(start, stop, grad_params)
            total = sum(out.values()) if out else None
            if track and total is not None and total.requires_grad:
                # The chunk's backward runs with autocast off, as a backward should: under autocast (this
                # runs inside the caller's forward) its matmuls would be recast to bf16 even where the
                # forward ran in fp32 (the LM head); ops autocast did recast save bf16 tensors anyway.
                with torch.autocast(hidden.device.type, enabled=False):
                    grads = torch.autograd.grad(total, inputs, allow_unused=True)
                if grad_hidden is not None and grads[0] is not None:
                    grad_hidden[start:stop] = grads[0]
                if split is None:  # generic head: autograd gave the parameter gradients as well
                    for buf, g in zip(grad_params, grads[1 if hidden.requires_grad else 0:]):
                        if g is not None:
                            buf.add_(g)
        for name, value in out.items():
            value = value.detach().reshape(())
            term_sums[name] = value if name not in term_sums else term_sums[name] + value
        pieces.append(values)

    def loop(grad_hidden=None, grad_params=None) -> Tensor:
        for start in range(0, max(n, 1), chunk_size):
            chunk(start, grad_hidden, grad_params)
        if not term_sums:
            return hidden.new_zeros((), dtype=_compute_dtype(hidden.dtype))
        return torch.stack([v.to(_compute_dtype(v.dtype)) for v in term_sums.values()]).sum()

    def run():
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        grad_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32),
                                        memory_format=torch.contiguous_format) for p in params]
        loss = loop(grad_hidden, grad_params)
        return loss, grad_hidden, grad_params

    if track:
        loss = _FusedLossFunction.apply(run, hidden, *params)
    else:
        with torch.no_grad():
            loss = loop()

    def cat(i: int) -> Tensor | None:
        parts = [p[i] for p in pieces]
        return None if parts[0] is None else torch.cat(parts)

    return FusedTerms(loss=loss, terms=term_sums, logprobs=cat(0), divergence=cat(1), teacher_logprobs=cat(2),
                      entropy=cat(3))


# ------------------------------------------------------------------------------------------------
# Masked reductions
# ------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ mask·values / Σ mask (0 where the mask is empty); masked entries may hold NaN/inf."""
    m = mask.to(_compute_dtype(values.dtype))
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


# ------------------------------------------------------------------------------------------------
# MiniLLM policy-gradient pieces
# ------------------------------------------------------------------------------------------------


def per_token_rewards(
    teacher_logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    *,
    reward_scaling: float = 1.0,
    reward_clip: float | None = None,
) -> Tensor:
    """r_t = (log p(y_t|y_<t,x) - log q_old(y_t|y_<t,x)) / reward_scaling, clipped to ±reward_clip.

    Paper Eq. 2 (r_t with q_θ frozen at the rollout policy); spec §1.2 step D. LMOps scales by 1/0.5
    and clips at ±100, both neutralised by whitening. Rewards are constants (detached) and exactly 0
    where mask = 0.
    """
    rewards = (teacher_logprobs.detach() - old_logprobs.detach()).to(_compute_dtype(old_logprobs.dtype))
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

    variant="lmops" (released code, spec §1.2 step E):
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
    r = torch.where(valid, rewards.detach(), 0.0).to(_compute_dtype(rewards.dtype))
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

    Spec §1.2 step E. Deliberate departure from LMOps, whose statistics include the padding of the
    fixed 256-long buffer, so that they depended on how much padding a batch happened to carry.
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
    return torch.where(valid, whitened.to(_compute_dtype(values.dtype)), 0.0)


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
    log_w = log_w.to(_compute_dtype(log_w.dtype))
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
    """Long-term term of MiniLLM (paper Eq. 7 second part, Algorithm 1 clipping; spec §1.2 step F).

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
    log_ratio = log_ratio.to(_compute_dtype(log_ratio.dtype))
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

    Paper Eq. 7 first part / (∇L)_Single; spec §1.2 step G. `divergence_per_token` is the exact token
    reverse KL over the vocabulary (`chunked_token_terms(..., divergence="rkl")`), differentiable
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
    """L_PT as released (spec §1.2 step H): (1 - kd_ratio)·CE + kd_ratio·KD, each a token mean.

    The paper's L_PT is the plain CE (kd_ratio = 0); LMOps adds word-level KD on the pre-training text
    with kd_ratio = 0.5. LMOps' KD is the soft cross-entropy -Σ p log q; passing the token "fkl"
    instead gives identical gradients and a value lower by the constant teacher entropy H(p) (0 at a
    perfect match, which reads better in logs). `kd_per_token` may be None when kd_ratio = 0.
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
    loss = (1.0 - kd_ratio) * masked_mean(ce_per_token, mask)
    if kd_ratio > 0.0:
        if kd_per_token is None:
            raise ValueError(f"kd_ratio={kd_ratio} needs kd_per_token (per-token teacher KD values)")
        loss = loss + kd_ratio * masked_mean(kd_per_token, mask)
    return loss
