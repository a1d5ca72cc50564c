"""LoRA students (PEFT) end to end: train, resume, merge on save, reload with plain transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import TrainingError
from minillm.trainer import Trainer, TrainingInterrupted

pytest.importorskip("peft")


def _cfg(tiny_dirs, instruction_file, out, **kw) -> TrainConfig:
    base = dict(method="sft", student=tiny_dirs["student"], train_data=instruction_file, output_dir=str(out),
                batch_size=4, learning_rate=1e-2, max_steps=4, valid_fraction=0.2, max_length=200,
                max_prompt_length=160, seed=3, lora_r=4, lora_alpha=8)
    base.update(kw)
    return build_config(TrainConfig, None, base)


def _capture(monkeypatch) -> dict:
    """The trained (PEFT) student at the end of training, before it is merged and saved."""
    seen: dict = {}
    original = Trainer.finish

    def finish(self):
        seen["model"] = self.student
        return original(self)

    monkeypatch.setattr(Trainer, "finish", finish)
    return seen


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["sft", "minillm"])
def test_lora_trains_adapters_only_and_saves_a_plain_merged_model(tiny_dirs, instruction_file, tmp_path,
                                                                 monkeypatch, method):
    from transformers import AutoModelForCausalLM

    extra = {}
    if method == "minillm":
        extra = dict(method="minillm", teacher=tiny_dirs["teacher"], num_rollouts=4, max_new_tokens=8,
                     ppo_epochs=1, rollout_batch_size=2, max_steps=2, eval_num_prompts=2)
    seen = _capture(monkeypatch)
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "run", **extra))
    peft_model = seen["model"]
    start = load_file(str(Path(tiny_dirs["student"]) / "model.safetensors"))
    # the base weights inside the PEFT model did not move; the adapters did
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in peft_model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], start[k]) for k in start)
    assert any(float(v.abs().max()) > 0 for k, v in peft_model.state_dict().items() if "lora_B" in k)
    # final/ is a plain transformers folder with the adapters merged in
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()
    saved = load_file(str(final / "model.safetensors"))
    assert saved.keys() == start.keys()
    plain = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.randint(3, 60, (2, 12))
    trained, reloaded = _logits(peft_model, ids), _logits(plain, ids)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    initial = _logits(AutoModelForCausalLM.from_pretrained(tiny_dirs["student"]), ids)
    assert float((reloaded - initial).abs().max()) > 1e-3


def test_lora_resume_is_exact(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "a", save_every=2))
    with monkeypatch.context() as m:
        original = Trainer._stop_everywhere
        m.setattr(Trainer, "_stop_everywhere", lambda self: True if self.step == 2 else original(self))
        with pytest.raises(TrainingInterrupted):
            api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "b", save_every=2))
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "b", save_every=2, resume=True))
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_lora_with_gradient_checkpointing_gives_the_same_training(tiny_dirs, instruction_file, tmp_path):
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "a", max_steps=2))
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_lora_without_peft_says_how_to_install_it(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails
    with pytest.raises(TrainingError, match=r"pip install 'minillm\[peft\]'"):
        api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "run"))
