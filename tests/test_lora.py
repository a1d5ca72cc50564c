"""LoRA students end to end: only the adapters train, best/ and final/ are plain merged HF folders with the
trained model's logits, exact resume, a clear error without PEFT, gradient checkpointing under PEFT."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import MiniLLMError, TrainingError
from minillm.trainer import Trainer, TrainingInterrupted

pytest.importorskip("peft")

LOGIT_TOL = 1e-5  # fp32: merged W + s*B@A against W x + s*B(A x) differ only in rounding
MINILLM = dict(method="minillm", num_rollouts=4, max_new_tokens=8, ppo_epochs=1, rollout_batch_size=2,
               batch_size=2, max_steps=2, eval_num_prompts=2)


def _cfg(tiny_dirs, instruction_file, out, **kw) -> TrainConfig:
    base = dict(method="sft", student=tiny_dirs["student"], train_data=instruction_file, output_dir=str(out),
                batch_size=4, learning_rate=1e-2, max_steps=4, warmup_steps=1, lr_scheduler="cosine",
                valid_fraction=0.2, max_length=200, max_prompt_length=160, seed=3, lora_r=4, lora_alpha=8)
    if kw.get("method") == "minillm":
        base["teacher"] = tiny_dirs["teacher"]
    base.update(kw)
    return build_config(TrainConfig, None, base)


def _capture(monkeypatch) -> dict:
    """What the trainer holds when training ends (before the final evaluation, merge and save): the PEFT
    student, a copy of its state dict, the parameters the optimiser updates, and the checkpoints resumed
    from."""
    seen: dict = {"loaded": []}
    original, original_load = Trainer.finish, Trainer.load_checkpoint

    def load_checkpoint(self, path):
        seen["loaded"].append(Path(path).name)
        return original_load(self, path)

    def finish(self):
        seen["model"] = self.student
        seen["state"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        seen["optimized"] = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return original(self)

    monkeypatch.setattr(Trainer, "finish", finish)
    monkeypatch.setattr(Trainer, "load_checkpoint", load_checkpoint)
    return seen


def _initial_peft(cfg):
    """The PEFT student exactly as `Trainer.__init__` builds it (same seed for the adapter initialisation)."""
    from minillm.models import apply_lora, load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return apply_lora(load_model(cfg.student, dtype="float32"), cfg)


def _base_key(peft_key: str) -> str:
    """`base_model.model.model.layers.0.mlp.up_proj.base_layer.weight` -> `model.layers.0.mlp.up_proj.weight`
    (the key of the same weight in the plain model)."""
    return peft_key.removeprefix("base_model.model.").replace(".base_layer", "")


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (3, 17), generator=torch.Generator().manual_seed(11))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _plain(folder: Path):
    """`folder` loaded with transformers alone, after checking it is a plain (merged, adapter-free) folder."""
    from transformers import AutoModelForCausalLM

    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not {n for n in names if "adapter" in n}, names  # no adapter_config.json / adapter_model.*
    config_text = (folder / "config.json").read_text().lower()
    assert "peft" not in config_text and "lora" not in config_text
    assert not any("lora" in k or "base_layer" in k for k in load_file(str(folder / "model.safetensors")))
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_modules())
    assert not hasattr(model, "peft_config")
    return model


def _check_lora_run(cfg, seen, run_dir: Path) -> None:
    """The adapters alone trained; final/ (and best/) reload plainly with the trained model's logits."""
    from transformers import AutoModelForCausalLM

    peft_model, trained_state = seen["model"], seen["state"]
    initial = AutoModelForCausalLM.from_pretrained(cfg.student)
    start = initial.state_dict()
    init_peft = _initial_peft(cfg).state_dict()
    assert init_peft.keys() == trained_state.keys()

    # only the LoRA parameters are trainable and handed to the optimiser
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert seen["optimized"] == {id(p) for p in peft_model.parameters() if p.requires_grad}
    # every non-LoRA weight inside the PEFT model is bit-identical to the initial student's
    base = {_base_key(k): v for k, v in trained_state.items() if "lora_" not in k}
    assert base.keys() == start.keys()
    assert all(torch.equal(base[k], start[k]) for k in start)
    # the adapters moved: lora_B away from its zero initialisation, lora_A away from its seeded one
    lora_b = [k for k in trained_state if "lora_B" in k]
    lora_a = [k for k in trained_state if "lora_A" in k]
    assert lora_b and len(lora_a) == len(lora_b)
    assert all(float(init_peft[k].abs().max()) == 0 for k in lora_b)
    assert all(float(trained_state[k].abs().max()) > 0 for k in lora_b)
    assert max(float((trained_state[k] - init_peft[k]).abs().max()) for k in lora_a) > 1e-4

    ids = _ids(initial.config.vocab_size)
    trained = _logits(peft_model, ids)
    final = _plain(run_dir / "final")
    assert final.state_dict().keys() == start.keys()
    torch.testing.assert_close(_logits(final, ids), trained, rtol=LOGIT_TOL, atol=LOGIT_TOL)
    assert float((trained - _logits(initial, ids)).abs().max()) > 1e-3  # the training did something
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == cfg.max_steps
    if summary["best_model"]:
        _plain(Path(summary["best_model"]))


