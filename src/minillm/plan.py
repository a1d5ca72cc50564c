"""`minillm plan`: per-GPU memory of a training run for each sharding option, and a recommendation.

Parameter counts are exact (each model is built on the meta device from its config); the rest are formulas
(`docs/planner.md`, with their error against memory measured on CPU by `benchmarks/plan_check.py`).
API: `plan_memory(teacher, student, method, gpus, gpu_memory_gib, config=None, **settings) -> MemoryPlan`,
`format_plan(plan) -> str`, `MemoryPlan.to_dict()` (JSON). Every figure is bytes per device.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError
from .plan_shapes import LAYER_BYTES, ModelShape, model_shape

__all__ = ["HEADROOM", "OPTIONS", "MemoryPlan", "ModelShape", "OptionPlan", "format_plan", "model_shape",
           "plan_memory"]

GIB = 2**30
HEADROOM = 0.10  # kept free for the CUDA context, NCCL buffers and allocator fragmentation
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# least communication first: the recommendation is the first that fits; value = what to switch on
OPTIONS = {
    "ddp": "nothing to switch (DDP; accelerate launch --config_file configs/accelerate/ddp.yaml)",
    "zero2": "accelerate launch --config_file configs/accelerate/zero2.yaml (DeepSpeed ZeRO-2)",
    "fsdp=true teacher_sharding=replicate": "fsdp=true teacher_sharding=replicate",
    "fsdp=true teacher_sharding=shard": "fsdp=true teacher_sharding=shard",
    "zero3 (untested here)": "accelerate launch --config_file configs/accelerate/zero3.yaml (DeepSpeed "
                             "ZeRO-3: refused by minillm's engine so far)",
}
# Bytes autograd keeps per token per decoder layer, (x hidden, x kv width, x MLP width) in fp32 and in bf16:
# measured with saved-tensor hooks on transformers' layers (SDPA attention, no dropout; docs/planner.md).
OUTSIDE_BYTES = {"llama": 8, "gpt2": 4, "opt": 4}  # the final norm, per token per hidden unit
SETTINGS = ("batch_size", "max_length", "rollout_batch_size", "max_prompt_length", "max_new_tokens",
            "num_rollouts", "chunk_size", "lora_r", "gradient_checkpointing", "precision", "teacher_dtype",
            "fsdp_mixed_precision", "teacher_mix_alpha", "single_step", "pt_data", "pt_seq_len", "kd_ratio")
_FALLBACK = {"teacher_dtype": "float32", "teacher_mix_alpha": 0.0, "single_step": False, "pt_data": "",
             "pt_seq_len": 512, "num_rollouts": 0, "kd_ratio": 0.0}
# the table's rows (components)
W, MASTER, GRAD, ADAM = ("student weights", "fp32 master weights (DeepSpeed bf16)", "gradients (fp32)",
                         "AdamW state (2 fp32 moments)")
BUCKETS, TEMP, TW = "DDP gradient buckets", "AdamW step temporaries (foreach)", "teacher weights"
SUNIT, TUNIT = "student gathered unit (root + 1 layer)", "teacher gathered unit (root + 1 layer)"
CAST, LOSS, THID = ("bf16 autocast weight copies", "loss: logit chunks, head gradient",
                    "teacher hidden states (loss input)")
KVS, KVT = "rollout KV cache, student", "rollout KV cache, teacher"
SDEC, DEC = "student gathered for decoding", "decoding transients (logits, prefill, records)"


def _settings(method: str | None, config, overrides: dict) -> dict:
    from .config import TrainConfig, build_config

    if config is None:
        method = method or "minillm"
        values = {"method": method, "student": "-", "train_data": "-"}
        config = build_config(TrainConfig, None, values | ({} if method == "sft" else {"teacher": "-"}))
    unknown = sorted(set(overrides) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"unknown planner settings {unknown}; known: {', '.join(SETTINGS)}.")
    st = {n: config.sampling.max_new_tokens if n == "max_new_tokens" else getattr(config, n, _FALLBACK.get(n))
          for n in SETTINGS} | overrides | {"method": config.method}
    if st["precision"] not in ("fp32", "bf16") or st["teacher_dtype"] not in DTYPE_BYTES:
        raise ConfigError(f"precision must be fp32 or bf16 and teacher_dtype one of "
                          f"{', '.join(DTYPE_BYTES)}; got {st['precision']!r} / {st['teacher_dtype']!r}.")
    positive = ("batch_size", "max_length", "rollout_batch_size", "max_prompt_length", "max_new_tokens",
                "chunk_size", "pt_seq_len")
    bad = [n for n in positive if not (isinstance(st[n], int) and st[n] > 0)]
    if bad or st["lora_r"] < 0:
        raise ConfigError(f"{', '.join(bad) or 'lora_r'} must be positive integers (lora_r >= 0).")
    return st


@dataclasses.dataclass
class OptionPlan:
    """One sharding option: `parts` maps a component to its bytes per device."""

    option: str
    switches: str
    parts: dict
    update_peak: int
    rollout_peak: int
    peak: int
    fits: bool


@dataclasses.dataclass
class MemoryPlan:
    """Every option (OPTIONS order), the first that fits (`recommended`), and what to change if none does."""

    method: str
    gpus: int
    gpu_memory_gib: float
    headroom: float
    student: ModelShape
    teacher: ModelShape | None
    settings: dict
    options: list
    recommended: str | None
    switches: str  # the recommended option's switches and the settings that differ from the defaults
    advice: list
    host_rollout_bytes: int  # the rollout round's buffer in host RAM, per process (minillm)

    def option(self, name: str) -> OptionPlan:
        """The plan of one option (KeyError when it is not planned: with one GPU only ddp is)."""
        for p in self.options:
            if p.option == name:
                return p
        raise KeyError(f"{name!r} is not planned here; planned: {[p.option for p in self.options]}")

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB * (1 - self.headroom))

    def to_dict(self) -> dict:
        shapes = {"student": self.student.summary(), "teacher": self.teacher and self.teacher.summary()}
        return dataclasses.asdict(self) | shapes | {"usable_bytes": self.usable_bytes}


def _teacher_term(st: dict) -> bool:
    if st["method"] == "minillm":
        return st["single_step"] or bool(st["pt_data"] and st["kd_ratio"] > 0)
    return st["method"] not in ("sft", "seqkd")


def _update_tokens(st: dict) -> int:
    """Positions of one student forward (L_PT's chunks join minillm's rollouts, padded to one width)."""
    if st["method"] == "minillm":
        width = st["max_prompt_length"] + st["max_new_tokens"]
        return st["batch_size"] * (2 * max(width, st["pt_seq_len"]) if st["pt_data"] else width)
    if st["method"] == "onpolicy":
        return st["batch_size"] * max(st["max_prompt_length"] + st["max_new_tokens"], st["max_length"])
    return st["batch_size"] * st["max_length"]


def _activations(s: ModelShape, tokens: int, mode: str, checkpointing: bool) -> int:
    """Saved for backward: every layer's tensors, or (checkpointing) each layer's input plus one layer's."""
    h, kv, i = LAYER_BYTES[s.family][mode != "fp32"]
    layer = h * s.hidden + kv * s.kv_width + i * s.intermediate
    outside = OUTSIDE_BYTES[s.family] * s.hidden
    if checkpointing:
        return tokens * (s.layers * s.hidden * (2 if mode == "bf16" else 4) + outside + layer)
    return tokens * (s.layers * layer + outside)


