"""Configs (YAML + overrides, hints, ranges) and the CLI surface."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from minillm.cli import run
from minillm.config import EvalConfig, GenerateConfig, TrainConfig, build_config, save_config
from minillm.errors import ConfigError

BASE = {"student": "s", "train_data": "d.jsonl"}


def test_defaults_follow_the_paper_recipe():
    cfg = build_config(TrainConfig, None, {**BASE, "method": "minillm", "teacher": "t"})
    assert (cfg.teacher_mix_alpha, cfg.clip_eps, cfg.gamma, cfg.ppo_epochs, cfg.num_rollouts) == (0.2, 0.2, 0.95, 4, 256)
    assert (cfg.kd_ratio, cfg.lm_coef, cfg.top_k, cfg.top_p, cfg.temperature) == (0.5, 1.0, 0, 1.0, 1.0)
    assert cfg.single_step and cfg.length_norm and cfg.advantage == "lmops"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "learning_rate": 1e-3, "batch_size": 4, "single_step": "false"}))
    cfg = build_config(TrainConfig, str(path), ["batch_size=2", "--seed=7"])
    assert cfg.learning_rate == 1e-3 and cfg.batch_size == 2 and cfg.seed == 7 and cfg.single_step is False


def test_misspelled_key_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "learnig_rate": 1e-3}))
    with pytest.raises(ConfigError, match=r"c\.yaml.*unknown option `learnig_rate`.*Did you mean `learning_rate`"):
        build_config(TrainConfig, str(path))
    with pytest.raises(ConfigError, match="Did you mean `teacher_mix_alpha`"):
        build_config(TrainConfig, None, {**BASE, "teacher_mix_alfa": 0.1})


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "batch_size` must be >= 1"),
    ({"teacher_mix_alpha": 1.5}, "teacher_mix_alpha` must be <= 0.99"),
    ({"method": "minilm"}, "Did you mean 'minillm'"),
    ({"batch_size": "four"}, "expects int"),
    ({"single_step": "maybe"}, "expects bool"),
    ({"max_prompt_length": 600}, "must be smaller than max_length"),
    ({"method": "kd"}, "needs a teacher"),
    ({"method": "minillm", "teacher": "t", "top_k": 50}, "zero student probability"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, None, {**BASE, **override})


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("student: s\nlearning_rate: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+"):
        build_config(TrainConfig, str(path))


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(TrainConfig, None, {**BASE, "learning_rate": 3e-4})
    path = save_config(cfg, tmp_path)
    again = build_config(TrainConfig, str(path))
    assert again == cfg


def test_list_fields():
    cfg = build_config(EvalConfig, None, {"models": "a,b", "data": "x.jsonl", "seeds": "10,20"})
    assert cfg.models == ["a", "b"] and cfg.seeds == [10, 20]
    with pytest.raises(ConfigError, match="`output` is required"):
        build_config(GenerateConfig, None, {"model": "m", "data": "d"})


def test_cli_help_for_every_command():
    for args in ([], ["sft"], ["distill"], ["generate"], ["evaluate"], ["prune"], ["report"]):
        proc = subprocess.run([sys.executable, "-m", "minillm.cli", *args, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "usage: minillm" in proc.stdout
    out = subprocess.run([sys.executable, "-m", "minillm.cli", "distill", "--help"], capture_output=True,
                         text=True).stdout
    assert "--teacher_mix_alpha" in out and "Teacher-mixed sampling" in out


def test_cli_reports_config_errors_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "minillm.cli", "sft", "student=s", "train_data=d",
                           "lerning_rate=1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Did you mean `learning_rate`" in proc.stderr and "Traceback" not in proc.stderr


def test_distill_requires_a_method():
    from minillm.errors import MiniLLMError

    with pytest.raises(MiniLLMError, match="needs --method"):
        run(["distill", "student=s", "train_data=d", "teacher=t"])


def test_every_shipped_config_parses():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert files
    for path in files:
        data = yaml.safe_load(path.read_text())
        cls = TrainConfig if "method" in data else EvalConfig
        cfg = build_config(cls, str(path))
        assert cfg is not None, path
