"""A run's logs: metrics.jsonl and TensorBoard (Accelerate's tracker), written by the main process.

metrics.jsonl holds one JSON record per logged step."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from torch import Tensor

from .config import save_config

__all__ = ["RunLog", "to_float"]


def to_float(v) -> float:
    if isinstance(v, Tensor):
        return float(v.detach().float().mean().item())
    return float(v)


class RunLog:
    """metrics.jsonl and the TensorBoard tracker of one run (written by the main process only)."""

    def __init__(self, accelerator, out: Path) -> None:
        self.accelerator, self.out = accelerator, Path(out)
        self._file = None

    def open(self, cfg) -> None:
        """Start the trackers; the main process writes config.yaml and opens metrics.jsonl for appending."""
        self.accelerator.init_trackers("tensorboard")
        if not self.accelerator.is_main_process:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out)
        self._file = open(self.out / "metrics.jsonl", "a")

    def log(self, metrics: dict, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        rec = {"step": step, "time": time.time(), **{k: to_float(v) for k, v in metrics.items()}}
        if self._file:
            self._file.write(json.dumps(rec) + "\n")
            self._file.flush()
        scalars = {k: v for k, v in rec.items() if k not in ("step", "time") and math.isfinite(v)}
        self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        for tracker in self.accelerator.trackers:  # not end_training(): it would end the process group too
            tracker.finish()
