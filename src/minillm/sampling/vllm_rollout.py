"""Rollouts from a vLLM engine: a model's weights in, the same `Rollout` as minillm's own sampler out.

`VLLMSampler` starts a `VLLMEngine` on the model's current weights (written once to a private folder, on
/dev/shm when it has room), keeps it in step with the model by a version number (the trainer's step: after
every optimiser round the new weights are written and loaded into the running engine in place, or, for a
PEFT LoRA student, the adapter is handed to vLLM's LoRA path under a fresh id), and turns the engine's
completions into a `Rollout`:

- the sampling settings map exactly: temperature (greedy -> vLLM's temperature 0), top-k (0 = off in both),
  top-p, max_new_tokens -> max_tokens, stop on the EOS ids (`ignore_eos` + `stop_token_ids`: exactly our
  stop set, whatever the model's tokenizer or generation config say) with the EOS kept in the response, and
  one seed per row drawn from the caller's generator, so a seeded run draws the same rows again;
- log q of the sampled tokens comes from the engine (vLLM's processed log-probs: after temperature and
  truncation) and, with `rescore=True` (training), is replaced by one teacher-forced forward of our own model
  under the same processing, so the policy gradient uses minillm's numbers; the difference engine - ours is
  kept in `VLLMStats` and logged;
- with a teacher, its log-probs (and hidden states) come from `score_with_teacher`, as minillm's sampler
  gives them at teacher_mix_alpha = 0.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from minillm.config import SamplingConfig
from minillm.config.engine import VLLMConfig
from minillm.errors import ConfigError, EngineError
from minillm.sampling.adapter import EvalMode
from minillm.sampling.draw import build_processors
from minillm.sampling.rollout import Rollout, check_rollout_args
from minillm.sampling.teacher import score_with_teacher, teacher_forced_logprobs
from minillm.sampling.vllm_client import VLLMEngine, find_vllm_python

__all__ = ["VLLMSampler", "VLLMStats", "engine_sampler", "sampling_params"]

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM 0.32's max_lora_rank values


@dataclass
class VLLMStats:
    """What the engine did, summed over calls (the log-prob differences: of the last re-scored call)."""

    calls: int = 0
    rollouts: int = 0
    tokens: int = 0
    generate_seconds: float = 0.0
    syncs: int = 0
    sync_seconds: float = 0.0
    logprob_max_abs_diff: float = float("nan")   # max |log q_engine - log q_ours| over the sampled tokens
    logprob_mean_abs_diff: float = float("nan")

    def metrics(self, prefix: str = "vllm/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


def sampling_params(config: SamplingConfig, eos_ids: Sequence[int], seeds: Sequence[int]) -> list[dict]:
    """vLLM `SamplingParams` keywords, one dict per row, that sample what `generate_rollouts` samples."""
    if config.no_repeat_ngram_size > 0:
        raise ConfigError(f"the vllm engine cannot honour sampling.no_repeat_ngram_size = "
                          f"{config.no_repeat_ngram_size} (vLLM has no n-gram ban); set it to 0 or use hf.")
    base = {"temperature": 0.0 if config.greedy else float(config.temperature), "top_k": int(config.top_k),
            "top_p": float(config.top_p), "min_p": 0.0, "max_tokens": int(config.max_new_tokens),
            "min_tokens": 0, "stop_token_ids": [int(i) for i in eos_ids], "ignore_eos": True,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "logprobs": 0, "detokenize": False, "skip_special_tokens": False}
    return [{**base, "seed": int(seed)} for seed in seeds]


def row_seeds(batch: int, generator: torch.Generator | None) -> list[int]:
    """One vLLM seed per row, drawn from `generator` (its device), so a seeded call is reproducible."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (batch,), generator=generator, device=device).tolist()


def _is_peft(model) -> bool:
    return getattr(model, "peft_config", None) is not None


def _lora_rank(model) -> int:
    config = model.peft_config[getattr(model, "active_adapter", "default")]
    rank = max([int(config.r), *(int(r) for r in (getattr(config, "rank_pattern", None) or {}).values())])
    fits = [r for r in _LORA_RANKS if r >= rank]
    if not fits:
        raise ConfigError(f"lora_r = {rank}: vLLM's LoRA path takes ranks up to {_LORA_RANKS[-1]}; lower "
                          "lora_r or use rollout_engine=hf.")
    return fits[0]


def _model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _workdir(model) -> Path:
    """A private folder for the weights handed to the engine: /dev/shm (memory) when it has room for two
    copies, else the temporary directory."""
    shm = Path("/dev/shm")
    base = None
    if shm.is_dir():
        with contextlib.suppress(OSError):
            if shutil.disk_usage(shm).free > 2 * _model_bytes(model) + (256 << 20):
                base = str(shm)
    return Path(tempfile.mkdtemp(prefix="minillm-vllm-", dir=base))


