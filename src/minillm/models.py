"""Loading, saving, pruning and pairing teacher/student models.

(Helper functions used by sampling/losses live at the top; loading code follows.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded batches: 0 at the first real token, counting real tokens only.

    Absolute-position models (GPT-2) would otherwise see positions shifted by the amount of left
    padding; RoPE models are unaffected either way but get the same ids for consistency.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_head_fn(model) -> Callable[[Tensor], Tensor]:
    """A function mapping post-norm hidden states [..., H] to logits [..., V] exactly as `model` does.

    Lets full-vocabulary losses project hidden states chunk by chunk instead of materialising
    B x T x V logits. Handles final logit soft-capping (Gemma-2/3 style configs) when present.
    """
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    scale = getattr(model.config, "logit_scale", None)

    def fn(hidden: Tensor) -> Tensor:
        logits = head(hidden)
        if scale is not None and not isinstance(scale, bool):
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return fn


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Post-norm last-layer hidden states [B, T, H] (what the LM head consumes)."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
    return out.last_hidden_state