@pytest.mark.parametrize("student", ["student", "gpt2"])  # Llama (nn.Linear) and GPT-2 (Conv1D, tied head)
def test_sft_lora_trains_adapters_only_and_saves_a_plain_merged_model(tiny_dirs, instruction_file, tmp_path,
                                                                     monkeypatch, student):
    seen = _capture(monkeypatch)
    cfg = _cfg(tiny_dirs, instruction_file, tmp_path / "run", student=tiny_dirs[student], eval_every=2)
    best = api.train(cfg)
    _check_lora_run(cfg, seen, tmp_path / "run")
    assert best.name == "best"  # validated at step 2 and at the end: best/ is written (and plain, above)


def test_minillm_lora_runs_and_saves_a_plain_merged_model(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    seen = _capture(monkeypatch)
    cfg = _cfg(tiny_dirs, instruction_file, tmp_path / "run", **MINILLM)
    api.train(cfg)
    _check_lora_run(cfg, seen, tmp_path / "run")
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]


def _interrupt_at(monkeypatch, step: int):
    original = Trainer._stop_everywhere

    def stop(self):
        return True if self.step == step else original(self)

    monkeypatch.setattr(Trainer, "_stop_everywhere", stop)


def _final_state(cfg, monkeypatch, *, interrupt_at: int | None = None) -> dict:
    """Run `cfg` (interrupted after step `interrupt_at` and resumed with resume=true, if given); the PEFT
    student's state dict when training ends."""
    with monkeypatch.context() as m:
        cap = _capture(m)
        if interrupt_at is not None:
            with monkeypatch.context() as stop:
                _interrupt_at(stop, interrupt_at)
                with pytest.raises(TrainingInterrupted):
                    api.train(cfg)
            cfg = dataclasses.replace(cfg, resume=True)
        api.train(cfg)
    assert cap["loaded"] == (["step-0000002"] if cfg.resume else [])  # continued, did not start over
    return cap["state"]


def _assert_same_run(a_dir: Path, a_state: dict, b_dir: Path, b_state: dict) -> None:
    """Bit-exact: the adapters (and the untouched base weights) and the merged final/ weights."""
    assert a_state.keys() == b_state.keys()
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in (a_dir, b_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _checkpoint_holds_adapters(run_dir: Path, step: int) -> None:
    ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
    assert (ckpt / "COMPLETE").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert any("lora_B" in k for k in load_file(str(ckpt / "model.safetensors")))  # the PEFT model's state


def test_lora_resume_after_an_interruption_is_exact(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    def cfg(name):  # cosine with warmup
        return _cfg(tiny_dirs, instruction_file, tmp_path / name, max_steps=4, save_every=2)

    straight = _final_state(cfg("a"), monkeypatch)
    resumed = _final_state(cfg("b"), monkeypatch, interrupt_at=2)
    _checkpoint_holds_adapters(tmp_path / "b", 2)
    _checkpoint_holds_adapters(tmp_path / "b", 4)
    _assert_same_run(tmp_path / "a", straight, tmp_path / "b", resumed)


def test_lora_resume_with_more_steps_is_exact(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    # a finished 2-step run continued to 4 steps (max_steps may change on resume); the constant schedule makes
    # its learning rates those of a 4-step run (a cosine one would follow the new length from step 3 on)
    def cfg(name, steps, **kw):
        return _cfg(tiny_dirs, instruction_file, tmp_path / name, max_steps=steps, save_every=2,
                    lr_scheduler="constant", **kw)

    straight = _final_state(cfg("a", 4), monkeypatch)
    api.train(cfg("b", 2))
    _checkpoint_holds_adapters(tmp_path / "b", 2)
    extended = _final_state(cfg("b", 4, resume=True), monkeypatch)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["steps"] == 4
    _assert_same_run(tmp_path / "a", straight, tmp_path / "b", extended)


def test_lora_checkpoint_refuses_a_full_finetuning_resume(tiny_dirs, instruction_file, tmp_path):
    api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "run", max_steps=2, save_every=2))
    with pytest.raises(TrainingError, match="checkpoint does not match the student"):
        api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "run", max_steps=4, lora_r=0, resume=True))


