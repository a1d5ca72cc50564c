"""One training loop for every method, on Hugging Face Accelerate.

The loop is method-agnostic: an `Algorithm` (algorithms/) supplies micro-batches and a loss made of
named terms; the trainer does precision, gradient accumulation, clipping, AdamW, warmup + constant /
cosine schedules, validation and best-model selection, logging (JSONL + TensorBoard + tqdm), and
checkpoints that resume exactly.

Checkpoints (`output_dir/checkpoints/step-NNNNNN/`) hold the student weights, optimizer, scheduler,
every process's RNG states and the algorithm's data position (and rollout buffer). They are written to
a temporary folder that is renamed into place only when complete, so a kill during a save never
leaves a broken latest checkpoint. SIGTERM / Ctrl-C finish the current step, save, and exit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .config import TrainConfig, save_config
from .errors import TrainingError
from .models import final_hidden, lm_head_fn, save_pretrained_atomic

logger = logging.getLogger("minillm")

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"


class TrainingInterrupted(Exception):
    """Raised after a SIGTERM / Ctrl-C once the checkpoint is safely on disk."""


class HiddenStates(nn.Module):
    """Wraps a causal LM so that DDP/FSDP see a forward that returns post-norm hidden states.

    Full-vocabulary losses then project the hidden states chunk by chunk with the LM head
    (`lm_head_fn`) instead of materialising B x T x V logits inside the model's forward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        return final_hidden(self.lm, input_ids, attention_mask, position_ids)


class Algorithm:
    """Interface of a training recipe (see algorithms/). Subclasses fill in the methods."""

    #: put the student in train() mode during updates (False for RL: no dropout, as in MiniLLM)
    train_mode: bool = True
    #: metric used to keep the best model ("valid_loss" is minimised, anything else maximised)
    selection_metric: str = "valid_loss"

    def setup(self, trainer: "Trainer") -> None:
        self.trainer = trainer

    def total_steps(self) -> int:
        raise NotImplementedError

    def micro_batches(self) -> Iterator[Any]:
        raise NotImplementedError

    def loss_terms(self, batch: Any) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Named loss terms (their sum is minimised) and extra metrics of one micro-batch."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
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


