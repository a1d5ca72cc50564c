"""Rollout engine: batched KV-cache decoding with teacher-mixed sampling (MiniLLM Eq. 4-5).

Every policy-gradient quantity downstream is computed from what this module records, so it records
the *behaviour* distributions exactly as they were sampled from:

- q_old(y_t): the student's processed next-token distribution (temperature, n-gram ban, top-k/top-p),
- p(y_t): the teacher's next-token distribution after the same processing,
- p~(y_t) = alpha * p(y_t) + (1 - alpha) * q_old(y_t): the distribution the token was really drawn from,
- w_t = q_old(y_t) / p~(y_t): the single-token importance weight of Eq. 5 (<= 1 / (1 - alpha)).

Teacher and student decode in lockstep, each with its own KV cache, on left-padded prompts with explicit
position ids (GPT-2's absolute positions must not count the padding). Tokens are drawn by inverse-CDF
sampling (cumsum + searchsorted) because `torch.multinomial` over a ~50k vocabulary is ~28x slower on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import (
    DynamicCache,
    DynamicLayer,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.logits_process import LogitsProcessor

from minillm.errors import ConfigError, DataError
from minillm.models import backbone, final_hidden, lm_head_fn, position_ids_from_mask

__all__ = [
    "Rollout",
    "SamplingConfig",
    "check_teacher_sampling",
    "generate_rollouts",
    "generate_texts",
    "response_hidden",
    "sample_from_probs",
]


@dataclass
class SamplingConfig:
    """How tokens are drawn. The MiniLLM rollout setting is the default: plain sampling at temperature 1."""

    max_new_tokens: int = field(default=256, metadata={"help": "Maximum number of generated tokens per prompt "
                                                               "(the first EOS included)."})
    temperature: float = field(default=1.0, metadata={"help": "Logits are divided by this before softmax, for the "
                                                              "student and the teacher alike."})
    top_k: int = field(default=0, metadata={"help": "Keep only the k most likely tokens; 0 disables. Not allowed "
                                                    "when a teacher is stepped (see check_teacher_sampling)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass; 1.0 disables. Not allowed when a "
                                                        "teacher is stepped (see check_teacher_sampling)."})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "Ban any n-gram of this size (prompt included) "
                                                                   "from repeating; 0 disables."})
    greedy: bool = field(default=False, metadata={"help": "Take the argmax of the sampling distribution instead "
                                                          "of sampling."})

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, "an integer >= 1"),
            "temperature": (math.isfinite(self.temperature) and self.temperature > 0,
                            "a number > 0 (use greedy=true for argmax decoding)"),
            "top_k": (self.top_k >= 0, "an integer >= 0 (0 disables top-k)"),
            "top_p": (0.0 < self.top_p <= 1.0, "a number in (0, 1] (1.0 disables top-p)"),
            "no_repeat_ngram_size": (self.no_repeat_ngram_size >= 0, "an integer >= 0 (0 disables it)"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"sampling.{key} = {getattr(self, key)!r} is invalid: it must be {expected}.")


@dataclass
class Rollout:
    """A batch of sampled responses with everything the policy-gradient update needs.

    All tensors are on CPU (the rollout buffer outlives the decoding batch). Per-token tensors are [B, T]
    with T = the longest response; positions after a sequence's first EOS (response_mask = 0) hold
    pad_token_id in `response_ids` and exactly 0 in every float tensor, importance weights included.
    """

    prompt_ids: Tensor                   # [B, P] long, left padded
    prompt_mask: Tensor                  # [B, P] long
    response_ids: Tensor                 # [B, T] long
    response_mask: Tensor                # [B, T] float, 1 on generated tokens incl. the first EOS
    lengths: Tensor                      # [B] long, number of generated tokens incl. EOS
    student_logprobs: Tensor             # [B, T] fp32, log q_old(y_t) under the processed student distribution
    teacher_logprobs: Tensor | None      # [B, T] fp32, log p(y_t) under the processed teacher distribution
    mix_logprobs: Tensor | None          # [B, T] fp32, log p~(y_t); equals student_logprobs when alpha = 0
    importance_weights: Tensor           # [B, T] fp32, q_old(y_t) / p~(y_t); 1 when alpha = 0
    teacher_hidden: Tensor | None        # [B, T, Ht] fp32, teacher post-norm hidden state predicting y_t

    def full_sequence(self) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) of prompt + response, for the scoring forward passes.

        Position t of the response is predicted at index P - 1 + t of the returned sequence.
        """
        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask.long(), self.response_mask.long()], dim=1)
        return ids, mask


