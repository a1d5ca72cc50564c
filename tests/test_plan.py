"""`minillm plan`: exact counts against real models, the sharded figures, and the CLI's messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minillm import plan as P
from minillm.config import MiniLLMConfig, TrainConfig, build_config
from minillm.distributed import decoder_layers
from minillm.errors import ConfigError, ModelError
from minillm.plan import OPTIONS, format_plan, model_shape, plan_memory
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer

DDP, ZERO2, FSDP, SHARD, ZERO3 = OPTIONS
SMALL = dict(batch_size=2, max_length=32, rollout_batch_size=3, max_prompt_length=7, max_new_tokens=5,
             chunk_size=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = tiny_tokenizer()
    out = {"root": root}
    for name, model in (("llama", tiny_llama(tok, hidden_size=64, layers=3, heads=4, kv_heads=2, seed=1)),
                        ("gpt2", tiny_gpt2(tok, hidden_size=32, layers=2, seed=2)),
                        ("tied", tiny_llama(tok, hidden_size=32, layers=2, seed=3, tie_word_embeddings=True)),
                        ("student", tiny_llama(tok, hidden_size=32, layers=2, seed=4))):
        model.save_pretrained(root / name)
        (root / f"{name}.json").write_text(json.dumps(model.config.to_dict()))
        out[name] = (root / name, model)
    return out


def _spec(models, name, as_json=True):
    return str(models["root"] / f"{name}.json") if as_json else str(models[name][0])


@pytest.mark.parametrize("name", ["llama", "gpt2", "tied"])
def test_parameter_counts_and_widths_are_exact(models, name):
    folder, model = models[name]
    real = sum(p.numel() for p in model.parameters())  # tied parameters once
    layers = decoder_layers(model)
    for shape in (model_shape(str(folder)), model_shape(_spec(models, name))):
        assert shape.params == real
        assert shape.layer_params == sum(p.numel() for layer in layers for p in layer.parameters())
        assert shape.layers == len(layers) == model.config.num_hidden_layers
        assert (shape.hidden, shape.vocab) == (model.config.hidden_size, model.config.vocab_size)
    if name == "tied":
        assert sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) > real  # once here
    if name == "llama":
        assert (shape.kv_heads, shape.head_dim, shape.intermediate, shape.family) == (2, 16, 128, "llama")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_lora_count_equals_peft(models, name):
    peft = pytest.importorskip("peft")
    folder, model = models[name]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    wrapped.unload()
    shape = model_shape(str(folder))
    assert shape.lora_params(4) == trainable > 0
    parts = plan_memory(None, shape, "sft", 1, 80.0, lora_r=4).option(DDP).parts
    assert (parts[P.GRAD], parts[P.ADAM]) == (4 * trainable, 8 * trainable)
    assert parts[P.W] == 4 * (shape.params + trainable)  # frozen base weights stay, in fp32


def _real_cache_bytes(model, batch, length, dtype=torch.float32):
    from transformers import DynamicCache

    model = model.to(dtype)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 60, (batch, length)), past_key_values=cache, use_cache=True)
    model.to(torch.float32)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def test_kv_cache_bytes_equal_a_real_cache(models):
    from minillm.sampling.adapter import CausalLMAdapter

    teacher, student = models["llama"][1], models["gpt2"][1]  # GQA teacher, GPT-2 (full-width) student
    batch, prompt, new = SMALL["rollout_batch_size"], SMALL["max_prompt_length"], SMALL["max_new_tokens"]
    kw = dict(config=None, **SMALL)
    teacher_spec, student_spec = _spec(models, "llama"), _spec(models, "gpt2")
    parts = plan_memory(teacher_spec, student_spec, "minillm", 1, 80.0, **kw).option(DDP).parts
    assert parts[P.KVS] == _real_cache_bytes(student, batch, prompt + new)
    assert parts[P.KVT] == _real_cache_bytes(teacher, batch, prompt + new)  # teacher-mixed: it decodes too
    bf16 = plan_memory(teacher_spec, student_spec, "minillm", 1, 80.0, teacher_dtype="bfloat16",
                       **kw).option(DDP).parts
    assert bf16[P.KVT] == _real_cache_bytes(teacher, batch, prompt + new, torch.bfloat16) == parts[P.KVT] // 2
    # the rollout decoder preallocates prompt + max_new_tokens positions: the same bytes
    cache = CausalLMAdapter(teacher).new_cache(new)
    with torch.no_grad():
        teacher.model(input_ids=torch.randint(3, 60, (batch, prompt)), past_key_values=cache, use_cache=True)
    assert sum(b.numel() * 4 for layer in cache.layers for b in (layer.key_buffer, layer.value_buffer)) == \
        parts[P.KVT]
    alone = plan_memory(teacher_spec, student_spec, "minillm", 1, 80.0, teacher_mix_alpha=0.0,
                        **kw).option(DDP).parts
    assert alone[P.KVT] == 0 and alone[P.KVS] == parts[P.KVS]  # alpha = 0: the teacher scores afterwards
    assert plan_memory(None, _spec(models, "gpt2"), "sft", 1, 80.0, **kw).option(DDP).parts[P.KVS] == 0


@pytest.mark.parametrize("n", [2, 3, 8])
def test_sharded_figures_are_the_replicated_ones_over_n(models, n):
    teacher, student = _spec(models, "llama"), _spec(models, "student")
    plan = plan_memory(teacher, student, "minillm", n, 80.0, **SMALL)
    ddp, z2, fsdp, shard, z3 = (plan.option(o).parts for o in OPTIONS)
    close = lambda a, b: abs(a - b) <= 1  # noqa: E731  (int() of a division)
    for part in (P.W, P.GRAD, P.ADAM, P.TEMP):
        assert close(fsdp[part], ddp[part] / n) and close(shard[part], ddp[part] / n)
    for part in (P.GRAD, P.ADAM):
        assert close(z2[part], ddp[part] / n) and close(z3[part], ddp[part] / n)
    assert z2[P.W] == ddp[P.W] and close(z3[P.W], ddp[P.W] / n)
    assert fsdp[P.TW] == z2[P.TW] == ddp[P.TW] and close(shard[P.TW], ddp[P.TW] / n)
    s = model_shape(student)
    assert (ddp[P.W], ddp[P.GRAD], ddp[P.ADAM], ddp[P.BUCKETS]) == (4 * s.params, 4 * s.params, 8 * s.params,
                                                                     4 * s.params)
    layer0 = sum(p.numel() for p in decoder_layers(models["student"][1])[0].parameters())
    assert fsdp[P.SUNIT] == 4 * (s.params - s.layers * layer0 + layer0) and ddp[P.SUNIT] == 0
    assert fsdp[P.SDEC] == 4 * s.params and ddp[P.SDEC] == 0  # gathered whole for decoding
    for part in (P.KVS, P.KVT, P.LOSS, P.THID):
        assert ddp[part] == z2[part] == fsdp[part] == shard[part] == z3[part] > 0
    mixed = plan_memory(teacher, student, "minillm", n, 80.0, fsdp_mixed_precision=True, **SMALL)
    assert mixed.option(FSDP).parts[P.SUNIT] == fsdp[P.SUNIT] // 2
    assert mixed.option(FSDP).parts[P.W] == fsdp[P.W]
    assert mixed.option(DDP).parts == ddp  # the switch only acts on FSDP


def _saved_bytes(model, batch, length):
    """Bytes autograd saves during a forward of the decoder (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 60, (batch, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return sum(saved.values())


@pytest.mark.parametrize("make", [lambda: tiny_llama(vocab_size=64, hidden_size=64, layers=3, kv_heads=2),
                                  lambda: tiny_gpt2(vocab_size=64, hidden_size=64, layers=3)])
def test_activations_match_the_tensors_autograd_saves(make):
    from minillm.models import enable_checkpointing

    model, batch, length = make().train(), 2, 64
    shape = model_shape(model)  # a built model works too
    parts = plan_memory(None, shape, "sft", 1, 80.0, batch_size=batch, max_length=length).option(DDP).parts
    estimate = parts["activations, gradient_checkpointing=false (counted)"]
    assert abs(estimate / _saved_bytes(model, batch, length) - 1) < 0.03
    # checkpointing: forward keeps each layer's input (the estimate adds the layer recomputed in backward)
    one_layer = (estimate - batch * length * P.OUTSIDE_BYTES[shape.family] * shape.hidden) // shape.layers
    enable_checkpointing(model)
    kept = parts["activations, gradient_checkpointing=true"] - one_layer
    assert abs(kept / _saved_bytes(model.train(), batch, length) - 1) < 0.03


def test_defaults_are_the_configs_and_a_config_is_read(models):
    plan = plan_memory(_spec(models, "llama"), _spec(models, "student"), "minillm", 2, 80.0)
    c = MiniLLMConfig()
    expect = dict(batch_size=c.batch_size, rollout_batch_size=c.rollout_batch_size, chunk_size=c.chunk_size,
                  max_length=c.max_length, max_prompt_length=c.max_prompt_length,
                  max_new_tokens=c.sampling.max_new_tokens, num_rollouts=c.num_rollouts,
                  teacher_mix_alpha=c.teacher_mix_alpha, precision=c.precision, teacher_dtype=c.teacher_dtype)
    assert {k: plan.settings[k] for k in expect} == expect
    cfg = build_config(TrainConfig, None, dict(method="minillm", student="s", teacher="t", train_data="d",
                                               batch_size=4, rollout_batch_size=4,
                                               gradient_checkpointing=True))
    plan = plan_memory(_spec(models, "llama"), _spec(models, "student"), config=cfg, gpus=2, lora_r=2)
    assert [plan.settings[k] for k in ("batch_size", "gradient_checkpointing", "lora_r")] == [4, True, 2]
    assert "batch_size=4" in plan.switches and "gradient_checkpointing=true" in plan.switches
    with pytest.raises(ConfigError, match="unknown planner settings"):
        plan_memory(None, _spec(models, "student"), "sft", 1, 80.0, batchsize=4)


def test_the_recommendation_is_the_cheapest_option_that_fits(tmp_path):
    assert list(OPTIONS) == ["ddp", "zero2", "fsdp=true teacher_sharding=replicate",
                             "fsdp=true teacher_sharding=shard", "zero3 (untested here)"]
    for name, cfg in (("t", dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40,
                                 intermediate_size=13824)),
                      ("s", dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                 intermediate_size=11008))):  # LLaMA-13B and LLaMA-7B
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(model_type="llama", vocab_size=32000, **cfg)))
    t, s = model_shape(str(tmp_path / "t.json")), model_shape(str(tmp_path / "s.json"))
    assert abs(t.params - 13.016e9) < 0.01e9 and abs(s.params - 6.738e9) < 0.01e9
    kw = dict(batch_size=2, rollout_batch_size=8, teacher_dtype="bfloat16", gradient_checkpointing=True)
    for gib in (24.0, 48.0, 80.0, 160.0, 1000.0):
        plan = plan_memory(t, s, "minillm", 8, gib, **kw)
        fits = [o.option for o in plan.options if o.fits]
        assert plan.recommended == (fits[0] if fits else None)
        assert all(o.peak > plan.usable_bytes for o in plan.options[:list(OPTIONS).index(plan.recommended)]
                   ) if fits else plan.advice
    plan = plan_memory(t, s, "minillm", 8, 80.0, **kw)
    assert plan.recommended == ZERO2 and plan.switches.startswith(OPTIONS[ZERO2])
    plan = plan_memory(t, s, "minillm", 8, 56.0, **kw)  # rollouts gather the fp32 student: only shard fits
    assert plan.recommended == SHARD and plan.switches.startswith(OPTIONS[SHARD])
    assert "gradient_checkpointing=true" in plan.switches and "teacher_dtype=bfloat16" in plan.switches
    assert "Recommended: **fsdp=true teacher_sharding=shard**" in format_plan(plan)
    assert plan_memory(t, s, "minillm", 1, 1000.0, **kw).recommended == DDP
    tight = plan_memory(None, s, "sft", 8, 80.0, batch_size=16, max_length=2048)  # activations dominate
    assert tight.recommended is None
    assert any(a.startswith("gradient_checkpointing=true: ") for a in tight.advice)
    assert "lora_r=16: ddp fits" in " ".join(plan_memory(None, s, "sft", 1, 80.0, batch_size=1).advice)
    assert "Nothing fits 8 x 80 GiB" in format_plan(tight)


