"""What the trainer runs on: the Accelerator, the learning-rate schedule, and the module DDP wraps."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import Tensor, nn

from .distributed import accelerate_fsdp_hidden
from .models import final_hidden

__all__ = ["HiddenStates", "build_scheduler", "make_accelerator"]


class HiddenStates(nn.Module):
    """Wraps a causal LM so that DDP/FSDP see a forward that returns post-norm hidden states.

    Full-vocabulary losses then project the hidden states chunk by chunk with the LM head
    (`lm_head_fn`) instead of materialising B x T x V logits inside the model's forward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        return final_hidden(self.lm, input_ids, attention_mask, position_ids)


def build_scheduler(optimizer, cfg, total_steps: int):
    """Linear warmup, then constant or cosine decay to `lr_min` (as LambdaLR so it checkpoints)."""
    base = cfg.learning_rate
    floor = cfg.lr_min / base if base > 0 else 0.0

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_scheduler == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(cfg) -> Accelerator:
    # several runs in one process (quickstart stages, tests) may use different precisions; the process group
    # (PartialState) is kept, only the per-run state is reset
    AcceleratorState._reset_state()
    with accelerate_fsdp_hidden():
        return _accelerator(cfg)


def _accelerator(cfg) -> Accelerator:
    return Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        step_scheduler_with_optimizer=False,
        # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo
        # (MULTI_CPU) group instead of each running alone
        cpu=not torch.cuda.is_available(),
        log_with="tensorboard",
        project_dir=str(cfg.output_dir),
    )