def _export_base(model, folder: Path) -> None:
    """The model as a Hugging Face folder vLLM loads (config.json + model.safetensors), written by this
    process whatever its rank (transformers' save_pretrained writes on rank 0 only once torch.distributed is
    up, and every process of a DDP run feeds its own engine). For a PEFT model: its base weights (adapters
    left out, `base_layer` names restored) with the base config. A tied weight is written once (vLLM ties
    it from the config)."""
    from safetensors.torch import save_file

    inner = model.get_base_model() if _is_peft(model) else model
    state, seen = {}, set()
    for name, tensor in inner.state_dict().items():
        if "lora_" in name:
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied embeddings: vLLM ties them from the config
            continue
        seen.add(ptr)
        state[name.replace(".base_layer.", ".")] = tensor.detach().to("cpu").contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    inner.config.save_pretrained(str(folder))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


class VLLMSampler:
    """A model served by a vLLM engine, started on first use and kept in step with the model by `version`.

    Args:
        options: the `vllm` option group (python, memory, timeouts).
        dtype: the engine's dtype ("float32", "bfloat16", "float16").
        max_model_len: the longest prompt + response to serve, unless options.max_model_len is set.
        log_path: where the engine's log goes (default: inside the private folder, removed on close).
        device: the device of the process the engine serves (a CUDA device pins the engine to that GPU).
    """

    def __init__(self, options: VLLMConfig | None = None, *, dtype: str = "float32", max_model_len: int,
                 log_path: str | None = None, device=None):
        self.options = options or VLLMConfig()
        self.python = find_vllm_python(self.options.python)  # a missing vLLM fails before any work
        self.dtype, self.log_path, self.device = dtype, log_path, device
        self.max_model_len = self.options.max_model_len or int(max_model_len)
        self.engine: VLLMEngine | None = None
        self.version = None
        self.stats = VLLMStats()
        self.workdir: Path | None = None
        self._lora: dict | None = None
        self._lora_ids = 0

    # ------------------------------------------------------------------ engine and weights
    def start(self, model, version=None) -> None:
        """Start the engine on `model`'s current weights (a no-op once started)."""
        if self.engine is not None:
            return
        lora = _is_peft(model)
        engine = {"dtype": self.dtype, "max_model_len": self.max_model_len, "seed": 0,
                  "gpu_memory_utilization": self.options.gpu_memory_utilization,
                  "enforce_eager": self.options.enforce_eager, "skip_tokenizer_init": True,  # (CPU: always)
                  "logprobs_mode": "processed_logprobs", "generation_config": "vllm",
                  "disable_log_stats": True}
        if lora:
            engine.update(enable_lora=True, max_lora_rank=_lora_rank(model), max_loras=1)
        self.workdir = _workdir(model)
        # removed by close(), or at the latest when the sampler is collected or the interpreter exits
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.workdir), True)
        folder = self.workdir / "model"
        log = self.log_path or self.workdir / "engine.log"
        try:
            _export_base(model, folder)
            self.engine = VLLMEngine(folder, python=self.python, engine=engine, log_path=log,
                                     cpu_kv_cache_gb=self.options.cpu_kv_cache_gb,
                                     start_timeout=self.options.start_timeout,
                                     request_timeout=self.options.request_timeout, device=self.device)
        except BaseException:
            self._remove_workdir()
            raise
        if lora:
            self._save_lora(model)
        self.version = version

    def sync(self, model, version) -> None:
        """Bring the engine to `model`'s weights when `version` differs from the one it holds."""
        if self.engine is None:
            self.start(model, version)
            return
        if version is None or version == self.version:
            return
        start = time.perf_counter()
        if self._lora is not None:
            self._save_lora(model)
        else:
            folder = self.workdir / "update"
            shutil.rmtree(folder, ignore_errors=True)  # no shard of an earlier save left behind
            _export_base(model, folder)
            self.engine.load_weights(folder)
        self.version = version
        self.stats.syncs += 1
        self.stats.sync_seconds += time.perf_counter() - start

    def _save_lora(self, model) -> None:
        """The adapter as PEFT saves it, under a fresh LoRA id (vLLM caches adapters by id)."""
        self._lora_ids += 1
        folder = self.workdir / f"lora-{self._lora_ids}"
        model.save_pretrained(str(folder))
        old, self._lora = self._lora, {"name": f"minillm-{self._lora_ids}", "id": self._lora_ids,
                                       "path": str(folder)}
        if old is not None:
            with contextlib.suppress(EngineError):  # never loaded (no generation since): nothing to drop
                self.engine.remove_lora(old["id"])
            shutil.rmtree(old["path"], ignore_errors=True)

    def close(self) -> None:
        """Stop the engine and remove the weights folder (idempotent)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._remove_workdir()

    def _remove_workdir(self) -> None:
        if self.workdir is not None:
            self._cleanup()
            self.workdir = None

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ rollouts
    def rollouts(self, model, prompt_ids: Tensor, prompt_mask: Tensor, *, config: SamplingConfig,
                 eos_token_id: int | Sequence[int], pad_token_id: int,
                 generator: torch.Generator | None = None, version=None, teacher=None,
                 shared_vocab_size: int | None = None, return_teacher_hidden: bool = False,
                 student_autocast: torch.dtype | None = None, rescore: bool = True) -> Rollout:
        """`generate_rollouts(model, ...)` at teacher_mix_alpha = 0, sampled by the engine (see the module).

        `model` is the sampled model as it is now (its weights reach the engine when `version` changed);
        `rescore` replaces the engine's log q by our own forward's (the difference goes to `self.stats`);
        without it the engine's values stay (generation and evaluation, which keep only the tokens).
        """
        check_rollout_args(config, prompt_ids, prompt_mask, teacher, 0.0, return_teacher_hidden)
        self.sync(model, version)
        eos = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]
        width = model.get_output_embeddings().weight.shape[0]
        stop = [i for i in eos if 0 <= i < width]  # an id outside the logits is never drawn (vLLM refuses it)
        prompts = [ids[mask != 0].tolist() for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = sampling_params(config, stop, row_seeds(len(prompts), generator))
        start = time.perf_counter()
        outputs = self.engine.generate(prompts, params, lora=self._lora)
        self.stats.generate_seconds += time.perf_counter() - start
        rollout, engine_logprobs = _assemble(outputs, prompt_ids, prompt_mask, eos, pad_token_id)
        self.stats.calls += 1
        self.stats.rollouts += len(outputs)
        self.stats.tokens += int(rollout.lengths.sum())
        if rescore:
            ours = _rescore(model, rollout, config, student_autocast)
            valid = rollout.response_mask.bool()
            diff = (engine_logprobs - ours)[valid].abs()
            self.stats.logprob_max_abs_diff = float(diff.max()) if diff.numel() else 0.0
            self.stats.logprob_mean_abs_diff = float(diff.mean()) if diff.numel() else 0.0
            rollout.student_logprobs = ours
        if teacher is not None:
            rollout = score_with_teacher(rollout, model, teacher, temperature=config.temperature,
                                         shared_vocab_size=shared_vocab_size,
                                         return_teacher_hidden=return_teacher_hidden)
        return rollout


@contextlib.contextmanager
def engine_sampler(engine: str, options: VLLMConfig | None, *, dtype: str, max_model_len: int,
                   log_path: str | None = None) -> Iterator[VLLMSampler | None]:
    """A `VLLMSampler` for engine="vllm" (started on its first batch, closed on leaving), None for "hf"."""
    if engine != "vllm":
        yield None
        return
    with VLLMSampler(options, dtype=dtype, max_model_len=max_model_len, log_path=log_path) as sampler:
        yield sampler


def _assemble(outputs: list[dict], prompt_ids: Tensor, prompt_mask: Tensor, eos: list[int],
              pad: int) -> tuple[Rollout, Tensor]:
    """The engine's completions as a `Rollout` (EOS kept in the response, pad and 0 after it) and the
    engine's log-probs [B, T]."""
    rows = []
    for output in outputs:
        ids, logprobs = list(output["token_ids"]), list(output["logprobs"])
        if len(logprobs) != len(ids):
            raise EngineError(f"the vLLM engine returned {len(logprobs)} log-probs for {len(ids)} tokens.")
        if output["finish_reason"] == "stop" and (not ids or ids[-1] not in eos):
            raise EngineError(f"the vLLM engine stopped a response without an EOS token at its end "
                              f"({ids[-3:]}); minillm keeps the EOS in every finished response.")
        rows.append((ids, logprobs))
    width = max(1, max(len(ids) for ids, _ in rows))
    batch = len(rows)
    response_ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.float32)
    engine_logprobs = torch.zeros((batch, width), dtype=torch.float32)
    for i, (ids, logprobs) in enumerate(rows):
        n = len(ids)
        response_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        mask[i, :n] = 1.0
        engine_logprobs[i, :n] = torch.tensor(logprobs, dtype=torch.float32)
    rollout = Rollout(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.long().cpu(),
                      response_ids=response_ids, response_mask=mask, lengths=mask.long().sum(dim=1),
                      student_logprobs=engine_logprobs.clone(), teacher_logprobs=None, mix_logprobs=None,
                      importance_weights=mask.clone(), teacher_hidden=None)
    return rollout, engine_logprobs


def _rescore(model, rollout: Rollout, config: SamplingConfig, autocast: torch.dtype | None) -> Tensor:
    """log q(y_t) of the sampled tokens by one teacher-forced forward of `model`, under the processed
    distribution the engine sampled from (temperature; top-k / top-p when set), in the update's numerics."""
    truncated = config.top_k > 0 or config.top_p < 1.0
    processors = build_processors(config) if truncated else None
    device = next(model.parameters()).device
    context = (torch.autocast(device.type, dtype=autocast) if autocast is not None
               else contextlib.nullcontext())
    with torch.no_grad(), EvalMode(model), context:
        logprobs, _ = teacher_forced_logprobs(model, rollout, temperature=config.temperature,
                                              processors=processors)
    return logprobs
