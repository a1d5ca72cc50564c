"""The rollout API: sample responses from p~ = alpha * p + (1 - alpha) * q and record the behaviour.

Every policy-gradient quantity downstream is computed from what `generate_rollouts` records, so it records
the *behaviour* distributions exactly as they were sampled from (Gu et al., arXiv 2306.08543, Eq. 4-5):

- q_old(y_t): the student's processed next-token distribution (temperature, n-gram ban, top-k/top-p),
- p(y_t): the teacher's next-token distribution after the same processing,
- p~(y_t) = alpha * p(y_t) + (1 - alpha) * q_old(y_t): the distribution the token was really drawn from,
- w_t = q_old(y_t) / p~(y_t): the single-token importance weight of Eq. 5 (<= 1 / (1 - alpha)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minillm.config import SamplingConfig, validate_teacher_mix_alpha, validate_untruncated_sampling
from minillm.errors import ConfigError, DataError
from minillm.sampling.adapter import EvalMode
from minillm.sampling.decoder import Decoder, decode_lockstep
from minillm.sampling.speculative import SpeculativeStats, decode_speculative, supports_speculative
from minillm.sampling.teacher import score_with_teacher

__all__ = ["Rollout", "check_teacher_sampling", "generate_rollouts", "generate_texts", "response_texts"]


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
    student_logprobs: Tensor             # [B, T] fp32, log q_old(y_t) under the processed student dist.
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


def response_texts(tokenizer, rollout) -> list[str]:
    """The responses of `rollout` as text: each row's generated tokens (EOS included) decoded with special
    tokens skipped, then stripped: the one rollout -> text decoder of minillm (validation, `generate`,
    `evaluate` and SeqKD data all read responses through it).

    Positions past a row's length are not decoded (they hold the pad token). LMOps decodes with the special
    tokens kept and cuts at a literal "<|endoftext|>"; skipping them gives the same text, except when a
    response spells that string out in ordinary tokens, which is kept here as the model wrote it.
    """
    rows = [ids[:n] for ids, n in zip(rollout.response_ids.tolist(), rollout.lengths.tolist())]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def check_teacher_sampling(config: SamplingConfig, *, teacher_mix_alpha: float, with_teacher: bool) -> None:
    """Refuse sampling setups whose log-probability ratios can be infinite.

    Call it when a run is configured (before loading models) to fail early; generate_rollouts calls it too.
    The rules are `minillm.config.validate_teacher_mix_alpha` and `validate_untruncated_sampling`.
    """
    validate_teacher_mix_alpha(teacher_mix_alpha)
    if teacher_mix_alpha > 0 and not with_teacher:
        raise ConfigError(f"teacher_mix_alpha = {teacher_mix_alpha} > 0 needs a teacher model to mix in; "
                          "pass one or set teacher_mix_alpha = 0.")
    if with_teacher:
        validate_untruncated_sampling(config, "sampling with a teacher")


def check_rollout_args(config: SamplingConfig, prompt_ids: Tensor, prompt_mask: Tensor, teacher,
                       teacher_mix_alpha: float, return_teacher_hidden: bool) -> None:
    """What every sampler (this one, the vLLM engine's) refuses: unsafe teacher sampling, hidden states
    without a teacher, mismatched shapes, an empty prompt."""
    check_teacher_sampling(config, teacher_mix_alpha=teacher_mix_alpha, with_teacher=teacher is not None)
    if return_teacher_hidden and teacher is None:
        raise ConfigError("return_teacher_hidden=True needs a teacher model.")
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                         "must be the same [batch, prompt_length] shape.")
    if not bool((prompt_mask != 0).any(dim=1).all()):
        raise DataError("A prompt in the batch is empty (its attention mask is all 0); every prompt needs at "
                        "least one token to condition on. Drop empty prompts before generating.")


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
    stats: SpeculativeStats | None = None,
) -> Rollout:
    """Sample responses from p~ = alpha * teacher + (1 - alpha) * student and record the behaviour log-probs.

    Args:
        student, teacher: causal LMs sharing the token ids. When `teacher` is given it is stepped in lockstep
            (its own KV cache) even at alpha = 0, so that teacher log-probs (and hidden states) come back.
        prompt_ids, prompt_mask: [B, P], LEFT padded; every row needs at least one real token.
        eos_token_id: one id or several; a sequence stops after its first EOS, which is part of the response.
        shared_vocab_size: both models' logits are sliced to this width before anything else; by default
            the smaller of the two logit widths.
        generator: source of the uniforms for reproducible sampling (any device; one uniform per row per
            step).
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

        stats: a `SpeculativeStats` to add the speculative sampler's counts to (drafted and accepted tokens,
            teacher forwards), when it runs.

    With a teacher and `config.draft_length > 0`, teacher-mixed sampling (alpha > 0, or the n-gram ban at
    alpha = 0) runs the speculative sampler (`minillm.sampling.speculative`): exact samples of p~ with one
    teacher forward per drafted block instead of one per token; the same records, other uniforms.

    Greedy decoding takes the argmax of p~ (of the processed student logits when alpha = 0, as
    `generate(do_sample=False)` does); the recorded log-probs are still those of the processed distributions.
    """
    check_rollout_args(config, prompt_ids, prompt_mask, teacher, teacher_mix_alpha, return_teacher_hidden)
    alpha = float(teacher_mix_alpha)
    if teacher is not None and alpha == 0.0 and config.no_repeat_ngram_size == 0:
        # The teacher does not shape the samples: decode the student alone, then score the whole batch
        # with ONE teacher forward pass over the rows' real tokens (batched prefill is several times cheaper
        # than stepping the teacher token by token; docs/benchmarks.md). The n-gram ban needs per-step
        # teacher processing, so it keeps the lockstep path.
        rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=config,
                                    eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                                    student_autocast=student_autocast, compact=compact)
        return score_with_teacher(rollout, student, teacher, temperature=config.temperature,
                                  shared_vocab_size=shared_vocab_size,
                                  return_teacher_hidden=return_teacher_hidden)

    with torch.no_grad(), EvalMode(student, teacher):
        student_dec = Decoder(student, student_autocast, config.max_new_tokens)
        teacher_dec = Decoder(teacher, max_new_tokens=config.max_new_tokens) if teacher is not None else None
        speculative = teacher_dec is not None and config.draft_length > 0
        if speculative and supports_speculative(student_dec, teacher_dec):
            columns = decode_speculative(
                student_dec, teacher_dec, prompt_ids, prompt_mask, config=config, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, alpha=alpha, shared_vocab_size=shared_vocab_size,
                generator=generator, return_teacher_hidden=return_teacher_hidden, compact=compact,
                draft_length=config.draft_length, adaptive=config.draft_adaptive, stats=stats)
            return _assemble_rollout(columns, prompt_ids, prompt_mask, alpha=alpha, with_teacher=True,
                                     with_hidden=return_teacher_hidden)
        steps = decode_lockstep(student_dec, teacher_dec, prompt_ids, prompt_mask, config=config,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, alpha=alpha,
                                shared_vocab_size=shared_vocab_size, generator=generator,
                                return_teacher_hidden=return_teacher_hidden, compact=compact)
    columns = [torch.stack(list(col), dim=1) for col in zip(*steps)]
    return _assemble_rollout(columns, prompt_ids, prompt_mask, alpha=alpha, with_teacher=teacher is not None,
                             with_hidden=return_teacher_hidden)


def _assemble_rollout(columns: list[Tensor], prompt_ids: Tensor, prompt_mask: Tensor, *,
                      alpha: float, with_teacher: bool, with_hidden: bool) -> Rollout:
    """The decoded columns (tokens, active, log q[, log p, log p~[, teacher hidden]], each [B, T, ...]) as a
    `Rollout` of CPU tensors, zeroing every float after a sequence's EOS.

    Zeroing selects rather than multiplies: the pad fed to a finished row can be outside a truncated
    distribution, and -inf * 0 would leave NaN in the buffer.
    """
    columns = [col.cpu() for col in columns]
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


def _left_padded(tokenizer, prompts: list[str], start: int, pad: int, device) -> tuple[Tensor, Tensor]:
    """Prompts encoded without special tokens (MiniLLM adds no BOS), left padded: (ids, mask) [B, P]."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise DataError(f"Prompt {start + i} encodes to no tokens; every prompt needs some text.")
    width = max(len(ids) for ids in encoded)
    prompt_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return prompt_ids, prompt_mask


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

    Prompts are encoded without special tokens (MiniLLM adds no BOS), left padded, decoded by
    `response_texts`. One CPU generator seeded with `seed` drives all batches, so a (seed, batch_size) pair
    draws the same uniforms on any device.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("The tokenizer has no eos_token; generation cannot know where a response ends.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        prompt_ids, prompt_mask = _left_padded(tokenizer, batch, start, pad, device)
        rollout = generate_rollouts(model, prompt_ids, prompt_mask, config=config, eos_token_id=eos,
                                    pad_token_id=pad, generator=generator)
        texts += response_texts(tokenizer, rollout)
    return texts
