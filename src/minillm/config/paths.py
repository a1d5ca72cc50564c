"""Pre-flight checks of output paths: a command refuses an output it cannot write *before* any expensive work
(loading models, generating), with the option that named the path and what to do instead.

Only the file system is consulted (no torch), so configs check their paths in `validate()`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError

__all__ = ["check_output_dir", "check_output_file", "check_writable_parent", "nearest_existing"]


def nearest_existing(path: Path) -> Path:
    """`path` itself or its closest ancestor that exists (the folder a mkdir of `path` would start in)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_parent(path: str | os.PathLike, key: str) -> Path:
    """Refuse `path` when its folder cannot be created or written: an ancestor is a file, or the closest
    existing ancestor is not writable. Returns the absolute path."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    base = nearest_existing(target.parent)
    if not base.is_dir():
        raise ConfigError(f"{key}={path}: {base} is a file, so the folder {target.parent} cannot be created; "
                          f"choose another {key}.")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot write into {base} (permission denied or a read-only file "
                          f"system); choose a writable {key} or fix the folder's permissions.")
    return target


def check_output_file(path: str | os.PathLike, key: str = "output") -> Path:
    """Refuse an output *file* path that is a directory (or whose `.partial` sibling is one) or that cannot be
    written (see `check_writable_parent`). Returns the absolute path."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    for p in (target, target.with_name(target.name + ".partial")):
        if p.is_dir():
            raise ConfigError(f"{key}={path}: {p} is a directory, but {key} names the JSONL file to write; "
                              f"give a file path such as {key}={Path(path) / 'generations.jsonl'}.")
    return check_writable_parent(target, key)


def check_output_dir(path: str | os.PathLike, key: str = "output_dir", *, writable: bool = True) -> Path:
    """Refuse an output *folder* path that is a file or lies under a file, and (with `writable`) one that
    cannot be written (see `check_writable_parent`). Returns the absolute path."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{key}={path}: {target} is a file, but {key} names the folder to write into; "
                          f"choose another {key} (a new or existing folder).")
    base = nearest_existing(target)
    if not base.is_dir():
        raise ConfigError(f"{key}={path}: {base} is a file, so the folder {target} cannot be created; "
                          f"choose another {key}.")
    return check_writable_parent(target / "x", key) if writable else target
