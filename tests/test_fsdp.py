"""Sharded training with FSDP2 on CPU (gloo), launched with torchrun as a user would.

Equivalence: FSDP2 on 2 processes = 1 process with the same global batch (kd, sft); FSDP2 minillm = DDP
minillm with the same seeds (the same rollouts), with the teacher replicated or sharded; a run killed
mid-training resumes to the uninterrupted run's weights; the final folders are plain Hugging Face folders.
Each 2-process launch takes ~10 s here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import TrainingError

# max |difference| of weights that moved by ~2e-2 (lr 1e-2, 3 steps): summation order of the reductions
# differs
# (FSDP2's reduce-scatter vs DDP's all-reduce vs one process's accumulation); measured 7e-9 (kd) and 3e-6
# (minillm, whose rollouts feed back the weights)
SAME_BATCH_TOL = 1e-6
MINILLM_TOL = 2e-5

DRIVER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from minillm import api
    from minillm.config import TrainConfig, build_config
    from minillm.trainer import Trainer
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    kill = int(args.pop("_kill_at", 0))
    if kill:
        original = Trainer._stop_everywhere
        def stop(self):
            if self.step == kill and self.accelerator.process_index == 0:
                os._exit(9)  # as a kill -9 of one process: torchrun then stops the other
            return original(self)
        Trainer._stop_everywhere = stop
    def record(self):
        n = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                for p in self.student.parameters())
        rank = self.accelerator.process_index
        with open(os.path.join(self.cfg.output_dir, f"local_params{rank}"), "w") as f:
            f.write(str(n))
    original_finish = Trainer.finish
    def finish(self):
        record(self)
        return original_finish(self)
    Trainer.finish = finish
    api.train(build_config(TrainConfig, None, args))
""")

