"""`minillm plan`: exact counts against real models, the sharded figures, and the CLI's messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from minillm.errors import ModelError
from minillm.plan import lora_params, model_shape, plan_memory
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = tiny_tokenizer()
    out = {}
    for name, model in (
        ("llama", tiny_llama(tok, hidden_size=64, layers=3, seed=1)),
        ("gpt2", tiny_gpt2(tok, hidden_size=32, layers=2, seed=2)),
        ("student", tiny_llama(tok, hidden_size=32, layers=2, seed=3)),
    ):
        model.save_pretrained(root / name)
        (root / f"{name}.json").write_text(json.dumps(model.config.to_dict()))
        out[name] = (root / name, model)
    out["root"] = root
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_parameter_counts_are_exact_from_a_folder_or_a_config_json(models, name):
    folder, model = models[name]
    real = sum(p.numel() for p in model.parameters())
    assert model_shape(str(folder)).params == real
    assert model_shape(str(models["root"] / f"{name}.json")).params == real


def test_lora_count_equals_peft(models):
    peft = pytest.importorskip("peft")
    folder, model = models["llama"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    assert lora_params(model_shape(str(folder)), 4) == trainable
    wrapped.unload()


def test_kv_cache_bytes_equal_a_real_cache(models):
    from transformers import DynamicCache

    folder, model = models["llama"]
    shape = model_shape(str(folder))
    batch, prompt, new = 3, 7, 5
    plans = plan_memory(None, str(folder), "sft", 1, 80.0)  # sft: no rollouts
    assert plans[0].parts["rollout KV caches"] == 0
    teacher_free = plan_memory(
        str(folder),
        str(folder),
        "minillm",
        1,
        80.0,
        rollout_batch_size=batch,
        max_prompt_length=prompt,
        max_new_tokens=new,
        teacher_mix_alpha=0.0,
    )[0]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(
            input_ids=torch.randint(3, 60, (batch, prompt + new)), past_key_values=cache, use_cache=True
        )
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert teacher_free.parts["rollout KV caches"] == real
    assert shape.kv_width * shape.layers * 2 * batch * (prompt + new) * 4 == real
    mixed = plan_memory(
        str(folder),
        str(folder),
        "minillm",
        1,
        80.0,
        rollout_batch_size=batch,
        max_prompt_length=prompt,
        max_new_tokens=new,
    )[0]
    assert mixed.parts["rollout KV caches"] == 2 * real  # the teacher decodes alongside


def test_sharded_states_are_the_replicated_ones_over_n(models):
    teacher, student = str(models["llama"][0]), str(models["student"][0])
    plans = {p.option: p for p in plan_memory(teacher, student, "minillm", 4, 80.0)}
    ddp, fsdp, both = plans["ddp"].parts, plans["fsdp"].parts, plans["fsdp+teacher"].parts
    for part in ("student weights", "gradients", "AdamW state"):
        assert fsdp[part] == ddp[part] // 4
    assert fsdp["teacher weights"] == ddp["teacher weights"]
    assert both["teacher weights"] == ddp["teacher weights"] // 4
    assert plans["zero2"].parts["student weights"] == ddp["student weights"]
    assert plans["zero2"].parts["AdamW state"] == fsdp["AdamW state"]
    # fp32: 4 bytes per weight, 4 per gradient, 8 for AdamW's two moments
    n = model_shape(student).params
    assert (ddp["student weights"], ddp["gradients"], ddp["AdamW state"]) == (4 * n, 4 * n, 8 * n)
    ckpt = {
        p.option: p for p in plan_memory(teacher, student, "minillm", 4, 80.0, gradient_checkpointing=True)
    }
    assert ckpt["ddp"].parts["activations"] < ddp["activations"]


def test_the_recommendation_is_the_cheapest_option_that_fits():
    from minillm.plan import ModelShape, recommend

    # LLaMA-7B / 13B-like shapes (weights dominate): DDP does not fit 80 GiB, sharding the student does
    student = ModelShape("s", 6_738_000_000, 32, 4096, 4096, 11008, 32000, 2 * 32000 * 4096, [])
    teacher = ModelShape("t", 13_016_000_000, 40, 5120, 5120, 13824, 32000, 2 * 32000 * 5120, [])
    settings = dict(
        batch_size=1,
        rollout_batch_size=4,
        teacher_dtype="bfloat16",
        gradient_checkpointing=True,
        fsdp_mixed_precision=True,
    )
    plans = plan_memory(teacher, student, "minillm", 8, 80.0, **settings)
    assert not plans[0].fits and recommend(plans).option == "fsdp"
    small = plan_memory(teacher, student, "minillm", 8, 40.0, **settings)
    assert recommend(small).option == "fsdp+teacher"
    assert recommend(plan_memory(teacher, student, "minillm", 8, 1.0, **settings)) is None
    assert recommend(plan_memory(teacher, student, "minillm", 1, 1000.0, **settings)).option == "ddp"


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", "plan", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_cli_prints_a_table_and_a_recommendation(models):
    proc = _cli(
        "--teacher",
        str(models["root"] / "llama.json"),
        "--student",
        str(models["root"] / "student.json"),
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--gradient-checkpointing",
    )
    assert proc.returncode == 0, proc.stderr
    assert "| AdamW state |" in proc.stdout and "Recommended on 8 x 80 GiB" in proc.stdout
    proc = _cli(
        "--teacher",
        str(models["root"] / "llama.json"),
        "--student",
        str(models["root"] / "student.json"),
        "--json",
    )
    assert {p["option"] for p in json.loads(proc.stdout)} == {"ddp", "fsdp", "fsdp+teacher", "zero2", "zero3"}


def test_bad_inputs_give_clear_errors(models, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for spec, message in (
        (str(tmp_path / "missing"), "no such folder"),
        (str(bad), "not a readable config.json"),
        ("someone/some-model", "offline"),
    ):
        with pytest.raises(ModelError, match=message):
            model_shape(spec)
    proc = _cli("--student", str(tmp_path / "missing"), "--method", "sft")
    assert proc.returncode == 2 and "minillm: error:" in proc.stderr and "Traceback" not in proc.stderr
