"""`minillm plan`: per-GPU memory of a distillation run for each sharding option, and a recommendation.

Every figure is bytes per device. Parameter counts are exact (the models are built on the meta device from
their config.json); the rest are formulas (see `docs/planner.md`, which also gives their error against memory
measured on CPU):

- student weights: fp32 master weights, sharded 1/N by FSDP2 and ZeRO-3; gradients (fp32) sharded by ZeRO-2,
  FSDP2 and ZeRO-3; AdamW's two fp32 moments likewise. With LoRA only the adapters have gradients and moments.
- FSDP2 gathers a unit at a time for compute: the root unit (embeddings, final norm, LM head) and one decoder
  layer, in the compute dtype; during rollouts the student is gathered whole (`student gathered`).
- teacher weights in `teacher_dtype`, sharded 1/N with `teacher_sharding=shard` (plus one gathered layer and
  its root unit).
- activations saved for backward, per decoder layer and token (elements): 13 h + 2 kv + 4 i (h hidden, kv the
  key/value width, i the MLP width: the RMSNorm internals, q/k/v and their rotary forms, the attention inputs
  and output, the MLP's gate/up/activation/down inputs; fitted to the saved-tensor bytes of Llama layers with
  SDPA attention, within 7 %), in the activation dtype; with checkpointing only each layer's input (h) is
  kept, plus one layer's full activations during its recomputation.
- full-vocabulary losses: `chunk_size` positions x vocabulary, 4 fp32 tensors per model (logits, log-softmax,
  probabilities, gradient).
- rollout KV caches: 2 x layers x kv x (max_prompt_length + max_new_tokens) x rollout_batch_size, for the
  student and, for minillm with teacher mixing, the teacher (which decodes alongside).
The peak is the larger of the update phase and the rollout phase.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from .errors import ModelError

__all__ = ["ModelShape", "Plan", "format_plan", "model_shape", "plan_memory", "OPTIONS"]

GIB = 2**30
HEADROOM = 0.10  # CUDA context, allocator fragmentation, NCCL buffers
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
# tested options first, cheapest communication first: the recommendation is the first that fits
OPTIONS = {
    "ddp": "(no switch: data parallel)",
    "fsdp": "fsdp=true teacher_sharding=replicate",
    "fsdp+teacher": "fsdp=true teacher_sharding=shard",
    "zero2": "accelerate launch --config_file configs/accelerate/zero2.yaml (DeepSpeed)",
    "zero3": "(DeepSpeed ZeRO-3: not supported by minillm; for comparison)",
}


@dataclasses.dataclass
class ModelShape:
    """What the formulas need of one model."""

    name: str
    params: int
    layers: int
    hidden: int
    kv_width: int  # key/value width per token per layer (kv heads x head dim)
    intermediate: int
    vocab: int
    root_params: int  # embeddings + final norm + LM head (FSDP2's root unit)
    linear_shapes: list  # (in, out) of each linear layer inside the decoder blocks (for LoRA)


def _read_config(spec: str):
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelError(f"{spec}: not a readable config.json ({err})") from None
        if "model_type" not in data:
            raise ModelError(f"{spec}: config.json has no `model_type`")
        return AutoConfig.for_model(**data)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{spec}: folder without a config.json")
        return AutoConfig.from_pretrained(path)
    if spec.startswith((".", "/", "~")) or spec.endswith(".json") or "/" not in spec:
        raise ModelError(f"{spec}: no such folder or config.json")
    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(
            f"cannot read the config of hub id {spec!r}"
            + (" (offline: HF_HUB_OFFLINE=1)" if offline else f" ({type(err).__name__})")
            + ": pass a local model folder or its config.json"
        ) from None


def model_shape(spec: str) -> ModelShape:
    """Exact parameter counts and the widths the formulas use, from a folder, a config.json or a hub id."""
    import torch
    from transformers import AutoModelForCausalLM

    from .distributed import decoder_layers

    config = _read_config(str(spec))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    linears = [
        (m.in_features, m.out_features)
        for layer in layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    hidden = model.get_input_embeddings().weight.shape[1]
    first = layers[0]
    widths = [
        m.out_features
        for n, m in first.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in ("k_proj", "v_proj")
    ]
    kv = widths[0] if widths else hidden  # GPT-2's fused c_attn: full width
    mlp = [
        m.out_features for m in first.modules() if isinstance(m, torch.nn.Linear) and m.out_features > hidden
    ]
    conv = [getattr(m, "nf", 0) for m in first.modules() if type(m).__name__ == "Conv1D"]  # GPT-2's MLP
    intermediate = max(mlp + [n for n in conv if n > hidden * 3 // 2] + [4 * hidden if conv else hidden])
    if conv:
        linears = [
            (m.weight.shape[0], m.nf)
            for layer in layers
            for m in layer.modules()
            if type(m).__name__ == "Conv1D"
        ]
    return ModelShape(
        str(spec),
        params,
        len(layers),
        hidden,
        kv,
        intermediate,
        model.get_output_embeddings().weight.shape[0],
        root,
        linears,
    )


def lora_params(shape: ModelShape, r: int) -> int:
    """LoRA adapters on every linear layer of the decoder blocks (PEFT's target_modules="all-linear")."""
    return sum(r * (i + o) for i, o in shape.linear_shapes)


@dataclasses.dataclass
class Plan:
    option: str
    switches: str
    parts: dict  # component -> bytes per device
    update_peak: int
    rollout_peak: int
    peak: int
    fits: bool


def _option_parts(
    option: str, s: ModelShape, t: ModelShape | None, n: int, run: dict
) -> tuple[dict, int, int]:
    shard_student = option in ("fsdp", "fsdp+teacher", "zero3")
    shard_states = option != "ddp"
    shard_teacher = option == "fsdp+teacher"
    compute = 2 if (run["precision"] == "bf16" or run["fsdp_mixed_precision"]) else 4  # activations, KV
    gathered = 2 if run["fsdp_mixed_precision"] else 4  # FSDP2 all-gathers the parameters in this dtype
    trainable = lora_params(s, run["lora_r"]) if run["lora_r"] else s.params
    base_bytes = 4 * s.params + (4 * trainable if run["lora_r"] else 0)
    tb = DTYPE_BYTES[run["teacher_dtype"]]
    parts = {
        "student weights": base_bytes / (n if shard_student else 1),
        "student gathered unit (root + 1 layer)": gathered
        * (s.root_params + (s.params - s.root_params) / max(s.layers, 1))
        if shard_student
        else 0,
        "gradients": 4 * trainable / (n if shard_states else 1),
        "AdamW state": 8 * trainable / (n if shard_states else 1),
        "teacher weights": 0 if t is None else tb * t.params / (n if shard_teacher else 1),
        "teacher gathered unit": 0
        if not (t and shard_teacher)
        else tb * (t.root_params + (t.params - t.root_params) / max(t.layers, 1)),
    }
    tokens = run["batch_size"] * run["seq_len"]
    per_layer = tokens * (13 * s.hidden + 2 * s.kv_width + 4 * s.intermediate) * compute
    if run["gradient_checkpointing"]:
        parts["activations"] = tokens * s.hidden * compute * s.layers + per_layer
    else:
        parts["activations"] = per_layer * s.layers
    models = 2 if t is not None and run["method"] != "seqkd" else 1
    parts["loss chunks (logits)"] = 4 * 4 * run["chunk_size"] * s.vocab * models
    kv = 0
    if run["method"] in ("minillm", "onpolicy"):
        cache = 2 * run["rollout_batch_size"] * (run["max_prompt_length"] + run["max_new_tokens"]) * compute
        kv = cache * s.layers * s.kv_width
        if run["method"] == "minillm" and run["teacher_mix_alpha"] > 0 and t is not None:
            kv += (
                2
                * run["rollout_batch_size"]
                * (run["max_prompt_length"] + run["max_new_tokens"])
                * tb
                * t.layers
                * t.kv_width
            )
    parts["rollout KV caches"] = kv
    parts["student gathered for decoding"] = gathered * s.params if shard_student and kv else 0
    resident = parts["student weights"] + parts["AdamW state"] + parts["teacher weights"]
    update = (
        resident
        + parts["gradients"]
        + parts["student gathered unit (root + 1 layer)"]
        + parts["teacher gathered unit"]
        + parts["activations"]
        + parts["loss chunks (logits)"]
    )
    rollout = (
        resident
        + parts["teacher gathered unit"]
        + parts["rollout KV caches"]
        + parts["student gathered for decoding"]
        + 4 * run["rollout_batch_size"] * s.vocab * models
    )
    return {k: int(v) for k, v in parts.items()}, int(update), int(rollout)


def plan_memory(
    teacher: str | ModelShape | None,
    student: str | ModelShape,
    method: str = "minillm",
    gpus: int = 8,
    gpu_memory_gib: float = 80.0,
    **run,
) -> list[Plan]:
    """One `Plan` per sharding option (OPTIONS order). `run` overrides the training settings; the defaults are
    the method's config defaults (batch_size, max_length, rollout_batch_size, ...)."""
    from .config import TrainConfig, build_config

    cfg_values = {
        "method": method,
        "student": "x",
        "train_data": "x",
        **({"teacher": "x"} if method != "sft" else {}),
    }
    cfg = build_config(TrainConfig, None, cfg_values)
    settings = dict(
        method=method,
        batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size,
        lora_r=cfg.lora_r,
        gradient_checkpointing=cfg.gradient_checkpointing,
        precision=cfg.precision,
        fsdp_mixed_precision=cfg.fsdp_mixed_precision,
        teacher_dtype=getattr(cfg, "teacher_dtype", "float32"),
        rollout_batch_size=cfg.rollout_batch_size,
        max_prompt_length=cfg.max_prompt_length,
        max_new_tokens=cfg.sampling.max_new_tokens,
        max_length=cfg.max_length,
        teacher_mix_alpha=getattr(cfg, "teacher_mix_alpha", 0.0),
    )
    unknown = set(run) - set(settings)
    if unknown:
        raise ValueError(f"unknown planner settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(run)
    settings["seq_len"] = (
        settings["max_prompt_length"] + settings["max_new_tokens"]
        if method in ("minillm", "onpolicy")
        else settings["max_length"]
    )
    s = student if isinstance(student, ModelShape) else model_shape(student)
    t = (
        None
        if teacher is None or method == "sft"
        else (teacher if isinstance(teacher, ModelShape) else model_shape(teacher))
    )
    budget = gpu_memory_gib * GIB * (1 - HEADROOM)
    plans = []
    for option, switches in OPTIONS.items():
        if option != "ddp" and gpus == 1:
            continue
        parts, update, rollout = _option_parts(option, s, t, gpus, settings)
        peak = max(update, rollout)
        plans.append(Plan(option, switches, parts, update, rollout, peak, peak <= budget))
    return plans


def recommend(plans: list[Plan]) -> Plan | None:
    """The first option (tested first, least communication first) that fits; never ZeRO-3 (unsupported)."""
    return next((p for p in plans if p.fits and p.option != "zero3"), None)


def format_plan(plans: list[Plan], gpus: int, gpu_memory_gib: float) -> str:
    """A markdown table (GiB per device) and the recommendation."""
    names = list(plans[0].parts)
    lines = [
        "| component (GiB per GPU) | " + " | ".join(p.option for p in plans) + " |",
        "|---|" + "---|" * len(plans),
    ]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{p.parts[name] / GIB:.2f}" for p in plans) + " |")
    for label, attr in (
        ("update phase", "update_peak"),
        ("rollout phase", "rollout_peak"),
        ("**peak**", "peak"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{getattr(p, attr) / GIB:.2f}" for p in plans) + " |")
    lines.append("| fits | " + " | ".join("yes" if p.fits else "no" for p in plans) + " |")
    best = recommend(plans)
    budget = gpu_memory_gib * (1 - HEADROOM)
    if best is not None:
        lines.append(
            f"\nRecommended on {gpus} x {gpu_memory_gib:g} GiB ({budget:.0f} GiB usable, {HEADROOM:.0%} "
            f"kept free): **{best.option}** - {best.switches}"
        )
    else:
        lines.append(
            f"\nNothing fits {gpus} x {gpu_memory_gib:g} GiB: try gradient_checkpointing=true, lora_r=16, "
            "a smaller batch_size / rollout_batch_size / chunk_size, teacher_dtype=bfloat16, or more GPUs."
        )
    return "\n".join(lines)
