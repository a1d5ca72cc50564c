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

__all__ = ["SpeculativeStats", "adaptive_draft_length", "decode_speculative", "supports_speculative"]

NO_TOKEN = torch.iinfo(torch.long).max  # the n-gram history's left padding: an id no token can match
# The adaptive draft length prices a round at k + 1 student steps plus a verification worth DRAFT_COST_RATIO
# of them (measured 3.7-3.8, but a batch waits on its slowest row: 2 came within 3 % of the best k <= 12 at
# every acceptance from 0.8 to 0.98, docs/benchmarks.md section 8); prior: PRIOR_TOKENS tokens at 1 - alpha/2.
DRAFT_COST_RATIO = 2.0
PRIOR_TOKENS = 8


def adaptive_draft_length(accepted: int, rejected: int, *, alpha: float, max_length: int,
                          cost_ratio: float = DRAFT_COST_RATIO) -> int:
    """The draft length k in 1..max_length that maximises the tokens a row expects per round,
    (1 - a^(k+1)) / (1 - a) at per-token acceptance a, per round cost k + 1 + cost_ratio; a is estimated from
    the drafted tokens accepted and the rejections so far. Ties go to the shorter draft."""
    a = (accepted + PRIOR_TOKENS * (1.0 - alpha / 2)) / (accepted + rejected + PRIOR_TOKENS)

    def value(k: int) -> float:
        gain = k + 1.0 if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)
        return gain / (k + 1 + cost_ratio)

    return max(range(1, max_length + 1), key=value)


