"""The rollout decoder: KV-cache decoding of student (and teacher) in lockstep, with batch compaction.

Teacher and student decode in lockstep, each with its own KV cache (`Decoder`, which owns a
`CausalLMAdapter`), on left-padded prompts with explicit position ids (GPT-2's absolute positions must
not count the padding). On CPU the prompts are prefilled without most of their left padding when that
pays (`prefill_groups`); finished rows leave the decoded batch (`DecodeBatch.compact`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from minillm.config import SamplingConfig
from minillm.distributed import lockstep_group, ranks_done
from minillm.models import position_ids_from_mask
from minillm.sampling import draw
from minillm.sampling.adapter import CausalLMAdapter, GrowingLayer

__all__ = ["PREFILL_CALL_COST", "UNPADDED_PREFILL_MAX_COST", "DecodeBatch", "Decoder", "decode_lockstep",
           "prefill_groups"]

# Unpadded prompt prefill on CPU (see `prefill_groups`). A backbone call over g rows of width w costs about
# g * w tokens plus a fixed overhead (weight traffic, mask and RoPE set-up) worth about this many tokens:
# 4-layer SmolLM2 student, fp32, 1 thread: ~0.36 ms per token and ~9 ms per call (1 row x 4 tokens: 10.6 ms).
PREFILL_CALL_COST = 25
# Prefill in groups only when the estimated cost is at most this fraction of the one padded batched call;
# batches with little padding keep the single call (whose numbers are the reference). 0 disables the unpadded
# prefill. The estimate tracked the measured prefill time (same student, batch 8, 1 thread): estimated /
# measured ratio 0.91 / 0.90 (11 % padding), 0.87 / 0.88 (22 %), 0.80 / 0.78 (31 %), 0.66 / 0.57 (45 %),
# 0.27 / 0.27 (77 %); below ~25 % padding the saving is ~10 % of a prefill, under 1 % of a 128-token rollout.
UNPADDED_PREFILL_MAX_COST = 0.8
# The planner is a quadratic dynamic programme over the rows (~0.1 ms per 1000 row pairs in Python); larger
# batches (test-sized sampling runs, never a rollout batch) keep the one padded call.
PREFILL_PLAN_MAX_ROWS = 512


def prefill_groups(lengths: Sequence[int], width: int) -> list[list[int]] | None:
    """Row groups for an unpadded prefill of left-padded prompts, or None for one padded batched call.

    Rows sorted by length are split into contiguous runs minimising sum(rows * longest + PREFILL_CALL_COST)
    over the runs (exact dynamic programme; batch sizes are small); each run is then prefilled over the last
    `longest` columns only, so it carries only its own padding. Left padding typically makes up half of a
    batch's prompt positions (Dolly prompts, batch 8: 58 %), and the prefill costs as much as ~18 decode
    steps.
    """
    batch = len(lengths)
    if batch < 2 or batch > PREFILL_PLAN_MAX_ROWS or UNPADDED_PREFILL_MAX_COST <= 0 or min(lengths) == width:
        return None  # nothing to plan: one row, no padding, or a batch too large for the quadratic planner
    order = sorted(range(batch), key=lambda i: -lengths[i])
    size = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * batch  # best[i]: cost of the first i rows (longest first)
    cut = [0] * (batch + 1)
    for end in range(1, batch + 1):
        for start in range(end):
            cost = best[start] + (end - start) * size[start] + PREFILL_CALL_COST
            if cost < best[end]:
                best[end], cut[end] = cost, start
    if best[batch] > UNPADDED_PREFILL_MAX_COST * (batch * width + PREFILL_CALL_COST):
        return None
    groups, end = [], batch
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return groups[::-1]


class Decoder:
    """One model's incremental decoding state: its adapter (body, head, device) and its KV cache.

    The backbone is called directly and only the last position is projected, so the prompt forward never
    materialises [B, P, V] logits, and the teacher's recorded hidden state is by construction the one its
    logits came from (the adapter's head is `lm_head_fn`, what the losses use as well).
    """

    def __init__(self, model, autocast_dtype: torch.dtype | None = None, max_new_tokens: int = 0) -> None:
        self.model = CausalLMAdapter(model, autocast_dtype)
        self.cache = self.model.new_cache(max_new_tokens)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Feed new tokens; return (logits [B, V], post-norm hidden [B, H]) at the last fed position."""
        device = self.model.device
        with self.model.autocast():
            hidden = self.model.hidden_states(input_ids.to(device), attention_mask.to(device),
                                              position_ids.to(device), self.cache)[:, -1]
            return self.model.project(hidden), hidden

    def feed(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Feed several new tokens per row: (logits [B, n, V], post-norm hidden [B, n, H]) at every fed
        position (the speculative sampler's verification forward)."""
        device = self.model.device
        with self.model.autocast():
            hidden = self.model.hidden_states(input_ids.to(device), attention_mask.to(device),
                                              position_ids.to(device), self.cache)
            return self.model.project(hidden), hidden

    def select_rows(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (long, on this decoder's device) of every cache layer (batch
        compaction)."""
        self.cache.batch_select_indices(indices)

    def can_prefill_unpadded(self) -> bool:
        """Only on CPU, without autocast, in fp32/fp64 and with plain (growing) cache layers.

        On accelerators one padded batched call is cheaper than several small ones; bf16 and autocast keep the
        batched prefill so that their numbers stay exactly as before.
        """
        layers = getattr(self.cache, "layers", None)
        return (self.model.device.type == "cpu" and self.model.autocast_dtype is None
                and isinstance(layers, list) and len(layers) > 0
                and all(type(layer) is GrowingLayer for layer in layers)
                and self.model.dtype in (torch.float32, torch.float64))

    def prefill(self, prompt_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                groups: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """The prompt forward: `step` over the whole left-padded batch, or (CPU) group by group without the
        padding.

        With `groups`, each group of rows is fed only the last w columns of the left-padded prompt (w = its
        longest prompt), with its own slice of the mask and position ids (0..n-1 over real tokens, as in the
        batched call), into a scratch cache; the keys/values are then written into this decoder's cache at the
        same columns of the usual [B, heads, P, d] left-padded layout, and the padding columns no group
        computed are zero (the attention mask is 0 there, as for the padding keys of the batched call). Logits
        and hidden states are each row's at its last (real) prompt token. Mathematically the batched
        computation; numerically equal up to float round-off (different matmul shapes).
        """
        if groups is None or not self.can_prefill_unpadded():
            return self.step(prompt_ids, attention_mask, position_ids)
        device = self.model.device
        batch, width = prompt_ids.shape
        prompt_ids, attention_mask = prompt_ids.to(device), attention_mask.to(device)
        position_ids = position_ids.to(device)
        hidden = keys = values = None
        for rows in groups:
            index = torch.tensor(rows, device=device)
            cols = slice(width - int(attention_mask[index].sum(dim=1).max()), width)
            scratch = self.model.scratch_cache()
            last = self.model.hidden_states(prompt_ids[index, cols], attention_mask[index, cols],
                                            position_ids[index, cols], scratch)[:, -1]
            if hidden is None:
                hidden = last.new_empty((batch, last.shape[-1]))
                keys = [layer.keys.new_zeros((batch, *layer.keys.shape[1:-2], width, layer.keys.shape[-1]))
                        for layer in scratch.layers]
                values = [layer.values.new_zeros((batch, *layer.values.shape[1:-2], width,
                                                  layer.values.shape[-1])) for layer in scratch.layers]
            hidden[index] = last
            for layer, k, v in zip(scratch.layers, keys, values):
                k[index, :, cols] = layer.keys
                v[index, :, cols] = layer.values
        for layer, k, v in zip(self.cache.layers, keys, values, strict=True):
            layer.update(k, v)
        return self.model.project(hidden), hidden


class DecodeBatch:
    """The decoded rows' mask, positions and n-gram history, and the map back to the original batch.

    Batch compaction: `rows` maps the rows still decoded to their original rows (None: all, uncompacted).
    Every record is written at full batch size (`full`), finished rows as pad / inactive, as without it.
    """

    def __init__(self, prompt_ids: Tensor, prompt_mask: Tensor, max_new_tokens: int,
                 device: torch.device) -> None:
        self.batch, self.prompt_len = prompt_ids.shape
        # The mask of prompt + response, filled one column per step; each step passes the filled prefix.
        self.full_mask = torch.zeros(self.batch, self.prompt_len + max_new_tokens, dtype=torch.long,
                                     device=device)
        self.full_mask[:, :self.prompt_len] = (prompt_mask != 0).long()
        self.attention_mask = self.full_mask[:, :self.prompt_len]
        self.position_ids = position_ids_from_mask(self.attention_mask)
        # The n-gram ban sees left padding as an id no token can match, so a padded prompt bans exactly what
        # the unpadded prompt would (with pad = EOS, padding would otherwise form n-grams of its own).
        no_token = torch.iinfo(torch.long).max
        self.history = prompt_ids.to(device).masked_fill(self.attention_mask == 0, no_token)
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.rows: Tensor | None = None

    def full(self, x: Tensor, fill) -> Tensor:
        """A decoded-rows tensor at full batch size, `fill` in the rows no longer decoded."""
        if self.rows is None:
            return x
        out = x.new_full((self.batch, *x.shape[1:]), fill)
        out[self.rows] = x
        return out

    def compact(self, keep: Tensor) -> None:
        """Drop the decoded rows not in `keep` (indices into the decoded rows)."""
        self.rows = keep if self.rows is None else self.rows[keep]
        self.full_mask, self.position_ids, self.history = (self.full_mask[keep], self.position_ids[keep],
                                                           self.history[keep])

    def advance(self, token: Tensor, active: Tensor, t: int, with_history: bool) -> None:
        """Append step t's tokens: mask column, next position ids and (when read) the n-gram history."""
        # Finished rows not (yet) compacted away keep decoding a pad token with attention mask 0: the cache
        # stays rectangular and nothing attends to it; their outputs are discarded.
        self.full_mask[:, self.prompt_len + t] = active
        self.attention_mask = self.full_mask[:, :self.prompt_len + t + 1]
        # position_ids_from_mask(attention_mask)[:, -1:], without the cumsum over the whole mask: each row
        # has a real prompt token, so its position advances by one for a real token and stays put for a pad.
        self.position_ids = self.position_ids[:, -1:] + active.long()[:, None]
        if with_history:  # only the n-gram ban reads the history
            self.history = torch.cat([self.history, token[:, None]], dim=1)


def decode_lockstep(student_dec: Decoder, teacher_dec: Decoder | None, prompt_ids: Tensor,
                    prompt_mask: Tensor, *, config: SamplingConfig, eos_token_id: int | Sequence[int],
                    pad_token_id: int, alpha: float, shared_vocab_size: int | None,
                    generator: torch.Generator | None, return_teacher_hidden: bool,
                    compact: bool) -> list[tuple[Tensor, ...]]:
    """Decode until every row has drawn an EOS or `max_new_tokens`; one record per step (see _record)."""
    device = student_dec.device
    eos_ids = torch.tensor(eos_token_id, device=device).reshape(-1)
    processors = draw.build_processors(config)
    state = DecodeBatch(prompt_ids, prompt_mask, config.max_new_tokens, device)
    # A sharded teacher (minillm.distributed) gathers each layer per call: every process then prefills in one
    # call and decodes until all are done. Otherwise, on CPU the prompts are prefilled without (most of) their
    # left padding when that pays (prefill_groups).
    in_step = lockstep_group()
    groups = None if in_step else prefill_groups(state.attention_mask.sum(dim=1).tolist(), state.prompt_len)
    s_logits, _ = student_dec.prefill(prompt_ids, state.attention_mask, state.position_ids, groups)
    t_logits = t_hidden = None
    if teacher_dec is not None:
        t_logits, t_hidden = teacher_dec.prefill(prompt_ids, state.attention_mask, state.position_ids, groups)
    vocab = _shared_width(s_logits, t_logits, shared_vocab_size)
    steps: list[tuple[Tensor, ...]] = []
    for t in range(config.max_new_tokens):
        token, *logprobs = draw.draw_next(
            s_logits[:, :vocab], None if t_logits is None else t_logits[:, :vocab].to(device), state.history,
            processors, alpha=alpha, greedy=config.greedy, generator=generator, rows=state.rows,
            full_batch=state.batch)
        active_all = ~state.finished
        active = active_all if state.rows is None else active_all[state.rows]  # the decoded rows' flags
        token = token.masked_fill(~active, pad_token_id)
        hidden = t_hidden if return_teacher_hidden else None
        steps.append(_record(state, token, active_all, logprobs, hidden, pad_token_id, device))

        done = ~active | torch.isin(token, eos_ids)  # the decoded rows finished after this step
        state.finished = done if state.rows is None else state.finished.index_fill(0, state.rows[done], True)
        all_done = bool(state.finished.all())
        if in_step:
            all_done = ranks_done(all_done, device)
        if t == config.max_new_tokens - 1 or all_done:
            break
        if compact and int(done.sum()) >= max(1, math.ceil(done.shape[0] / 4)) and not bool(done.all()):
            # Drop the finished rows from the decoding state; the kept rows are all active.
            keep = (~done).nonzero().squeeze(1)
            state.compact(keep)
            student_dec.select_rows(keep)
            if teacher_dec is not None:
                teacher_dec.select_rows(keep.to(teacher_dec.device))
            token, active = token[keep], active[keep]
        state.advance(token, active, t, with_history=bool(processors))
        s_logits, _ = student_dec.step(token[:, None], state.attention_mask, state.position_ids)
        if teacher_dec is not None:
            t_logits, t_hidden = teacher_dec.step(token[:, None], state.attention_mask, state.position_ids)
    return steps


def _shared_width(s_logits: Tensor, t_logits: Tensor | None, shared_vocab_size: int | None) -> int:
    widths = [s_logits.shape[-1]] + ([t_logits.shape[-1]] if t_logits is not None else [])
    vocab = shared_vocab_size or min(widths)
    if vocab > min(widths):
        raise ValueError(f"shared_vocab_size = {vocab} exceeds the logit widths {widths}.")
    return vocab


def _record(state: DecodeBatch, token: Tensor, active_all: Tensor, logprobs: list[Tensor | None],
            t_hidden: Tensor | None, pad_token_id: int, device: torch.device) -> tuple[Tensor, ...]:
    """(tokens, active, log q[, log p, log p~[, teacher hidden]]) of one step, at full batch size."""
    tok_logq, tok_logp, tok_logmix = logprobs
    record = [state.full(token, pad_token_id), active_all, state.full(tok_logq, 0.0)]
    if tok_logp is not None:
        record += [state.full(tok_logp, 0.0), state.full(tok_logmix, 0.0)]
        if t_hidden is not None:
            record.append(state.full(t_hidden.to(device), 0.0))
    return tuple(record)
