"""Rollout engine: batched KV-cache decoding with teacher-mixed sampling.

The method: Gu et al., MiniLLM, arXiv 2306.08543, Eq. 4-5 (teacher-mixed sampling p~).

    rollout.py   the public API: `Rollout`, `generate_rollouts`, `generate_texts`, `response_texts`
                 (the one rollout -> text decoder), `check_teacher_sampling`
    decoder.py   `Decoder` (one model's KV-cache decoding state), the CPU prefill planner
                 `prefill_groups`, the lockstep decode loop with batch compaction
    adapter.py   `CausalLMAdapter`: body + LM head + cache factory + device of one model, what the
                 decoder and the scorer ask for; the `GrowingLayer` KV-cache layer; `EvalMode`
    draw.py      token drawing: `sample_from_probs` (inverse CDF), logits processors, `draw_next`
    speculative.py  teacher-mixed sampling by draft-and-verify (`decode_speculative`, `SpeculativeStats`):
                 exact samples of p~ with one teacher forward per drafted block
    teacher.py   teacher-forced scoring: `response_hidden`, `teacher_forced_logprobs` (the one scorer),
                 `score_with_teacher`
    vllm_rollout.py  the vLLM engine as a sampler (`VLLMSampler`): a model's weights in (synced by version,
                 LoRA adapters by vLLM's LoRA path), the same `Rollout` out, log q re-scored by our forward
    vllm_client.py   `VLLMEngine`: the engine's worker process in the vLLM environment (found by
                 `find_vllm_python`), its protocol, timeouts and errors; never imports vLLM
    vllm_worker.py   the worker script that environment's python runs (standard library + vLLM only)
"""

from minillm.config import SamplingConfig
from minillm.sampling.adapter import CausalLMAdapter, EvalMode, GrowingLayer
from minillm.sampling.decoder import Decoder, prefill_groups
from minillm.sampling.draw import build_processors, draw_next, sample_from_probs
from minillm.sampling.rollout import (
    Rollout,
    check_teacher_sampling,
    generate_rollouts,
    generate_texts,
    response_texts,
)
from minillm.sampling.speculative import SpeculativeStats, decode_speculative
from minillm.sampling.teacher import response_hidden, score_with_teacher, teacher_forced_logprobs
from minillm.sampling.vllm_rollout import VLLMSampler, VLLMStats

__all__ = [
    "CausalLMAdapter",
    "Decoder",
    "EvalMode",
    "GrowingLayer",
    "Rollout",
    "SamplingConfig",
    "SpeculativeStats",
    "VLLMSampler",
    "VLLMStats",
    "build_processors",
    "check_teacher_sampling",
    "decode_speculative",
    "draw_next",
    "generate_rollouts",
    "generate_texts",
    "prefill_groups",
    "response_hidden",
    "response_texts",
    "sample_from_probs",
    "score_with_teacher",
    "teacher_forced_logprobs",
]
