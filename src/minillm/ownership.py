"""Output ownership: one run per output folder, recorded, locked, never silently mixed or replaced.

Every training run claims its `output_dir` before any expensive work (`claim_output_dir`):

- a lock (`.minillm.lock`, `fcntl.flock`, held until the run ends) refuses a second run into the same folder
  while the first is alive, naming its process;
- a manifest (`minillm_run.json`: run id, command, method, when, where, the minillm version, the resolved
  config and the data files' content hashes) says which run the folder belongs to;
- a folder that already holds something is refused unless the run continues it (`resume=true`, only for a
  folder made by minillm) or `overwrite=true` is given, which *moves* the old content aside to
  `<folder>.replaced-<time>` (nothing is deleted). The message names the old run and the three ways on.

Only the main process (RANK 0) claims; the other processes of a run write into the folder it claimed.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError
from .io import file_hash, free_name, write_text

__all__ = ["MANIFEST", "claim_output_dir", "describe_run", "file_lock"]

logger = logging.getLogger("minillm")

MANIFEST = "minillm_run.json"
LOCK = ".minillm.lock"
# What a minillm training run writes into its output_dir (a folder holding only these is a minillm run's,
# also one made before manifests existed).
RUN_FILES = {MANIFEST, LOCK, "config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "best", "final",
             "tensorboard", "seqkd_teacher_data.jsonl", "seqkd_teacher_data.jsonl.partial", "runs"}


def describe_run(manifest: dict) -> str:
    """One line naming a run from its manifest."""
    return (f"run {manifest.get('run_id', '?')} ({manifest.get('command', '?')} "
            f"{manifest.get('method', '')}, started {manifest.get('created', '?')} on "
            f"{manifest.get('host', '?')}, pid {manifest.get('pid', '?')})")


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _acquire(path: Path, busy: str):
    """Open `path` and take an exclusive non-blocking flock on it, writing who holds it; the open file is
    returned (closing it releases the lock). Held elsewhere: ConfigError, `busy` formatted with the holder."""
    fd = open(path, "a+")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fd.seek(0)
        holder = fd.read().strip() or "another process"
        fd.close()
        raise ConfigError(busy.format(holder=holder)) from None
    fd.seek(0)
    fd.truncate()
    fd.write(f"pid {os.getpid()} on {socket.gethostname()} since "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    fd.flush()
    return fd


def _lock(out: Path):
    """An exclusive lock on the output folder `out`, or ConfigError naming the run that holds it."""
    return _acquire(out / LOCK, f"output_dir={out} is in use by {{holder}}: two runs must not write into one "
                                "folder. Wait for it to finish, or choose another output_dir.")


def _move_aside(out: Path) -> Path:
    target = free_name(out, f".replaced-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(out, target)
    return target


def _check_existing(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse (or move aside with overwrite) a non-empty `out` this run may not write into."""
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []
    if not entries or entries == [MANIFEST]:
        return  # empty, or a run that stopped before it wrote anything (its claim alone): taken over
    manifest = _read_manifest(out)
    ours = manifest is not None or set(entries) <= RUN_FILES
    if resume and ours:
        return
    if overwrite:
        moved = _move_aside(out)
        logger.warning("overwrite=true: moved the previous content of %s to %s (nothing was deleted)", out,
                       moved)
        return
    if ours:
        who = describe_run(manifest) if manifest else "an earlier minillm run"
        raise ConfigError(f"output_dir={out} already holds {who}. Continue it with resume=true, choose a new "
                          "output_dir, or pass overwrite=true to move the old run aside (to "
                          f"{out.name}.replaced-<time>; nothing is deleted).")
    shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
    raise ConfigError(f"output_dir={out} is not empty and was not made by minillm ({shown}); choose another "
                      "output_dir, or pass overwrite=true to move its content aside (nothing is deleted).")


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def claim_output_dir(cfg, command: str = "train"):
    """Claim `cfg.output_dir` for this run for the duration of the `with` block (see the module docstring).

    `cfg` needs output_dir, resume and overwrite; its other fields go into the manifest.
    """
    out = Path(cfg.output_dir)
    if not _is_main_process():
        yield out
        return
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output_dir={out} is a file; choose a folder path for output_dir.")
        # Refused before anything is written into it (not even the lock file); checked again under the lock.
        _check_existing(out, resume=bool(cfg.resume), overwrite=bool(getattr(cfg, "overwrite", False)))
        created = [p for p in (out, *out.parents) if not p.exists()]  # folders this claim makes
        out.mkdir(parents=True, exist_ok=True)
        fd = _lock(out)
    except OSError as e:
        raise ConfigError(f"output_dir={out}: cannot create or lock it ({e.strerror or e}); choose a "
                          "writable output_dir.") from None
    try:
        _check_existing(out, resume=True, overwrite=False)  # what appeared meanwhile must be a run's
        _write_manifest(out, cfg, command)
        yield out
    except BaseException:
        # A run that fails before writing anything (bad data, a missing model) leaves no folder behind: only
        # a folder this claim created and that holds nothing but the claim is removed.
        if created and {p.name for p in out.iterdir()} <= {MANIFEST, LOCK}:
            for name in (MANIFEST, LOCK):
                (out / name).unlink(missing_ok=True)
            for folder in created:  # innermost first; a parent something else wrote into stays
                try:
                    folder.rmdir()
                except OSError:
                    break
        raise
    finally:
        fd.close()


def _write_manifest(out: Path, cfg, command: str) -> None:
    old = _read_manifest(out) or {}
    from . import __version__

    config = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}
    data_keys = ("train_data", "valid_data", "pt_data", "seqkd_data")
    manifest = {
        "run_id": old.get("run_id") or uuid.uuid4().hex[:12],
        "command": command,
        "method": getattr(cfg, "method", ""),
        "created": old.get("created") or datetime.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "minillm_version": __version__,
        "resumed": bool(old) and bool(cfg.resume),
        "inputs": {k: {"path": str(config[k]), "blake2b": file_hash(str(config[k]))}
                   for k in data_keys if config.get(k)},
        "config": json.loads(json.dumps(config, default=str)),
    }
    sitting = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "pid": os.getpid(),
               "resume": bool(cfg.resume)}
    manifest["sittings"] = [*old.get("sittings", []), sitting]
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))


@contextmanager
def file_lock(path: Path, what: str):
    """Hold an exclusive lock file `path` for the `with` block (a second writer of the same output is
    refused, naming `what` and the holder); the lock file is removed afterwards."""
    try:
        fd = _acquire(path, f"{what} is being written by {{holder}}; wait for it to finish or choose another "
                            "output.")
    except OSError as e:
        raise ConfigError(f"{what}: cannot create the lock file {path} ({e.strerror or e}); choose a "
                          "writable location.") from None
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        fd.close()
