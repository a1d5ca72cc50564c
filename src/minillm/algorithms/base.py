"""What a training recipe is, and the narrow context it runs in.

An `Algorithm` supplies micro-batches and the loss of one micro-batch; the trainer (minillm.trainer)
does everything else - precision, accumulation, clipping, the optimiser, validation scheduling,
logging and checkpoints. An algorithm never sees the trainer: it gets a `TrainingContext`, which
holds exactly what the recipes of the paper need (the two models and their heads, the tokenizer, the
shared vocabulary width, the device, a cross-process sum, a logger).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..models import LMHead, final_hidden

__all__ = ["Algorithm", "LossOutput", "TrainingContext"]


@dataclass
class TrainingContext:
    """Everything an algorithm may use while it trains; built by the trainer.

    tokenizer          the student's tokenizer (pad and eos set)
    student            the Hugging Face student as sampled from and validated (not the wrapped model)
    student_head       maps the student's post-norm hidden states to logits (`minillm.models.LMHead`)
    student_hidden     (input_ids, attention_mask) -> post-norm hidden states [B, T, H] through the
                       wrapped (e.g. DDP) model, so that gradients synchronise across processes
    teacher            the frozen teacher (eval mode, on `device`), or None (sft)
    teacher_head       the teacher's LM head, or None
    shared_vocab_size  the logit width teacher and student share (None without a teacher)
    device             where batches go
    process_index, num_processes   this process's rank and the world size
    reduce_sum         sums a tensor over all processes (None in a single process)
    log                writes a dict of metrics at the current step (main process only)
    step               the number of optimiser steps done so far (kept current by the trainer)
    sampling_scope     () -> context manager to decode and score in (FSDP: the student gathered whole, a
                       sharded teacher in lockstep); every process enters it together
    teacher_scope      () -> context manager around a teacher forward (`teacher_hidden` enters it)
    rollout_engine     where the student's samples come from: None for minillm's own sampler, or a
                       `minillm.sampling.vllm_rollout.VLLMSampler` (rollout_engine=vllm), kept at the
                       student's weights of the current `step`
    """

    tokenizer: Any
    student: nn.Module
    student_head: LMHead
    student_hidden: Callable[[Tensor, Tensor], Tensor]
    teacher: nn.Module | None
    teacher_head: LMHead | None
    shared_vocab_size: int | None
    device: torch.device
    process_index: int = 0
    num_processes: int = 1
    reduce_sum: Callable[[Tensor], Tensor] | None = None
    log: Callable[[dict], None] = lambda metrics: None
    step: int = 0
    sampling_scope: Callable[[], AbstractContextManager] = nullcontext
    teacher_scope: Callable[[], AbstractContextManager] = nullcontext
    rollout_engine: Any = None

    @torch.no_grad()
    def teacher_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The teacher's post-norm hidden states [B, T, Ht] (no gradient)."""
        with self.teacher_scope():
            return final_hidden(self.teacher, input_ids, attention_mask)


class LossOutput(NamedTuple):
    """The loss of one micro-batch.

    loss     the differentiable scalar that is minimised
    terms    its named parts, detached (they sum to `loss`); logged and checked for NaN by name
    metrics  other values of the micro-batch to log ("tokens" is summed over the step, the rest averaged)
    """

    loss: Tensor
    terms: dict[str, Tensor]
    metrics: dict[str, Any]


class Algorithm:
    """A training recipe (see algorithms/). Subclasses fill in the methods."""

    #: put the student in train() mode during updates (False for RL: no dropout, as in MiniLLM)
    train_mode: bool = True
    #: metric used to keep the best model ("valid_loss" is minimised, anything else maximised)
    selection_metric: str = "valid_loss"
    #: full-vocabulary losses take the fused path (gradients formed chunk by chunk in the forward pass) when
    #: the head allows it; False forces the checkpointed path (same values up to rounding; for tests)
    fused: bool = True

    def __init__(self, cfg, train_examples: list, valid_examples: list | None):
        self.cfg = cfg
        self.train_examples = train_examples
        self.valid_examples = valid_examples

    def setup(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    def total_steps(self) -> int:
        raise NotImplementedError

    def micro_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def loss(self, batch: Any) -> LossOutput:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def selection_key(self) -> str:
        """The validation metric that picks the best model: `select_by`, or this recipe's default."""
        choice = self.cfg.select_by
        if choice == "auto":
            return self.selection_metric
        return "valid_loss" if choice == "valid_loss" else "valid_rougeL"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