def check_teacher_sampling(config: SamplingConfig, *, teacher_mix_alpha: float, with_teacher: bool) -> None:
    """Refuse sampling setups whose log-probability ratios can be infinite.

    Call it when a run is configured (before loading models) to fail early; generate_rollouts calls it too.
    """
    if not (0.0 <= teacher_mix_alpha < 1.0):
        raise ConfigError(
            f"teacher_mix_alpha = {teacher_mix_alpha!r} is invalid: it must be in [0, 1). It is the teacher's share "
            "of the sampling mixture p~ = alpha*p + (1-alpha)*q; at alpha = 1 the student never samples, so every "
            "importance weight q/p~ is 0 and the policy gradient vanishes. The MiniLLM paper uses 0.2."
        )
    if teacher_mix_alpha > 0 and not with_teacher:
        raise ConfigError(f"teacher_mix_alpha = {teacher_mix_alpha} > 0 needs a teacher model to mix in; pass one "
                          "or set teacher_mix_alpha = 0.")
    if with_teacher and (config.top_k > 0 or config.top_p < 1.0):
        raise ConfigError(
            f"sampling.top_k = {config.top_k} / sampling.top_p = {config.top_p} cannot be used when the teacher is "
            "stepped during sampling (teacher-mixed rollouts or teacher log-probs for rewards). Top-k and top-p "
            "truncate each model's distribution to its *own* most likely tokens, so the two supports differ: a token "
            "the teacher contributes to p~ = alpha*p + (1-alpha)*q can lie outside the student's truncated support "
            "(log q_old = -inf, importance weight 0 and a -inf log-ratio in the reward), and a token the student "
            "samples can lie outside the teacher's (log p = -inf, reward -inf). This is the assertion failure of "
            "MiniLLM issue #287 (spec §5.2). Set sampling.top_k = 0 and sampling.top_p = 1.0 for rollouts, as the "
            "paper does; temperature and no_repeat_ngram_size are fine (the n-gram ban removes the same tokens "
            "from both models)."
        )


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
    # The generator may live on another device than the logits (a CPU generator driving a GPU model).
    u_device = generator.device if generator is not None else cdf.device
    if rows is None:
        u = torch.rand(total.shape, generator=generator, device=u_device)
    else:
        u = torch.rand((batch, 1), generator=generator, device=u_device)[rows.to(u_device)]
    u = u.to(cdf.device) * total
    index = torch.searchsorted(cdf, u, right=True)
    last_positive = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last_positive).squeeze(-1)


def _build_processors(config: SamplingConfig) -> list[LogitsProcessor]:
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


