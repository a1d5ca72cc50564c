"""Sharded training with PyTorch FSDP2: student and teacher placement, gathered decoding, memory checks.

One code path (`torch.distributed.fsdp.fully_shard`) for gloo on CPU and NCCL on GPUs.

`ShardedLM` shards a Hugging Face causal LM per decoder layer, the way pytorch/torchtune's distributed recipes
do, under a root unit (`FSDPRoot`) that owns what is left: the embeddings, the final norm and the LM head
(tied
or not, they stay in one unit). The root's forward runs a function, so everything that uses the model's
parameters together - a loss that reads the hidden states and projects them with the LM head itself
(`minillm.losses.token_loss`), decoding, scoring - happens inside one FSDP forward: the root's parameters are
gathered there, each decoder layer gathers its own when called, and backward reduce-scatters the gradients
(the LM head's included, which the fused loss hands to autograd itself).

Outside a forward, `gathered()` makes the model usable as a plain module: the root's parameters are gathered,
and (`layers=True`) every decoder layer's too and kept so - the student while it decodes rollouts or is
validated. A sharded teacher keeps its layers sharded (`layers=False`): each layer call all-gathers that
layer, so every process must make the same calls; `lockstep()` tells the decoder to keep decoding until every
process is done (`ranks_done`), and to prefill in one call.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .errors import ConfigError, TrainingError

__all__ = ["FSDPRoot", "Placement", "ShardedLM", "accelerate_fsdp_hidden", "broadcast_from_main",
           "check_fits", "decoder_layers", "device_memory", "fsdp_requested", "lockstep", "lockstep_group",
           "plain_copy", "ranks_done", "shard_teacher_choice"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a Hugging Face causal LM (also under PEFT), in order.

    Read from the model's `_no_split_modules` (the block classes transformers never splits across devices);
    otherwise the longest `nn.ModuleList` of the model.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")
    return list(max(lists, key=len))


class FSDPRoot(nn.Module):
    """FSDP2's root unit over a causal LM (`self.lm`): its forward runs `fn(*args, **kwargs)`.

    Running a whole loss, or a whole decode, as the root's forward is what lets FSDP gather the root's
    parameters (embeddings, final norm, LM head) for it and reduce their gradients after backward.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        return fn(*args, **kwargs)


