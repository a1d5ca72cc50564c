"""Loading from the Hugging Face hub: offline mode, a quick reachability check, clear errors."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from urllib.parse import urlparse

from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError

from minillm.errors import ModelError
from minillm.models.builtin import builtin_names

__all__ = ["from_hub", "hub_offline", "looks_like_path"]


def hub_offline() -> bool:
    """True when the user asked for offline mode, read at call time so a late `export` still counts."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that was meant as a path should not hit the hub."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or name.lower().endswith(".gguf"))


def _hub_error(model_id: str, error: Exception) -> ModelError:
    reason = ("the hub is unreachable because offline mode is on (HF_HUB_OFFLINE is set)" if hub_offline()
              else "the Hugging Face hub is unreachable or has no model with that id")
    return ModelError(
        f"cannot load '{model_id}': it is not a local folder, and {reason} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Pass a local model folder, a .gguf file, or a "
        f"built-in model name ({builtin_names()})."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that a machine without internet fails in seconds, not after ~90 s of retries."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def from_hub(loader: Callable, model_id: str, **kwargs):
    """`loader(model_id, **kwargs)` from the local HF cache when there, else the hub; a ModelError if
    neither."""
    try:
        if not hub_offline():
            cached = any(isinstance(try_to_load_from_cache(model_id, f), str)
                         for f in ("config.json", "tokenizer_config.json"))
            if cached:  # already in the local Hugging Face cache: no network needed
                try:
                    return loader(model_id, local_files_only=True, **kwargs)
                except (OSError, HFValidationError):
                    pass
            if not _hub_reachable():
                raise OSError("no connection to the Hugging Face hub")
        return loader(model_id, local_files_only=hub_offline(), **kwargs)
    except (OSError, HFValidationError) as error:  # connection errors and missing repos are OSErrors
        raise _hub_error(model_id, error) from error
