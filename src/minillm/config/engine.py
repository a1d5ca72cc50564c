"""Which engine draws the samples (`rollout_engine` / `engine`: hf or vllm), the vLLM engine's options, and
the rules for what vLLM can and cannot sample exactly."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .options import option
from .sampling import SamplingConfig

ENGINES = ("hf", "vllm")
ENGINE_HELP = ("hf: minillm's own KV-cache sampler on the model in memory; vllm: a vLLM engine in a worker "
               "process (its own environment; see the README's vLLM section and the `vllm` options).")


@dataclass
class VLLMConfig:
    """The vLLM engine: where it runs and how much memory it takes (used only with the vllm engine)."""

    python: str = option("", "Python of the environment that has vLLM (vLLM 0.32 pins transformers < "
                             "5.20, minillm 5.24, so it usually has its own venv). Empty: "
                             "$MINILLM_VLLM_PYTHON, else this interpreter if it can import vllm, else "
                             "./.venv-vllm/bin/python.")
    gpu_memory_utilization: float = option(0.3, "GPU: the share of the GPU's memory vLLM takes for weights "
                                                "and KV cache; training shares the GPU with it, so leave "
                                                "room for the student, the teacher and the optimiser.")
    cpu_kv_cache_gb: int = option(0, "CPU: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); 0 = vLLM's default.")
    max_model_len: int = option(0, "Longest prompt + response the engine reserves KV cache for; 0 = "
                                   "max_prompt_length + sampling.max_new_tokens.")
    enforce_eager: bool = option(False, "GPU: no CUDA graphs (starts faster, decodes slower). A CPU engine "
                                        "always runs eagerly.")
    start_timeout: float = option(600.0, "Seconds the engine may take to start before it is stopped with an "
                                         "error.")
    request_timeout: float = option(3600.0, "Seconds one generation or weight update may take before the "
                                            "engine is stopped with an error.")

    def __post_init__(self) -> None:
        checks = {
            "gpu_memory_utilization": (0.0 < self.gpu_memory_utilization <= 1.0, "a number in (0, 1]"),
            "cpu_kv_cache_gb": (self.cpu_kv_cache_gb >= 0, "an integer >= 0 (0: vLLM's default)"),
            "max_model_len": (self.max_model_len >= 0, "an integer >= 0 (0: derived from the lengths)"),
            "start_timeout": (self.start_timeout > 0, "a number of seconds > 0"),
            "request_timeout": (self.request_timeout > 0, "a number of seconds > 0"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise ConfigError(f"vllm.{key} = {getattr(self, key)!r} is invalid: it must be {expected}.")


def validate_engine_sampling(engine: str, sampling: SamplingConfig, key: str) -> None:
    """The one rule for what the vllm engine samples: everything SamplingConfig offers except the n-gram ban.

    vLLM maps temperature, top-k, top-p, max_new_tokens, greedy decoding and per-row seeds exactly; it has no
    n-gram ban (its repetition penalties are other distributions), so the samples would not be the ones asked
    for. `key` names the engine option (rollout_engine / engine).
    """
    if engine not in ENGINES:
        raise ConfigError(f"{key}={engine!r} is invalid: choose one of {', '.join(ENGINES)}.")
    if engine == "vllm" and sampling.no_repeat_ngram_size > 0:
        raise ConfigError(f"{key}=vllm cannot honour sampling.no_repeat_ngram_size = "
                          f"{sampling.no_repeat_ngram_size}: vLLM has no n-gram ban (its repetition "
                          f"penalties sample another distribution). Set sampling.no_repeat_ngram_size=0, or "
                          f"{key}=hf.")


def validate_engine_mixing(engine: str, teacher_mix_alpha: float) -> None:
    """rollout_engine=vllm samples the student alone: teacher-mixed sampling (alpha > 0) needs hf."""
    if engine == "vllm" and teacher_mix_alpha > 0:
        raise ConfigError(f"rollout_engine=vllm with teacher_mix_alpha = {teacher_mix_alpha}: vLLM samples "
                          "the student alone and cannot draw from the teacher mixture p~ = alpha*p + "
                          "(1-alpha)*q. Use rollout_engine=hf for teacher-mixed sampling, or "
                          "teacher_mix_alpha=0 for on-policy student samples through vLLM.")