class ShardedLM:
    """A causal LM sharded with FSDP2 over the default process group (see the module docstring).

    `lm` is the Hugging Face model (its parameters become DTensors, sharded over the processes);
    `mixed_precision`: FSDP2's MixedPrecisionPolicy with bf16 parameters for compute and fp32 gradient
    reduction (the sharded master weights stay in their dtype). The model must still be on the CPU or on this
    process's device; each layer is moved to `device` as it is sharded, so a model larger than one device is
    never whole on it.
    """

    def __init__(self, lm: nn.Module, device: torch.device, *, mixed_precision: bool = False) -> None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision else MixedPrecisionPolicy())
        self.lm = lm
        self.layers = decoder_layers(lm)
        for layer in self.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        self.root = FSDPRoot(lm)
        fully_shard(self.root, mesh=mesh, mp_policy=policy)
        self._root_whole = self._layers_whole = False
        with torch.no_grad():  # the first forward decides which unit is FSDP's root: make it ours
            self.root(lambda: None)
        self.root.reshard()

    def __call__(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` as the root's forward (a training loss: backward reduces its gradients)."""
        return self.root(fn, *args, **kwargs)

    @contextlib.contextmanager
    def gathered(self, layers: bool = True) -> Iterator[None]:
        """Inside: the root's parameters (and with `layers` every layer's) are whole, so the model works as an
        unsharded module. Re-entrant; every process must enter together (it all-gathers)."""
        need_root, need_layers = not self._root_whole, layers and not self._layers_whole
        if need_root:
            self.root.unshard()
            self._root_whole = True
        if need_layers:
            for layer in self.layers:
                layer.unshard()
                layer.set_reshard_after_forward(False, recurse=False)
            self._layers_whole = True
        try:
            yield
        finally:
            if need_layers:
                for layer in self.layers:
                    layer.set_reshard_after_forward(True, recurse=False)
                    layer.reshard()
                self._layers_whole = False
            if need_root:
                self.root.reshard()
                self._root_whole = False

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (keys as `lm.state_dict()`), on the CPU of every process."""
        sd = get_model_state_dict(self.lm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd


# ---------------------------------------------------------------------------------------------- lockstep deco
_LOCKSTEP: contextvars.ContextVar[bool] = contextvars.ContextVar("minillm_lockstep", default=False)


@contextlib.contextmanager
def lockstep(enabled: bool = True) -> Iterator[None]:
    """Inside: decoding keeps every process in step (a sharded model gathers each layer per call)."""
    token = _LOCKSTEP.set(enabled)
    try:
        yield
    finally:
        _LOCKSTEP.reset(token)


def lockstep_group() -> bool:
    """Whether decoding must keep the processes in step here (see `lockstep`)."""
    return _LOCKSTEP.get() and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def ranks_done(done: bool, device: torch.device) -> bool:
    """True when `done` holds on every process (one all-reduce)."""
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() == 0)


# ---------------------------------------------------------------------------------------------- the two model
class Placement:
    """Where the student and the teacher live in one training run, and the scopes the algorithms use.

    Without `fsdp` the models are plain modules (one process, or DDP through Accelerate) and every scope is a
    no-op. With it the student is a `ShardedLM`, and the teacher either one too (`shard_teacher`) or a whole
    copy on each process. Models are moved to `device` here.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, device: torch.device, *, fsdp: bool,
                 shard_teacher: bool = False, mixed_precision: bool = False) -> None:
        self.student_lm, self.teacher_lm = student, teacher
        self.student = ShardedLM(student, device, mixed_precision=mixed_precision) if fsdp else None
        if teacher is not None and fsdp and shard_teacher:
            self.teacher = ShardedLM(teacher, device)
        else:
            self.teacher = None
            if teacher is not None:
                teacher.to(device)

    @property
    def teacher_sharded(self) -> bool:
        return self.teacher is not None

    def teacher_scope(self) -> contextlib.AbstractContextManager:
        """Around a teacher forward (all processes together when it is sharded)."""
        return self.teacher.gathered(layers=False) if self.teacher is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def sampling_scope(self) -> Iterator[None]:
        """Around decoding and scoring: the student whole, the teacher's root whole, decoding in lockstep
        when the teacher is sharded. Every process must enter together when anything is sharded."""
        with contextlib.ExitStack() as stack:
            if self.student is not None:
                stack.enter_context(self.student.gathered(layers=True))
            if self.teacher is not None:
                stack.enter_context(self.teacher.gathered(layers=False))
                stack.enter_context(lockstep(True))
            yield


# ---------------------------------------------------------------------------------------------- helpers
def fsdp_requested(cfg) -> bool:
    """`fsdp=true`, or an Accelerate launch config with distributed_type FSDP (fsdp_version 2 only)."""
    if getattr(cfg, "fsdp", False):
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true", "yes"):
        return False
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"the Accelerate config asks for FSDP version {version}; minillm shards with FSDP2 "
                          "only: set `fsdp_version: 2` in it (or launch a multi-GPU config with fsdp=true).")
    return True


@contextlib.contextmanager
def accelerate_fsdp_hidden() -> Iterator[None]:
    """Hide an Accelerate FSDP launch from `Accelerator()` (minillm applies FSDP2 itself; Accelerate would
    wrap
    the model in its own FSDP on GPUs, or in DDP on CPUs)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def broadcast_from_main(obj: Any) -> Any:
    """`obj` as the main process has it, on every process."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def plain_copy(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module | None:
    """On the main process, a plain CPU copy of `model` (a Hugging Face causal LM, or a PEFT LoRA model,
    which is
    merged) holding `state_dict` (`ShardedLM.full_state_dict`); None on the other processes."""
    if dist.get_rank() != 0:
        return None
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    with torch.device("meta"):
        fresh = type(base)(base.config)
    if peft_config:
        from peft import get_peft_model

        name = getattr(model, "active_adapter", "default")
        fresh = get_peft_model(fresh, peft_config[name])
    missing, unexpected = fresh.load_state_dict(state_dict, strict=False, assign=True)
    if unexpected or any("lm_head" not in k for k in missing):
        raise RuntimeError(f"gathered state dict does not fit {type(base).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if peft_config:
        fresh = fresh.merge_and_unload()
    if getattr(fresh.config, "tie_word_embeddings", False) or missing:
        fresh.tie_weights()
    fresh.eval()
    return fresh


# ---------------------------------------------------------------------------------------------- memory
def shard_teacher_choice(cfg, teacher, device: torch.device) -> bool:
    """teacher_sharding: shard / replicate, or auto: shard when the teacher takes over half of one GPU."""
    choice = getattr(cfg, "teacher_sharding", "replicate")
    if teacher is None or choice == "replicate":
        return False
    if choice == "shard":
        return True
    memory = device_memory(device)
    return memory is not None and _bytes(teacher) > 0.5 * memory


def device_memory(device: torch.device) -> int | None:
    """Total memory of one accelerator (bytes), or None on CPU (no fixed budget to check)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def _bytes(model: nn.Module | None) -> int:
    return 0 if model is None else sum(p.numel() * p.element_size() for p in model.parameters())


def check_fits(student: nn.Module, teacher: nn.Module | None, device: torch.device, *, processes: int,
               fsdp: bool, shard_teacher: bool) -> None:
    """TrainingError when the teacher's weights and the student's fp32 weights, gradients and AdamW moments
    (16 bytes per trainable parameter, plus the frozen ones' weights) cannot fit on one device as sharded -
    before anything is moved there. Activations, KV caches and logits come on top: `minillm plan` estimates
    them.
    """
    memory = device_memory(device)
    if memory is None:
        return
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    student_bytes = (_bytes(student) + 12 * trainable) / (processes if fsdp else 1)
    teacher_bytes = _bytes(teacher) / (processes if shard_teacher else 1)
    need = student_bytes + teacher_bytes
    if need <= 0.9 * memory:
        return
    gib = 2 ** 30
    hints = []
    if not fsdp:
        hints.append("fsdp=true (shards the student's weights, gradients and optimizer state)")
    if teacher is not None and not shard_teacher:
        hints.append("fsdp=true teacher_sharding=shard (shards the teacher too)")
    hints += ["more processes", "lora_r=16 (trains adapters only)", "teacher_dtype=bfloat16"]
    raise TrainingError(
        f"the models do not fit: each device would hold {teacher_bytes / gib:.1f} GiB of teacher weights and "
        f"{student_bytes / gib:.1f} GiB of student weights, gradients and AdamW state ({need / gib:.1f} GiB "
        f"before activations), and has {memory / gib:.1f} GiB. Try {'; '.join(hints)}. `minillm plan` "
        "estimates every part for each sharding option."
    )