def _unit(m: ModelShape) -> float:
    return m.root_params + m.layer_params / max(m.layers, 1)


def _parts(label: str, s: ModelShape, t: ModelShape | None, n: int, st: dict) -> dict:
    fsdp, zero = label.startswith("fsdp"), label.startswith("zero")
    shard_w, shard_t = fsdp or label.startswith("zero3"), t is not None and label.endswith("=shard")
    lora, gc = st["lora_r"] > 0, st["gradient_checkpointing"]
    trainable = s.lora_params(st["lora_r"]) if lora else s.params
    ds_bf16 = zero and st["precision"] == "bf16"  # DeepSpeed bf16: a bf16 model with fp32 master weights
    pure_bf16 = ds_bf16 or (fsdp and st["fsdp_mixed_precision"])
    autocast = st["precision"] == "bf16" and not pure_bf16
    mode = "bf16" if pure_bf16 else "autocast" if autocast else "fp32"
    states = 1 if label == "ddp" else n
    tb, tokens = DTYPE_BYTES[st["teacher_dtype"]], _update_tokens(st)
    parts = {
        W: (2 if ds_bf16 else 4) * (s.params + (trainable if lora else 0)) / (n if shard_w else 1),
        MASTER: 4 * trainable / n if ds_bf16 else 0,
        GRAD: 4 * trainable / states,
        ADAM: 8 * trainable / states,
        BUCKETS: 4 * trainable if label == "ddp" and n > 1 else 0,
        TEMP: 4 * trainable / states,
        TW: tb * t.params / (n if shard_t else 1) if t is not None else 0,
        SUNIT: (2 if pure_bf16 else 4) * _unit(s) if shard_w else 0,
        TUNIT: tb * _unit(t) if shard_t else 0,
        CAST: 2 * s.layer_params / (s.layers if lora and gc else 1) if autocast else 0,
    }
    for flag in (False, True):
        name = f"activations, gradient_checkpointing={str(flag).lower()}{' (counted)' if flag == gc else ''}"
        parts[name] = _activations(s, tokens, mode, flag)
    teacher_term = t is not None and _teacher_term(st)
    chunk = min(st["chunk_size"], tokens)
    parts[LOSS] = (16 * chunk * (s.vocab + (t.vocab if teacher_term else 0)) + 4 * tokens * s.hidden
                   + (0 if lora else 4 * s.vocab * s.hidden))
    parts[THID] = _teacher_hidden(t, st) if teacher_term else 0
    parts.update(_decode_parts(s, t, st, 4 if mode == "fp32" else 2, (2 if pure_bf16 else 4) * s.params
                               if shard_w else 0))
    return {k: int(v) for k, v in parts.items()}


