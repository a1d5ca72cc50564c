"""Files in and out: atomic JSON / JSONL writes and JSONL reads (the one place for them).

A file written here is either absent, the old file, or complete: the text goes to a hidden sibling,
is fsynced, and is renamed over the target (a rename within one folder is atomic on POSIX). Readers
name the file and line of a malformed record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

__all__ = ["iter_jsonl", "read_jsonl", "write_json", "write_jsonl", "write_text"]


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` so that `path` is either absent, the old file, or complete - never half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, **kwargs) -> Path:
    """`json.dumps(obj)` written atomically (see `write_text`)."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> Path:
    """One JSON record per line (UTF-8 kept as is), written atomically (see `write_text`)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def iter_jsonl(path: str | os.PathLike, shape: str = "one JSON object") -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", record), skipping blank lines; a bad line raises DataError naming it and `shape`.

    Lines end at "\\n" only (file iteration), never inside a record: `str.splitlines()` would also split at
    U+2028 / U+0085 / U+001C-1E, which sampled responses can hold and `json.dumps(ensure_ascii=False)`
    writes raw.
    """
    path = Path(path)
    with path.open("rb") as f:  # binary lines end at b"\n" only; each is decoded on its own
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column "
                                f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({error.msg} at column {error.colno}); "
                    f"each line must be {shape}"
                ) from error


def read_jsonl(path: str | os.PathLike, shape: str = "one JSON object") -> list[Any]:
    """The records of a JSONL file, blank lines skipped; a bad line raises DataError naming it."""
    return [record for _, record in iter_jsonl(path, shape)]


def file_hash(path: str | os.PathLike) -> str | None:
    """BLAKE2b (128-bit, hex) of a file's bytes, or None when `path` is not a file (e.g. a hub name)."""
    p = Path(path)
    if not p.is_file():
        return None
    return hash_file_into(hashlib.blake2b(digest_size=16), p).hexdigest()


def hash_file_into(h, path: str | os.PathLike):
    """Feed a file's bytes to the hash object `h` in 8 MiB blocks; returns `h`."""
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h


def free_name(path: str | os.PathLike, suffix: str) -> Path:
    """A sibling name for moving `path` aside: `path` + `suffix`, or + `suffix-2`, `-3`, ... when taken."""
    path = Path(path)
    aside, n = path.with_name(path.name + suffix), 2
    while aside.exists():
        aside, n = path.with_name(f"{path.name}{suffix}-{n}"), n + 1
    return aside