def _exp_shifted(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(e = exp(scores - row max) [B, V], z = row sums of e [B, 1], log normaliser [B, 1]).

    softmax = e / z and log_softmax[y] = scores[y] - log normaliser (exact, no underflow in the tail).
    A decode step's sampling cost is memory traffic over [B, V]: computing log_softmax, exponentiating it
    and mixing would allocate and stream the full vocabulary several times more.
    """
    shift = scores.amax(dim=-1, keepdim=True)
    e = (scores - shift).exp_()
    z = e.sum(dim=-1, keepdim=True)
    return e, z, shift + z.log()


def _draw_next(
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
    batch = student_logits.shape[0]
    s_scores = student_logits.float()
    t_scores = teacher_logits.float() if teacher_logits is not None else None
    if processors and t_scores is not None:
        # Processors act row by row, so one call on the stacked batch processes both models identically
        # (and the n-gram ban, the costly one, is computed once).
        both = torch.cat([s_scores, t_scores])
        history = history.repeat(2, 1)
        for processor in processors:
            both = processor(history, both)
        s_scores, t_scores = both[:batch], both[batch:]
    else:
        for processor in processors:
            s_scores = processor(history, s_scores)
    e_q, z_q, lognorm_q = _exp_shifted(s_scores)
    probs = e_q  # q up to a per-row constant, which is all inverse-CDF sampling and argmax need
    if t_scores is not None:
        e_p, z_p, lognorm_p = _exp_shifted(t_scores)
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
    tok_logmix = tok_logq if alpha == 0 else torch.logaddexp(math.log(alpha) + tok_logp,
                                                            math.log1p(-alpha) + tok_logq)
    return token, tok_logq, tok_logp, tok_logmix


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into a buffer with room to spare instead of re-concatenating.

    `DynamicLayer.update` copies the whole cache every step (torch.cat); here each step writes one slot and
    hands attention a view of the filled part, which holds the same values, so the attention output is the
    same. The buffer is sized for the prompt plus `headroom` more positions and regrown (one copy) if needed.
    Only `_Decoder` uses it, which never crops or reorders the cache; it only drops finished rows
    (`batch_select_indices`, batch compaction).
    """

    def __init__(self, headroom: int) -> None:
        super().__init__()
        self.headroom = headroom
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            def grow(filled: Tensor, new: Tensor) -> Tensor:
                buffer = new.new_empty((*new.shape[:-2], end + self.headroom, new.shape[-1]))
                if start:
                    buffer[..., :start, :] = filled
                return buffer
            self.key_buffer = grow(self.keys, key_states)
            self.value_buffer = grow(self.values, value_states)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (long) of the batch: buffers keep their room, the filled part is copied."""
        if self.key_buffer is None:
            super().batch_select_indices(indices)
            return
        end = self.get_seq_length()

        def select(buffer: Tensor) -> Tensor:
            index = indices.to(buffer.device)
            out = buffer.new_empty((index.shape[0], *buffer.shape[1:]))
            out[..., :end, :] = buffer[..., :end, :].index_select(0, index)
            return out

        self.key_buffer, self.value_buffer = select(self.key_buffer), select(self.value_buffer)
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]


# Rows of the LM-head weight projected per matmul on CPU. One [B, H] x [H, V] GEMM over a ~49k vocabulary runs
# 20-25 % slower in MKL than the same product in ~2 MB weight slices (SmolLM2 head, B = 8, fp32, 1 thread: ~20 vs
# ~16 ms per decode step). Each logit is still the same dot product over H; on our machine the slices gave bitwise
# the same logits and rollouts (tests/test_sampling.py checks them to 1e-6).
_HEAD_ROWS_PER_MATMUL = 1024

# Unpadded prompt prefill on CPU (see `_prefill_groups`). A backbone call over g rows of width w costs about
# g * w tokens plus a fixed overhead (weight traffic, mask and RoPE set-up) worth about this many tokens: 4-layer
# SmolLM2 student, fp32, 1 thread: ~0.36 ms per token and ~9 ms per call (1 row x 4 tokens: 10.6 ms).
_PREFILL_CALL_COST = 25
# Prefill in groups only when the estimated cost is at most this fraction of the one padded batched call; batches
# with little padding keep the single call (whose numbers are the reference). 0 disables the unpadded prefill.
# The estimate tracked the measured prefill time (same student, batch 8, 1 thread): estimated / measured ratio
# 0.91 / 0.90 (11 % padding), 0.87 / 0.88 (22 %), 0.80 / 0.78 (31 %), 0.66 / 0.57 (45 %), 0.27 / 0.27 (77 %);
# below ~25 % padding the saving is ~10 % of a prefill, under 1 % of a 128-token rollout.
_UNPADDED_PREFILL_MAX_COST = 0.8


def _prefill_groups(lengths: Sequence[int], width: int) -> list[list[int]] | None:
    """Row groups for an unpadded prefill of left-padded prompts, or None for one padded batched call.

    Rows sorted by length are split into contiguous runs minimising sum(rows * longest + _PREFILL_CALL_COST) over
    the runs (exact dynamic programme; batch sizes are small); each run is then prefilled over the last `longest`
    columns only, so it carries only its own padding. Left padding typically makes up half of a batch's prompt
    positions (Dolly prompts, batch 8: 58 %), and the prefill costs as much as ~18 decode steps.
    """
    batch = len(lengths)
    if batch < 2 or _UNPADDED_PREFILL_MAX_COST <= 0:
        return None
    order = sorted(range(batch), key=lambda i: -lengths[i])
    size = [lengths[i] for i in order]
    best = [0.0] + [math.inf] * batch  # best[i]: cost of the first i rows (longest first)
    cut = [0] * (batch + 1)
    for end in range(1, batch + 1):
        for start in range(end):
            cost = best[start] + (end - start) * size[start] + _PREFILL_CALL_COST
            if cost < best[end]:
                best[end], cut[end] = cost, start
    if best[batch] > _UNPADDED_PREFILL_MAX_COST * (batch * width + _PREFILL_CALL_COST):
        return None
    groups, end = [], batch
    while end > 0:
        groups.append(sorted(order[cut[end]:end]))
        end = cut[end]
    return groups[::-1]


class _Decoder:
    """One model's incremental decoding state: KV cache plus the head that turns its last hidden state into logits.

    The backbone (`base_model`) is called directly and only the last position is projected, so the prompt
    forward never materialises [B, P, V] logits, and the teacher's recorded hidden state is by construction
    the one its logits came from (`lm_head_fn` is what the losses use as well).
    """

    def __init__(self, model, autocast_dtype: torch.dtype | None = None, max_new_tokens: int = 0) -> None:
        self.autocast_dtype = autocast_dtype
        self.backbone = backbone(model)
        self.head = lm_head_fn(model)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.config = model.config
        self.cache = DynamicCache(config=model.config)
        layers = getattr(self.cache, "layers", None)
        if isinstance(layers, list):  # plain (not sliding-window) layers: preallocate instead of torch.cat
            layers[:] = [_GrowingLayer(max_new_tokens) if type(layer) is DynamicLayer else layer for layer in layers]
        # transformers renamed `past_key_values` to `cache` during 5.x; support both spellings.
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        split = self.head.linear_split()
        self.head_split = None
        if split is not None and self.device.type == "cpu" and split[0].dtype == torch.float32:
            weight, bias, postprocess = split
            rows = _HEAD_ROWS_PER_MATMUL
            biases = bias.split(rows) if bias is not None else [None] * math.ceil(weight.shape[0] / rows)
            self.head_split = (list(zip(weight.split(rows), biases)), postprocess)

    def project(self, hidden: Tensor) -> Tensor:
        """`lm_head_fn(model)(hidden)`, computed in weight slices on CPU (same logits; see _HEAD_ROWS_PER_MATMUL)."""
        x = self.head.cast_input(hidden)
        if self.head_split is None or x.dtype != torch.float32:
            return self.head(hidden)
        slices, postprocess = self.head_split
        # fp32 input and weight: what LMHead computes with or without autocast (which it switches off).
        with torch.autocast(self.device.type, enabled=False):
            return postprocess(torch.cat([torch.nn.functional.linear(x, w, b) for w, b in slices], dim=-1))

    def step(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Feed new tokens; return (logits [B, V], post-norm hidden [B, H]) at the last fed position."""
        with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
              else contextlib.nullcontext()):
            hidden = self._last_hidden(input_ids.to(self.device), attention_mask.to(self.device),
                                       position_ids.to(self.device), self.cache)
            return self.project(hidden), hidden

    def _last_hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, cache) -> Tensor:
        """The backbone over the fed tokens with `cache`; the post-norm hidden state at the last position [B, H]."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **{self.cache_kwarg: cache})
        return out.last_hidden_state[:, -1]

    def select_rows(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (long, on this decoder's device) of every cache layer (batch compaction)."""
        self.cache.batch_select_indices(indices)

    def can_prefill_unpadded(self) -> bool:
        """Only on CPU, without autocast, in fp32/fp64 and with plain (growing) cache layers.

        On accelerators one padded batched call is cheaper than several small ones; bf16 and autocast keep the
        batched prefill so that their numbers stay exactly as before.
        """
        layers = getattr(self.cache, "layers", None)
        return (self.device.type == "cpu" and self.autocast_dtype is None and isinstance(layers, list)
                and len(layers) > 0 and all(type(layer) is _GrowingLayer for layer in layers)
                and self.dtype in (torch.float32, torch.float64))

    def prefill(self, prompt_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                groups: list[list[int]] | None) -> tuple[Tensor, Tensor]:
        """The prompt forward: `step` over the whole left-padded batch, or (CPU) group by group without the padding.

        With `groups`, each group of rows is fed only the last w columns of the left-padded prompt (w = its longest
        prompt), with its own slice of the mask and position ids (0..n-1 over real tokens, as in the batched call),
        into a scratch cache; the keys/values are then written into this decoder's cache at the same columns of
        the usual [B, heads, P, d] left-padded layout, and the padding columns no group computed are zero (the
        attention mask is 0 there, as for the padding keys of the batched call). Logits and hidden states are
        each row's at its last (real) prompt token. Mathematically the batched computation; numerically equal up
        to float round-off (different matmul shapes).
        """
        if groups is None or not self.can_prefill_unpadded():
            return self.step(prompt_ids, attention_mask, position_ids)
        batch, width = prompt_ids.shape
        prompt_ids, attention_mask = prompt_ids.to(self.device), attention_mask.to(self.device)
        position_ids = position_ids.to(self.device)
        hidden = keys = values = None
        for rows in groups:
            index = torch.tensor(rows, device=self.device)
            group_width = int(attention_mask[index].sum(dim=1).max())
            cols = slice(width - group_width, width)
            scratch = DynamicCache(config=self.config)
            last = self._last_hidden(prompt_ids[index, cols], attention_mask[index, cols],
                                     position_ids[index, cols], scratch)
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
        return self.project(hidden), hidden