def _teacher_hidden(t: ModelShape, st: dict) -> int:
    tb = DTYPE_BYTES[st["teacher_dtype"]]
    if st["method"] == "onpolicy":  # recorded during the rollout, kept in fp32
        return st["batch_size"] * t.hidden * 4 * max(st["max_new_tokens"], st["max_length"])
    if st["method"] == "minillm":  # single-step term: recorded in fp32; L_PT's KD term: a teacher forward
        pt = st["pt_seq_len"] * tb if st["pt_data"] and st["kd_ratio"] > 0 else 0
        return st["batch_size"] * t.hidden * ((4 * st["max_new_tokens"] if st["single_step"] else 0) + pt)
    return st["batch_size"] * st["max_length"] * t.hidden * tb


def _decode_parts(s: ModelShape, t: ModelShape | None, st: dict, compute: int, gathered: int) -> dict:
    """Rollouts (minillm: rollout_batch_size rows; onpolicy: batch_size rows) with their KV caches."""
    if st["method"] not in ("minillm", "onpolicy"):
        return dict.fromkeys((KVS, KVT, SDEC, DEC), 0)
    rows = st["rollout_batch_size"] if st["method"] == "minillm" else st["batch_size"]
    prompt, new, tb = st["max_prompt_length"], st["max_new_tokens"], DTYPE_BYTES[st["teacher_dtype"]]
    lockstep = t is not None and st["method"] == "minillm" and st["teacher_mix_alpha"] > 0
    kv_s = 2 * s.layers * s.kv_width * (prompt + new) * rows * compute
    kv_t = 2 * t.layers * t.kv_width * (prompt + new) * rows * tb if lockstep else 0
    logits = 16 * rows * (s.vocab + (t.vocab if lockstep else 0))
    prefill = rows * prompt * max(2 * (m.hidden + m.intermediate) * b for m, b in ((s, compute), (t, tb))
                                  if m is not None and (m is s or lockstep))
    records = 2 * rows * new * t.hidden * tb if lockstep and st["single_step"] else 0  # stacked at the end
    if t is not None and not lockstep:  # one teacher forward over the finished rows scores them
        prefill = max(prefill, rows * (prompt + new) * (4 * t.hidden + 2 * (t.hidden + t.intermediate) * tb))
    return {KVS: kv_s, KVT: kv_t, SDEC: gathered, DEC: logits + prefill + records}


