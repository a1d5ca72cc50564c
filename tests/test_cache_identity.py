"""Caches are keyed on content: generations made by one model are never reused for another, even one saved
at the same path (issue 22: a model retrained at the same path got the old generations and 0.00 Rouge-L)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_instructions
from minillm.config import SamplingConfig
from minillm.errors import ConfigError
from minillm.evaluation.runner import evaluate_models
from minillm.generation import generate_file
from minillm.io import write_jsonl
from minillm.models.fingerprint import source_fingerprint, weights_fingerprint
from minillm.testing import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _examples(n: int = 6):
    from minillm.data import InstructionExample

    return [InstructionExample(instruction=r["instruction"], input=r["input"], outputs=[r["output"]],
                               id=r["id"]) for r in make_instructions(n, 0)]


def test_fingerprints_follow_content_not_paths(tok, tmp_path):
    a, b = tiny_llama(tok, seed=1), tiny_llama(tok, seed=1)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert weights_fingerprint(a) != weights_fingerprint(b)
    a.save_pretrained(tmp_path / "m")
    first = source_fingerprint(tmp_path / "m")
    assert first.startswith("files:") and source_fingerprint(tmp_path / "m") == first
    b.save_pretrained(tmp_path / "m")  # retrained into the same folder
    assert source_fingerprint(tmp_path / "m") != first
    assert source_fingerprint("some-org/some-model") == "name:some-org/some-model"


def test_generate_does_not_resume_another_models_partial_file(tok, tmp_path, caplog):
    """A kill, then a rerun with another model into the same output: the old model's records are dropped."""
    settings = dict(sampling=SamplingConfig(max_new_tokens=4), batch_size=3, seed=0, model_name="same-name")
    old, new = tiny_llama(tok, seed=1), tiny_llama(tok, seed=2)
    reference = generate_file(new, tok, _examples(), tmp_path / "reference.jsonl", **settings).read_text()
    stale = generate_file(old, tok, _examples(), tmp_path / "stale.jsonl", **settings).read_text()
    out = tmp_path / "gen.jsonl"
    (tmp_path / "gen.jsonl.partial").write_text("".join(stale.splitlines(keepends=True)[:3]))
    with caplog.at_level("WARNING", logger="minillm"):
        generate_file(new, tok, _examples(), out, **settings)
    assert out.read_text() == reference
    assert "dropped 3 record(s)" in caplog.text and "other settings" in caplog.text


def test_evaluate_refuses_generations_of_a_model_retrained_at_the_same_path(tok, tmp_path):
    data = write_jsonl(tmp_path / "set.jsonl", make_instructions(2))
    path = tmp_path / "run" / "best"
    tiny_llama(tok, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    kwargs = dict(seeds=[1], max_new_tokens=2, batch_size=2)
    evaluate_models({"student": str(path)}, [str(data)], tmp_path / "eval", **kwargs)
    evaluate_models({"student": str(path)}, [str(data)], tmp_path / "eval", **kwargs)  # same model: reused
    tiny_llama(tok, seed=3).save_pretrained(path)  # retrained into the same folder
    with pytest.raises(ConfigError, match=r"is not the one that made the generations"):
        evaluate_models({"student": str(path)}, [str(data)], tmp_path / "eval", **kwargs)
    # in-memory models are fingerprinted by their weights
    pair = (tiny_llama(tok, seed=4), tok)
    evaluate_models({"mem": pair}, [str(data)], tmp_path / "eval2", **kwargs)
    with pytest.raises(ConfigError, match="other settings or models"):
        evaluate_models({"mem": (tiny_llama(tok, seed=5), tok)}, [str(data)], tmp_path / "eval2", **kwargs)


def test_seqkd_teacher_data_is_reused_only_for_the_same_teacher_and_prompts(tiny_dirs, instruction_file,
                                                                            tmp_path):
    import dataclasses
    import shutil

    from minillm import api
    from minillm.config import TrainConfig, build_config

    out = tmp_path / "seqkd"
    teacher = shutil.copytree(tiny_dirs["teacher"], tmp_path / "teacher")  # retrained below
    cfg = build_config(TrainConfig, None, dict(
        method="seqkd", student=str(tiny_dirs["student"]), teacher=str(teacher),
        train_data=str(instruction_file), output_dir=str(out), batch_size=2, max_steps=1, max_length=200,
        max_prompt_length=160, valid_fraction=0.0, max_new_tokens=4, save_every=1))
    api.train(cfg)
    data = (out / "seqkd_teacher_data.jsonl").read_text()
    api.train(dataclasses.replace(cfg, resume=True, max_steps=2))  # same teacher: the cache is reused
    assert (out / "seqkd_teacher_data.jsonl").read_text() == data
    # the teacher retrained at the same path: the cache is not this teacher's, the resume is refused
    tok = tiny_tokenizer()
    tiny_llama(tok, seed=77, hidden_size=48).save_pretrained(teacher)
    with pytest.raises(ConfigError, match=r"was not made by this teacher.*other settings"):
        api.train(dataclasses.replace(cfg, resume=True, max_steps=3))
    assert (out / "seqkd_teacher_data.jsonl").read_text() == data  # left as it was


def test_seqkd_data_without_responses_is_a_clear_error(tiny_dirs, instruction_file, tmp_path):
    from minillm import api
    from minillm.config import TrainConfig, build_config
    from minillm.errors import DataError

    bad = tmp_path / "teacher_data.jsonl"
    bad.write_text('{"id": "0", "instruction": "hi", "input": ""}\n')
    cfg = build_config(TrainConfig, None, dict(
        method="seqkd", student=str(tiny_dirs["student"]), teacher=str(tiny_dirs["teacher"]),
        train_data=str(instruction_file), output_dir=str(tmp_path / "run"), batch_size=2, max_steps=1,
        max_length=200, max_prompt_length=160, valid_fraction=0.0, seqkd_data=str(bad)))
    with pytest.raises(DataError, match=r"teacher_data.jsonl:1: a SeqKD record needs a `response`"):
        api.train(cfg)


def test_evaluate_refuses_generations_of_an_edited_data_file(tok, tmp_path):
    data = write_jsonl(tmp_path / "set.jsonl", make_instructions(2))
    pair = (tiny_llama(tok, seed=1), tok)
    kwargs = dict(seeds=[1], max_new_tokens=2, batch_size=2)
    evaluate_models({"m": pair}, [str(data)], tmp_path / "eval", **kwargs)
    rows = make_instructions(2)
    rows[0]["instruction"] = "an edited prompt with the same id"
    write_jsonl(data, rows)
    with pytest.raises(ConfigError, match="other settings or models.*data"):
        evaluate_models({"m": pair}, [str(data)], tmp_path / "eval", **kwargs)
