"""Token drawing: transformers' logits processors, then one draw from p~ = alpha * p + (1 - alpha) * q.

Tokens are drawn by inverse-CDF sampling (cumsum + searchsorted) because `torch.multinomial` over a ~50k
vocabulary is ~28x slower on CPU. The mixture and the recorded log-probabilities follow MiniLLM's
teacher-mixed sampling (Gu et al., arXiv 2306.08543, Eq. 4-5).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import (
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.logits_process import LogitsProcessor

from minillm.config import SamplingConfig
from minillm.errors import ModelError

__all__ = ["apply_processors", "build_processors", "draw_next", "exp_shifted", "mix_logprob", "row_uniforms",
           "sample_from_probs"]


def sample_from_probs(probs: Tensor, generator: torch.Generator | None = None, *, rows: Tensor | None = None,
                      batch: int | None = None) -> Tensor:
    """Draw one index per row of `probs` [B, V] (non-negative, need not sum to 1) by inverse-CDF sampling.

    A single uniform per row and a binary search replace `torch.multinomial`, which is over 20x slower over a
    49k vocabulary on CPU. Zero-probability entries are never drawn: `right=True` skips the flat stretches
    of the CDF, and a uniform that rounding pushes past the last CDF value is clamped to the last token
    with positive probability rather than to index V - 1.

    With `rows` (long [B]) and `batch`, the rows of `probs` are rows `rows` of a batch of `batch` rows (a
    compacted decoding batch): `batch` uniforms are drawn and those of `rows` used, so each original row gets
    the uniform it would get without compaction and the generator advances by the same amount.
    """
    cdf = probs.float().cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    broken = ~torch.isfinite(total) | (total <= 0)
    if bool(broken.any()):  # NaN / inf logits: searchsorted returns V, out of range for every later gather
        bad = broken.squeeze(-1).nonzero().squeeze(-1).tolist()
        more = " ..." if len(bad) > 8 else ""
        raise ModelError(f"sampling: the model's next-token probabilities are NaN, infinite or all zero in "
                         f"batch rows {bad[:8]}{more} (non-finite logits: check the model weights and the "
                         "dtype - bf16/fp16 overflow - or fully masked rows of left-padded prompts)")
    u = row_uniforms((1,), batch if rows is not None else total.shape[0], rows, generator, cdf.device) * total
    index = torch.searchsorted(cdf, u, right=True)
    last_positive = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last_positive).squeeze(-1)


def row_uniforms(shape_rest: tuple[int, ...], full_batch: int, rows: Tensor | None,
                 generator: torch.Generator | None, device) -> Tensor:
    """Uniforms [b, *shape_rest] on `device` for the decoded rows `rows` of a batch of `full_batch` (all rows
    when None): uniforms are drawn for every original row, so each row gets the ones it would get without
    compaction and the generator advances the same. The generator may live on another device than the
    logits (a CPU generator driving a GPU model)."""
    u_device = generator.device if generator is not None else device
    u = torch.rand((full_batch, *shape_rest), generator=generator, device=u_device)
    if rows is not None:
        u = u[rows.to(u_device)]
    return u.to(device)


def apply_processors(scores: Tensor, history: Tensor | None, processors: list[LogitsProcessor]) -> Tensor:
    """The processors applied in order to one model's scores [B, V] with token history [B, T]."""
    for processor in processors:
        scores = processor(history, scores)
    return scores


def mix_logprob(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    """log p~(y) = log(alpha p(y) + (1 - alpha) q(y)) from the two log-probs (exact far in either tail);
    log q at alpha = 0."""
    if alpha == 0:
        return logq
    return torch.logaddexp(math.log(alpha) + logp, math.log1p(-alpha) + logq)


def build_processors(config: SamplingConfig) -> list[LogitsProcessor]:
    """Transformers' own processors, in the order `generate` applies them (processors, then warpers)."""
    processors: list[LogitsProcessor] = []
    if config.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(float(config.temperature)))
    if config.top_k > 0:
        processors.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        processors.append(TopPLogitsWarper(config.top_p))
    return processors


def exp_shifted(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(e = exp(scores - row max) [B, V], z = row sums of e [B, 1], log normaliser [B, 1]).

    softmax = e / z and log_softmax[y] = scores[y] - log normaliser (exact, no underflow in the tail).
    A decode step's sampling cost is memory traffic over [B, V]: computing log_softmax, exponentiating it
    and mixing would allocate and stream the full vocabulary several times more.
    """
    shift = scores.amax(dim=-1, keepdim=True)
    e = (scores - shift).exp_()
    z = e.sum(dim=-1, keepdim=True)
    return e, z, shift + z.log()


def _process(s_scores: Tensor, t_scores: Tensor | None, history: Tensor,
             processors: list[LogitsProcessor]) -> tuple[Tensor, Tensor | None]:
    """Apply the processors to the student's and (when given) the teacher's fp32 scores."""
    if processors and t_scores is not None:
        # Processors act row by row, so one call on the stacked batch processes both models identically
        # (and the n-gram ban, the costly one, is computed once).
        batch = s_scores.shape[0]
        both = torch.cat([s_scores, t_scores])
        history = history.repeat(2, 1)
        for processor in processors:
            both = processor(history, both)
        return both[:batch], both[batch:]
    return apply_processors(s_scores, history, processors), t_scores


def draw_next(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    history: Tensor,
    processors: list[LogitsProcessor],
    *,
    alpha: float,
    greedy: bool,
    generator: torch.Generator | None,
    rows: Tensor | None = None,
    full_batch: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One step's draw from p~: (tokens [B], log q(y), log p(y) | None, log p~(y) | None), all fp32.

    Logits arrive sliced to the shared vocabulary; softmax and the CDF run in fp32 whatever the model dtype.
    log p~(y) is formed from the two token log-probs with logaddexp rather than from the mixed probability,
    so it stays exact for tokens far in either model's tail. `rows` / `full_batch`: the logits' rows are these
    rows of the original batch (compacted decoding; see `sample_from_probs`), None when not compacted.
    """
    s_scores, t_scores = _process(student_logits.float(),
                                  teacher_logits.float() if teacher_logits is not None else None,
                                  history, processors)
    e_q, z_q, lognorm_q = exp_shifted(s_scores)
    probs = e_q  # q up to a per-row constant, which is all inverse-CDF sampling and argmax need
    if t_scores is not None:
        e_p, z_p, lognorm_p = exp_shifted(t_scores)
        if alpha > 0:
            probs = e_q.mul_((1 - alpha) / z_q).addcmul_(e_p, alpha / z_p)
    if greedy:
        # At alpha = 0 the argmax of the processed logits, exactly as generate(do_sample=False) takes it.
        token = (s_scores if alpha == 0 else probs).argmax(dim=-1)
    else:
        token = sample_from_probs(probs, generator, rows=rows, batch=full_batch)
    tok_logq = (s_scores.gather(1, token[:, None]) - lognorm_q).squeeze(1)
    if t_scores is None:
        return token, tok_logq, None, None
    tok_logp = (t_scores.gather(1, token[:, None]) - lognorm_p).squeeze(1)
    return token, tok_logq, tok_logp, mix_logprob(tok_logq, tok_logp, alpha)
