"""A run's logs: metrics.jsonl and TensorBoard (Accelerate's tracker), written by the main process.

metrics.jsonl holds one JSON record per logged step (and one per validation). A resumed run continues from
its checkpoint's step N, so whatever the interrupted run logged after N would be logged again: `open`
rewrites metrics.jsonl (atomically) without those records - and without a torn last line - and starts
TensorBoard's writer with `purge_step=N+1`, which hides the interrupted run's events from step N+1 on."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from torch import Tensor

from .config import config_to_dict, save_config
from .io import write_text

logger = logging.getLogger("minillm")

__all__ = ["RunLog", "drop_after", "to_float"]


def to_float(v) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean().item())
    return float(v)


class RunLog:
    """metrics.jsonl and the TensorBoard tracker of one run (written by the main process only)."""

    def __init__(self, accelerator, out: Path) -> None:
        self.accelerator, self.out = accelerator, Path(out)
        self._file = None

    def open(self, cfg, resume_step: int | None = None, final_eval_again: bool = False) -> None:
        """Start the trackers; the main process writes config.yaml and opens metrics.jsonl for appending.

        `resume_step`: the step the run resumes from (0: resumed without a checkpoint, from scratch); the
        records logged after it are dropped. `final_eval_again`: the run resumes at its last step, where
        the final validation runs (and is logged) again - its earlier records at that step are dropped too.
        """
        kwargs = {}
        if resume_step is not None:  # SummaryWriter(purge_step=...): events from that step on are hidden
            purge = resume_step if final_eval_again else resume_step + 1
            kwargs = {"init_kwargs": {"tensorboard": {"purge_step": max(purge, 0)}}}
        self.accelerator.init_trackers("tensorboard", **kwargs)  # the project name is TensorBoard's folder
        if not self.accelerator.is_main_process:
            return
        for tracker in self.accelerator.trackers:  # W&B / MLflow keep the run's settings beside its metrics
            if tracker.name != "tensorboard":
                tracker.store_init_configuration(config_to_dict(cfg))
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out)
        path = self.out / "metrics.jsonl"
        if resume_step is not None and path.exists():
            kept = drop_after(path, resume_step, final_eval_again)
            if final_eval_again:  # the purge hid the training metrics of the last step: log them again
                for rec in kept:
                    if rec.get("step") == resume_step:
                        self.accelerator.log(_scalars(rec), step=resume_step)
        self._file = open(path, "a")

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        rec = {"step": step, "time": time.time(), **{k: to_float(v) for k, v in metrics.items()}}
        if self._file:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        self.accelerator.log(_scalars(rec), step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        for tracker in self.accelerator.trackers:  # not end_training(): it would end the process group too
            tracker.finish()


def _scalars(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in ("step", "time") and isinstance(v, (int, float))
            and math.isfinite(v)}


def _is_validation(rec: dict) -> bool:
    return any(k.startswith("valid_") for k in rec)


def drop_after(path: Path, step: int, drop_validation_at_step: bool = False) -> list[dict]:
    """Rewrite the metrics file `path` (atomically) with only its complete records of steps <= `step`
    (without the validation records of `step` itself when `drop_validation_at_step`); returns the kept
    records."""
    kept, dropped = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                at = int(rec["step"])
            except (ValueError, KeyError, TypeError):  # a torn or foreign line
                dropped += 1
                continue
            if at < step or (at == step and not (drop_validation_at_step and _is_validation(rec))):
                kept.append(rec)
            else:
                dropped += 1
    if dropped:
        write_text(path, "".join(json.dumps(rec) + "\n" for rec in kept))
        logger.info("%s: dropped %d record(s) logged after step %d (the run resumes from there)", path,
                    dropped, step)
    return kept
