"""Resumable pipelines: run each named stage once, time it, and skip it when its result is already on disk.

The quickstart and `experiments/table1/run.py` are chains of expensive stages (teacher answers, SFT,
MiniLLM, evaluation). Both re-run into the same output folder to continue an interrupted run, so a stage
that finished is skipped and its result is read back instead of recomputed. A stage is finished when

- its `output` file exists (the quickstart: a stage's own product, e.g. a run's `summary.json`), and its
  result is then what `cached()` reads back; or else
- its marker `marker_dir/<name>.json` exists (the table-1 driver): `{"seconds": wall time, "info": the
  stage's result}`, written atomically (`minillm.io`) once the stage returns, so a stage that dies
  midway leaves no marker and runs again.

A stage with neither an `output` nor a marker folder always runs (and is timed).

    stages = Stages(out / "stages", log=logging.getLogger("table1"))
    data = stages.run("data", lambda: build_data(out))              # skipped on a re-run
    model = stages.run("train", lambda: train(run_dir), output=run_dir / "summary.json",
                       cached=lambda: read_selected_model(run_dir))
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import write_text

__all__ = ["Stages"]


class Stages:
    """Named stages of one output folder: which ran, which were skipped, and the seconds each took.

    Args:
        marker_dir: folder of the stage markers (created); None: no markers, a stage is skipped only
            when its `output` exists.
        log: where "run NAME" / "skip NAME (...)" / "done NAME (S s)" are logged (INFO).
    """

    def __init__(self, marker_dir: str | Path | None = None, log: logging.Logger | None = None):
        self.dir = Path(marker_dir) if marker_dir is not None else None
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log or logging.getLogger("minillm")
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}  # this sitting, in run order; skipped stages: time to read back

    def marker(self, name: str) -> Path | None:
        return self.dir / f"{name}.json" if self.dir is not None else None

    def done(self, name: str, output: str | Path | None = None) -> bool:
        """Whether stage `name` is finished: its `output` exists, or (without one) its marker does."""
        if output is not None:
            return Path(output).exists()
        marker = self.marker(name)
        return marker is not None and marker.exists()

    def run(self, name: str, fn: Callable[[], Any], *, output: str | Path | None = None,
            cached: Callable[[], Any] | None = None) -> Any:
        """`fn()` unless the stage is done (see `done`); then `cached()`, or the info its marker holds."""
        t0 = time.perf_counter()
        if self.done(name, output):
            self.log.info("skip %s (%s %s)", name, "output" if output is not None else "marker",
                          output if output is not None else self.marker(name))
            self.skipped.append(name)
            info = cached() if cached is not None else self.info(name)
            self.seconds[name] = time.perf_counter() - t0
            return info
        self.log.info("run %s", name)
        info = fn()
        seconds = time.perf_counter() - t0
        marker = self.marker(name)
        if marker is not None and output is None:
            write_text(marker, json.dumps({"seconds": seconds, "info": info}, indent=1, default=str))
        self.log.info("done %s (%.1f s)", name, seconds)
        self.ran.append(name)
        self.seconds[name] = seconds
        return info

    def info(self, name: str) -> Any:
        """The result a finished stage's marker holds (None without a marker folder)."""
        marker = self.marker(name)
        return json.loads(marker.read_text())["info"] if marker is not None else None

    def drop_stale(self, name: str, stale: Callable[[Any], bool]) -> None:
        """Delete stage `name`'s marker if `stale(info)` says its result no longer matches the settings."""
        marker = self.marker(name)
        if marker is not None and marker.exists() and stale(self.info(name)):
            self.log.info("redo %s: its models or seeds changed", name)
            marker.unlink()

    def marker_seconds(self) -> dict[str, float]:
        """Stage -> seconds of every marker in the folder (the sitting that finished it), oldest first."""
        if self.dir is None:
            return {}
        markers = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        return {p.stem: json.loads(p.read_text())["seconds"] for p in markers}
