"""A loss that is a sum of per-chunk terms, with its gradients formed during the forward pass.

`fused_token_loss` visits the positions once: per chunk it forms the head's logits, calls the loss
callback and computes the chunk's gradients at once, so that backward recomputes no head and autograd
sums no per-chunk head-weight gradients. `_FusedPass` holds one call's state: the head's gradient
route (`_head_parameters`, `_usable_split`), one chunk's forward (`forward_chunk`) and gradient
(`backward_chunk`), and the running sums; `_FusedLossFunction` hands the stored gradients to autograd.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .chunked import Head, check_token_args, chunk_quantities, concat_pieces
from .divergences import Divergence, compute_dtype

TokenLoss = Callable[[Tensor | None, Tensor | None, int, int], dict[str, Tensor]]


class FusedTerms(NamedTuple):
    """Result of `fused_token_loss` (and of `token_loss`).

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


def can_fuse(head: Head, head_parameters=None) -> bool:
    """Whether `fused_token_loss` can find the head's trainable parameters: passed as `head_parameters`,
    exposed as `head.trainable_parameters` (`minillm.models.lm_head_fn` heads), or an nn.Module's."""
    if head_parameters is not None or getattr(head, "trainable_parameters", None) is not None:
        return True
    return isinstance(head, torch.nn.Module)


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


def _usable_split(head: Head, params: list[Tensor]):
    """`_linear_split(head)`, or None when the trainable parameters go beyond its weight and bias."""
    split = _linear_split(head)
    if split is not None:
        weight, bias = split[0], split[1]
        known = {id(weight)} | ({id(bias)} if bias is not None else set())
        if any(id(p) not in known for p in params):
            split = None  # parameters beyond the linear weight/bias: differentiate the head generically
    return split


def _add_linear_grads(accumulate: list[tuple[Tensor, Tensor]], weight: Tensor, x: Tensor,
                      g_z: Tensor) -> None:
    """Hook on a chunk's logits z = linear(x, weight, bias): add dz/dweight, dz/dbias into the buffers."""
    for p, buf in accumulate:
        if p is weight:
            xx = x.detach().to(g_z.dtype)
            if g_z.dtype == buf.dtype:
                buf.addmm_(g_z.t(), xx)
            else:  # e.g. bf16 logits under autocast: one [V, H] temporary in that dtype
                buf.add_(torch.mm(g_z.t(), xx))
        else:
            buf.add_(g_z.sum(0))


def check_chunk_terms(out, names, start: int, stop: int) -> None:
    """TypeError unless the callback returned {name: scalar tensor}; ValueError when the names differ
    from `names` (those of the chunks before, empty for the first)."""
    if not isinstance(out, dict) or not all(isinstance(v, Tensor) and v.numel() == 1 for v in out.values()):
        raise TypeError("token_loss must return a dict of scalar tensors")
    if names and out.keys() != names:
        raise ValueError(f"token_loss returned terms {sorted(out)} for positions {start}:{stop} but "
                         f"{sorted(names)} before; every chunk must return the same names")


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