class _EvalMode:
    """Put models in eval mode (no dropout while sampling) and restore their previous mode afterwards."""

    def __init__(self, *models) -> None:
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        self.was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, training in zip(self.models, self.was_training):
            m.train(training)


def generate_rollouts(
    student,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    config: SamplingConfig,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    teacher=None,
    teacher_mix_alpha: float = 0.0,
    shared_vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    return_teacher_hidden: bool = False,
    student_autocast: torch.dtype | None = None,
    compact: bool = True,
) -> Rollout:
    """Sample responses from p~ = alpha * teacher + (1 - alpha) * student and record the behaviour log-probs.

    Args:
        student, teacher: causal LMs sharing the token ids. When `teacher` is given it is stepped in lockstep
            (its own KV cache) even at alpha = 0, so that teacher log-probs (and hidden states) come back.
        prompt_ids, prompt_mask: [B, P], LEFT padded; every row needs at least one real token.
        eos_token_id: one id or several; a sequence stops after its first EOS, which is part of the response.
        shared_vocab_size: both models' logits are sliced to this width before anything else; by default
            the smaller of the two logit widths.
        generator: source of the uniforms for reproducible sampling (any device; one uniform per row per step).
        return_teacher_hidden: also return the teacher's post-norm hidden state at each predicting position,
            so the loss can recompute teacher logits with `lm_head_fn(teacher)` instead of storing [B, T, V].
        student_autocast: run the student's decoding steps under `torch.autocast(dtype)` (the trainer's bf16
            mixed precision), so that the recorded log q_old comes from the same numerics as the update's
            log q_theta (body in bf16, LM head in fp32: `models.LMHead`). The teacher is not affected.
        compact: drop finished rows from the decoding state (KV caches, mask, positions, n-gram history) once
            at least a quarter of the rows still decoded (and at least one) have finished, so late steps only
            compute the unfinished rows. The rollout is the same: finished rows are recorded as pad / mask 0
            as without compaction, the uniforms are drawn for the whole batch every step (same tokens for the
            same generator), and active rows' numbers differ at most by float round-off (other batch shape).

    Greedy decoding takes the argmax of p~ (of the processed student logits when alpha = 0, as
    `generate(do_sample=False)` does); the recorded log-probs are still those of the processed distributions.
    """
    check_teacher_sampling(config, teacher_mix_alpha=teacher_mix_alpha, with_teacher=teacher is not None)
    if return_teacher_hidden and teacher is None:
        raise ConfigError("return_teacher_hidden=True needs a teacher model.")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must "
                         "be the same [batch, prompt_length] shape.")
    if not bool((prompt_mask != 0).any(dim=1).all()):
        raise DataError("A prompt in the batch is empty (its attention mask is all 0); every prompt needs at "
                        "least one token to condition on. Drop empty prompts before generating.")
    alpha = float(teacher_mix_alpha)
    if teacher is not None and alpha == 0.0 and config.no_repeat_ngram_size == 0:
        # The teacher does not shape the samples: decode the student alone, then score the whole batch
        # with ONE teacher forward pass over the rows' real tokens (batched prefill is several times cheaper
        # than stepping the teacher token by token; docs/benchmarks.md). The n-gram ban needs per-step
        # teacher processing, so it keeps the lockstep path.
        rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=config, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, generator=generator, student_autocast=student_autocast,
                                    compact=compact)
        return _score_with_teacher(rollout, student, teacher, config, shared_vocab_size, return_teacher_hidden)

    with torch.no_grad(), _EvalMode(student, teacher):
        student_dec = _Decoder(student, student_autocast, config.max_new_tokens)
        teacher_dec = _Decoder(teacher, max_new_tokens=config.max_new_tokens) if teacher is not None else None
        device = student_dec.device
        eos_ids = torch.tensor(eos_token_id, device=device).reshape(-1)
        processors = _build_processors(config)
        batch = prompt_ids.shape[0]

        prompt_len = prompt_ids.shape[1]
        # The mask of prompt + response, filled one column per step; each step passes the filled prefix.
        full_mask = torch.zeros(batch, prompt_len + config.max_new_tokens, dtype=torch.long, device=device)
        full_mask[:, :prompt_len] = (prompt_mask != 0).long()
        attention_mask = full_mask[:, :prompt_len]
        position_ids = position_ids_from_mask(attention_mask)
        # The n-gram ban sees left padding as an id no token can match, so a padded prompt bans exactly what
        # the unpadded prompt would (with pad = EOS, padding would otherwise form n-grams of its own).
        history = prompt_ids.to(device).masked_fill(attention_mask == 0, torch.iinfo(torch.long).max)

        # On CPU the prompts are prefilled without (most of) their left padding when that pays (_prefill_groups).
        groups = _prefill_groups(attention_mask.sum(dim=1).tolist(), prompt_len)
        s_logits, _ = student_dec.prefill(prompt_ids, attention_mask, position_ids, groups)
        t_logits = t_hidden = None
        if teacher_dec is not None:
            t_logits, t_hidden = teacher_dec.prefill(prompt_ids, attention_mask, position_ids, groups)
        widths = [s_logits.shape[-1]] + ([t_logits.shape[-1]] if t_logits is not None else [])
        vocab = shared_vocab_size or min(widths)
        if vocab > min(widths):
            raise ValueError(f"shared_vocab_size = {vocab} exceeds the logit widths {widths}.")

        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # Batch compaction: `rows` maps the rows still decoded to their original rows (None: all, uncompacted).
        # Every record is written at full batch size, finished rows as pad / inactive, as without compaction.
        rows: Tensor | None = None
        steps: list[tuple[Tensor, ...]] = []

        def full(x: Tensor, fill) -> Tensor:
            if rows is None:
                return x
            out = x.new_full((batch, *x.shape[1:]), fill)
            out[rows] = x
            return out

        for t in range(config.max_new_tokens):
            token, tok_logq, tok_logp, tok_logmix = _draw_next(
                s_logits[:, :vocab], None if t_logits is None else t_logits[:, :vocab].to(device), history,
                processors, alpha=alpha, greedy=config.greedy, generator=generator, rows=rows, full_batch=batch)
            active_all = ~finished
            active = active_all if rows is None else active_all[rows]  # the decoded rows' flags
            token = token.masked_fill(~active, pad_token_id)
            record = [full(token, pad_token_id), active_all, full(tok_logq, 0.0)]
            if teacher_dec is not None:
                record += [full(tok_logp, 0.0), full(tok_logmix, 0.0)]
                if return_teacher_hidden:
                    record.append(full(t_hidden.to(device), 0.0))
            steps.append(tuple(record))

            done = ~active | torch.isin(token, eos_ids)  # the decoded rows finished after this step
            finished = done if rows is None else finished.index_fill(0, rows[done], True)
            if t == config.max_new_tokens - 1 or bool(finished.all()):
                break
            n_done = int(done.sum())
            if compact and n_done >= max(1, math.ceil(done.shape[0] / 4)):
                # Drop the finished rows from the decoding state; the kept rows are all active.
                keep = (~done).nonzero().squeeze(1)
                rows = keep if rows is None else rows[keep]
                student_dec.select_rows(keep)
                if teacher_dec is not None:
                    teacher_dec.select_rows(keep.to(teacher_dec.device))
                full_mask, position_ids, history = full_mask[keep], position_ids[keep], history[keep]
                token, active = token[keep], active[keep]
            # Finished rows not (yet) compacted away keep decoding a pad token with attention mask 0: the cache
            # stays rectangular and nothing attends to it; their outputs are discarded.
            full_mask[:, prompt_len + t] = active
            attention_mask = full_mask[:, :prompt_len + t + 1]
            # position_ids_from_mask(attention_mask)[:, -1:], without the cumsum over the whole mask: each row
            # has a real prompt token, so its position advances by one for a real token and stays put for a pad.
            position_ids = position_ids[:, -1:] + active.long()[:, None]
            if processors:  # only the n-gram ban reads the history
                history = torch.cat([history, token[:, None]], dim=1)
            s_logits, _ = student_dec.step(token[:, None], attention_mask, position_ids)
            if teacher_dec is not None:
                t_logits, t_hidden = teacher_dec.step(token[:, None], attention_mask, position_ids)

    return _assemble_rollout(steps, prompt_ids, prompt_mask, alpha=alpha, with_teacher=teacher is not None,
                             with_hidden=return_teacher_hidden)