def test_bad_inputs_give_clear_errors(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad, inconsistent, empty = tmp_path / "bad.json", tmp_path / "odd.json", tmp_path / "empty"
    (tmp_path / "t5.json").write_text(json.dumps(dict(model_type="t5")))  # not a causal LM
    bad.write_text('{"model_type": "llama",\n "hidden_size": }')
    inconsistent.write_text(json.dumps(dict(model_type="llama", hidden_size=100, num_attention_heads=7)))
    empty.mkdir()
    for spec, message in ((tmp_path / "missing", "no such file or folder"),
                          (bad, r"not valid JSON \(line 2, column 17"),
                          (empty, "the folder has no config.json"),
                          (tmp_path / "nope.json", "no such file or folder"),
                          ("someone/some-model", "'someone/some-model' is not a local file or folder.*offline"
                                                 ".*config.json"),
                          (inconsistent, "not a valid 'llama' config.*not a multiple"),
                          (tmp_path / "t5.json", "cannot build a causal LM from this config")):
        with pytest.raises(ModelError, match=message):
            model_shape(str(spec))
    with pytest.raises(ConfigError, match="needs a teacher"):
        plan_memory(None, _spec(models, "student"), "minillm", 1, 80.0)


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minillm.cli", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=180, env=env)


def test_cli_prints_a_table_a_recommendation_and_json(models):
    args = ["--teacher", _spec(models, "llama"), "--student", _spec(models, "student"), "--gpus", 4,
            "--gpu-memory", 80, "--gradient-checkpointing", "--rollout-batch-size", 4]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| GiB per GPU"))
    assert header == "| GiB per GPU | " + " | ".join(OPTIONS) + " |"
    assert "| AdamW state (2 fp32 moments) |" in proc.stdout
    assert "| rollout KV cache, teacher |" in proc.stdout
    assert "Recommended: **ddp**" in proc.stdout and "gradient_checkpointing=true" in proc.stdout
    out = json.loads(_cli(*args, "--json").stdout)
    api = plan_memory(_spec(models, "llama"), _spec(models, "student"), "minillm", 4, 80.0,
                      gradient_checkpointing=True, rollout_batch_size=4)
    assert out["recommended"] == api.recommended == DDP
    assert [o["peak"] for o in out["options"]] == [o.peak for o in api.options]
    assert out["student"]["params"] == model_shape(_spec(models, "student")).params


def test_cli_errors_are_messages_not_tracebacks(models, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    for args, message in ((["--student", bad, "--method", "sft"], "not valid JSON"),
                          (["--student", "someone/some-model", "--teacher", _spec(models, "llama")],
                           "'someone/some-model' is not a local file or folder")):
        proc = _cli(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("minillm: error:"), proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
