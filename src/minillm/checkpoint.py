"""Resumable checkpoints: Accelerate's state saving inside an atomic write-then-rename.

`output_dir/checkpoints/step-NNNNNNN/` holds what `Accelerator.save_state` writes - the student
(safetensors; tied weights stored once and re-tied on load by safetensors' `load_model`), optimizer,
scheduler, every process's RNG states (Python, NumPy, torch and, when CUDA is used, CUDA) and the
registered algorithm state (its data position and rollout buffer, per process) - plus, for an FSDP2 run,
the sharded model and optimizer in torch distributed checkpoint format (`sharded/`, one file per process) -
plus
`trainer_state.json` (step, best model, world size). It is written into a hidden `.tmp-step-*` folder
and renamed into place only when complete (a `COMPLETE` marker), so a kill during a save never leaves
a broken latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import TrainingError
from .io import write_json

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
SHARDED_DIR = "sharded"  # torch distributed checkpoint of an FSDP run's model and optimizer

__all__ = ["CHECKPOINT_DIR", "COMPLETE_MARKER", "Checkpoints", "PerProcessState"]


class PerProcessState:
    """Makes an object's per-process state checkpointable by Accelerate.

    Accelerate writes a registered object's `state_dict()` from the main process only, but each process
    of a MiniLLM run samples its own rollouts (own buffer, own generators). So `state_dict` gathers every
    process's state to the main process and `load_state_dict` hands each process its own.
    """

    def __init__(self, obj, accelerator):
        self.obj, self.accelerator = obj, accelerator

    def state_dict(self) -> dict:
        local = self.obj.state_dict()
        world = self.accelerator.num_processes
        if world == 1:
            return {"per_process": [local]}
        gathered = [None] * world if self.accelerator.is_main_process else None
        dist.gather_object(local, gathered, dst=0)
        return {"per_process": gathered}

    def load_state_dict(self, state: dict) -> None:
        states = state["per_process"]
        if len(states) != self.accelerator.num_processes:
            raise TrainingError(
                f"the checkpoint holds the state of {len(states)} processes, this run has "
                f"{self.accelerator.num_processes}; exact resume needs the same number."
            )
        self.obj.load_state_dict(states[self.accelerator.process_index])


class Checkpoints:
    """The resumable checkpoints of one run: save (atomically), list, load, prune."""

    def __init__(self, output_dir: Path, accelerator, keep: int, sharded: tuple | None = None):
        """`sharded`: (model, optimizer) of an FSDP2 run, saved with torch distributed checkpoint (each
        process
        writes its shards into `SHARDED_DIR`); otherwise Accelerate saves the prepared model and optimizer."""
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.accelerator = accelerator
        self.keep = keep
        self.sharded = sharded

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        done = [
            p for p in self.root.iterdir() if p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()
        ]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def save(self, step: int, trainer_state: dict) -> Path:
        """Write the checkpoint of `step` (every process calls this); returns its folder."""
        acc = self.accelerator
        final, tmp = self.root / f"step-{step:07d}", self.root / f".tmp-step-{step:07d}"
        if acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            if self.sharded is not None:
                dcp.save(_sharded_state(*self.sharded), checkpoint_id=str(tmp / SHARDED_DIR))
            if acc.is_main_process:
                write_json(
                    tmp / TRAINER_STATE, {**trainer_state, "step": step, "world_size": acc.num_processes}
                )
        except Exception as err:  # a full disk, a quota, a vanished mount: say so, keep the last checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            last = self.list()
            raise TrainingError(
                f"could not write the checkpoint of step {step} into {tmp.parent} ({type(err).__name__}: "
                f"{err}). Free space there (or set output_dir elsewhere) and re-run with resume=true; "
                + (
                    f"it continues from {last[-1].name}, which is intact."
                    if last
                    else "no earlier checkpoint exists, so the run starts over."
                )
            ) from err
        acc.wait_for_everyone()
        if acc.is_main_process:
            (tmp / COMPLETE_MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.list()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> dict:
        """Restore everything `save` wrote into the prepared objects; returns the trainer state."""
        acc = self.accelerator
        state = json.loads((path / TRAINER_STATE).read_text())
        if state.get("world_size", 1) != acc.num_processes:
            raise TrainingError(
                f"{path}: written by {state.get('world_size')} processes, resuming with "
                f"{acc.num_processes}. Exact resume needs the same number: each process's data order, random "
                f"generators and rollout round are in the checkpoint. Relaunch with --num_processes "
                f"{state.get('world_size')}, or start a new run (resume=false, a new output_dir) from this "
                "run's best/ or final/ model."
            )
        if (self.sharded is not None) != (path / SHARDED_DIR).is_dir():
            sharded_dir = (path / SHARDED_DIR).is_dir()
            kind = "an FSDP (sharded)" if sharded_dir else "an unsharded (DDP / one process)"
            raise TrainingError(f"{path} is {kind} checkpoint; resume it with the same fsdp setting it was "
                                "written with.")
        try:
            acc.load_state(str(path))
            if self.sharded is not None:
                model, optimizer = self.sharded
                sharded = _sharded_state(model, optimizer)
                dcp.load(sharded, checkpoint_id=str(path / SHARDED_DIR))
                set_state_dict(model, optimizer, model_state_dict=sharded["model"],
                               optim_state_dict=sharded["optim"])
        except RuntimeError as err:  # safetensors' load_model / DCP: missing / unexpected weights
            raise TrainingError(
                f"{path}: checkpoint does not match the student ({str(err).splitlines()[0]})"
            ) from err
        return state


def _sharded_state(model, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}
