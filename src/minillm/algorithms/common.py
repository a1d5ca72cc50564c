"""Pieces shared by the training recipes: resumable sharded batch order, data splits, validation."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from ..data import collate_prompts
from ..errors import ConfigError, DataError
from ..evaluation.metrics import rouge_l
from ..sampling import Rollout, generate_rollouts, response_texts


class EpochBatches:
    """Deterministic, resumable order of batch indices, sharded over processes.

    Each epoch is a fresh permutation seeded by (seed, epoch); a global batch of
    `batch_size * world_size` consecutive indices is split so that process r takes the r-th slice.
    The incomplete last global batch of an epoch is dropped, so every process sees the same number of
    batches. The state is just (epoch, position): resuming from it gives the identical stream.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._perm: list[int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def next(self) -> list[int]:
        if self.batches_per_epoch() == 0:
            raise DataError(
                f"{self.n} examples are fewer than one global batch "
                f"({self.batch_size} per process x {self.world_size} processes)."
            )
        if self.position + self.global_batch > self.n:
            self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        perm = self._permutation()
        start = self.position + self.rank * self.batch_size
        self.position += self.global_batch
        return perm[start : start + self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._perm = state["epoch"], state["position"], None


def split_train_valid(examples: list, valid_examples: list | None, fraction: float, seed: int):
    """Use the given validation examples, or hold out a fixed random fraction of the training data."""
    if valid_examples:
        return examples, valid_examples
    if fraction <= 0:
        return examples, []
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n_valid = max(1, int(round(len(examples) * fraction)))
    if n_valid >= len(examples):
        raise DataError(
            f"cannot hold out {n_valid} validation examples from {len(examples)} training "
            f"examples: provide valid_data=... or lower valid_fraction."
        )
    valid_idx = set(idx[:n_valid])
    return (
        [e for i, e in enumerate(examples) if i not in valid_idx],
        [e for i, e in enumerate(examples) if i in valid_idx],
    )


def require_examples(dataset, what: str, cfg) -> None:
    """Fail early, with the fix, when filtering left too few examples to form one batch."""
    if len(dataset) == 0:
        raise DataError(
            f"no usable {what}: every example was dropped because its prompt is longer than "
            f"max_prompt_length={cfg.max_prompt_length} tokens (or leaves no room within "
            f"max_length={cfg.max_length}). Raise max_prompt_length / max_length."
        )


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def steps_for(num_batches_per_epoch: int, cfg) -> int:
    """Optimiser steps for `epochs` passes (or max_steps when set)."""
    if cfg.max_steps:
        return cfg.max_steps
    return int(math.ceil(cfg.epochs * num_batches_per_epoch / cfg.gradient_accumulation_steps))


def rollout_engine(cfg, accelerator, *, sharded: bool = False):
    """The vLLM sampler of this process in a run with rollout_engine=vllm (None with hf); it starts on its
    first rollout, with the student's weights of then, and runs in the engine's dtype of the run's precision.
    With several processes (DDP) each process gets its own engine, on its own GPU (`accelerator.device`), fed
    its own (identical) weights; a sharded run (`sharded`: FSDP, or Accelerate's DeepSpeed) is refused."""
    if getattr(cfg, "rollout_engine", "hf") != "vllm":
        return None
    num_processes, process_index = accelerator.num_processes, accelerator.process_index
    from accelerate.utils import DistributedType

    sharded = sharded or getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED
    if num_processes > 1 and sharded:
        raise ConfigError(f"rollout_engine=vllm gives each of the {num_processes} processes an engine fed "
                          "with the whole student, which a sharded run (fsdp / DeepSpeed) does not hold on "
                          "each process; train with DDP (fsdp=false, no DeepSpeed) or use rollout_engine=hf.")
    from ..sampling.vllm_rollout import VLLMSampler  # the client only; vLLM itself runs in its own process

    log = "vllm_engine.log" if num_processes == 1 else f"vllm_engine.rank{process_index}.log"
    return VLLMSampler(cfg.vllm, dtype="bfloat16" if cfg.precision == "bf16" else "float32",
                       max_model_len=cfg.max_prompt_length + cfg.sampling.max_new_tokens,
                       log_path=str(Path(cfg.output_dir) / log), device=accelerator.device)


def sample_responses(ctx, sampling, items: list, generator: torch.Generator, **kwargs) -> Rollout:
    """The student's responses to `PromptDataset` items (the teacher, if any, scores them; `kwargs` go to
    `generate_rollouts`, e.g. teacher_mix_alpha, return_teacher_hidden). With a vLLM rollout engine
    (`ctx.rollout_engine`) the engine samples, at the student's weights of `ctx.step`."""
    batch = collate_prompts(items, ctx.tokenizer.pad_token_id)
    ids, mask = batch["input_ids"].to(ctx.device), batch["attention_mask"].to(ctx.device)
    with ctx.sampling_scope():
        if ctx.rollout_engine is not None:
            return _engine_responses(ctx, sampling, ids, mask, generator, **kwargs)
        return generate_rollouts(ctx.student, ids, mask, config=sampling,
                                 eos_token_id=ctx.tokenizer.eos_token_id,
                                 pad_token_id=ctx.tokenizer.pad_token_id, teacher=ctx.teacher,
                                 shared_vocab_size=ctx.shared_vocab_size, generator=generator, **kwargs)


def _engine_responses(ctx, sampling, ids, mask, generator, *, teacher_mix_alpha: float = 0.0, stats=None,
                      **kwargs) -> Rollout:
    """`sample_responses` through the vLLM engine: student samples re-scored by our forward, then the
    teacher's log-probs (the engine's log-prob differences are logged as vllm/*). `stats` (the speculative
    sampler's counts) has nothing to count here."""
    if teacher_mix_alpha > 0:  # refused when the config is validated; a direct caller gets the same rule
        raise ConfigError(f"rollout_engine=vllm cannot sample the teacher mixture (teacher_mix_alpha = "
                          f"{teacher_mix_alpha}); use rollout_engine=hf.")
    engine = ctx.rollout_engine
    tok = ctx.tokenizer
    rollout = engine.rollouts(ctx.student, ids, mask, config=sampling, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, generator=generator, version=ctx.step,
                              teacher=ctx.teacher, shared_vocab_size=ctx.shared_vocab_size, **kwargs)
    ctx.log(engine.stats.metrics())
    return rollout


@torch.no_grad()
def generation_validation(
    ctx, cfg, prompt_dataset, *, num_prompts: int, seed: int = 1234
) -> dict[str, float]:
    """Sample (no teacher mixing) on validation prompts: Rouge-L vs references, reverse KL, length.

    The reverse-KL estimate is sequence level: the mean over prompts of sum_t log q(y_t) - log p(y_t)
    on the student's own samples (an unbiased Monte-Carlo estimate of KL[q || p] per response), also
    reported per token.
    """
    tok = ctx.tokenizer
    n = min(num_prompts, len(prompt_dataset))
    if n == 0:
        return {}
    gen = torch.Generator().manual_seed(seed)
    scores, seq_kl, tok_kl, lengths = [], [], [], []
    bs = cfg.rollout_batch_size
    for start in range(0, n, bs):
        items = [prompt_dataset[i] for i in range(start, min(n, start + bs))]
        r = sample_responses(ctx, cfg.sampling, items, gen)
        for i, text in enumerate(response_texts(tok, r)):
            scores.append(rouge_l(text, items[i]["references"]))
        lengths.extend(r.lengths.tolist())
        if r.teacher_logprobs is not None:
            diff = ((r.student_logprobs - r.teacher_logprobs) * r.response_mask).sum(-1)
            seq_kl.extend(diff.tolist())
            tok_kl.extend((diff / r.lengths.clamp(min=1)).tolist())
    out = {"rougeL": sum(scores) / len(scores), "length": sum(lengths) / len(lengths)}
    if seq_kl:
        out["reverse_kl"] = sum(seq_kl) / len(seq_kl)
        out["reverse_kl_per_token"] = sum(tok_kl) / len(tok_kl)
    return out
