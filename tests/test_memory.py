"""Gradient checkpointing works for every method, MiniLLM included (whose updates run in eval mode, no
dropout).

Activation memory is measured exactly: the bytes of the tensors autograd saves for backward during one
micro-batch's loss (`torch.autograd.graph.saved_tensors_hooks`, each storage counted once) - what
checkpointing
is meant to cut - with the loss and the gradients compared against the run without it.
"""

from __future__ import annotations

import pytest
import torch

from minillm.algorithms import build_algorithm
from minillm.algorithms.common import split_train_valid
from minillm.api import load_pair
from minillm.config import TrainConfig, build_config
from minillm.data import load_instructions
from minillm.models import set_train_mode
from minillm.trainer import Trainer


def _trainer(tiny_dirs, instruction_file, out, method: str, checkpointing: bool) -> Trainer:
    values = dict(method=method, student=tiny_dirs["teacher"], teacher=tiny_dirs["teacher"],
                  train_data=instruction_file, output_dir=str(out), batch_size=4, max_steps=2, max_length=200,
                  max_prompt_length=160, valid_fraction=0.2, seed=5, gradient_checkpointing=checkpointing)
    if method == "minillm":
        values.update(num_rollouts=4, max_new_tokens=12, ppo_epochs=1, rollout_batch_size=4)
    if method == "sft":
        values.pop("teacher")
    cfg = build_config(TrainConfig, None, values)
    student, teacher, tokenizer, shared = load_pair(cfg)
    train, valid = split_train_valid(load_instructions(cfg.train_data), None, cfg.valid_fraction, cfg.seed)
    algorithm = build_algorithm(cfg.method, train, valid, cfg)
    return Trainer(cfg, student, tokenizer, algorithm, teacher=teacher, shared_vocab_size=shared)


def _saved_bytes_loss_and_grads(trainer: Trainer):
    torch.manual_seed(0)
    batch = next(trainer.algorithm.micro_batches())
    set_train_mode(trainer.student, trainer.algorithm.train_mode, trainer.cfg.gradient_checkpointing)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = trainer._loss(batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.student.named_parameters() if p.grad is not None}
    return sum(storages.values()), float(out.loss.detach()), grads


@pytest.mark.parametrize("method", ["minillm", "kd", "sft"])
def test_gradient_checkpointing_saves_activation_memory_with_the_same_loss(tiny_dirs, instruction_file,
                                                                             tmp_path, method):
    plain = _saved_bytes_loss_and_grads(_trainer(tiny_dirs, instruction_file, tmp_path / "a", method, False))
    ckpt = _saved_bytes_loss_and_grads(_trainer(tiny_dirs, instruction_file, tmp_path / "b", method, True))
    # the 2-layer model keeps only each layer's input (and the head's inputs) instead of every layer's
    # internals
    assert ckpt[0] < 0.75 * plain[0], (ckpt[0], plain[0])
    assert ckpt[1] == pytest.approx(plain[1], rel=1e-5, abs=1e-6)
    assert plain[2].keys() == ckpt[2].keys() and plain[2]
    for name, g in plain[2].items():
        torch.testing.assert_close(ckpt[2][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_minillm_checkpointing_keeps_dropout_off(tiny_dirs, instruction_file, tmp_path):
    trainer = _trainer(tiny_dirs, instruction_file, tmp_path, "minillm", True)
    set_train_mode(trainer.student, False, True)
    flagged = [m for m in trainer.student.modules() if m.training]
    assert flagged and all(getattr(m, "gradient_checkpointing", False) for m in flagged)
    assert not any(m.training for m in trainer.student.modules() if isinstance(m, torch.nn.Dropout))
