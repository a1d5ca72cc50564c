"""Resumable checkpoints: Accelerate's state saving inside an atomic write-then-rename.

`output_dir/checkpoints/step-NNNNNNN/` holds what `Accelerator.save_state` writes - the student
(safetensors; tied weights stored once and re-tied on load by safetensors' `load_model`), optimizer,
scheduler, every process's RNG states (Python, NumPy, torch and, when CUDA is used, CUDA) and the
registered algorithm state (its data position and rollout buffer, per process) - plus, for an FSDP2 run,
the sharded model and optimizer in torch distributed checkpoint format (`sharded/`, one file per process) -
plus
`trainer_state.json` (step, best model, world size). It is written into a hidden `.tmp-step-*` folder
and renamed into place only when complete, so a kill during a save never leaves a broken latest
checkpoint. The `COMPLETE` marker records every file's size and, for files up to `HASH_LIMIT` bytes (the
trainer state, scheduler, RNG states, algorithm state; a small model's weights), its SHA-256: a file
truncated, emptied, removed or changed later is found before anything is loaded (`verify`).

On resume (`Checkpoints.resume`) the newest checkpoint that verifies and loads is used; each newer broken
one is reported and moved aside (`step-N.broken`), never deleted. If none is intact the run refuses and
lists them. Pruning (`keep_checkpoints`) deletes only checkpoints of this run: the ones it wrote and the
ones up to the checkpoint it resumed from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .errors import TrainingError
from .io import free_name, hash_file_into, write_json

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
SHARDED_DIR = "sharded"  # torch distributed checkpoint of an FSDP run's model and optimizer
BROKEN_SUFFIX = ".broken"  # a broken checkpoint moved aside on resume (kept, never deleted)
HASH_LIMIT = 64 * 2**20  # files up to this size are hashed into the marker (larger ones: size only)
_STEP_DIR = re.compile(r"step-(\d+)")

logger = logging.getLogger("minillm")

__all__ = ["CHECKPOINT_DIR", "COMPLETE_MARKER", "CheckpointBroken", "Checkpoints", "PerProcessState",
           "verify"]


class CheckpointBroken(TrainingError):
    """A checkpoint's files are damaged (or do not load): resume falls back to an older one."""


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
    """The resumable checkpoints of one run: save (atomically), list, verify, load / resume, prune."""

    def __init__(self, output_dir: Path, accelerator, keep: int, sharded: tuple | None = None):
        """`sharded`: (model, optimizer) of an FSDP2 run, saved with torch distributed checkpoint (each
        process
        writes its shards into `SHARDED_DIR`); otherwise Accelerate saves the prepared model and optimizer."""
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.accelerator = accelerator
        self.keep = keep
        self.sharded = sharded
        self.owned: set[str] = set()  # checkpoints of this run (written, or resumed through): prunable

    def list(self) -> list[Path]:
        """Checkpoints with a `COMPLETE` marker (not yet verified), oldest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.iterdir()
                if _STEP_DIR.fullmatch(p.name) and (p / COMPLETE_MARKER).exists()]
        return sorted(done, key=_step_of)

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
            write_json(tmp / COMPLETE_MARKER, _manifest(tmp, step))  # after every process wrote its files
            self._replace(final, tmp)
            self.owned.add(final.name)
            for old in [p for p in self.list() if p.name in self.owned][: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
                self.owned.discard(old.name)
        acc.wait_for_everyone()
        return final

    def _replace(self, final: Path, tmp: Path) -> None:
        """Rename `tmp` into `final`; an existing `final` of this run is replaced (after the rename), one the
        run did not write is moved aside, never deleted."""
        if not final.exists():
            os.replace(tmp, final)
            return
        aside = free_name(final, ".replaced") if final.name not in self.owned else final.with_name(
            f".old-{final.name}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
        os.replace(tmp, final)
        if final.name in self.owned:
            shutil.rmtree(aside, ignore_errors=True)
        else:
            logger.warning("%s existed and was not written by this run: moved aside to %s", final, aside.name)

    def resume(self, load) -> Path | None:
        """Load the newest intact checkpoint with `load(path)` (which raises `CheckpointBroken` for one that
        does not load); each newer broken one is reported and moved aside. None when there is none at all;
        a TrainingError listing them when none is intact."""
        found = self.list()
        broken: list[tuple[Path, str]] = []
        for path in reversed(found):
            problem = verify(path)
            if problem is None:
                try:
                    load(path)
                except CheckpointBroken as err:
                    problem = str(err)
            problem = self._agree(problem)
            if problem is None:
                self._set_aside(broken, path)
                self.owned = {p.name for p in found if _step_of(p) <= _step_of(path)}
                return path
            broken.append((path, problem))
        if not broken:
            return None
        listing = "\n".join(f"  {p.name}: {why}" for p, why in broken)
        raise TrainingError(
            f"resume=true: no intact checkpoint in {self.root}:\n{listing}\nNothing was deleted or moved. "
            "If the checkpoints do not match the student or the settings, resume with the run's own settings "
            "(its config.yaml); otherwise start a new run (resume=false with a new output_dir)."
        )

    def _agree(self, problem: str | None) -> str | None:
        """Every process uses the same checkpoint: one that failed on any process failed for all."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return problem
        failed = acc.reduce(torch.tensor([0.0 if problem is None else 1.0], device=acc.device), "sum")
        if problem is None and failed.item() > 0:
            return "it does not load on another process (see that process's log)"
        return problem

    def _set_aside(self, broken: list[tuple[Path, str]], used: Path) -> None:
        moves = [(path, why, free_name(path, BROKEN_SUFFIX)) for path, why in broken]
        self.accelerator.wait_for_everyone()  # every process named the same folders before any is moved
        if self.accelerator.is_main_process:
            for path, why, aside in moves:
                os.replace(path, aside)
                logger.warning("checkpoint %s is broken (%s): resuming from %s instead; the broken one is "
                               "kept as %s", path, why, used.name, aside.name)
        self.accelerator.wait_for_everyone()

    def load(self, path: Path) -> dict:
        """Restore everything `save` wrote into the prepared objects; returns the trainer state. Damaged files
        raise `CheckpointBroken`; a checkpoint of another process count or fsdp setting a TrainingError."""
        acc = self.accelerator
        try:
            state = json.loads((path / TRAINER_STATE).read_text())
            world = state.get("world_size", 1)
        except (OSError, ValueError, AttributeError) as err:
            raise CheckpointBroken(f"{TRAINER_STATE} does not load ({type(err).__name__}: {err})") from err
        if world != acc.num_processes:
            raise TrainingError(
                f"{path}: written by {world} processes, resuming with "
                f"{acc.num_processes}. Exact resume needs the same number: each process's data order, random "
                f"generators and rollout round are in the checkpoint. Relaunch with --num_processes "
                f"{world}, or start a new run (resume=false, a new output_dir) from this "
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
        except TrainingError:
            raise
        except RuntimeError as err:  # safetensors' load_model / DCP: missing / unexpected weights
            raise CheckpointBroken(
                f"checkpoint does not match the student ({str(err).splitlines()[0]})"
            ) from err
        except Exception as err:  # a damaged pickle / safetensors file the marker could not tell
            msg = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointBroken(f"it does not load ({type(err).__name__}: {msg})") from err
        return state


def verify(folder: Path) -> str | None:
    """What is wrong with the checkpoint `folder` by its `COMPLETE` marker (sizes, hashes), or None."""
    try:
        text = (folder / COMPLETE_MARKER).read_text()
    except OSError as err:
        return f"its {COMPLETE_MARKER} marker cannot be read ({err})"
    if text.strip() == "ok":  # a marker of an older minillm: no sizes recorded, only emptiness is seen
        empty = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                 and p.stat().st_size == 0 and p.name != COMPLETE_MARKER]
        missing = [] if (folder / TRAINER_STATE).is_file() else [f"{TRAINER_STATE} is missing"]
        return "; ".join(missing + [f"{name} is empty" for name in empty]) or None
    try:
        files = json.loads(text)["files"]
        expected = {rel: (int(meta["size"]), meta.get("sha256")) for rel, meta in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"its {COMPLETE_MARKER} marker is damaged"
    problems = []
    for rel, (size, digest) in expected.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != size:
            problems.append(f"{rel} has {p.stat().st_size} bytes, {size} were written")
        elif digest is not None and _sha256_of(p) != digest:
            problems.append(f"{rel} changed after it was written (SHA-256 differs)")
    return "; ".join(problems) or None


def _manifest(folder: Path, step: int) -> dict:
    """What the marker records: each file's size, and the SHA-256 of those up to `HASH_LIMIT` bytes."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != COMPLETE_MARKER:
            size = p.stat().st_size
            files[p.relative_to(folder).as_posix()] = {"size": size, **(
                {"sha256": _sha256_of(p)} if size <= HASH_LIMIT else {})}
    return {"step": step, "files": files}


def _sha256_of(path: Path) -> str:
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def _sharded_state(model, optimizer) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}