class _FusedPass:
    """The state of one `fused_token_loss` call: inputs, the head's gradient route, running results."""

    def __init__(self, hidden: Tensor, head: Head, token_loss: TokenLoss, teacher_input: Tensor | None,
                 targets: Tensor | None, chunk_size: int, options: dict, head_parameters):
        self.hidden, self.head, self.token_loss = hidden, head, token_loss
        self.teacher_input, self.targets = teacher_input, targets
        self.chunk_size, self.options = chunk_size, options
        self.params = _head_parameters(head, head_parameters)
        self.split = _usable_split(head, self.params)
        self.track = torch.is_grad_enabled() and (hidden.requires_grad or bool(self.params))
        self.pieces: list[tuple] = []
        self.term_sums: dict[str, Tensor] = {}

    def run(self) -> tuple[Tensor, Tensor | None, list[Tensor]]:
        """The loop into new gradient buffers (parameters: fp32 or wider): loss, grad_hidden, grad_params."""
        grad_hidden = torch.zeros_like(self.hidden) if self.hidden.requires_grad else None
        grad_params = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32),
                                        memory_format=torch.contiguous_format) for p in self.params]
        loss = self.loop(grad_hidden, grad_params)
        return loss, grad_hidden, grad_params

    def loop(self, grad_hidden: Tensor | None = None, grad_params: list[Tensor] | None = None) -> Tensor:
        """Every chunk once; returns the total of the terms."""
        hidden = self.hidden
        for start in range(0, max(hidden.shape[0], 1), self.chunk_size):
            self.chunk(start, grad_hidden, grad_params)
        if not self.term_sums:
            return hidden.new_zeros((), dtype=compute_dtype(hidden.dtype))
        return torch.stack([v.to(compute_dtype(v.dtype)) for v in self.term_sums.values()]).sum()

    def chunk(self, start: int, grad_hidden: Tensor | None, grad_params: list[Tensor] | None) -> None:
        """One chunk's terms, their gradients (when tracked) and the running sums."""
        stop = min(start + self.chunk_size, self.hidden.shape[0])
        with torch.enable_grad() if self.track else torch.no_grad():
            out, values, inputs = self.forward_chunk(start, stop, grad_params)
            total = sum(out.values()) if out else None
            if self.track and total is not None and total.requires_grad:
                self.backward_chunk(total, inputs, start, stop, grad_hidden, grad_params)
        for name, value in out.items():
            value = value.detach().reshape(())
            self.term_sums[name] = value if name not in self.term_sums else self.term_sums[name] + value
        self.pieces.append(values)

    def forward_chunk(self, start: int, stop: int, grad_params: list[Tensor] | None):
        """The chunk's terms and per-token values; returns (terms, per-token values, autograd inputs).

        A function of its own so that no Python reference keeps the chunk's [chunk, V] tensors alive:
        only the autograd graph does, which frees each one as soon as backward has used it.
        """
        h = self.hidden[start:stop].detach()
        inputs: list[Tensor] = []
        if self.track and self.split is not None:
            make_student_logits = self.split_logits(h, inputs, grad_params)
        else:
            if self.track and self.hidden.requires_grad:
                h.requires_grad_(True)
                inputs.append(h)
            if self.track:
                inputs.extend(self.params)
            make_student_logits = functools.partial(self.head, h)
        logprobs, div, teacher_lp, entropy = chunk_quantities(
            make_student_logits, None if self.teacher_input is None else self.teacher_input[start:stop],
            None if self.targets is None else self.targets[start:stop], **self.options)
        out = self.token_loss(logprobs, div, start, stop)
        check_chunk_terms(out, self.term_sums.keys(), start, stop)
        values = tuple(None if v is None else v.detach() for v in (logprobs, div, teacher_lp)) + (entropy,)
        return out, values, inputs

    def split_logits(self, h: Tensor, inputs: list[Tensor],
                     grad_params: list[Tensor]) -> Callable[[], Tensor]:
        """The head's projection on a detached weight; a hook adds the weight/bias gradients into the
        buffers in place when backward reaches the logits (autograd gives only the input gradient)."""
        cast = self.split[3]
        x = (cast(h) if cast is not None else h).detach().requires_grad_(True)
        inputs.append(x)
        accumulate = [(p, buf) for p, buf in zip(self.params, grad_params)]
        return functools.partial(self.linear_logits, x, accumulate)

    def linear_logits(self, x: Tensor, accumulate: list[tuple[Tensor, Tensor]]) -> Tensor:
        w, b, post, _, linear = self.split
        z = linear(x, w.detach(), None if b is None else b.detach())
        if accumulate:
            z.register_hook(functools.partial(_add_linear_grads, accumulate, w, x))
        return post(z) if post is not None else z

    def backward_chunk(self, total: Tensor, inputs: list[Tensor], start: int, stop: int,
                       grad_hidden: Tensor | None, grad_params: list[Tensor] | None) -> None:
        """d total / d inputs within the chunk, into the hidden buffer (and the parameter buffers when the
        head is generic: with a linear split the logits hook has added those already)."""
        # The chunk's backward runs with autocast off, as a backward should: under autocast (this runs
        # inside the caller's forward) its matmuls would be recast to bf16 even where the forward ran in
        # fp32 (the LM head); ops autocast did recast save bf16 tensors anyway.
        with torch.autocast(self.hidden.device.type, enabled=False):
            grads = torch.autograd.grad(total, inputs, allow_unused=True)
        if grad_hidden is not None and grads[0] is not None:
            grad_hidden[start:stop] = grads[0]
        if self.split is None:  # generic head: autograd gave the parameter gradients as well
            for buf, g in zip(grad_params, grads[1 if self.hidden.requires_grad else 0:]):
                if g is not None:
                    buf.add_(g)

    def result(self, loss: Tensor) -> FusedTerms:
        return FusedTerms(loss, self.term_sums, *(concat_pieces(self.pieces, i) for i in range(4)))


def fused_token_loss(student_hidden: Tensor, student_head: Head, token_loss: TokenLoss, *,
                     targets: Tensor | None = None, teacher_hidden: Tensor | None = None,
                     teacher_head: Head | None = None, teacher_logits: Tensor | None = None,
                     divergence: Divergence | None = None, vocab_size: int | None = None,
                     temperature: float = 1.0, chunk_size: int = 256, beta: float = 0.5,
                     skew_alpha: float = 0.1, head_parameters=None) -> FusedTerms:
    """A loss that is a sum of per-chunk terms of log q(target) and a token divergence, fused chunk by chunk.

    Same inputs and per-position quantities as `chunked_token_terms`, plus a callback

        token_loss(logprobs_chunk, divergence_chunk, start, stop) -> {name: scalar tensor}

    which gets the differentiable [stop - start] log-probs / divergences of positions start:stop
    (None where not requested) and returns named scalar contributions of that chunk, scaled so that
    their sum over chunks is the full loss (e.g. a token sum divided by the global token count: a
    per-chunk mean is not additive; `chunk_share` gives the factor). Statistics that are not additive
    over chunks (maxima, clip fractions) are best computed afterwards from the returned detached
    per-token values.

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
    gradient; `token_loss` falls back to `chunked_token_terms` for such a head).
    Parameters that do not require grad get none; a head without trainable parameters still gives
    the hidden gradient.

    Only the hidden states and the head parameters receive gradients: the terms returned by
    `token_loss` must depend on trainable tensors only through the chunk tensors it is given (anything
    else it closes over is a constant). The loss may be backpropagated once (the stored gradients are
    consumed; a second backward through a retained graph raises). Without grad mode, or when neither
    the hidden states nor a head parameter requires grad, only values are computed.
    """
    teacher_input = check_token_args(student_hidden, teacher_hidden, teacher_head, teacher_logits, divergence,
                                     temperature, chunk_size, beta, skew_alpha)
    options = dict(teacher_head=teacher_head, divergence=divergence, vocab_size=vocab_size,
                   temperature=temperature, beta=beta, skew_alpha=skew_alpha)
    fused = _FusedPass(student_hidden, student_head, token_loss, teacher_input, targets, chunk_size, options,
                       head_parameters)
    if fused.track:
        loss = _FusedLossFunction.apply(fused.run, student_hidden, *fused.params)
    else:
        with torch.no_grad():
            loss = fused.loop()
    return fused.result(loss)
