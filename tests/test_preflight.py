"""Pre-flight checks (issue 22): what would fail inside torch, or after hours, is refused before any work."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch

from conftest import make_instructions
from minillm import api
from minillm.config import GenerateConfig, TrainConfig, build_config
from minillm.errors import ConfigError, ModelError
from minillm.evaluation.runner import evaluate_models
from minillm.io import write_jsonl
from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A GPT-2 with 64 positions (absolute: longer inputs fail inside torch.embedding) and a Llama whose
    embedding has fewer rows than the tokenizer has ids."""
    root = tmp_path_factory.mktemp("preflight")
    tok = tiny_tokenizer()
    gpt2 = tiny_gpt2(tok)
    gpt2.config.n_positions = 64
    gpt2.transformer.wpe = torch.nn.Embedding(64, gpt2.config.n_embd)
    gpt2.save_pretrained(root / "gpt2-64")
    tok.save_pretrained(root / "gpt2-64")
    small = tiny_llama(tok, vocab_size=len(tok) - 20)
    small.save_pretrained(root / "small-vocab")
    tok.save_pretrained(root / "small-vocab")
    return root


def _sft(model, data, out, **kw):
    return build_config(TrainConfig, None, dict(method="sft", student=str(model), train_data=str(data),
                                                 output_dir=str(out), batch_size=2, max_steps=1,
                                                 valid_fraction=0.0, **kw))


def test_sequences_longer_than_the_context_are_refused_before_training(short_context, instruction_file,
                                                                       tmp_path):
    with pytest.raises(ConfigError, match=r"max_length \(200\) = 200 positions, but the student model's "
                                          r"context is 64 \(its config\.\w+\)"):
        api.train(_sft(short_context / "gpt2-64", instruction_file, tmp_path / "a", max_length=200,
                       max_prompt_length=32, max_new_tokens=8))
    with pytest.raises(ConfigError, match=r"max_prompt_length \(48\) \+ max_new_tokens \(32\) = 80"):
        api.train(_sft(short_context / "gpt2-64", instruction_file, tmp_path / "b", max_length=64,
                       max_prompt_length=48, max_new_tokens=32))
    data = write_jsonl(tmp_path / "d.jsonl", make_instructions(2))
    with pytest.raises(ConfigError, match=r"context is 64"):
        api.generate(build_config(GenerateConfig, None, dict(model=str(short_context / "gpt2-64"),
                                                             data=str(data), output=str(tmp_path / "g.jsonl"),
                                                             max_new_tokens=100)))
    with pytest.raises(ConfigError, match=r"the longest prompt \(\d+\) \+ max_new_tokens \(100\)"):
        evaluate_models({"m": str(short_context / "gpt2-64")}, [str(data)], tmp_path / "eval", seeds=[1],
                        max_new_tokens=100)


def test_an_embedding_smaller_than_the_tokenizer_is_refused(short_context, instruction_file, tmp_path):
    with pytest.raises(ModelError, match=r"the tokenizer has \d+ tokens .* input embedding has only "
                                         r"\d+ rows"):
        api.train(_sft(short_context / "small-vocab", instruction_file, tmp_path / "a", max_length=200,
                       max_prompt_length=160))


def test_too_little_disk_for_the_planned_checkpoints_is_refused(tiny_dirs, instruction_file, tmp_path,
                                                                monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(ConfigError, match=r"GiB free, but the run plans to write about .* "
                                          r"keep_checkpoints=2"):
        api.train(_sft(tiny_dirs["student"], instruction_file, tmp_path / "a", max_length=200,
                       max_prompt_length=160))
