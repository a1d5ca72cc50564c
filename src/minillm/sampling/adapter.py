"""What the decoder and the teacher scorer need of a causal LM, gathered once per model per call.

`CausalLMAdapter` holds the transformer body, the LM head (`minillm.models.LMHead`, what the losses use
as well), the device and dtype, and makes the KV caches; the decoder asks it, never `minillm.models`,
for these pieces. `GrowingLayer` is the cache layer it fills; `EvalMode` switches dropout off while
sampling and scoring.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
from torch import Tensor
from transformers import DynamicCache, DynamicLayer

from minillm.models import backbone, lm_head_fn

__all__ = ["HEAD_ROWS_PER_MATMUL", "CausalLMAdapter", "EvalMode", "GrowingLayer"]

# Rows of the LM-head weight projected per matmul on CPU. One [B, H] x [H, V] GEMM over a ~49k vocabulary runs
# 20-25 % slower in MKL than the same product in ~2 MB weight slices (SmolLM2 head, B = 8, fp32, 1 thread: ~20
# vs ~16 ms per decode step). Each logit is still the same dot product over H; on our machine the slices gave
# bitwise the same logits and rollouts (tests/test_sampling.py checks them to 1e-6).
HEAD_ROWS_PER_MATMUL = 1024


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that writes new keys/values into a buffer with room to spare instead of
    re-concatenating.

    `DynamicLayer.update` copies the whole cache every step (torch.cat); here each step writes one slot and
    hands attention a view of the filled part, which holds the same values, so the attention output is the
    same. The buffer is sized for the prompt plus `headroom` more positions and regrown (one copy) if needed.
    Only the rollout decoder uses it, which never crops or reorders the cache; it only drops finished rows
    (`batch_select_indices`, batch compaction).
    """

    def __init__(self, headroom: int) -> None:
        super().__init__()
        self.headroom = headroom
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self.key_buffer is None or end > self.key_buffer.shape[-2]:
            def grow(filled: Tensor, new: Tensor) -> Tensor:
                buffer = new.new_empty((*new.shape[:-2], end + self.headroom, new.shape[-1]))
                if start:
                    buffer[..., :start, :] = filled
                return buffer
            self.key_buffer = grow(self.keys, key_states)
            self.value_buffer = grow(self.values, value_states)
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (long) of the batch: buffers keep their room, the filled part is
        copied."""
        if self.key_buffer is None:
            super().batch_select_indices(indices)
            return
        end = self.get_seq_length()

        def select(buffer: Tensor) -> Tensor:
            index = indices.to(buffer.device)
            out = buffer.new_empty((index.shape[0], *buffer.shape[1:]))
            out[..., :end, :] = buffer[..., :end, :].index_select(0, index)
            return out

        self.key_buffer, self.value_buffer = select(self.key_buffer), select(self.value_buffer)
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]


class CausalLMAdapter:
    """One causal LM as the rollout engine uses it: body, LM head, KV-cache factory, device and dtype.

    `autocast_dtype`: run the body under `torch.autocast(dtype)` (see `generate_rollouts(student_autocast=)`).
    On CPU with an fp32 `torch.nn.Linear` head, `project` computes the logits in weight slices of
    `HEAD_ROWS_PER_MATMUL` rows (same logits; see the constant).
    """

    def __init__(self, model, autocast_dtype: torch.dtype | None = None) -> None:
        self.autocast_dtype = autocast_dtype
        self.backbone = backbone(model)
        self.head = lm_head_fn(model)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.config = model.config
        # transformers renamed `past_key_values` to `cache` during 5.x; support both spellings.
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        split = self.head.linear_split()
        self.head_split = None
        if split is not None and self.device.type == "cpu" and split[0].dtype == torch.float32:
            weight, bias, postprocess = split
            rows = HEAD_ROWS_PER_MATMUL
            biases = bias.split(rows) if bias is not None else [None] * math.ceil(weight.shape[0] / rows)
            self.head_split = (list(zip(weight.split(rows), biases)), postprocess)

    def new_cache(self, headroom: int = 0) -> DynamicCache:
        """An empty KV cache; its plain (not sliding-window) layers preallocate `headroom` positions."""
        cache = DynamicCache(config=self.config)
        layers = getattr(cache, "layers", None)
        if isinstance(layers, list):  # plain (not sliding-window) layers: preallocate instead of torch.cat
            layers[:] = [GrowingLayer(headroom) if type(layer) is DynamicLayer else layer for layer in layers]
        return cache

    def scratch_cache(self) -> DynamicCache:
        """A plain transformers cache (the unpadded prefill's per-group cache)."""
        return DynamicCache(config=self.config)

    def autocast(self):
        """The body's autocast context (a no-op without `autocast_dtype`)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                      cache=None) -> Tensor:
        """Post-norm last-layer hidden states [B, T, H]; with `cache` the fed tokens extend it."""
        if cache is None:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
        else:
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=True, **{self.cache_kwarg: cache})
        return out.last_hidden_state

    def project(self, hidden: Tensor) -> Tensor:
        """`lm_head_fn(model)(hidden)`, computed in weight slices on CPU (same logits; see
        HEAD_ROWS_PER_MATMUL)."""
        x = self.head.cast_input(hidden)
        if self.head_split is None or x.dtype != torch.float32:
            return self.head(hidden)
        slices, postprocess = self.head_split
        # fp32 input and weight: what LMHead computes with or without autocast (which it switches off).
        with torch.autocast(self.device.type, enabled=False):
            return postprocess(torch.cat([torch.nn.functional.linear(x, w, b) for w, b in slices], dim=-1))


class EvalMode:
    """Put models in eval mode (no dropout while sampling) and restore their previous mode afterwards."""

    def __init__(self, *models) -> None:
        self.models = [m for m in models if m is not None]

    def __enter__(self) -> None:
        self.was_training = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, training in zip(self.models, self.was_training):
            m.train(training)