def response_hidden(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                    response_mask: Tensor) -> Tensor:
    """Post-norm hidden states [B, T, H] of `model` at the positions that predict each response token.

    Teacher-forced, by one forward pass without padding inside the sequences: each row's real tokens
    (the prompt without its left padding, then the response) are packed to start at position 0 and
    right-padded to the longest row, with attention mask 1 on real tokens and position ids 0..n-1. This
    gives what a forward over `cat(prompt_ids, response_ids)` (left-padded prompts, position ids from the
    mask) gives at positions P-1 ... P+T-2, up to float round-off, but processes only
    max_b(prompt_b + response_b) - 1 positions per row instead of P + T (a row's last response token
    predicts nothing and is not fed unless it lies within the longest row's span). As in a `Rollout`,
    prompts are left-padded and each response mask is 1 on a prefix of its row. Entries at t >= the
    row's response length are arbitrary (callers mask them). The output is on the model's device; no
    grad mode is set here (callers scoring without gradients wrap it in torch.no_grad()).
    """
    device = next(model.parameters()).device
    ids = torch.cat([prompt_ids, response_ids], dim=1).to(device)
    real = torch.cat([prompt_mask != 0, response_mask != 0], dim=1).to(device)
    P, T = prompt_ids.shape[1], response_ids.shape[1]
    counts = real.long().cumsum(dim=1)  # real tokens up to and including each position
    n_real = counts[:, -1]
    # The response token t (at P + t) is predicted at the packed position of the real token before it.
    predict = counts[:, P - 1:P - 1 + T] - 1
    width = max(1, int(n_real.max()) - 1)
    slot = torch.where(real, counts - 1, width).clamp(max=width)  # padding and tokens past the width: dropped
    packed = ids.new_zeros((ids.shape[0], width + 1)).scatter_(1, slot, ids)[:, :width]
    positions = torch.arange(width, device=device)
    packed_mask = (positions[None] < n_real[:, None]).long()
    hidden = final_hidden(model, packed, packed_mask, positions[None].expand(ids.shape[0], -1))
    index = predict.clamp(0, width - 1)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def _score_with_teacher(rollout: Rollout, student, teacher, config: SamplingConfig, shared_vocab_size: int | None,
                        return_teacher_hidden: bool) -> Rollout:
    """Fill a student-only rollout's teacher fields (alpha = 0) from one teacher-forced forward pass.

    The forward runs over the rows' real tokens only (`response_hidden`: no left padding of the prompts,
    no right padding inside each row), which equals the decode-time teacher up to float round-off.
    """
    widths = [student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]]
    vocab = shared_vocab_size or min(widths)
    if vocab > min(widths):
        raise ValueError(f"shared_vocab_size = {vocab} exceeds the logit widths {widths}.")
    device = next(teacher.parameters()).device
    head = lm_head_fn(teacher)
    keep = rollout.response_mask.bool()
    logprobs = torch.zeros(rollout.response_ids.shape, dtype=torch.float32)
    hidden_out = None
    with torch.no_grad(), _EvalMode(teacher):
        hidden = response_hidden(teacher, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                 rollout.response_mask)
        for row in range(hidden.shape[0]):  # one row's real tokens at a time: never [B, T, V] logits
            valid = keep[row]
            logits = head(hidden[row][valid.to(device)])[:, :vocab].float()
            if config.temperature != 1.0:
                logits = logits / config.temperature
            targets = rollout.response_ids[row][valid].to(device)[:, None]
            logprobs[row, valid] = torch.log_softmax(logits, dim=-1).gather(-1, targets)[:, 0].cpu()
        if return_teacher_hidden:
            hidden_out = torch.where(keep[..., None], hidden.float().cpu(), torch.zeros(()))
    return dataclasses.replace(rollout, teacher_logprobs=logprobs, mix_logprobs=rollout.student_logprobs.clone(),
                               teacher_hidden=hidden_out)


