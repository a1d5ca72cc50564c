"""The shape of a model as `minillm plan` needs it: exact parameter counts (built on the meta device) and the
widths its formulas use, from a folder, a config.json, a .gguf file, a built-in name, a hub id or a built
model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import ModelError

__all__ = ["LAYER_BYTES", "ModelShape", "model_shape", "shape_of_model"]

# activation bytes saved for backward per token by one decoder layer, as (h, kv, i) coefficients of the
# hidden, key/value and MLP widths: (fp32, bf16 autocast); measured with saved-tensor hooks (parameters
# excluded)
LAYER_BYTES = {"llama": ((32, 8, 16), (30, 4, 8)),  # RMSNorm + gated MLP (Llama, Qwen2, Mistral, ...)
               "gpt2": ((40, 0, 20), (24, 0, 10)),  # LayerNorm, fused q/k/v, gelu_new MLP (other ungated)
               "opt": ((32, 0, 4), (24, 0, 2))}  # LayerNorm, ReLU MLP


@dataclasses.dataclass
class ModelShape:
    """What the formulas need of one model (counts exact, tied parameters once)."""

    name: str
    model_type: str
    params: int
    layer_params: int  # in the decoder blocks; the rest is FSDP's root unit (embeddings, final norm, head)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the LM head
    family: str  # key of LAYER_BYTES
    lora_linears: list = dataclasses.field(default_factory=list, repr=False)  # (in, out) of PEFT's all-linear

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def root_params(self) -> int:
        return self.params - self.layer_params

    def lora_params(self, r: int) -> int:
        """LoRA parameters with PEFT's target_modules="all-linear": r x (in + out) per linear layer."""
        return sum(r * (i + o) for i, o in self.lora_linears)

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "lora_linears"}


def _first(cfg, *names, default=None):
    return next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)


def shape_of_model(model, name: str) -> ModelShape:
    """The shape of a built Hugging Face causal LM (a real or a meta-device one)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from .distributed import decoder_layers

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    head = model.get_output_embeddings()
    linears = [(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else tuple(m.weight.shape)
               for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]
    gated = "gate" in " ".join(n for n, _ in layers[0].named_modules())
    act = str(_first(cfg, "hidden_act", "activation_function", default=""))
    family = cfg.model_type if cfg.model_type in LAYER_BYTES else "llama" if gated else (
        "opt" if act == "relu" else "gpt2")
    return ModelShape(
        name=name, model_type=cfg.model_type, params=sum(p.numel() for p in model.parameters()),
        layer_params=sum(p.numel() for p in model.parameters() if id(p) in in_layers), layers=len(layers),
        hidden=hidden, heads=heads, kv_heads=_first(cfg, "num_key_value_heads", default=heads),
        head_dim=_first(cfg, "head_dim", default=hidden // heads),
        intermediate=_first(cfg, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        vocab=head.weight.shape[0], family=family, lora_linears=linears)


def _config_from_json(path: Path):
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); pass "
                         "a model folder or its config.json.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot be read ({err}).") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelError(f"{path}: no `model_type` key, so it is not a Hugging Face model config.json.")
    try:
        return AutoConfig.for_model(**data)
    except Exception as err:  # unknown model_type, or values the config class validates and refuses
        raise ModelError(f"{path}: not a valid {data['model_type']!r} config for transformers "
                         f"({type(err).__name__}: {' '.join(str(err).split())}).") from None


def _gguf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # the gguf reader raises many kinds of errors
        raise ModelError(f"{path}: cannot read the GGUF metadata ({type(err).__name__}: {err}).") from None


def _read_config(spec: str):
    from transformers import AutoConfig

    from .models.builtin import BUILTIN_MODELS, builtin_gguf_path, cache_dir
    from .models.hub import from_hub, hub_offline, looks_like_path

    if spec in BUILTIN_MODELS:
        converted = cache_dir() / spec / "config.json"
        return _config_from_json(converted) if converted.is_file() else _gguf_config(builtin_gguf_path(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: the folder has no config.json; pass a model folder written by "
                             "save_pretrained, or a config.json file.")
        return _config_from_json(path / "config.json")
    if path.is_file():
        return _gguf_config(path) if path.suffix.lower() == ".gguf" else _config_from_json(path)
    if looks_like_path(spec) or spec.lower().endswith(".json"):
        raise ModelError(f"{spec}: no such file or folder; pass a model folder or its config.json.")
    try:
        return from_hub(AutoConfig.from_pretrained, spec)
    except (ModelError, ValueError) as err:
        reason = "offline mode is on (HF_HUB_OFFLINE)" if hub_offline() else str(err).split(". ")[0]
        raise ModelError(f"'{spec}' is not a local file or folder, and as a hub id its config cannot be "
                         f"read: {reason}. Pass the model's local folder or its config.json.") from None


def model_shape(spec) -> ModelShape:
    """A ModelShape from a folder, a config.json, a .gguf file, a built-in name, a hub id or a built model."""
    if isinstance(spec, ModelShape):
        return spec
    if hasattr(spec, "config") and hasattr(spec, "parameters"):
        return shape_of_model(spec, type(spec).__name__)
    import torch
    from transformers import AutoModelForCausalLM

    config = _read_config(str(spec))
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as err:  # an inconsistent config fails in the model's __init__, in any way
        raise ModelError(f"{spec}: cannot build a causal LM from this config ({type(err).__name__}: "
                         f"{err}).") from None
    return shape_of_model(model, str(spec))
