"""Safe resume: a broken latest checkpoint falls back to the previous intact one (reported, kept), metrics
are not duplicated across a resume (metrics.jsonl and TensorBoard), and a resume refuses a change of what
the run is while applying (for real) what may change."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import ConfigError, TrainingError
from minillm.trainer import Trainer

BASE = dict(method="sft", batch_size=4, learning_rate=1e-2, max_steps=4, save_every=2, warmup_steps=2,
            lr_scheduler="cosine", valid_fraction=0.2, max_length=200, max_prompt_length=160, seed=3)


def _cfg(tiny_dirs, instruction_file, out, **kw) -> TrainConfig:
    values = {**BASE, "student": tiny_dirs["student"], "train_data": instruction_file, "output_dir": str(out)}
    return build_config(TrainConfig, None, {**values, **kw})


@pytest.fixture(scope="module")
def finished(tiny_dirs, instruction_file, tmp_path_factory) -> Path:
    """A finished 4-step sft run with the checkpoints of steps 2 and 4 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    api.train(_cfg(tiny_dirs, instruction_file, out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _steps(run: Path, key: str) -> list[int]:
    return [r["step"] for r in _records(run) if key in r]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _legacy_garbage_weights(ckpt: Path) -> None:  # an old "ok" marker cannot tell: the load error is caught
    (ckpt / "COMPLETE").write_text("ok\n")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x07" * weights.stat().st_size)


CORRUPTIONS = {
    "truncated weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors has"),
    "zero-byte optimizer": (lambda c: (c / "optimizer.bin").write_bytes(b""), "optimizer.bin has 0 bytes"),
    "missing rank file": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "truncated state": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json has"),
    "changed scheduler": (lambda c: _flip_byte(c / "scheduler.bin"), "scheduler.bin changed"),
    "legacy marker, garbage weights": (_legacy_garbage_weights, "does not load"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_broken_latest_checkpoint_falls_back_to_the_previous_intact_one(
        tiny_dirs, instruction_file, tmp_path, finished, caplog, kind):
    run = _copy(finished, tmp_path)
    corrupt, problem = CORRUPTIONS[kind]
    corrupt(run / "checkpoints" / "step-0000004")
    broken_files = sorted(p.name for p in (run / "checkpoints" / "step-0000004").iterdir())
    with caplog.at_level(logging.WARNING, logger="minillm"):
        api.train(_cfg(tiny_dirs, instruction_file, run, resume=True))
    warning = next(r.getMessage() for r in caplog.records if "is broken" in r.getMessage())
    assert "step-0000004" in warning and problem in warning and "resuming from step-0000002" in warning
    aside = run / "checkpoints" / "step-0000004.broken"  # kept (moved aside), not deleted
    assert sorted(p.name for p in aside.iterdir()) == broken_files
    assert (run / "checkpoints" / "step-0000004" / "COMPLETE").exists()  # written again by the resumed run
    # the resumed steps 3-4 redo exactly what the interrupted run did
    a, b = _weights(finished), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(run, "loss") == [1, 2, 3, 4] and _steps(run, "valid_loss") == [4]


def test_no_intact_checkpoint_refuses_and_lists_them(tiny_dirs, instruction_file, tmp_path, finished):
    run = _copy(finished, tmp_path)
    _truncate(run / "checkpoints" / "step-0000004" / "model.safetensors")
    (run / "checkpoints" / "step-0000002" / "optimizer.bin").write_bytes(b"")
    metrics_before = (run / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError, match="no intact checkpoint") as err:
        api.train(_cfg(tiny_dirs, instruction_file, run, resume=True))
    msg = str(err.value)
    assert "step-0000004: model.safetensors has" in msg and "step-0000002: optimizer.bin has 0 bytes" in msg
    assert "new output_dir" in msg
    # nothing deleted or moved, nothing rewritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    assert (run / "metrics.jsonl").read_text() == metrics_before


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_resume_after_a_kill_logs_every_step_once(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = dict(max_steps=6, eval_every=2)
    original = Trainer._stop_everywhere

    def killed_at_3(self):  # like kill -9 after step 3 was logged, before any checkpoint of it
        if self.step == 3:
            raise SystemExit("killed")
        return original(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_stop_everywhere", killed_at_3)
        with pytest.raises(SystemExit):
            api.train(_cfg(tiny_dirs, instruction_file, run, **cfg))
    assert _steps(run, "loss") == [1, 2, 3]
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # a torn last line
    api.train(_cfg(tiny_dirs, instruction_file, run, resume=True, **cfg))
    assert _steps(run, "loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(run, "valid_loss") == [2, 4, 6]
    assert _tensorboard_steps(run, "loss") == [1, 2, 3, 4, 5, 6]  # purge_step hid the killed run's step 3
    assert _tensorboard_steps(run, "valid_loss") == [2, 4, 6]


def test_resuming_a_finished_run_logs_its_final_validation_once(tiny_dirs, instruction_file, tmp_path,
                                                                finished):
    run = _copy(finished, tmp_path)
    api.train(_cfg(tiny_dirs, instruction_file, run, resume=True))  # nothing left to train: validates again
    assert _steps(run, "loss") == [1, 2, 3, 4] and _steps(run, "valid_loss") == [4]
    assert _tensorboard_steps(run, "valid_loss") == [4]
    assert _tensorboard_steps(run, "loss") == [1, 2, 3, 4]


@pytest.mark.parametrize("change, listed", [
    (dict(batch_size=2, gradient_accumulation_steps=2), ["batch_size: 4 (the run) -> 2 (now)",
                                                         "gradient_accumulation_steps: 1 (the run) -> 2"]),
    (dict(seed=4, max_length=128, max_prompt_length=100),
     ["seed: 3", "max_length: 200", "max_prompt_length"]),
    (dict(method="kd", teacher="<teacher>"), ["method: 'sft' (the run) -> 'kd' (now)", "teacher"]),
    (dict(train_data="<other data>"), ["train_data: "]),
])
def test_resume_refuses_a_change_of_what_the_run_is(tiny_dirs, instruction_file, tmp_path, finished, change,
                                                    listed):
    run = _copy(finished, tmp_path)
    other = tmp_path / "other.jsonl"
    other.write_text(Path(instruction_file).read_text())
    change = {k: {"<teacher>": tiny_dirs["teacher"], "<other data>": str(other)}.get(v, v)
              for k, v in change.items()}
    config_before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="cannot change mid-run") as err:
        api.train(_cfg(tiny_dirs, instruction_file, run, resume=True, max_steps=6, **change))
    msg = str(err.value)
    assert all(item in msg for item in listed), msg
    assert "max_steps" not in msg  # may change: not listed
    assert "keep the run's values" in msg and "resume=false and a new output_dir" in msg
    assert (run / "config.yaml").read_text() == config_before  # refused before anything was written
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_resume_applies_and_logs_settings_that_may_change(tiny_dirs, instruction_file, tmp_path, finished,
                                                         caplog):
    run = _copy(finished, tmp_path)
    with caplog.at_level(logging.WARNING, logger="minillm"):
        api.train(_cfg(tiny_dirs, instruction_file, run, resume=True, max_steps=8, log_every=2, eval_every=2,
                       keep_checkpoints=3))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for key, old, new in (("max_steps", 4, 8), ("log_every", 1, 2), ("eval_every", 0, 2),
                          ("keep_checkpoints", 2, 3)):
        assert f"resume: {key} changes from {old} to {new}" in logged
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["max_steps"], saved["log_every"], saved["eval_every"]) == (8, 2, 2)
    assert json.loads((run / "summary.json").read_text())["steps"] == 8
    assert _steps(run, "loss") == [1, 2, 3, 4, 6, 8] and _steps(run, "valid_loss") == [4, 6, 8]


def _lrs_used(monkeypatch) -> dict:
    """step -> (learning rate, weight decay) the optimizer steps with."""
    seen = {}
    original = Trainer._accumulate

    def accumulate(self, batches):
        out = original(self, batches)
        group = self.optimizer.param_groups[0]
        seen[self.step + 1] = (group["lr"], group["weight_decay"])
        return out

    monkeypatch.setattr(Trainer, "_accumulate", accumulate)
    return seen


@pytest.mark.parametrize("lr, weight_decay", [(1e-2, 0.01), (2e-3, 0.1)])  # unchanged / changed
def test_resume_applies_a_changed_learning_rate_for_real(tiny_dirs, instruction_file, tmp_path, finished,
                                                         monkeypatch, lr, weight_decay):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-0000004")  # resume at step 2, in the middle of the schedule
    seen = _lrs_used(monkeypatch)
    api.train(_cfg(tiny_dirs, instruction_file, run, resume=True, learning_rate=lr, weight_decay=weight_decay,
                   lr_scheduler="constant"))
    # constant after the 2 warmup steps: every resumed step runs at the configured rate and weight decay
    assert seen == {3: (pytest.approx(lr, rel=1e-12), weight_decay), 4: (pytest.approx(lr, rel=1e-12),
                                                                           weight_decay)}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["learning_rate"], saved["weight_decay"], saved["lr_scheduler"]) == (lr, weight_decay,
                                                                                      "constant")
    assert [r["lr"] for r in _records(run) if r["step"] in (3, 4) and "lr" in r] == pytest.approx([lr, lr])


def test_a_run_never_deletes_checkpoints_it_did_not_write(tiny_dirs, instruction_file, tmp_path, finished,
                                                          caplog):
    run = _copy(finished, tmp_path)  # a fresh run (no resume) into the folder of a finished one
    old_step2 = (run / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    cfg = _cfg(tiny_dirs, instruction_file, run, max_steps=2, keep_checkpoints=1, seed=5)
    with pytest.raises(ConfigError, match="already holds"):  # refused first by the output's ownership
        api.train(cfg)
    # and below that, the checkpoint layer itself (a Trainer used without `api.train`'s claim)
    with caplog.at_level(logging.WARNING, logger="minillm"):
        api._train(cfg, None)
    ckpts = run / "checkpoints"
    # the old run's step 4 is not pruned (the new run's step 2 is newest of this run, the one it keeps), and
    # its step 2 is moved aside, not replaced
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step-0000002", "step-0000002.replaced", "step-0000004"]
    assert (ckpts / "step-0000002.replaced" / "model.safetensors").read_bytes() == old_step2
    assert (ckpts / "step-0000002" / "model.safetensors").read_bytes() != old_step2
    assert any("not written by this run" in r.getMessage() for r in caplog.records)
