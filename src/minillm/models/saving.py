"""Saving models as plain Hugging Face folders that appear all at once (write to a sibling, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from minillm.errors import ModelError

__all__ = ["save_pretrained_atomic", "save_to_temp_sibling"]


def save_to_temp_sibling(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                         out_dir: Path) -> Path:
    """Save into a fresh hidden folder next to `out_dir` (same filesystem, so a rename is atomic)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's private 0700 would make the final folder unreadable to other users
    try:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


# Files a Hugging Face model folder (model + tokenizer + generation config, possibly sharded) is made of.
_MODEL_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".txt", ".jinja", ".py", ".md")


def _check_replaceable(out: Path) -> None:
    """Refuse to replace `out` unless it is absent, empty, or a model folder (config.json and only model /
    tokenizer files): a save never deletes files that are not a model's."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelError(f"cannot save the model to {out}: it is a file; choose a folder path.")
    entries = [p for p in out.iterdir()]
    if not entries:
        return
    foreign = [p.name for p in entries if p.is_dir() or not p.name.endswith(_MODEL_SUFFIXES)]
    if not (out / "config.json").is_file() or foreign:
        shown = ", ".join(sorted(foreign or [p.name for p in entries])[:5])
        raise ModelError(f"cannot save the model to {out}: the folder holds files that are not a model's "
                         f"({shown}); saving replaces the whole folder, so choose another path or move "
                         "those files away.")


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                           out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer as a plain HF folder that appears all at once.

    An interrupted save (crash, SIGTERM, full disk) must never destroy the previous checkpoint:
    everything is written to a temporary sibling first, and the old folder is only removed once
    the new one has been renamed into place.
    """
    out = Path(out_dir).expanduser().absolute()
    _check_replaceable(out)  # before the (long) save: never replace what is not a model folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = save_to_temp_sibling(model, tokenizer, out)
    if not out.exists():
        os.replace(tmp, out)
        return out
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old)  # `old` is an empty dir, so replacing it with a dir is allowed
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