def test_lora_without_peft_says_how_to_install_it(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` / `from peft import ...` now fail
    with pytest.raises(TrainingError, match=r"lora_r > 0 needs PEFT: pip install 'minillm\[peft\]'") as err:
        api.train(_cfg(tiny_dirs, instruction_file, tmp_path / "run"))
    assert isinstance(err.value, MiniLLMError)  # the CLI prints it without a traceback
    assert not (tmp_path / "run" / "checkpoints").exists()


def _gc_run(tiny_dirs, instruction_file, out: Path, monkeypatch, gc: bool, method: str) -> dict:
    """One 2-step LoRA run; its final PEFT state, losses by step, whether its decoder layers are set to
    checkpoint and how often the (one) decoder layer's MLP ran with gradients enabled (a checkpointed layer
    runs it again in backward)."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.llama.modeling_llama import LlamaMLP

    calls = {"grad": 0}
    original_forward = LlamaMLP.forward

    def counting_forward(self, *args, **kwargs):
        calls["grad"] += torch.is_grad_enabled()
        return original_forward(self, *args, **kwargs)

    extra = MINILLM if method == "minillm" else dict(max_steps=2)
    with monkeypatch.context() as m:
        cap = _capture(m)
        m.setattr(LlamaMLP, "forward", counting_forward)
        api.train(_cfg(tiny_dirs, instruction_file, out, gradient_checkpointing=gc, **extra))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    layers = [mod for mod in cap["model"].modules() if isinstance(mod, GradientCheckpointingLayer)]
    return {"state": cap["state"], "losses": {r["step"]: r["loss"] for r in recs if "loss" in r},
            "checkpointing": [bool(mod.gradient_checkpointing) for mod in layers],
            "grad_forwards": calls["grad"]}


@pytest.mark.parametrize("method", ["sft", "minillm"])  # train_mode True / False (set_train_mode's two paths)
def test_lora_with_gradient_checkpointing_gives_the_same_training(tiny_dirs, instruction_file, tmp_path,
                                                                  monkeypatch, method):
    plain = _gc_run(tiny_dirs, instruction_file, tmp_path / "plain", monkeypatch, False, method)
    ckpt = _gc_run(tiny_dirs, instruction_file, tmp_path / "gc", monkeypatch, True, method)
    assert plain["checkpointing"] == [False] and ckpt["checkpointing"] == [True]
    assert ckpt["losses"].keys() == plain["losses"].keys() == {1, 2}
    assert ckpt["losses"][1] == pytest.approx(plain["losses"][1], abs=1e-5)  # measured: equal
    assert ckpt["losses"][2] == pytest.approx(plain["losses"][2], abs=1e-5)
    # the adapters received the same gradients: the same weights after two steps
    lora = [k for k in plain["state"] if "lora_" in k]
    assert max(float((ckpt["state"][k] - plain["state"][k]).abs().max()) for k in lora) <= 1e-5
    assert all(float(ckpt["state"][k].abs().max()) > 0 for k in lora if "lora_B" in k)
    assert ckpt["grad_forwards"] > plain["grad_forwards"]  # some layer forward was recomputed in backward


@pytest.mark.parametrize("method", ["sft", "minillm"])
def test_gradient_checkpointing_recomputes_every_training_forward(tiny_dirs, instruction_file, tmp_path,
                                                                  monkeypatch, method):
    plain = _gc_run(tiny_dirs, instruction_file, tmp_path / "plain", monkeypatch, False, method)
    ckpt = _gc_run(tiny_dirs, instruction_file, tmp_path / "gc", monkeypatch, True, method)
    assert plain["grad_forwards"] == 2  # one micro-batch per step, two steps, one decoder layer
    assert ckpt["grad_forwards"] == 2 * plain["grad_forwards"]  # each once more, in its backward
