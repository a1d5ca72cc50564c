"""Loading teacher and student models and tokenizers: a local folder, a .gguf file, a built-in name or a hub
id."""

from __future__ import annotations

import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from minillm.errors import ModelError
from minillm.models.builtin import BUILTIN_MODELS, builtin_gguf_path, builtin_names, cache_dir
from minillm.models.hub import from_hub, looks_like_path
from minillm.models.saving import save_to_temp_sibling

__all__ = ["builtin_model_dir", "load_model", "load_tokenizer"]

log = logging.getLogger("minillm.models")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def builtin_model_dir(name: str) -> Path:
    """Plain Hugging Face folder for a built-in model, converted from its GGUF file on first use.

    Dequantising the GGUF takes ~20 s; the converted float32 folder loads in ~1 s and, unlike a
    GGUF-loaded model, can be trained and saved. The folder appears atomically, so a crash or a
    concurrent conversion never leaves a half-written cache entry; if two processes convert at
    once, the first to finish wins and the other discards its copy.
    """
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model '{name}'; built-in models: {builtin_names()}")
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf_path = builtin_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting built-in model %s from %s to %s (once)", name, gguf_path, target)
    model, tokenizer = _load_gguf_model(gguf_path, torch.float32), _load_gguf_tokenizer(gguf_path)
    tmp = save_to_temp_sibling(model, tokenizer, target)
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return target


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ModelError(f"unknown dtype {dtype!r}; use one of: float32, bfloat16, float16")


def _resolve(name_or_path: str) -> tuple[str, str, str | None]:
    """Classify a model reference as ("folder", dir, None), ("gguf", dir, file) or ("hub", id, None)."""
    name_or_path = str(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return "folder", str(builtin_model_dir(name_or_path)), None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelError(f"folder '{path}' is not a Hugging Face model folder (no config.json); pass a "
                             "folder written by save_pretrained, a .gguf file or a built-in name "
                             f"({builtin_names()})")
        return "folder", str(path), None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"'{path}' is a file but not a .gguf file; pass a model folder, a .gguf file "
                             f"or a built-in name ({builtin_names()})")
        return "gguf", str(path.parent), path.name
    if looks_like_path(name_or_path):
        raise ModelError(f"no such folder or file: '{path}'; pass an existing model folder, a .gguf file, "
                         f"a hub id or a built-in name ({builtin_names()})")
    return "hub", name_or_path, None


def _make_trainable(model: PreTrainedModel) -> PreTrainedModel:
    """Undo transformers' "quantized" marking of GGUF-loaded models.

    GGUF weights are dequantised to dense tensors at load time, yet transformers keeps a GGUF
    quantizer on the model, which makes `save_pretrained` raise "not serializable" and the HF
    Trainer refuse to train. Dropping the marker yields an ordinary model with identical logits.
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


# what a truncated or corrupt file raises inside the readers: struct.error / EOFError / IndexError (a GGUF
# cut short after its magic bytes), SafetensorError (a zero-byte or truncated model.safetensors), ...
_CORRUPT_FILE_ERRORS = (OSError, ValueError, RuntimeError, struct.error, EOFError, IndexError, KeyError,
                        SafetensorError)


def _read_gguf(loader: Callable, path: Path, **kwargs):
    try:
        return loader(str(path.parent), gguf_file=path.name, **kwargs)
    except (OSError, ValueError) as error:  # bad magic bytes, unsupported architecture or quant type
        raise ModelError(f"cannot load GGUF file '{path}': {error}") from error
    except _CORRUPT_FILE_ERRORS as error:
        raise ModelError(f"cannot load GGUF file '{path}' ({path.stat().st_size} bytes): it is truncated or "
                         f"corrupt ({type(error).__name__}: {error}); download or convert it "
                         "again.") from error


def _weights_files(folder: str) -> str:
    names = sorted(p.name for p in Path(folder).iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    return ", ".join(f"{n} ({(Path(folder) / n).stat().st_size} bytes)" for n in names) or "no weights file"


def _load_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    return _make_trainable(_read_gguf(AutoModelForCausalLM.from_pretrained, path, dtype=dtype))


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    return _prepare_tokenizer(_read_gguf(AutoTokenizer.from_pretrained, path))


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """MiniLLM convention: pad = eos when missing; right padding (prompt collators left-pad themselves)."""
    if tokenizer.eos_token is None:
        raise ModelError(f"tokenizer '{tokenizer.name_or_path}' has no eos token; responses need one to end")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Tokenizer from a local folder, a .gguf file, a built-in name or a hub id (pad := eos when missing)."""
    kind, where, gguf_file = _resolve(name_or_path)
    if kind == "gguf":
        return _load_gguf_tokenizer(Path(where) / gguf_file)
    if kind == "hub":
        return _prepare_tokenizer(from_hub(AutoTokenizer.from_pretrained, where))
    try:
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(where))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from '{where}': {error}") from error


def load_model(name_or_path: str, *, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """Causal LM from a local folder, a .gguf file, a built-in name or a hub id, in eval() mode.

    Training code switches to train() itself; eval() by default keeps dropout off for teachers and
    for rollout generation, where MiniLLM wants deterministic policies.
    """
    torch_dtype = _parse_dtype(dtype)
    kind, where, gguf_file = _resolve(name_or_path)
    if kind == "gguf":
        model = _load_gguf_model(Path(where) / gguf_file, torch_dtype)
    elif kind == "hub":
        model = from_hub(AutoModelForCausalLM.from_pretrained, where, dtype=torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        except OSError as error:
            raise ModelError(f"cannot load a model from folder '{where}': {error}") from error
        except _CORRUPT_FILE_ERRORS as error:
            raise ModelError(f"cannot load a model from folder '{where}': its weights "
                             f"({_weights_files(where)}) are truncated or corrupt ({type(error).__name__}: "
                             f"{error}); save the model again (save_pretrained) or download it "
                             "again.") from error
    return model.eval()