def _evaluate(label: str, s: ModelShape, t: ModelShape | None, n: int, st: dict, usable: int) -> OptionPlan:
    p = _parts(label, s, t, n, st)
    zero = label.startswith("zero")  # DeepSpeed keeps its gradient partitions allocated
    resident = p[W] + p[MASTER] + p[ADAM] + p[BUCKETS] + p[TW] + (p[GRAD] if zero else 0)
    act = next(v for k, v in p.items() if k.endswith("(counted)"))
    forward = p[SUNIT] + p[TUNIT] + p[CAST] + act + p[LOSS] + p[THID]
    backward = (0 if zero else p[GRAD]) + p[TEMP] + 2 * (p[SUNIT] + p[TUNIT])  # a unit's weights + gradients
    update = resident + max(forward, backward)
    decodes = st["method"] in ("minillm", "onpolicy")
    rollout = resident + p[TUNIT] + p[CAST] + p[KVS] + p[KVT] + p[SDEC] + p[DEC] if decodes else 0
    peak = max(update, rollout)
    return OptionPlan(label, OPTIONS[label], p, update, rollout, peak, peak <= usable)


def _all_options(s, t, n, gib, st, headroom) -> list[OptionPlan]:
    usable = int(gib * GIB * (1 - headroom))
    return [_evaluate(label, s, t, n, st, usable) for label in OPTIONS if n > 1 or label == "ddp"]