def _assemble_rollout(steps: list[tuple[Tensor, ...]], prompt_ids: Tensor, prompt_mask: Tensor, *, alpha: float,
                      with_teacher: bool, with_hidden: bool) -> Rollout:
    """Stack the per-step records into [B, T] CPU tensors, zeroing every float after a sequence's EOS.

    Zeroing selects rather than multiplies: the pad fed to a finished row can be outside a truncated
    distribution, and -inf * 0 would leave NaN in the buffer.
    """
    columns = [torch.stack(list(col), dim=1).cpu() for col in zip(*steps)]
    response_ids, active = columns[:2]

    def masked(x: Tensor) -> Tensor:
        keep = active if x.dim() == 2 else active[..., None]
        return torch.where(keep, x.float(), torch.zeros((), dtype=torch.float32))

    student_logprobs = masked(columns[2])
    teacher_logprobs = mix_logprobs = teacher_hidden = None
    weights = active.float()
    if with_teacher:
        teacher_logprobs, mix_logprobs = masked(columns[3]), masked(columns[4])
        if alpha > 0:
            weights = masked(torch.exp(student_logprobs - mix_logprobs))
        if with_hidden:
            teacher_hidden = masked(columns[5])
    return Rollout(
        prompt_ids=prompt_ids.cpu(),
        prompt_mask=prompt_mask.long().cpu(),
        response_ids=response_ids,
        response_mask=active.float(),
        lengths=active.long().sum(dim=1),
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        mix_logprobs=mix_logprobs,
        importance_weights=weights,
        teacher_hidden=teacher_hidden,
    )


def generate_texts(
    model,
    tokenizer,
    prompts: list[str],
    config: SamplingConfig,
    *,
    batch_size: int = 8,
    seed: int = 0,
) -> list[str]:
    """Sample one response string per prompt (evaluation, SeqKD pseudo-targets).

    Prompts are encoded without special tokens (MiniLLM adds no BOS), left padded, decoded with special
    tokens skipped and stripped. One CPU generator seeded with `seed` drives all batches, so a (seed,
    batch_size) pair draws the same uniforms on any device.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("The tokenizer has no eos_token; generation cannot know where a response ends.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[start:start + batch_size]]
        for i, ids in enumerate(encoded):
            if not ids:
                raise DataError(f"Prompt {start + i} encodes to no tokens; every prompt needs some text.")
        width = max(len(ids) for ids in encoded)
        prompt_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
        prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=config, eos_token_id=eos,
                                    pad_token_id=pad, generator=generator)
        for ids, n in zip(rollout.response_ids, rollout.lengths.tolist()):
            texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True).strip())
    return texts
