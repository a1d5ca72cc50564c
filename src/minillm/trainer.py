"""One training loop for every method, on Hugging Face Accelerate.

The loop is method-agnostic: an `Algorithm` (algorithms/) supplies micro-batches and the loss of one
micro-batch, and sees only a narrow `TrainingContext`; the trainer does precision, gradient
accumulation, clipping, AdamW, warmup + constant / cosine schedules, validation and best-model
selection, logging (metrics.jsonl, TensorBoard through Accelerate's trackers, tqdm) and checkpoints
that resume exactly (minillm.checkpoint: Accelerate's `save_state` inside an atomic rename; a broken
latest checkpoint falls back to the newest intact one; minillm.resume: what a resume may change).
SIGTERM / Ctrl-C finish the current step, save, and exit.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from .algorithms.base import Algorithm, LossOutput, TrainingContext
from .algorithms.common import rollout_engine
from .checkpoint import Checkpoints, PerProcessState
from .distributed import (
    Placement,
    broadcast_from_main,
    check_fits,
    fsdp_requested,
    plain_copy,
    shard_teacher_choice,
)
from .engine import HiddenStates, build_scheduler, make_accelerator
from .errors import TrainingError, TrainingInterrupted
from .io import write_json
from .models import (
    apply_lora,
    enable_checkpointing,
    final_hidden,
    lm_head_fn,
    save_pretrained_atomic,
    set_train_mode,
)
from .resume import apply_optimizer_settings
from .runlog import RunLog, to_float

logger = logging.getLogger("minillm")

__all__ = ["HiddenStates", "Trainer", "TrainingInterrupted", "build_scheduler"]


class Trainer:
    """Runs an `Algorithm` on a student with Accelerate; owns checkpoints, logging and selection."""

    def __init__(
        self,
        cfg,
        student: nn.Module,
        tokenizer,
        algorithm: Algorithm,
        teacher: nn.Module | None = None,
        shared_vocab_size: int | None = None,
        accelerator=None,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.out = Path(cfg.output_dir)
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        set_seed(cfg.seed + acc.process_index)
        self.fsdp = fsdp_requested(cfg) and acc.num_processes > 1
        if fsdp_requested(cfg) and not self.fsdp:
            logger.info("fsdp=true with one process: nothing to shard, training unsharded")
        if cfg.gradient_checkpointing:
            enable_checkpointing(student)
        if cfg.lora_r > 0:
            with torch.random.fork_rng(devices=[]):  # the same adapter initialisation on every process (FSDP
                torch.manual_seed(cfg.seed)          # shards each process's copy; DDP broadcasts rank 0's)
                student = apply_lora(student, cfg)
        self.student = student  # the HF model (unwrapped or FSDP-sharded); generation and saving use it
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        shard_teacher = self.fsdp and shard_teacher_choice(cfg, teacher, acc.device)
        check_fits(student, teacher, acc.device, processes=acc.num_processes, fsdp=self.fsdp,
                   shard_teacher=shard_teacher)
        self.placement = Placement(student, teacher, acc.device, fsdp=self.fsdp, shard_teacher=shard_teacher,
                                   mixed_precision=cfg.fsdp_mixed_precision)
        self.algorithm = algorithm
        self.ctx = TrainingContext(
            tokenizer=tokenizer,
            student=student,
            student_head=lm_head_fn(student),
            student_hidden=self.hidden,
            teacher=teacher,
            teacher_head=lm_head_fn(teacher) if teacher is not None else None,
            shared_vocab_size=shared_vocab_size,
            device=acc.device,
            process_index=acc.process_index,
            num_processes=acc.num_processes,
            log=self.log,
            reduce_sum=(lambda t: acc.reduce(t, reduction="sum")) if acc.num_processes > 1 else None,
            sampling_scope=self.placement.sampling_scope,
            teacher_scope=self.placement.teacher_scope,
            rollout_engine=rollout_engine(cfg, acc, sharded=self.fsdp),  # vLLM (started on first use) or None
        )
        with self.placement.sampling_scope():
            algorithm.setup(self.ctx)
        self.total_steps = algorithm.total_steps()
        if self.total_steps <= 0:
            raise TrainingError(
                "nothing to train: the data gives 0 optimiser steps (check batch_size, "
                "gradient_accumulation_steps, epochs/max_steps and the data size)."
            )
        params = [p for p in student.parameters() if p.requires_grad]  # DTensor shards under FSDP
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if self.fsdp:  # sharded by Placement; Accelerate keeps the trackers, RNG states and the scheduler
            self.model, self.optimizer, self.scheduler = None, optimizer, scheduler
            acc.register_for_checkpointing(scheduler)
        else:
            self.model, self.optimizer, self.scheduler = acc.prepare(HiddenStates(student), optimizer,
                                                                     scheduler)
        acc.register_for_checkpointing(PerProcessState(algorithm, acc))
        self.checkpoints = Checkpoints(self.out, acc, cfg.keep_checkpoints,
                                       sharded=(student, optimizer) if self.fsdp else None)
        self.step = 0
        self.best: dict[str, Any] = {"metric": None, "value": None, "step": None}
        self._stop_requested = False
        self.run_log = RunLog(acc, self.out)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Student hidden states through the (possibly DDP-wrapped) model: gradients sync across ranks. Under
        FSDP the whole loss runs as the sharded root's forward (`_loss`), so the student is called
        directly."""
        if self.model is None:
            return final_hidden(self.student, input_ids, attention_mask, position_ids)
        return self.model(input_ids, attention_mask, position_ids)

    def _loss(self, batch) -> LossOutput:
        """The algorithm's loss; under FSDP as the student's root forward, with a sharded teacher's root
        (its LM
        head, which the single-step and KD terms project with) gathered."""
        if self.placement.student is None:
            return self.algorithm.loss(batch)
        with self.placement.teacher_scope():
            return self.placement.student(self.algorithm.loss, batch)

    def _sync_gradients(self, sync: bool):
        """The context of one micro-batch's backward: gradients are reduced across processes only when `sync`
        (the last micro-batch of a step)."""
        if self.placement.student is not None:
            self.placement.student.root.set_requires_gradient_sync(sync)
            return nullcontext()
        if self.deepspeed:  # Accelerate counts the micro-batches; the engine steps on the last one
            return self.accelerator.accumulate(self.model)
        return nullcontext() if sync else self.accelerator.no_sync(self.model)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        return self.checkpoints.save(self.step, {"best": self.best})

    def load_checkpoint(self, path: Path) -> None:
        """Restore the checkpoint `path`; the config's learning rate and AdamW settings then apply (a resume
        may change them, see minillm.resume). Damaged files raise CheckpointBroken."""
        state = self.checkpoints.load(path)
        self.step, self.best = state["step"], state["best"]
        self.ctx.step = self.step
        apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg)
        logger.info("resumed from %s (step %d)", path, self.step)

    def _resume(self) -> None:
        """resume=true: continue from the newest intact checkpoint (broken newer ones are reported and moved
        aside; none intact refuses), or start from scratch when there is none."""
        if self.checkpoints.resume(self.load_checkpoint) is None:
            logger.warning(
                "resume requested but %s has no checkpoint: starting from scratch", self.checkpoints.root
            )

    # ------------------------------------------------------------------ logging
    def _open_logs(self) -> None:
        """On resume, what was logged after the checkpoint's step is dropped (it is logged again)."""
        resume_step = self.step if self.cfg.resume else None
        self.run_log.open(self.cfg, resume_step, final_eval_again=self.step >= self.total_steps)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run_log.log(metrics, self.step if step is None else step)

    def _close_logs(self) -> None:
        self.run_log.close()

    # ------------------------------------------------------------------ main loop
    def _on_signal(self, signum, frame):  # noqa: ARG002
        if self._stop_requested:  # second signal: give up immediately
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("signal %d received: finishing the current step and saving a checkpoint", signum)

    def _stop_everywhere(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def train(self) -> Path:
        """Train to `total_steps`; returns the folder of the selected (best) model."""
        if self.cfg.resume:
            self._resume()
        self._open_logs()
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
            return self.finish()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self._close_logs()
            if self.ctx.rollout_engine is not None:
                self.ctx.rollout_engine.close()

    def _loop(self) -> None:
        cfg, alg = self.cfg, self.algorithm
        batches = alg.micro_batches()
        pbar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=f"{cfg.method}",
            disable=not self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            sums, tokens = self._accumulate(batches)
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = self._clip_gradients(cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = self.ctx.step = self.step + 1
            dt = time.perf_counter() - t0
            metrics = {**sums, "lr": self.scheduler.get_last_lr()[0], "step_seconds": dt}
            if tokens:
                metrics["tokens"], metrics["tokens_per_second"] = tokens, tokens / dt
            if grad_norm is not None:  # (DeepSpeed clips inside its engine and may not report it)
                metrics["grad_norm"] = to_float(grad_norm)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self.log(metrics)
            pbar.update(1)
            pbar.set_postfix(
                loss=f"{metrics['loss']:.4f}",
                **({"tok/s": f"{metrics['tokens_per_second']:.0f}"} if tokens else {}),
            )
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                self.run_evaluation()
            stop = self._stop_everywhere()
            if (cfg.save_every and self.step % cfg.save_every == 0) or stop:
                self.save_checkpoint()
            if stop:
                pbar.close()
                raise TrainingInterrupted(
                    f"stopped at step {self.step}; resume with resume=true "
                    f"(checkpoint in {self.checkpoints.root})."
                )
        pbar.close()

    def _accumulate(self, batches) -> tuple[dict[str, float], int]:
        """Forward and backward of `gradient_accumulation_steps` micro-batches; their averaged metrics."""
        acc, ga = self.accelerator, self.cfg.gradient_accumulation_steps
        sums: dict[str, float] = defaultdict(float)
        tokens = 0
        for micro in range(ga):
            batch = next(batches)
            # after the batch: sampling a round switches the models to eval mode and back (sampling.EvalMode),
            # which would clear the decoder layers' checkpointing flag set here
            set_train_mode(self.student, self.algorithm.train_mode, self.cfg.gradient_checkpointing)
            with self._sync_gradients(micro == ga - 1):
                with acc.autocast():
                    out = self._loss(batch)
                    self._check_finite(out)
                # backward outside autocast (PyTorch's AMP rule): under it, the backward of the fp32 LM
                # head (models.LMHead) would be recast to bf16; the body's ops saved bf16 tensors anyway
                acc.backward(out.loss if self.deepspeed else out.loss / ga)  # DeepSpeed divides by ga itself
            for name, value in out.terms.items():
                sums[name] += value.item() / ga
            sums["loss"] += out.loss.item() / ga
            for k, v in out.metrics.items():
                if k == "tokens":
                    tokens += int(v)
                else:
                    sums[k] += to_float(v) / ga
        return sums, tokens

    def _clip_gradients(self, max_norm: float) -> Tensor:
        if self.model is not None:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.student.parameters() if p.requires_grad],
                                              max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _check_finite(self, out: LossOutput) -> None:
        for name, value in {**out.terms, "loss": out.loss}.items():
            if not torch.isfinite(value).all():
                raise TrainingError(
                    f"step {self.step + 1}: the loss term `{name}` is {value.item()} (non-finite). The last "
                    f"good checkpoint is kept in {self.checkpoints.root}; lower the learning rate or use "
                    "precision=fp32."
                )

    def run_evaluation(self) -> dict[str, float]:
        """Validate, log `valid_*` metrics and keep the best model (by the algorithm's selection key).

        The main process validates; under FSDP every process gathers the student first, and with a sharded
        teacher every process validates (the same prompts, in lockstep) and the main process's numbers count.
        """
        acc = self.accelerator
        metrics: dict[str, float] = {}
        with self.placement.sampling_scope():
            if acc.is_main_process or self.placement.teacher_sharded:
                self.student.eval()
                metrics = self.algorithm.evaluate()
                metrics = {k if k.startswith("valid_") else f"valid_{k}": v for k, v in metrics.items()}
        better = False
        if acc.is_main_process and metrics:
            self.log(metrics)
            key = self.algorithm.selection_key()
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                better = self.best["value"] is None or (
                    value < self.best["value"] if key == "valid_loss" else value > self.best["value"]
                )
                if better:
                    self.best = {"metric": key, "value": value, "step": self.step}
            logger.info(
                "step %d validation: %s", self.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            )
        if self.placement.student is not None:  # every process takes part in gathering the model to save
            better, self.best = broadcast_from_main((better, self.best))
        if better:
            self.save_model(self.out / "best")
        acc.wait_for_everyone()
        return metrics

    def save_model(self, out_dir: Path) -> Path:
        """The student as a plain Hugging Face folder (LoRA merged), written by the main process. Under FSDP
        every process must call it (the weights are gathered from all)."""
        if self.placement.student is not None:
            model = plain_copy(self.student, self.placement.student.full_state_dict())
        else:
            model = self.student
            if hasattr(model, "merge_and_unload") and self.accelerator.is_main_process:  # LoRA: merged copy
                model = copy.deepcopy(model).merge_and_unload()
        if self.accelerator.is_main_process:
            save_pretrained_atomic(model, self.tokenizer, out_dir)
        return out_dir

    def finish(self) -> Path:
        """Final validation, final model, and the selected model's folder."""
        acc = self.accelerator
        self.run_evaluation()
        if self.cfg.save_every or self.cfg.resume:
            self.save_checkpoint()
        final_dir = self.out / "final"
        self.save_model(final_dir)
        if acc.is_main_process:
            write_json(
                self.out / "summary.json",
                {
                    "steps": self.step,
                    "best": self.best,
                    "final_model": str(final_dir),
                    "best_model": str(self.out / "best") if self.best["step"] is not None else None,
                },
            )
        acc.wait_for_everyone()
        return self.out / "best" if self.best["step"] is not None else final_dir