@dataclass
class SpeculativeStats:
    """Counts of speculative decodes: drafted / accepted tokens, forwards (prefills included), rounds."""

    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # row-rounds that ended at a rejected drafted token
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
        for name in ("drafted", "accepted", "rejected", "teacher_forwards", "teacher_row_forwards",
                     "student_forwards", "tokens", "rounds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.draft_lengths += other.draft_lengths
        self.add_kept(other.kept_counts)

    def add_kept(self, counts: list[int]) -> None:
        """Add per-number-of-kept-drafts counts (`counts[i]`: row-rounds that kept i drafted tokens)."""
        self.kept_counts += [0] * (len(counts) - len(self.kept_counts))
        for i, n in enumerate(counts):
            self.kept_counts[i] += n


def supports_speculative(*decoders: Decoder) -> bool:
    """Whether every cache layer is a plain one (hole-masking rollback is exact only for full attention)."""
    for dec in decoders:
        layers = getattr(dec.cache, "layers", None)
        if not isinstance(layers, list) or not all(type(layer) is GrowingLayer for layer in layers):
            return False
    return True


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


def decode_speculative(student_dec: Decoder, teacher_dec: Decoder, prompt_ids: Tensor, prompt_mask: Tensor, *,
                       config: SamplingConfig, eos_token_id: int | Sequence[int], pad_token_id: int,
                       alpha: float, shared_vocab_size: int | None, generator: torch.Generator | None,
                       return_teacher_hidden: bool, compact: bool, draft_length: int,
                       adaptive: bool = False, stats: SpeculativeStats | None = None) -> list[Tensor]:
    """Decode by draft-and-verify until every row has drawn an EOS or `max_new_tokens`; `adaptive`: each
    round drafts `adaptive_draft_length` (at most `draft_length`) from this decode's counts so far.

    Returns the columns [B, T] of the rollout (tokens, active, log q, log p, log p~[, teacher hidden]) as
    `decode_lockstep` records them, T = the longest response.
    """
    run = _SpeculativeRun(student_dec, teacher_dec, config, eos_token_id, pad_token_id, alpha, generator,
                          return_teacher_hidden, stats if stats is not None else SpeculativeStats())
    run.prefill(prompt_ids, prompt_mask, shared_vocab_size)
    while not run.done():
        if compact:
            run.compact()
        run.round(adaptive_draft_length(run.accepted, run.rejected, alpha=alpha, max_length=draft_length)
                  if adaptive else draft_length)
    return run.out.columns(int(run.out.count.max()), with_teacher=True)


class _SpeculativeRun:
    """The state of one speculative decode: the decoded rows' masks, positions, pending tokens and n-gram
    history (`rows` maps them to the original batch once finished rows are dropped) and the records."""

    def __init__(self, student_dec: Decoder, teacher_dec: Decoder, config: SamplingConfig, eos_token_id,
                 pad_token_id: int, alpha: float, generator: torch.Generator | None, return_hidden: bool,
                 stats: SpeculativeStats) -> None:
        self.student, self.teacher, self.config, self.alpha = student_dec, teacher_dec, config, alpha
        self.device = student_dec.device
        self.eos_ids = torch.tensor(eos_token_id, device=self.device).reshape(-1)
        self.pad, self.generator, self.return_hidden = pad_token_id, generator, return_hidden
        self.stats = stats
        self.processors = draw.build_processors(config)
        self.with_history = config.no_repeat_ngram_size > 0  # the only processor that reads the history
        self.in_step = lockstep_group()  # a sharded teacher: every process makes the same teacher calls
        self.rows: Tensor | None = None  # decoded rows -> original rows (None: all)
        self.accepted = self.rejected = 0  # this decode: drafted tokens kept / row-rounds with a rejection

    # ------------------------------------------------------------------ set-up and the first token
    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor, shared_vocab_size: int | None) -> None:
        """Both prompt forwards, then the first token: one draw from p~ (both distributions are known)."""
        device, stats = self.device, self.stats
        self.batch, prompt_len = prompt_ids.shape
        self.mask = (prompt_mask != 0).long().to(device)
        self.history = prompt_ids.to(device).masked_fill(self.mask == 0, NO_TOKEN)
        position_ids = position_ids_from_mask(self.mask)
        groups = None if self.in_step else _decoder.prefill_groups(self.mask.sum(dim=1).tolist(), prompt_len)
        s_logits, _ = self.student.prefill(prompt_ids, self.mask, position_ids, groups)
        t_logits, t_hidden = self.teacher.prefill(prompt_ids, self.mask, position_ids, groups)
        stats.teacher_forwards += 1
        stats.student_forwards += 1
        stats.teacher_row_forwards += self.batch
        widths = [s_logits.shape[-1], t_logits.shape[-1]]
        self.vocab = shared_vocab_size or min(widths)
        if self.vocab > min(widths):
            raise ValueError(f"shared_vocab_size = {self.vocab} exceeds the logit widths {widths}.")
        self.out = _Outputs(self.batch, self.config.max_new_tokens, device, self.pad,
                            t_hidden.shape[-1] if self.return_hidden else None, torch.float32)
        token, logq, logp, logmix = draw.draw_next(
            s_logits[:, :self.vocab], t_logits[:, :self.vocab].to(device), self.history, self.processors,
            alpha=self.alpha, greedy=self.config.greedy, generator=self.generator)
        self.all_rows = torch.arange(self.batch, device=device)
        first = torch.ones((self.batch, 1), dtype=torch.bool, device=device)
        self.out.write(self.all_rows, first, token[:, None], logq[:, None], logp[:, None], logmix[:, None],
                       t_hidden[:, None].to(device) if self.return_hidden else None)
        stats.tokens += self.batch
        self.finished = torch.isin(token, self.eos_ids) | (self.config.max_new_tokens <= 1)
        self.pending = token
        self.next_pos = self.mask.sum(dim=1)  # position of the pending token
        if self.with_history:
            self.history = torch.cat([self.history, token[:, None]], dim=1)

    def done(self) -> bool:
        all_done = bool(self.finished.all())
        return ranks_done(all_done, self.device) if self.in_step else all_done

    def compact(self) -> None:
        """Drop finished rows once a quarter of the decoded rows (and at least one, not all) have finished."""
        n_done = int(self.finished.sum())
        if not (n_done >= max(1, math.ceil(self.finished.shape[0] / 4)) and n_done < self.finished.shape[0]):
            return
        keep = (~self.finished).nonzero().squeeze(1)
        self.rows = keep if self.rows is None else self.rows[keep]
        self.student.select_rows(keep)
        self.teacher.select_rows(keep.to(self.teacher.device))
        self.mask, self.next_pos = self.mask[keep], self.next_pos[keep]
        self.pending, self.finished = self.pending[keep], self.finished[keep]
        if self.with_history:
            self.history = self.history[keep]

    # ------------------------------------------------------------------ one round: draft, verify, keep
    def round(self, draft_length: int) -> None:
        active = ~self.finished
        decoded = self.all_rows if self.rows is None else self.rows
        budget = self.config.max_new_tokens - self.out.count[decoded]  # tokens each row may still add
        k = max(0, min(draft_length, int(budget[active].max()) - 1)) if bool(active.any()) else 0
        new_cols = active.long()[:, None].expand(-1, k + 1)
        s_scores, fed, histories = self._draft(k, active, new_cols)
        t_scores, t_hidden = self._verify(fed, new_cols, histories)
        s_lse, t_lse = s_scores.logsumexp(dim=-1), t_scores.logsumexp(dim=-1)  # [b, k+1]
        n_kept = self._accepted(s_scores, t_scores, fed[:, 1:], s_lse, t_lse)
        last = self._last_token(s_scores, t_scores, n_kept, k)
        tokens = torch.cat([fed[:, 1:], last[:, None]], dim=1)  # [b, k+1]; index n_kept holds `last`
        tokens.scatter_(1, n_kept[:, None], last[:, None])
        self._commit(tokens, n_kept, active, budget, decoded, s_scores, t_scores, s_lse, t_lse, t_hidden)
        self.pending = last.masked_fill(self.finished, self.pad)

    def _draft(self, k: int, active: Tensor, new_cols: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """The student feeds the pending token and drafts k tokens from q (k + 1 forwards): its processed
        scores [b, k+1, V], the fed tokens [b, k+1] (pending, drafts) and the history at each position."""
        feed = self.pending.masked_fill(~active, self.pad)
        fed, hist, scores_at, histories = [feed], self.history, [], []
        for i in range(k + 1):
            step_mask = torch.cat([self.mask, new_cols[:, :i + 1]], dim=1)
            logits, _ = self.student.step(feed[:, None], step_mask, (self.next_pos + i)[:, None])
            self.stats.student_forwards += 1
            scores = draw.apply_processors(_wide(logits[:, :self.vocab]), hist, self.processors)
            scores_at.append(scores)
            histories.append(hist)
            if i == k:
                break
            if self.config.greedy:
                feed = scores.argmax(dim=-1)
            else:
                feed = draw.sample_from_probs(draw.exp_shifted(scores)[0], self.generator, rows=self.rows,
                                              batch=self.batch)
            feed = feed.masked_fill(~active, self.pad)
            fed.append(feed)
            if self.with_history:
                hist = torch.cat([hist, feed[:, None]], dim=1)
        return torch.stack(scores_at, dim=1), torch.stack(fed, dim=1), histories

    def _verify(self, fed: Tensor, new_cols: Tensor, histories: list[Tensor]) -> tuple[Tensor, Tensor]:
        """One teacher forward over pending + drafts: processed scores [b, k+1, V] at every drafted position
        and the bonus position, and the hidden states there."""
        positions = self.next_pos[:, None] + torch.arange(fed.shape[1], device=self.device)
        t_logits, t_hidden = self.teacher.feed(fed, torch.cat([self.mask, new_cols], dim=1), positions)
        self.stats.teacher_forwards += 1
        t_logits = _wide(t_logits[..., :self.vocab]).to(self.device)
        scores = [draw.apply_processors(t_logits[:, i], histories[i], self.processors)
                  for i in range(fed.shape[1])]
        return torch.stack(scores, dim=1), t_hidden

    def _accepted(self, s_scores: Tensor, t_scores: Tensor, drafts: Tensor, s_lse: Tensor,
                  t_lse: Tensor) -> Tensor:
        """Drafted token d_i is kept with probability min(1, p~(d_i) / q(d_i)); the number of leading kept
        drafts per row [b] (greedy: while the draft is the argmax of p~)."""
        k = drafts.shape[1]
        u_accept = draw.row_uniforms((k,), self.batch, self.rows, self.generator, self.device)
        if k == 0:
            return torch.zeros(drafts.shape[0], dtype=torch.long, device=self.device)
        if self.config.greedy:
            target = s_scores[:, :k] if self.alpha == 0 else _mix_probs(s_scores[:, :k], t_scores[:, :k],
                                                                        self.alpha)
            accept = target.argmax(dim=-1) == drafts
        else:
            d_logq = _token_logprob(s_scores[:, :k], drafts, s_lse[:, :k])
            d_logp = _token_logprob(t_scores[:, :k], drafts, t_lse[:, :k])
            accept = u_accept.log() < (draw.mix_logprob(d_logq, d_logp, self.alpha) - d_logq).clamp(max=0.0)
        return accept.long().cumprod(dim=1).sum(dim=1)

    def _last_token(self, s_scores: Tensor, t_scores: Tensor, n_kept: Tensor, k: int) -> Tensor:
        """The round's last token, at index n_kept: from the residual (p - q)+ after a rejection, or from p~
        (the bonus) when the whole draft was kept."""
        at = n_kept[:, None, None].expand(-1, 1, s_scores.shape[-1])
        s_last, t_last = s_scores.gather(1, at).squeeze(1), t_scores.gather(1, at).squeeze(1)
        if self.config.greedy:
            return (s_last if self.alpha == 0 else _mix_probs(s_last, t_last, self.alpha)).argmax(dim=-1)
        q_last, p_last = s_last.softmax(dim=-1), t_last.softmax(dim=-1)
        mixture = q_last.mul(1 - self.alpha).add_(p_last, alpha=self.alpha)
        residual = (p_last - q_last).clamp_(min=0.0)
        # A rejection has probability alpha * TV(p, q); a residual that rounds to nothing can only follow a
        # rejection of probability ~0, and then p~ is the distribution the token is drawn from.
        empty = residual.sum(dim=-1, keepdim=True) <= 0
        probs = torch.where((n_kept < k)[:, None] & ~empty, residual, mixture)
        return draw.sample_from_probs(probs, self.generator, rows=self.rows, batch=self.batch)

    def _commit(self, tokens: Tensor, n_kept: Tensor, active: Tensor, budget: Tensor, decoded: Tensor,
                s_scores: Tensor, t_scores: Tensor, s_lse: Tensor, t_lse: Tensor, t_hidden: Tensor) -> None:
        """Record tokens 0..n_kept (cut at the first EOS and at each row's budget), then roll both caches back
        to each row's kept prefix: the pending column and the kept drafts stay, the rest are masked, and
        trailing columns no row kept are cropped."""
        k = tokens.shape[1] - 1
        idx = torch.arange(k + 1, device=self.device)
        kept_cols = (idx[None] <= n_kept[:, None]) & active[:, None]
        first_eos = torch.where(torch.isin(tokens, self.eos_ids) & kept_cols, idx[None], k + 1).amin(dim=1)
        keep = kept_cols & (idx[None] <= first_eos[:, None]) & (idx[None] < budget[:, None])
        logq = _token_logprob(s_scores, tokens, s_lse)
        logp = _token_logprob(t_scores, tokens, t_lse)
        self.out.write(decoded, keep, tokens, logq, logp, draw.mix_logprob(logq, logp, self.alpha),
                       t_hidden.to(self.device) if self.return_hidden else None)
        n_new = keep.long().sum(dim=1)
        self.finished = self.finished | (first_eos <= n_kept) | (self.out.count[decoded] >=
                                                                 self.config.max_new_tokens)
        self._count(k, n_kept, active, n_new)
        self.mask = torch.cat([self.mask, kept_cols.long()], dim=1)
        used = int(kept_cols.any(dim=0).nonzero().max()) + 1 if bool(kept_cols.any()) else 0
        if used < k + 1:
            self.student.cache.crop(used - k - 1)
            self.teacher.cache.crop(used - k - 1)
            self.mask = self.mask[:, :self.mask.shape[1] - (k + 1 - used)]
        self.next_pos = self.next_pos + kept_cols.long().sum(dim=1)
        if self.with_history:
            counts = torch.where(self.finished, 0, n_new)
            self.history = _append_ragged(self.history, tokens, counts, NO_TOKEN)

    def _count(self, k: int, n_kept: Tensor, active: Tensor, n_new: Tensor) -> None:
        stats, n_active = self.stats, int(active.sum())
        accepted, rejected = int(n_kept[active].sum()), int((n_kept[active] < k).sum())
        self.accepted, self.rejected = self.accepted + accepted, self.rejected + rejected
        stats.rounds += 1
        stats.rejected += rejected
        stats.teacher_row_forwards += n_active
        stats.drafted += k * n_active
        stats.accepted += accepted
        stats.tokens += int(n_new.sum())
        stats.draft_lengths.append(k)
        stats.add_kept(torch.bincount(n_kept[active], minlength=k + 1).tolist())


def _wide(logits: Tensor) -> Tensor:
    """Logits in fp32, or wider for float64 models."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _mix_probs(s_scores: Tensor, t_scores: Tensor, alpha: float) -> Tensor:
    return s_scores.softmax(dim=-1).mul(1 - alpha).add_(t_scores.softmax(dim=-1), alpha=alpha)