def _advice(s, t, n, gib, st, headroom) -> list[str]:
    """Single changes (then all of them together) that make an option fit, and the GPU count that would."""
    half_r, half_b = max(1, st["rollout_batch_size"] // 2), max(1, st["batch_size"] // 2)
    tries = [("gradient_checkpointing=true", {"gradient_checkpointing": True}), ("lora_r=16", {"lora_r": 16}),
             ("teacher_dtype=bfloat16", {"teacher_dtype": "bfloat16"}),
             ("fsdp_mixed_precision=true", {"fsdp_mixed_precision": True}),
             (f"rollout_batch_size={half_r}", {"rollout_batch_size": half_r}),
             (f"batch_size={half_b} (and twice the gradient_accumulation_steps)", {"batch_size": half_b})]
    tries = [(text, change) for text, change in tries if any(st[k] != v for k, v in change.items())
             and (t is not None or "teacher" not in text)]
    tries.append(("all of these together", {k: v for _, change in tries for k, v in change.items()}))
    out = []
    for text, change in tries:
        options = _all_options(s, t, n, gib, st | change, headroom)
        fit = next((p for p in options if p.fits and _usable(p)), None)
        if fit is not None:
            out.append(f"{text}: {fit.option} fits ({fit.peak / GIB:.1f} GiB)")
    for text, change in (("", {}), (" and all of these changes", tries[-1][1])):
        fit = next(((g, p) for g in (2 * n, 4 * n, 8 * n, 16 * n, 32 * n)
                    for p in _all_options(s, t, g, gib, st | change, headroom)
                    if p.fits and _usable(p)), None)
        if fit is not None:
            out.append(f"{fit[0]} GPUs{text}: {fit[1].option} fits ({fit[1].peak / GIB:.1f} GiB)")
            break
    return out or [f"nothing tried fits {gib:g} GiB (up to {32 * n} GPUs): a smaller teacher or larger GPUs."]


def _host_rollout_bytes(t: ModelShape | None, n: int, st: dict) -> int:
    if st["method"] != "minillm":
        return 0
    hidden = 4 * t.hidden if t is not None and st["single_step"] else 0
    return -(-st["num_rollouts"] // n) * (16 * st["max_prompt_length"] + st["max_new_tokens"] * (44 + hidden))


def plan_memory(teacher, student, method: str | None = None, gpus: int = 1, gpu_memory_gib: float = 80.0, *,
                config=None, headroom: float = HEADROOM, **settings: Any) -> MemoryPlan:
    """The per-device memory of every sharding option, and the recommended one.

    teacher / student: a model folder, config.json, .gguf file, built-in name, hub id, built model or
    ModelShape (teacher None for sft). `config`: a training config (`build_config(TrainConfig, ...)`) whose
    values are used (its method included); otherwise the method's defaults. `settings` override either, named
    as the training options (batch_size, rollout_batch_size, lora_r, gradient_checkpointing, precision, ...).
    """
    if gpus < 1 or gpu_memory_gib <= 0 or not 0 <= headroom < 1:
        raise ConfigError("gpus must be at least 1, gpu_memory_gib positive and headroom in [0, 1).")
    st = _settings(method, config, settings)
    s = model_shape(student)
    t = model_shape(teacher) if teacher is not None and st["method"] != "sft" else None
    if t is None and st["method"] != "sft":
        raise ConfigError(f"method={st['method']} needs a teacher (a model folder or its config.json).")
    options = _all_options(s, t, gpus, gpu_memory_gib, st, headroom)
    best = next((p for p in options if p.fits and _usable(p)), None)
    defaults = _settings(st["method"], None, {})
    changed = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in st.items()
               if k in SETTINGS and k != "pt_data" and v != defaults[k]
               and (k != "fsdp_mixed_precision" or (best and best.option.startswith("fsdp")))]
    switches = " ".join(([best.switches] if best.option != "ddp" else []) + changed) if best else ""
    advice = [] if best else _advice(s, t, gpus, gpu_memory_gib, st, headroom)
    return MemoryPlan(st["method"], gpus, gpu_memory_gib, headroom, s, t, st, options, best and best.option,
                      switches, advice, _host_rollout_bytes(t, gpus, st))


def _usable(p) -> bool:
    """Whether minillm can run the option (it refuses DeepSpeed ZeRO-3): only those are recommended."""
    return not p.option.startswith("zero3")


def _describe(role: str, m: ModelShape) -> str:
    return (f"{role}: {m.name} ({m.model_type}, {m.params / 1e9:.3f}B parameters, {m.layers} layers, hidden "
            f"{m.hidden}, {m.heads} heads / {m.kv_heads} KV heads of {m.head_dim}, MLP {m.intermediate}, "
            f"vocab {m.vocab})")


def format_plan(plan: MemoryPlan) -> str:
    """A markdown table (GiB per device, one column per option), the recommendation or what to change."""
    opts, st = plan.options, plan.settings
    models = [_describe(role, m) for role, m in (("teacher", plan.teacher), ("student", plan.student)) if m]
    lines = [f"minillm plan: method={plan.method} on {plan.gpus} x {plan.gpu_memory_gib:g} GiB "
             f"({plan.usable_bytes / GIB:.1f} GiB usable per GPU, {plan.headroom:.0%} kept free)", *models,
             "settings: " + " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                                     for k, v in st.items() if k != "method" and v != ""), "",
             "| GiB per GPU | " + " | ".join(p.option for p in opts) + " |", "|---|" + "---:|" * len(opts)]
    for name in opts[0].parts:
        if any(p.parts[name] for p in opts) or name.startswith("activations"):
            lines.append(f"| {name} | " + " | ".join(f"{p.parts[name] / GIB:.2f}" for p in opts) + " |")
    rows = [("update phase (forward, backward, step)", "update_peak"),
            ("rollout phase (decoding)", "rollout_peak"), ("**peak**", "peak")]
    for label, attr in [r for r in rows if r[1] != "rollout_peak" or opts[0].rollout_peak]:
        lines.append(f"| {label} | " + " | ".join(f"{getattr(p, attr) / GIB:.2f}" for p in opts) + " |")
    fits = " | ".join("yes" if p.fits else "**no**" for p in opts)
    lines += [f"| fits in {plan.usable_bytes / GIB:.1f} GiB | {fits} |", ""]
    if plan.recommended:
        lines += [f"Recommended: **{plan.recommended}** (the least communication that fits).",
                  f"Switches: {plan.switches or 'none (the defaults)'}"]
        if plan.recommended.startswith("fsdp") and plan.teacher is not None:
            tw = plan.teacher.params * DTYPE_BYTES[st["teacher_dtype"]]
            auto = "shard" if tw > plan.gpu_memory_gib * GIB / 2 else "replicate"
            lines.append(f"(teacher_sharding=auto picks {auto} here: teacher weights {tw / GIB:.1f} GiB)")
    else:
        lines.append(f"Nothing fits {plan.gpus} x {plan.gpu_memory_gib:g} GiB. What would:")
        lines += [f"- {a}" for a in plan.advice]
    if plan.host_rollout_bytes:
        lines.append(f"Host RAM per process for a rollout round (num_rollouts / gpus rows, on the CPU): "
                     f"{plan.host_rollout_bytes / GIB:.2f} GiB.")
    return "\n".join(lines)
