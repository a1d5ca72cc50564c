"""The pieces of a causal LM that sampling and the losses use: body, final hidden states, LM head.

`backbone` / `final_hidden` give the post-norm hidden states, `lm_head_fn` / `LMHead` map them to logits
exactly as the model does, so full-vocabulary losses and the rollout decoder never need [B, T, V] logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LMHead", "backbone", "final_hidden", "lm_head_fn", "position_ids_from_mask"]


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

    @property
    def weight(self) -> Tensor | None:
        """The output embedding's weight, read at each access: FSDP2 swaps the registered parameter between
        its sharded and its gathered form (minillm.distributed)."""
        return getattr(self.module, "weight", None)

    def _full_precision_dtype(self, hidden: Tensor) -> torch.dtype | None:
        """The dtype the head computes in when autocast is on for `hidden`'s device (fp32 or wider), else
        None."""
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
            bias = None if bias is None else bias.to(x.dtype)
            return torch.nn.functional.linear(x, weight.to(x.dtype), bias)

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


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor,
                 position_ids: Tensor | None = None) -> Tensor:
    """Post-norm last-layer hidden states [B, T, H] (what the LM head consumes)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state
