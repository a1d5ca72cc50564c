"""Teacher-mixed sampling by speculative decoding: exact samples of p~ = alpha * p + (1 - alpha) * q at the
cost of one teacher forward per k drafted tokens.

The lockstep loop (`decoder.decode_lockstep`) steps the teacher once per token. Here the student drafts k
tokens from its own q; ONE teacher forward over the draft gives p at every drafted position, and the draft is
verified as in speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with p~ as the target:

- drafted token d_i is kept with probability min(1, p~(d_i) / q(d_i)) = min(1, (1 - alpha) + alpha p/q),
  never below 1 - alpha;
- at the first rejection a token is drawn from the residual (p~ - q)+ / sum = (p - q)+ / sum(p - q)+ and the
  round ends; when the whole draft is kept, a bonus token is drawn from p~ at the next position (both models
  have its distribution: the student fed the last drafted token, the teacher verified it).

The kept tokens are distributed exactly as lockstep sampling from p~ (the speculative-sampling argument,
token by token), and every recorded number is the lockstep one: log q and log p of each kept token under the
processed distributions at its prefix, log p~, the weight q/p~ and the teacher's hidden state there (from the
verification forward).

KV caches. Each round feeds both models the same columns: the pending token (the last kept one, which
neither model has seen) and the k drafted tokens. A row's rejected columns then get attention mask 0 (with
explicit position ids counting real tokens only, this is the rollback: nothing attends to them and positions
continue from the kept prefix), and trailing columns no row kept are cropped from both caches. Finished rows
leave the batch as in the lockstep loop (compaction). Cache layers must be plain (not sliding-window): the
caller falls back to lockstep otherwise (`supports_speculative`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from minillm.config import SamplingConfig
from minillm.distributed import lockstep_group, ranks_done
from minillm.models import position_ids_from_mask
from minillm.sampling import decoder as _decoder
from minillm.sampling import draw
from minillm.sampling.adapter import GrowingLayer
from minillm.sampling.decoder import Decoder

__all__ = ["SpeculativeStats", "decode_speculative", "supports_speculative"]


@dataclass
class SpeculativeStats:
    """Counts of speculative decodes: drafted / accepted tokens, forwards (prefills included), rounds."""

    drafted: int = 0
    accepted: int = 0
    teacher_forwards: int = 0
    teacher_row_forwards: int = 0  # rows decoded in each teacher forward, summed (a row's verifications)
    student_forwards: int = 0
    tokens: int = 0
    rounds: int = 0
    draft_lengths: list[int] = field(default_factory=list)
    kept_counts: list[int] = field(default_factory=list)  # [i]: row-rounds that kept exactly i drafted tokens

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def tokens_per_teacher_forward(self) -> float:
        """Tokens a row gains per teacher forward (k + 1 at most; 1 for lockstep), the prefill included."""
        return self.tokens / self.teacher_row_forwards if self.teacher_row_forwards else float("nan")

    def add(self, other: SpeculativeStats) -> None:
        for name in ("drafted", "accepted", "teacher_forwards", "teacher_row_forwards", "student_forwards",
                     "tokens", "rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft_lengths += other.draft_lengths
        for i, n in enumerate(other.kept_counts):
            if i == len(self.kept_counts):
                self.kept_counts.append(0)
            self.kept_counts[i] += n


def supports_speculative(*decoders: Decoder) -> bool:
    """Whether every cache layer is a plain one (hole-masking rollback is exact only for full attention)."""
    for dec in decoders:
        layers = getattr(dec.cache, "layers", None)
        if not isinstance(layers, list) or not all(type(layer) is GrowingLayer for layer in layers):
            return False
    return True


def _process(scores: Tensor, history: Tensor | None, processors) -> Tensor:
    for processor in processors:
        scores = processor(history, scores)
    return scores


def _append_ragged(history: Tensor, tokens: Tensor, counts: Tensor, fill: int) -> Tensor:
    """Each row r of `history` [B, W] (left padded with `fill`) followed by tokens[r, :counts[r]], right
    aligned in a [B, W + M] tensor (M = tokens.shape[1]): a contiguous history per row for the n-gram ban."""
    batch, width = history.shape
    extra = tokens.shape[1]
    ext = torch.cat([history.new_full((batch, extra), fill), history, tokens], dim=1)
    index = torch.arange(width + extra, device=history.device)[None] + counts[:, None]
    return ext.gather(1, index)


class _Outputs:
    """The rollout's per-token records at full batch size, filled row by row at each row's own length."""

    def __init__(self, batch: int, max_new: int, device, pad: int, hidden_size: int | None,
                 hidden_dtype) -> None:
        self.ids = torch.full((batch, max_new), pad, dtype=torch.long, device=device)
        self.active = torch.zeros((batch, max_new), dtype=torch.bool, device=device)
        self.logq = torch.zeros((batch, max_new), dtype=torch.float32, device=device)
        self.logp = torch.zeros_like(self.logq)
        self.logmix = torch.zeros_like(self.logq)
        self.hidden = (torch.zeros((batch, max_new, hidden_size), dtype=hidden_dtype, device=device)
                       if hidden_size is not None else None)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # tokens written per row

    def write(self, rows: Tensor, keep: Tensor, ids: Tensor, logq: Tensor, logp: Tensor | None,
              logmix: Tensor | None, hidden: Tensor | None) -> None:
        """Append values [b, n] (hidden [b, n, H]) of the decoded rows `rows` where `keep` [b, n] is set
        (a prefix of each row)."""
        r, c = keep.nonzero(as_tuple=True)
        orig = rows[r]
        pos = self.count[orig] + c
        self.ids[orig, pos] = ids[r, c]
        self.active[orig, pos] = True
        self.logq[orig, pos] = logq[r, c].float()
        if logp is not None:
            self.logp[orig, pos] = logp[r, c].float()
            self.logmix[orig, pos] = logmix[r, c].float()
        if self.hidden is not None and hidden is not None:
            self.hidden[orig, pos] = hidden[r, c].to(self.hidden.dtype)
        self.count.index_add_(0, rows, keep.long().sum(dim=1))

    def columns(self, length: int, with_teacher: bool) -> list[Tensor]:
        cols = [self.ids[:, :length], self.active[:, :length], self.logq[:, :length]]
        if with_teacher:
            cols += [self.logp[:, :length], self.logmix[:, :length]]
            if self.hidden is not None:
                cols.append(self.hidden[:, :length])
        return cols


def _token_logprob(scores: Tensor, tokens: Tensor, lse: Tensor) -> Tensor:
    """log softmax(scores)[tokens] for scores [..., V], tokens [...] and lse = scores.logsumexp(-1)."""
    return scores.gather(-1, tokens[..., None]).squeeze(-1) - lse


def _mix_logprob(logq: Tensor, logp: Tensor, alpha: float) -> Tensor:
    if alpha == 0:
        return logq
    return torch.logaddexp(math.log(alpha) + logp, math.log1p(-alpha) + logq)


def _uniforms(shape_rest: tuple[int, ...], full_batch: int, rows: Tensor | None,
              generator: torch.Generator | None, device) -> Tensor:
    """Uniforms for every original row (so the generator advances the same whatever the compaction), those
    of the decoded rows."""
    u_device = generator.device if generator is not None else device
    u = torch.rand((full_batch, *shape_rest), generator=generator, device=u_device)
    if rows is not None:
        u = u[rows.to(u_device)]
    return u.to(device)


def decode_speculative(student_dec: Decoder, teacher_dec: Decoder, prompt_ids: Tensor, prompt_mask: Tensor, *,
                       config: SamplingConfig, eos_token_id: int | Sequence[int], pad_token_id: int,
                       alpha: float, shared_vocab_size: int | None, generator: torch.Generator | None,
                       return_teacher_hidden: bool, compact: bool, draft_length: int,
                       stats: SpeculativeStats | None = None) -> list[Tensor]:
    """Decode by draft-and-verify until every row has drawn an EOS or `max_new_tokens`.

    Returns the columns [B, T] of the rollout (tokens, active, log q, log p, log p~[, teacher hidden]) as
    `decode_lockstep` records them, T = the longest response.
    """
    device = student_dec.device
    stats = stats if stats is not None else SpeculativeStats()
    eos_ids = torch.tensor(eos_token_id, device=device).reshape(-1)
    processors = draw.build_processors(config)
    with_history = config.no_repeat_ngram_size > 0  # the only processor that reads the token history
    batch, prompt_len = prompt_ids.shape
    max_new = config.max_new_tokens
    mask = (prompt_mask != 0).long().to(device)
    position_ids = position_ids_from_mask(mask)
    no_token = torch.iinfo(torch.long).max
    history = prompt_ids.to(device).masked_fill(mask == 0, no_token)

    in_step = lockstep_group()
    groups = None if in_step else _decoder.prefill_groups(mask.sum(dim=1).tolist(), prompt_len)
    s_logits, _ = student_dec.prefill(prompt_ids, mask, position_ids, groups)
    t_logits, t_hidden = teacher_dec.prefill(prompt_ids, mask, position_ids, groups)
    stats.teacher_forwards += 1
    stats.teacher_row_forwards += batch
    stats.student_forwards += 1
    vocab = shared_vocab_size or min(s_logits.shape[-1], t_logits.shape[-1])
    if vocab > min(s_logits.shape[-1], t_logits.shape[-1]):
        raise ValueError(f"shared_vocab_size = {vocab} exceeds the logit widths "
                         f"{[s_logits.shape[-1], t_logits.shape[-1]]}.")
    hidden_size = t_hidden.shape[-1] if return_teacher_hidden else None
    out = _Outputs(batch, max_new, device, pad_token_id, hidden_size, torch.float32)

    # The first token: one draw from p~ at the prompt's end (both distributions are known from the prefills).
    token, logq, logp, logmix = draw.draw_next(s_logits[:, :vocab], t_logits[:, :vocab].to(device), history,
                                               processors, alpha=alpha, greedy=config.greedy,
                                               generator=generator)
    all_rows = torch.arange(batch, device=device)
    first = torch.ones((batch, 1), dtype=torch.bool, device=device)
    out.write(all_rows, first, token[:, None], logq[:, None], logp[:, None], logmix[:, None],
              t_hidden[:, None].to(device) if return_teacher_hidden else None)
    stats.tokens += batch
    finished = torch.isin(token, eos_ids) | (max_new <= 1)  # over the decoded rows
    rows: Tensor | None = None  # decoded rows -> original rows (None: all)
    pending = token
    next_pos = mask.sum(dim=1)  # position of the pending token
    if with_history:
        history = torch.cat([history, token[:, None]], dim=1)

    while True:
        all_done = bool(finished.all())
        if in_step:
            all_done = ranks_done(all_done, device)
        if all_done:
            break
        n_done = int(finished.sum())
        if compact and n_done >= max(1, math.ceil(finished.shape[0] / 4)) and n_done < finished.shape[0]:
            keep = (~finished).nonzero().squeeze(1)
            rows = keep if rows is None else rows[keep]
            student_dec.select_rows(keep)
            teacher_dec.select_rows(keep.to(teacher_dec.device))
            mask, next_pos, pending, finished = mask[keep], next_pos[keep], pending[keep], finished[keep]
            if with_history:
                history = history[keep]
        active = ~finished
        decoded = all_rows if rows is None else rows
        budget = max_new - out.count[decoded]  # tokens each row may still add
        k = max(0, min(draft_length, int(budget[active].max()) - 1)) if bool(active.any()) else 0
        b = pending.shape[0]

        # 1. The student feeds the pending token and drafts k tokens from q (k + 1 forwards).
        feed = pending.masked_fill(~active, pad_token_id)
        new_cols = active.long()[:, None].expand(b, k + 1)
        hist = history
        s_scores, drafts, histories = [], [], []
        for i in range(k + 1):
            step_mask = torch.cat([mask, new_cols[:, :i + 1]], dim=1)
            logits, _ = student_dec.step(feed[:, None], step_mask, (next_pos + i)[:, None])
            stats.student_forwards += 1
            scores = _process(_wide(logits[:, :vocab]), hist, processors)
            s_scores.append(scores)
            histories.append(hist)
            if i == k:
                break
            if config.greedy:
                feed = scores.argmax(dim=-1)
            else:
                e, _, _ = draw.exp_shifted(scores)
                feed = draw.sample_from_probs(e, generator, rows=rows, batch=batch)
            feed = feed.masked_fill(~active, pad_token_id)
            drafts.append(feed)
            if with_history:
                hist = torch.cat([hist, feed[:, None]], dim=1)
        s_scores_all = torch.stack(s_scores, dim=1)  # [b, k+1, V]

        # 2. One teacher forward over pending + drafts: p at every drafted position and the bonus position.
        fed = torch.stack([pending.masked_fill(~active, pad_token_id), *drafts], dim=1)  # [b, k+1]
        t_logits, t_hidden = teacher_dec.feed(fed, torch.cat([mask, new_cols], dim=1),
                                              next_pos[:, None] + torch.arange(k + 1, device=device))
        stats.teacher_forwards += 1
        t_logits = _wide(t_logits[..., :vocab]).to(device)
        t_scores_all = torch.stack([_process(t_logits[:, i], histories[i], processors) for i in range(k + 1)],
                                   dim=1)

        # 3. Verify the draft: keep d_i with probability min(1, p~(d_i) / q(d_i)); n_kept = leading accepts.
        s_lse, t_lse = s_scores_all.logsumexp(dim=-1), t_scores_all.logsumexp(dim=-1)  # [b, k+1]
        u_accept = _uniforms((k,), batch, rows, generator, device)
        draft_ids = fed[:, 1:]
        if k > 0:
            d_logq = _token_logprob(s_scores_all[:, :k], draft_ids, s_lse[:, :k])
            d_logp = _token_logprob(t_scores_all[:, :k], draft_ids, t_lse[:, :k])
            d_logmix = _mix_logprob(d_logq, d_logp, alpha)
            if config.greedy:  # the draft is the argmax of q; keep it while it is the argmax of p~
                target = s_scores_all[:, :k] if alpha == 0 else _mix_probs(s_scores_all[:, :k],
                                                                           t_scores_all[:, :k], alpha)
                accept = target.argmax(dim=-1) == draft_ids
            else:
                accept = u_accept.log() < (d_logmix - d_logq).clamp(max=0.0)
            n_kept = accept.long().cumprod(dim=1).sum(dim=1)
        else:
            n_kept = torch.zeros(b, dtype=torch.long, device=device)

        # 4. The last token of the round, at index n_kept: from the residual (p - q)+ after a rejection, or
        # from p~ (the bonus) when the whole draft was kept.
        at = n_kept[:, None, None].expand(b, 1, s_scores_all.shape[-1])
        s_last, t_last = s_scores_all.gather(1, at).squeeze(1), t_scores_all.gather(1, at).squeeze(1)
        rejected = n_kept < k
        if config.greedy:
            last = (s_last if alpha == 0 else _mix_probs(s_last, t_last, alpha)).argmax(dim=-1)
        else:
            q_last, p_last = s_last.softmax(dim=-1), t_last.softmax(dim=-1)
            mixture = q_last.mul(1 - alpha).add_(p_last, alpha=alpha)
            residual = (p_last - q_last).clamp_(min=0.0)
            # A rejection has probability alpha * TV(p, q); a residual that rounds to nothing can only follow
            # a rejection of probability ~0, and then p~ is the distribution the token is drawn from.
            empty = residual.sum(dim=-1, keepdim=True) <= 0
            probs = torch.where(rejected[:, None] & ~empty, residual, mixture)
            last = draw.sample_from_probs(probs, generator, rows=rows, batch=batch)
        tokens = torch.cat([draft_ids, last[:, None]], dim=1)  # [b, k+1]; index n_kept holds `last`
        tokens.scatter_(1, n_kept[:, None], last[:, None])

        # 5. Keep tokens 0..n_kept, cut at the first EOS and at each row's budget; record them.
        idx = torch.arange(k + 1, device=device)
        keep = (idx[None] <= n_kept[:, None]) & active[:, None]
        is_eos = torch.isin(tokens, eos_ids) & keep
        first_eos = torch.where(is_eos, idx[None], k + 1).amin(dim=1)
        keep &= (idx[None] <= first_eos[:, None]) & (idx[None] < budget[:, None])
        logq = _token_logprob(s_scores_all, tokens, s_lse)
        logp = _token_logprob(t_scores_all, tokens, t_lse)
        out.write(decoded, keep, tokens, logq, logp, _mix_logprob(logq, logp, alpha),
                  t_hidden.to(device) if return_teacher_hidden else None)
        n_new = keep.long().sum(dim=1)
        finished = finished | (first_eos <= n_kept) | (out.count[decoded] >= max_new)
        stats.rounds += 1
        stats.teacher_row_forwards += int(active.sum())
        stats.drafted += k * int(active.sum())
        stats.accepted += int(n_kept[active].sum())
        stats.tokens += int(n_new.sum())
        stats.draft_lengths.append(k)
        kept = torch.bincount(n_kept[active], minlength=k + 1).tolist()
        stats.add(SpeculativeStats(kept_counts=kept))

        # 6. Roll both caches back to each row's kept prefix: the pending column and the accepted drafts stay,
        # the rest are masked; trailing columns no row kept are cropped.
        kept_cols = (idx[None] <= n_kept[:, None]) & active[:, None]
        mask = torch.cat([mask, kept_cols.long()], dim=1)
        used = int(kept_cols.any(dim=0).nonzero().max()) + 1 if bool(kept_cols.any()) else 0
        if used < k + 1:
            crop = k + 1 - used
            student_dec.cache.crop(-crop)
            teacher_dec.cache.crop(-crop)
            mask = mask[:, :mask.shape[1] - crop]
        next_pos = next_pos + kept_cols.long().sum(dim=1)
        if with_history:
            history = _append_ragged(history, tokens, torch.where(finished, 0, n_new), no_token)
        pending = last.masked_fill(finished, pad_token_id)
    length = int(out.count.max())
    return out.columns(length, with_teacher=True)


def _wide(logits: Tensor) -> Tensor:
    """Logits in fp32, or wider for float64 models."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _mix_probs(s_scores: Tensor, t_scores: Tensor, alpha: float) -> Tensor:
    return s_scores.softmax(dim=-1).mul(1 - alpha).add_(t_scores.softmax(dim=-1), alpha=alpha)

