"""What the trainer runs on: the Accelerator, the learning-rate schedule, and the module DDP wraps."""

from __future__ import annotations

import atexit
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor, nn

from .distributed import accelerate_fsdp_hidden
from .errors import ConfigError
from .models import final_hidden

__all__ = [
    "HiddenStates", "build_scheduler", "configure_deepspeed", "deepspeed_requested", "make_accelerator",
    "trackers",
]


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


def deepspeed_requested() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def _accelerator(cfg) -> Accelerator:
    deepspeed = deepspeed_requested()
    cpu = not torch.cuda.is_available()
    acc = Accelerator(
        mixed_precision="bf16" if cfg.precision == "bf16" else "no",
        step_scheduler_with_optimizer=False,
        # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo
        # (MULTI_CPU) group instead of each running alone; `cpu=True` would drop DeepSpeed, so a DeepSpeed
        # launch without GPUs asks for gloo instead
        cpu=cpu and not deepspeed,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu and deepspeed else None,
        log_with=trackers(cfg),
        project_dir=str(cfg.output_dir),
    )
    plugin = acc.state.deepspeed_plugin
    if plugin is not None:
        configure_deepspeed(acc, plugin, cfg)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_end_process_group)  # several runs in one process: one call at exit
        atexit.register(_end_process_group)
    return acc


def _end_process_group() -> None:
    """At exit: end the process group, then give gloo's worker threads a moment with the GIL free.

    A gloo worker thread frees each finished collective after the caller has seen it finish - for the last
    barrier, together with the FSDP all-gather still queued behind it, whose tensors are Python objects. If
    that happens while the interpreter is finalising, the thread cannot take the GIL, is ended by CPython,
    and the unwinding through a C++ destructor aborts the process (`terminate called without an active
    exception`, SIGABRT: seen in CI as a failed torchrun after a run that had finished). Here, before
    finalisation, the sleep releases the GIL so the worker can finish freeing them."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        time.sleep(0.2)


def trackers(cfg) -> list | None:
    """Accelerate's trackers for `cfg.report_to`: TensorBoard by name (it logs to output_dir/tensorboard);
    W&B and MLflow built here so that they get the project and the run's name (Accelerate would use one
    project name for all, which also names TensorBoard's folder). W&B runs offline with WANDB_MODE=offline."""
    names = [str(n) for n in getattr(cfg, "report_to", ["tensorboard"]) if str(n) != "none"]
    out = Path(cfg.output_dir)
    made: list = []
    for name in names:
        if name == "wandb":
            from accelerate.tracking import WandBTracker

            made.append(WandBTracker(cfg.tracker_project, name=out.name, dir=str(out)))
        elif name == "mlflow":
            from accelerate.tracking import MLflowTracker

            made.append(MLflowTracker(experiment_name=cfg.tracker_project, run_name=out.name))
        else:
            made.append(name)
    return made or None  # None, not []: Accelerate warns that no tracker is installed for an empty list


def configure_deepspeed(acc: Accelerator, plugin, cfg) -> None:
    """DeepSpeed ZeRO-1/2 takes minillm's micro-batch, accumulation and clipping (the launch config leaves
    them out). ZeRO-3 is refused: minillm's fused losses project with the LM head outside the engine's
    forward, where ZeRO-3 has its weight partitioned."""
    if getattr(cfg, "fsdp", False):
        raise ConfigError("fsdp=true and a DeepSpeed launch config: choose one (FSDP2 is minillm's own "
                          "sharding).")
    stage = int(plugin.zero_stage or 0)
    if stage >= 3:
        raise ConfigError("DeepSpeed ZeRO-3 is not supported by minillm (its LM-head losses run outside the "
                          "engine's forward, where ZeRO-3 partitions the head): use ZeRO-2, or fsdp=true "
                          "teacher_sharding=shard to shard everything.")
    dsc = plugin.deepspeed_config
    dsc["train_micro_batch_size_per_gpu"] = cfg.batch_size
    dsc["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    dsc["gradient_clipping"] = cfg.max_grad_norm
    dsc.pop("train_batch_size", None)  # "auto": DeepSpeed derives it from the three above and the world size
    acc.gradient_accumulation_steps = cfg.gradient_accumulation_steps