class Trainer:
    """Runs an `Algorithm` on a student with Accelerate; owns checkpoints, logging and selection."""

    def __init__(self, cfg: TrainConfig, student: nn.Module, tokenizer, algorithm: Algorithm,
                 teacher: nn.Module | None = None, shared_vocab_size: int | None = None,
                 accelerator=None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.shared_vocab_size = shared_vocab_size
        self.out = Path(cfg.output_dir)
        if accelerator is None:
            from accelerate.state import AcceleratorState

            # several runs in one process (quickstart stages, tests) may use different precisions; the
            # process group (PartialState) is kept, only the per-run state is reset
            AcceleratorState._reset_state()
        self.accelerator = accelerator or Accelerator(
            mixed_precision="bf16" if cfg.precision == "bf16" else "no",
            step_scheduler_with_optimizer=False,
            # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun form a gloo
            # (MULTI_CPU) group instead of each running alone
            cpu=not torch.cuda.is_available(),
        )
        acc = self.accelerator
        seed_everything(cfg.seed + acc.process_index)
        if cfg.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora_r > 0:
            student = _apply_lora(student, cfg)
        self.student = student  # the HF model (unwrapped); generation and saving use it
        self.student_head = lm_head_fn(student)
        self.teacher_head = lm_head_fn(teacher) if teacher is not None else None
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            teacher.to(acc.device)

        self.algorithm = algorithm
        algorithm.setup(self)
        self.total_steps = algorithm.total_steps()
        if self.total_steps <= 0:
            raise TrainingError("nothing to train: the data gives 0 optimiser steps (check batch_size, "
                                "gradient_accumulation_steps, epochs/max_steps and the data size).")

        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(HiddenStates(student), optimizer, scheduler)
        self.step = 0
        self.best: dict[str, Any] = {"metric": None, "value": None, "step": None}
        self._stop_requested = False
        self._metrics_file = None
        self._tb = None

    # ------------------------------------------------------------------ helpers for algorithms
    def hidden(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Student hidden states through the (possibly DDP-wrapped) model: gradients sync across ranks."""
        return self.model(input_ids, attention_mask, position_ids)

    @torch.no_grad()
    def teacher_hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return final_hidden(self.teacher, input_ids, attention_mask)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_root(self) -> Path:
        return self.out / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint atomically (tmp folder renamed into place when complete)."""
        acc = self.accelerator
        root = self._ckpt_root()
        final = root / f"step-{self.step:07d}"
        tmp = root / f".tmp-step-{self.step:07d}"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            self._write_checkpoint_files(tmp)
        except Exception as err:  # a full disk, a quota, a vanished mount: say so, keep the last checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.list_checkpoints()
            raise TrainingError(
                f"could not write the checkpoint of step {self.step} into {tmp.parent} ({type(err).__name__}: "
                f"{err}). Free space there (or set output_dir elsewhere) and re-run with resume=true; "
                + (f"it continues from {last[-1].name}, which is intact." if last else
                   "no earlier checkpoint exists, so the run starts over.")) from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _write_checkpoint_files(self, tmp: Path) -> None:
        acc = self.accelerator
        torch.save({"rng": _rng_state(), "algorithm": self.algorithm.state_dict()}, tmp / f"rank{acc.process_index}.pt")
        if acc.is_main_process:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in acc.unwrap_model(self.model).lm.state_dict().items()}
            _save_tied_safe(state, tmp / "student.safetensors", save_file)
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"step": self.step, "best": self.best, "world_size": acc.num_processes}, indent=1))

    def _prune_checkpoints(self) -> None:
        ckpts = self.list_checkpoints()
        for old in ckpts[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def list_checkpoints(self) -> list[Path]:
        root = self._ckpt_root()
        if not root.is_dir():
            return []
        done = [p for p in root.iterdir() if p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if state.get("world_size", 1) != acc.num_processes:
            raise TrainingError(f"{path}: written by {state.get('world_size')} processes, resuming with "
                                f"{acc.num_processes}; exact resume needs the same number of processes.")
        weights = load_file(path / "student.safetensors")
        missing, unexpected = acc.unwrap_model(self.model).lm.load_state_dict(weights, strict=False)
        missing = [m for m in missing if not _is_tied_alias(m, weights)]
        if missing or unexpected:
            raise TrainingError(f"{path}: checkpoint does not match the student (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}).")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rank_state = torch.load(path / f"rank{acc.process_index}.pt", weights_only=False)
        _set_rng_state(rank_state["rng"])
        self.algorithm.load_state_dict(rank_state["algorithm"])
        self.step = state["step"]
        self.best = state["best"]
        logger.info("resumed from %s (step %d)", path, self.step)

    # ------------------------------------------------------------------ logging
    def _open_logs(self) -> None:
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.out)
        self._metrics_file = open(self.out / "metrics.jsonl", "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        except ImportError:  # tensorboard is a dependency; keep training if a user removed it
            self._tb = None

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        step = self.step if step is None else step
        rec = {"step": step, "time": time.time(), **{k: _to_float(v) for k, v in metrics.items()}}
        if self._metrics_file:
            self._metrics_file.write(json.dumps(rec) + "\n")
            self._metrics_file.flush()
        if self._tb:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def _close_logs(self) -> None:
        if self._metrics_file:
            self._metrics_file.close()
        if self._tb:
            self._tb.close()

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
        cfg = self.cfg
        if cfg.resume:
            ckpts = self.list_checkpoints()
            if ckpts:
                self.load_checkpoint(ckpts[-1])
            else:
                logger.warning("resume requested but %s has no checkpoint: starting from scratch",
                               self._ckpt_root())
        self._open_logs()
        old_handlers = {}
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._loop()
            return self.finish()
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self._close_logs()

    def _loop(self) -> None:
        from tqdm.auto import tqdm

        cfg, acc, alg = self.cfg, self.accelerator, self.algorithm
        batches = alg.micro_batches()
        ga = cfg.gradient_accumulation_steps
        pbar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.method}",
                    disable=not acc.is_main_process, dynamic_ncols=True)
        eval_every = cfg.eval_every
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.student.train(alg.train_mode)
            sums: dict[str, float] = defaultdict(float)
            tokens = 0
            for micro in range(ga):
                batch = next(batches)
                sync = micro == ga - 1
                with nullcontext() if sync else acc.no_sync(self.model):
                    with acc.autocast():
                        terms, extra = alg.loss_terms(batch)
                        for name, value in terms.items():
                            if not torch.isfinite(value).all():
                                raise TrainingError(
                                    f"step {self.step + 1}: the loss term `{name}` is {value.item()} "
                                    f"(non-finite). The last good checkpoint is kept in {self._ckpt_root()}; "
                                    f"lower the learning rate or use precision=fp32.")
                        loss = sum(terms.values())
                    # backward outside autocast (PyTorch's AMP rule): under it, the backward of the fp32 LM
                    # head (models.LMHead) would be recast to bf16; the body's ops saved bf16 tensors anyway
                    acc.backward(loss / ga)
                for name, value in terms.items():
                    sums[name] += value.item() / ga
                sums["loss"] += loss.item() / ga
                for k, v in extra.items():
                    if k == "tokens":
                        tokens += int(v)
                    else:
                        sums[k] += _to_float(v) / ga
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            dt = time.perf_counter() - t0
            metrics = dict(sums)
            metrics["lr"] = self.scheduler.get_last_lr()[0]
            metrics["step_seconds"] = dt
            if tokens:
                metrics["tokens"] = tokens
                metrics["tokens_per_second"] = tokens / dt
            if grad_norm is not None:
                metrics["grad_norm"] = _to_float(grad_norm)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self.log(metrics)
            pbar.update(1)
            pbar.set_postfix(loss=f"{metrics['loss']:.4f}",
                             **({"tok/s": f"{metrics['tokens_per_second']:.0f}"} if tokens else {}))
            if eval_every and self.step % eval_every == 0 and self.step < self.total_steps:
                self.run_evaluation()
            stop = self._stop_everywhere()
            if (cfg.save_every and self.step % cfg.save_every == 0) or stop:
                self.save_checkpoint()
            if stop:
                pbar.close()
                raise TrainingInterrupted(f"stopped at step {self.step}; resume with resume=true "
                                          f"(checkpoint in {self._ckpt_root()}).")
        pbar.close()

    def run_evaluation(self) -> dict[str, float]:
        """Validate, log `valid_*` metrics and keep the best model (by `selection_metric`)."""
        acc = self.accelerator
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            self.student.eval()
            metrics = self.algorithm.evaluate()
            metrics = {k if k.startswith("valid_") else f"valid_{k}": v for k, v in metrics.items()}
            if metrics:
                self.log(metrics)
                key = self.selection_metric()
                value = metrics.get(key)
                if value is not None and math.isfinite(value):
                    better = (self.best["value"] is None or
                              (value < self.best["value"] if key == "valid_loss" else value > self.best["value"]))
                    if better:
                        self.best = {"metric": key, "value": value, "step": self.step}
                        self.save_model(self.out / "best")
                logger.info("step %d validation: %s", self.step,
                            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        acc.wait_for_everyone()
        return metrics

    def selection_metric(self) -> str:
        choice = self.cfg.select_by
        if choice == "auto":
            return self.algorithm.selection_metric
        return "valid_loss" if choice == "valid_loss" else "valid_rougeL"

    def save_model(self, out_dir: Path) -> Path:
        model = self.student
        if hasattr(model, "merge_and_unload"):  # LoRA: save a plain merged model
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        return save_pretrained_atomic(model, self.tokenizer, out_dir)

    def finish(self) -> Path:
        """Final validation, final model, and the selected model's folder."""
        acc = self.accelerator
        self.run_evaluation()
        if self.cfg.save_every or self.cfg.resume:
            self.save_checkpoint()
        final_dir = self.out / "final"
        if acc.is_main_process:
            self.save_model(final_dir)
            summary = {"steps": self.step, "best": self.best, "final_model": str(final_dir),
                       "best_model": str(self.out / "best") if self.best["step"] is not None else None}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        acc.wait_for_everyone()
        return self.out / "best" if self.best["step"] is not None else final_dir


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _to_float(v) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean().item())
    return float(v)


def _save_tied_safe(state: dict[str, Tensor], path: Path, save_file) -> None:
    """safetensors refuses shared storage: store tied weights once (they are re-tied on load)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v
    save_file(out, str(path))


def _is_tied_alias(name: str, weights: dict) -> bool:
    return name.endswith("lm_head.weight") and any(k.endswith("embed_tokens.weight") or k.endswith("wte.weight")
                                                    for k in weights)


def _apply_lora(model, cfg: TrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingError("lora_r > 0 needs PEFT: pip install 'minillm[peft]'.") from None
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)