MINILLM = dict(method="minillm", num_rollouts=4, max_new_tokens=8, ppo_epochs=1, rollout_batch_size=2,
               eval_num_prompts=4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from minillm.testing import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("fsdp_models")
    tok = tiny_tokenizer()
    for name, model in (("teacher", tiny_llama(tok, hidden_size=48, layers=2, seed=1)),
                        ("student", tiny_llama(tok, hidden_size=32, layers=2, seed=2))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "driver.py").write_text(DRIVER)
    words = "the cat and the dog walk by the river in the city of paris near the mountain".split()
    (root / "pt.txt").write_text("\n\n".join(" ".join(words[i:] + words[:i]) * 3 for i in range(len(words))))
    return root


def _args(pair, instruction_file, out, **kw) -> dict:
    base = dict(student=pair / "student", teacher=pair / "teacher", train_data=instruction_file,
                output_dir=out,
                batch_size=2, max_steps=3, learning_rate=1e-2, lr_scheduler="constant", max_length=200,
                max_prompt_length=160, valid_fraction=0.2, seed=3)
    base.update(kw)
    if base["method"] == "minillm":  # with L_PT (pretraining text; its KD term runs the teacher in the loss)
        base.update(pt_data=pair / "pt.txt", pt_seq_len=24)
    if base["method"] == "sft":
        base.pop("teacher")
    return {k: str(v) for k, v in base.items()}


def _torchrun(pair, args: dict, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(pair / "driver.py"), *(f"{k}={v}" for k, v in args.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _weights(run: Path, folder: str = "final") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run) / folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["kd", "sft", "seqkd"])
def test_fsdp_two_processes_equal_one_process_with_the_same_global_batch(pair, instruction_file, tmp_path,
                                                                         method):
    # 2 processes x batch 2 (FSDP2) against 1 process x batch 2 x 2 accumulation steps: the same 4
    # sequences per
    # step (EpochBatches gives rank r the r-th slice of each global batch), the same mean of two
    # micro-batch means
    one = tmp_path / "one"
    api.train(build_config(TrainConfig, None, _args(pair, instruction_file, one, method=method,
                                                    gradient_accumulation_steps=2)))
    two = tmp_path / "two"
    _torchrun(pair, _args(pair, instruction_file, two, method=method, fsdp="true"))
    start = load_file(str(pair / "student" / "model.safetensors"))
    assert _max_diff(_weights(one), start) > 1e-3  # the runs trained
    assert _max_diff(_weights(one), _weights(two)) <= SAME_BATCH_TOL
    # each process held half of the student (FSDP2 shards every parameter along dim 0)
    local = [int((two / f"local_params{r}").read_text()) for r in (0, 1)]
    total = sum(v.numel() for v in start.values())
    assert sum(local) == total and max(local) <= 0.55 * total
    # best/ and final/ are plain Hugging Face folders
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(two / "final")
    assert all(not hasattr(p, "to_local") for p in model.parameters())


@pytest.fixture(scope="module")
def minillm_runs(pair, instruction_file, tmp_path_factory):
    """2-process minillm runs with the same seeds: DDP, FSDP2 (teacher replicated), FSDP2 (teacher sharded,
    the
    launch as an Accelerate FSDP config sets it up), FSDP2 with gradient checkpointing."""
    root = tmp_path_factory.mktemp("minillm_runs")
    runs = {}
    for name, extra, env in (
        ("ddp", {}, None),
        ("fsdp", {"fsdp": "true", "save_every": 1}, None),
        ("fsdp_shard_teacher", {"teacher_sharding": "shard"},
         {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
        ("fsdp_checkpointing", {"fsdp": "true", "gradient_checkpointing": "true"}, None),
    ):
        runs[name] = root / name
        _torchrun(pair, _args(pair, instruction_file, root / name, **MINILLM, **extra), env=env)
    return runs


def test_fsdp_minillm_equals_ddp_minillm(minillm_runs, pair):
    ddp = _weights(minillm_runs["ddp"])
    assert _max_diff(ddp, load_file(str(pair / "student" / "model.safetensors"))) > 1e-3
    for name in ("fsdp", "fsdp_shard_teacher", "fsdp_checkpointing"):
        assert _max_diff(ddp, _weights(minillm_runs[name])) <= MINILLM_TOL, name
    # the same rollouts: the first round's logged reward statistics agree
    def first_round(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in recs if "rollout/reward" in r)

    a, b = first_round(minillm_runs["ddp"]), first_round(minillm_runs["fsdp_shard_teacher"])
    log = (minillm_runs["fsdp_shard_teacher"] / "metrics.jsonl").read_text()
    steps = [json.loads(x) for x in log.splitlines()]
    assert any(r.get("pt", 0) > 0 for r in steps)  # L_PT ran
    keys = [k for k in a if k.startswith("rollout/") and "seconds" not in k and "per_second" not in k]
    assert keys and all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(a[k])) for k in keys), (a, b)


def test_fsdp_onpolicy_equals_ddp_onpolicy(pair, instruction_file, tmp_path):
    """On-policy KD (student samples, the teacher in the loss): FSDP2 = DDP with the same seeds (the same
    samples), teacher replicated and sharded."""
    runs = {}
    for name, extra in (("ddp", {}), ("fsdp", {"fsdp": "true"}),
                        ("fsdp_shard_teacher", {"fsdp": "true", "teacher_sharding": "shard"})):
        runs[name] = tmp_path / name
        _torchrun(pair, _args(pair, instruction_file, runs[name], method="onpolicy", max_new_tokens=8,
                              rollout_batch_size=2, divergence="rkl", **extra))
    ddp = _weights(runs["ddp"])
    assert _max_diff(ddp, load_file(str(pair / "student" / "model.safetensors"))) > 1e-3
    for name in ("fsdp", "fsdp_shard_teacher"):
        assert _max_diff(ddp, _weights(runs[name])) <= MINILLM_TOL, name


def test_fsdp_kill_and_resume_matches_the_uninterrupted_run(minillm_runs, pair, instruction_file, tmp_path):
    out = tmp_path / "killed"
    args = _args(pair, instruction_file, out, **MINILLM, fsdp="true", save_every=1)
    proc = _torchrun(pair, {**args, "_kill_at": "2"}, check=False)
    assert proc.returncode != 0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert ckpts and ckpts[-1] == "step-0000001"  # killed after step 2's update, before its checkpoint
    assert (out / "checkpoints" / ckpts[-1] / "sharded" / ".metadata").exists()
    _torchrun(pair, {**args, "resume": "true"})
    assert _max_diff(_weights(out), _weights(minillm_runs["fsdp"])) <= 1e-6


def test_resume_on_another_number_of_processes_is_refused(minillm_runs, pair, instruction_file):
    run = minillm_runs["fsdp"]
    cfg = build_config(TrainConfig, None, _args(pair, instruction_file, run, **MINILLM, fsdp="true",
                                                resume="true", max_steps=4))
    with pytest.raises(TrainingError, match="Relaunch with --num_processes 2"):
        api.train(cfg)


def test_fsdp_lora_equals_one_process_and_saves_a_merged_plain_model(pair, instruction_file, tmp_path):
    pytest.importorskip("peft")
    one, two = tmp_path / "one", tmp_path / "two"
    api.train(build_config(TrainConfig, None, _args(pair, instruction_file, one, method="kd", lora_r=4,
                                                    gradient_accumulation_steps=2)))
    _torchrun(pair, _args(pair, instruction_file, two, method="kd", lora_r=4, fsdp="true"))
    start = load_file(str(pair / "student" / "model.safetensors"))
    merged = _weights(two)
    assert merged.keys() == start.keys()  # merged: no lora_A / lora_B / base_layer entries
    assert _max_diff(merged, start) > 1e-4
    assert _max_diff(_weights(one), merged) <= SAME_BATCH_TOL


def test_fsdp_mixed_precision_trains_close_to_fp32(pair, instruction_file, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    api.train(build_config(TrainConfig, None, _args(pair, instruction_file, fp32, method="kd",
                                                    gradient_accumulation_steps=2)))
    _torchrun(pair, _args(pair, instruction_file, bf16, method="kd", fsdp="true",
                          fsdp_mixed_precision="true"))
    start = load_file(str(pair / "student" / "model.safetensors"))
    a, b = _weights(fp32), _weights(bf16)
    assert all(v.dtype == torch.float32 for v in b.values())  # the sharded master weights stay fp32
    moved = sum(float((a[k] - start[k]).norm() ** 2) for k in a) ** 0.5
    apart = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
    assert 0 < apart < 0.2 * moved, (apart, moved)


def test_models_that_do_not_fit_one_device_are_refused_with_the_options(pair, instruction_file, tmp_path,
                                                                        monkeypatch):
    import minillm.distributed as distributed

    # a device of 64 KiB: the 2-layer student's states alone (~1.4 MB with AdamW) exceed it
    monkeypatch.setattr(distributed, "device_memory", lambda device: 64 * 1024)
    cfg = build_config(TrainConfig, None, _args(pair, instruction_file, tmp_path / "run", method="kd"))
    with pytest.raises(TrainingError, match="do not fit.*fsdp=true.*teacher_sharding=shard.*minillm plan"):
        api.train(cfg)


def test_num_rollouts_must_divide_over_the_processes(pair, instruction_file):
    from minillm.algorithms import build_algorithm
    from minillm.algorithms.base import TrainingContext
    from minillm.data import load_instructions
    from minillm.errors import ConfigError
    from minillm.models import load_tokenizer

    cfg = build_config(TrainConfig, None, _args(pair, instruction_file, "unused", **MINILLM))
    algorithm = build_algorithm("minillm", load_instructions(instruction_file), None, cfg)
    ctx = TrainingContext(tokenizer=load_tokenizer(str(pair / "student")), student=None, student_head=None,
                          student_hidden=None, teacher=None, teacher_head=None, shared_vocab_size=None,
                          device=torch.device("cpu"), process_index=0, num_processes=3)
    message = r"num_rollouts \(4\) must be divisible by the number of processes \(3\)"
    with pytest.raises(ConfigError, match=message):
        algorithm.setup(ctx)


# ------------------------------------------------------------------------------------------- DeepSpeed ZeRO-2
# through Accelerate (`accelerate launch --config_file configs/accelerate/zero2.yaml`) on 2 CPU processes
# (DeepSpeed's CPU accelerator, gloo)
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (see the README's test command)")
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch(pair, config: str, args: dict, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--main_process_port", "0", str(pair / "driver.py"),
           *(f"{k}={v}" for k, v in args.items())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@needs_deepspeed
def test_zero2_equals_one_process_with_the_same_global_batch(pair, instruction_file, tmp_path):
    # 2 processes x batch 2 x 2 accumulation steps (DeepSpeed owns the accumulation and the clipping) against
    # 1 process x batch 2 x 4 accumulation steps
    one = tmp_path / "one"
    api.train(build_config(TrainConfig, None, _args(pair, instruction_file, one, method="kd",
                                                    gradient_accumulation_steps=4, lr_scheduler="cosine",
                                                    warmup_steps=1)))
    zero2 = tmp_path / "zero2"
    _launch(pair, "zero2.yaml", _args(pair, instruction_file, zero2, method="kd",
                                      gradient_accumulation_steps=2,
                                      lr_scheduler="cosine", warmup_steps=1))
    start = load_file(str(pair / "student" / "model.safetensors"))
    assert _max_diff(_weights(one), start) > 1e-3
    assert _max_diff(_weights(one), _weights(zero2)) <= 1e-6


@needs_deepspeed
def test_zero2_minillm_kill_and_resume_matches_ddp(minillm_runs, pair, instruction_file, tmp_path):
    out = tmp_path / "killed"
    args = _args(pair, instruction_file, out, **MINILLM, save_every=1)
    assert _launch(pair, "zero2.yaml", {**args, "_kill_at": "2"}, check=False).returncode != 0
    assert (out / "checkpoints" / "step-0000001" / "COMPLETE").exists()
    _launch(pair, "zero2.yaml", {**args, "resume": "true"})
    # the uninterrupted DDP run with the same seeds (its rollouts and updates)
    assert _max_diff(_weights(minillm_runs["ddp"]), _weights(out)) <= MINILLM_TOL


def test_zero3_is_refused_with_what_to_use(pair, instruction_file):
    from types import SimpleNamespace

    from minillm.engine import configure_deepspeed
    from minillm.errors import ConfigError

    cfg = build_config(TrainConfig, None, _args(pair, instruction_file, "unused", method="kd"))
    plugin = SimpleNamespace(zero_stage=3, deepspeed_config={})
    with pytest.raises(ConfigError, match="ZeRO-3 is not supported.*fsdp=true"):
        configure_deepspeed(SimpleNamespace(), plugin, cfg)
    plugin.zero_stage = 2
    acc = SimpleNamespace()
    configure_deepspeed(acc, plugin, cfg)
    assert plugin.deepspeed_config == {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                       "gradient_clipping": 1.0}
    assert acc.gradient_accumulation_steps == 1
