"""Preparing a student for training: activation checkpointing, the train/eval mode of an update, LoRA."""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from minillm.errors import TrainingError

__all__ = ["apply_lora", "enable_checkpointing", "set_train_mode"]


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers' own)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_train_mode(model: nn.Module, train_mode: bool, checkpointing: bool) -> None:
    """`model.train(train_mode)`; with gradient checkpointing and `train_mode=False` (MiniLLM: no dropout) the
    decoder layers alone are flagged as training, since transformers checkpoints a layer only in training
    mode: their submodules (dropout, attention) stay in eval mode, so nothing random runs."""
    model.train(train_mode)
    if checkpointing and not train_mode:
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module.training = True


def apply_lora(model, cfg):
    try:  # an optional extra: imported only when LoRA is asked for
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingError("lora_r > 0 needs PEFT: pip install 'minillm[peft]'.") from None
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)
