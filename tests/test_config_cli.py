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
    assert (cfg.teacher_mix_alpha, cfg.clip_eps, cfg.gamma, cfg.ppo_epochs, cfg.num_rollouts) == (
        0.2, 0.2, 0.95, 4, 256)
    assert (cfg.kd_ratio, cfg.lm_coef, cfg.sampling.top_k, cfg.sampling.top_p, cfg.sampling.temperature) == (
        0.5, 1.0, 0, 1.0, 1.0)
    assert cfg.single_step and cfg.length_norm and cfg.advantage == "lmops"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "method": "minillm", "teacher": "t", "learning_rate": 1e-3,
                                    "batch_size": 4, "single_step": "false"}))
    cfg = build_config(TrainConfig, str(path), ["batch_size=2", "--seed=7", "num_rollouts=4"])
    assert cfg.learning_rate == 1e-3 and cfg.batch_size == 2 and cfg.seed == 7 and cfg.single_step is False


def test_misspelled_key_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "learnig_rate": 1e-3}))
    with pytest.raises(ConfigError,
                       match=r"c\.yaml.*unknown option `learnig_rate`.*Did you mean `learning_rate`"):
        build_config(TrainConfig, str(path))
    with pytest.raises(ConfigError, match="Did you mean `teacher_mix_alpha`"):
        build_config(TrainConfig, None, {**BASE, "teacher_mix_alfa": 0.1})


@pytest.mark.parametrize("override, message", [
    ({"batch_size": 0}, "batch_size` must be >= 1"),
    ({"method": "minillm", "teacher": "t", "teacher_mix_alpha": 1.5},
     r"teacher_mix_alpha = 1.5 .* in \[0, 1\)"),
    ({"method": "minilm"}, "Did you mean 'minillm'"),
    ({"batch_size": "four"}, "expects int"),
    ({"method": "minillm", "teacher": "t", "single_step": "maybe"}, "expects bool"),
    ({"output_dir": False}, "expects str, got False. YAML reads an unquoted yes / no"),  # not "False/"
    ({"max_prompt_length": 600}, "must be smaller than max_length"),
    ({"method": "kd"}, "needs a teacher"),
    ({"method": "minillm", "teacher": "t", "top_k": 50}, "cannot be used when the teacher is stepped"),
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
        proc = subprocess.run([sys.executable, "-m", "minillm.cli", *args, "--help"], capture_output=True,
                              text=True)
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
    files = sorted(p for p in root.rglob("*.yaml") if p.parent.name != "accelerate")
    assert files
    for path in files:
        data = yaml.safe_load(path.read_text())
        cls = TrainConfig if "method" in data else EvalConfig
        cfg = build_config(cls, str(path))
        assert cfg is not None, path


def test_every_shipped_launch_config_is_an_accelerate_config():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "accelerate").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path


# -------------------------------------------------------------------------------------- per-method configs

ALL_METHODS = ("sft", "kd", "seqkd", "rkl", "jsd", "tvd", "skl", "srkl", "onpolicy", "minillm")


def _train(**kw):
    return build_config(TrainConfig, None, {**BASE, **({} if kw.get("method", "sft") == "sft" else
                                                       {"teacher": "t"}), **kw})


def test_method_picks_its_config_class():
    from minillm.config import MiniLLMConfig, SeqKDConfig, config_class

    for method in ALL_METHODS:
        cfg = _train(method=method)
        assert type(cfg) is config_class(method) and cfg.method == method
        assert isinstance(cfg, TrainConfig)
    assert config_class("sft") is TrainConfig and config_class("minillm") is MiniLLMConfig
    assert config_class("seqkd") is SeqKDConfig
    # TrainConfig(method=...) builds the method's class too (the README's Python example)
    assert type(TrainConfig(method="minillm", student="s", teacher="t")) is MiniLLMConfig
    assert MiniLLMConfig(student="s").method == "minillm"
    with pytest.raises(ConfigError, match="Did you mean 'minillm'"):
        config_class("minilm")
    with pytest.raises(ConfigError, match="method=kd is configured by DistillConfig, not MiniLLMConfig"):
        build_config(MiniLLMConfig, None, {**BASE, "method": "kd", "teacher": "t"})
    with pytest.raises(ConfigError, match="method=kd is configured by DistillConfig"):
        MiniLLMConfig(student="s", teacher="t", train_data="d", method="kd").validate()


def test_each_config_holds_only_its_methods_options():
    import dataclasses

    from minillm.config import DistillConfig, MiniLLMConfig, OnPolicyConfig, SeqKDConfig

    def names(cls):
        return {f.name for f in dataclasses.fields(cls)}

    base = names(TrainConfig)
    assert {"teacher", "kd_ratio", "teacher_mix_alpha", "divergence", "seqkd_data"}.isdisjoint(base)
    assert {"sampling", "rollout_batch_size", "eval_num_prompts", "lora_r"} <= base
    teacher = {"teacher", "teacher_dtype", "teacher_sharding"}
    assert {"fsdp", "fsdp_mixed_precision", "gradient_checkpointing"} <= base
    assert names(SeqKDConfig) - base == teacher | {"seqkd_data"}  # SeqKD ignores kd_ratio
    assert names(DistillConfig) - base == teacher | {"kd_ratio", "jsd_beta", "skew_alpha"}
    onpolicy = {"divergence", "onpolicy_fraction", "jsd_beta", "skew_alpha"}
    assert names(OnPolicyConfig) - base == teacher | onpolicy
    assert {"teacher_mix_alpha", "num_rollouts", "ppo_epochs", "pt_data", "lm_coef", "kd_ratio"} <= names(
        MiniLLMConfig)
    assert {"jsd_beta", "skew_alpha", "divergence", "seqkd_data"}.isdisjoint(names(MiniLLMConfig))


@pytest.mark.parametrize("method, key, owners", [
    ("seqkd", "kd_ratio", ["DistillConfig", "MiniLLMConfig"]),
    ("sft", "teacher", ["DistillConfig", "SeqKDConfig", "OnPolicyConfig", "MiniLLMConfig"]),
    ("kd", "teacher_mix_alpha", ["method=minillm (MiniLLMConfig)"]),
    ("minillm", "divergence", ["method=onpolicy (OnPolicyConfig)"]),
    ("onpolicy", "kd_ratio", ["method=kd/rkl/jsd/tvd/skl/srkl (DistillConfig)"]),
])
def test_an_option_of_another_method_is_refused_with_its_method(method, key, owners):
    with pytest.raises(ConfigError, match=f"option `{key}` does not apply to method={method}") as err:
        build_config(TrainConfig, None, {**BASE, "teacher": "t", "method": method, key: 0.1})
    for owner in owners:
        assert owner in str(err.value)
    from minillm.config import config_class

    with pytest.raises(ConfigError, match=f"option `{key}` does not apply"):  # direct construction too
        config_class(method)(**{key: 0.1})


def test_typo_of_another_methods_option_names_that_method():
    with pytest.raises(ConfigError, match=r"Did you mean `teacher_mix_alpha` \(an option of method=minillm"):
        _train(method="kd", teacher_mix_alfa=0.1)
    with pytest.raises(ConfigError, match="Did you mean `sampling.temperature`"):
        _train(temprature=0.5)


def test_teacher_mix_alpha_is_in_zero_one():
    # one rule, validate_teacher_mix_alpha: [0, 1) (the old range check stopped at 0.99, the sampler at 1)
    for ok in (0.0, 0.2, 0.99, 0.995):
        assert _train(method="minillm", teacher_mix_alpha=ok).teacher_mix_alpha == ok
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"teacher_mix_alpha = .* is invalid: it must be in \[0, 1\)"):
            _train(method="minillm", teacher_mix_alpha=bad)


def test_truncated_sampling_is_refused_with_the_teacher_in_the_loop():
    for method in ("minillm", "onpolicy"):
        with pytest.raises(ConfigError, match=f"method={method}: sampling.top_k = 0 / sampling.top_p = 0.9"):
            _train(method=method, top_p=0.9)
    assert _train(method="kd", top_k=5).sampling.top_k == 5  # validation samples only the student


# -------------------------------------------------------------------------------------- the sampling group

def test_flat_dotted_and_nested_sampling_names():
    from minillm.config import SamplingConfig

    flat = _train(method="minillm", temperature=1.2, max_new_tokens=8)
    dotted = build_config(TrainConfig, None, [*(f"{k}={v}" for k, v in BASE.items()), "method=minillm",
                                              "teacher=t", "sampling.temperature=1.2",
                                              "--sampling.max-new-tokens=8"])
    nested = _train(method="minillm", sampling={"temperature": 1.2, "max_new_tokens": 8})
    given = _train(method="minillm", sampling=SamplingConfig(temperature=1.2, max_new_tokens=8))
    assert flat == dotted == nested == given
    assert flat.sampling == SamplingConfig(max_new_tokens=8, temperature=1.2)
    gen = build_config(GenerateConfig, None, {"model": "m", "data": "d", "output": "o", "greedy": "true",
                                              "no_repeat_ngram_size": 3, "top_k": 5, "top_p": 0.9})
    assert gen.sampling == SamplingConfig(greedy=True, no_repeat_ngram_size=3, top_k=5, top_p=0.9)
    ev = build_config(EvalConfig, None, {"models": "a", "data": "x.jsonl", "temperature": 0.7,
                                         "no_repeat_ngram_size": 2})
    assert (ev.sampling.temperature, ev.sampling.no_repeat_ngram_size) == (0.7, 2)
    with pytest.raises(ConfigError, match=r"command line: sampling.top_p = 0.0 is invalid"):
        build_config(EvalConfig, None, {"models": "a", "data": "x.jsonl", "top_p": 0})
    with pytest.raises(ConfigError, match="`sampling.top_k` expects int"):
        build_config(EvalConfig, None, {"models": "a", "data": "x.jsonl", "top_k": "many"})
    with pytest.raises(ConfigError, match=r"pass sampling=SamplingConfig\(temperature=\.\.\.\)"):
        EvalConfig(models=["a"], data=["x"], temperature=0.7)


def test_later_sources_win_over_every_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**BASE, "method": "kd", "teacher": "t", "temperature": 0.5,
                                    "sampling": {"top_k": 3, "max_new_tokens": 9}}))
    cfg = build_config(TrainConfig, str(path), ["sampling.temperature=0.8", "top_k=4"])
    assert (cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.max_new_tokens) == (0.8, 4, 9)


@pytest.mark.parametrize("cls, values, key, command", [
    (EvalConfig, {"models": "a", "data": "x.jsonl"}, "greedy", "`minillm evaluate`"),
    (EvalConfig, {"models": "a", "data": "x.jsonl"}, "sampling.greedy", "`minillm evaluate`"),
    (TrainConfig, BASE, "greedy", "method=sft"),
    (TrainConfig, {**BASE, "method": "minillm", "teacher": "t"}, "no_repeat_ngram_size", "method=minillm"),
])
def test_sampling_options_a_command_does_not_take_are_refused(cls, values, key, command):
    with pytest.raises(ConfigError, match=f"`{key}` does not apply to {command}"):
        build_config(cls, None, {**values, key: "1"})


def test_refused_sampling_options_are_checked_on_direct_construction_too():
    from minillm.config import SamplingConfig

    with pytest.raises(ConfigError, match="`sampling.greedy` does not apply to `minillm evaluate`"):
        EvalConfig(models=["a"], data=["x"], sampling=SamplingConfig(greedy=True)).validate()


def test_sequence_kl_needs_plain_sampling():
    for key, value in (("temperature", 0.7), ("top_k", 5), ("top_p", 0.9), ("no_repeat_ngram_size", 3)):
        with pytest.raises(ConfigError, match=f"sequence_kl=true .* plain sampling.*'{key}'"):
            build_config(EvalConfig, None, {"models": "a", "data": "x", "teacher": "t", "sequence_kl": "true",
                                            key: value})
    assert build_config(EvalConfig, None, {"models": "a", "data": "x", "teacher": "t", "sequence_kl": "true",
                                           "max_new_tokens": 7}).sampling.max_new_tokens == 7


@pytest.mark.parametrize("cls, values", [
    (TrainConfig, {**BASE, "method": "minillm", "teacher": "t", "temperature": 1.2, "max_new_tokens": 8,
                   "teacher_mix_alpha": 0.1}),
    (TrainConfig, {**BASE, "method": "seqkd", "teacher": "t", "seqkd_data": "s.jsonl", "top_k": 4}),
    (GenerateConfig, {"model": "m", "data": "d", "output": "o", "greedy": True, "no_repeat_ngram_size": 3}),
    (EvalConfig, {"models": "a,b", "data": "x.jsonl", "top_p": 0.9, "seeds": "1,2"}),
])
def test_saved_config_is_nested_and_reads_back_identically(tmp_path, cls, values):
    cfg = build_config(cls, None, values)
    path = save_config(cfg, tmp_path)
    data = yaml.safe_load(path.read_text())
    assert isinstance(data["sampling"], dict) and "temperature" not in data
    for refused in getattr(cfg, "refused", {}):
        assert refused.split(".")[1] not in data["sampling"]  # options the command does not take: not written
    again = build_config(cls, str(path))
    assert again == cfg and type(again) is type(cfg)


def test_help_lists_sampling_and_per_method_options():
    def help_of(command):
        proc = subprocess.run([sys.executable, "-m", "minillm.cli", command, "--help"], capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    distill, sft, evaluate, generate = (help_of(c) for c in ("distill", "sft", "evaluate", "generate"))
    for text in (distill, sft, evaluate, generate):
        assert "--sampling.temperature" in text and "--temperature" in text and "--max_new_tokens" in text
    assert "options of method=minillm (MiniLLMConfig)" in distill and "options of method=seqkd" in distill
    assert "--teacher " in distill and "--teacher " not in sft and "--kd_ratio" not in sft
    assert "--greedy" in generate and "--greedy" not in evaluate and "--greedy" not in distill
    assert "--no_repeat_ngram_size" in evaluate and "--no_repeat_ngram_size" not in distill


def test_help_texts_are_true():
    import dataclasses

    from minillm.config import DistillConfig, MiniLLMConfig

    def help_of(cls, name):
        return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["help"]

    assert "seqkd" not in help_of(DistillConfig, "kd_ratio")  # SeqKD ignores kd_ratio
    assert "L_PT" in help_of(MiniLLMConfig, "kd_ratio")
    assert "[0, 1)" in help_of(MiniLLMConfig, "teacher_mix_alpha")


def test_cli_flags_reach_the_sampling_group(monkeypatch):
    from minillm import api

    seen = []
    monkeypatch.setattr(api, "generate", lambda cfg: seen.append(cfg) or "out.jsonl")
    assert run(["generate", "model=m", "data=d", "output=o", "sampling.top_k=3", "--temperature", "0.7",
                "--no-repeat-ngram-size=2", "--greedy"]) == 0
    s = seen[0].sampling
    assert (s.temperature, s.greedy, s.top_k, s.no_repeat_ngram_size) == (0.7, True, 3, 2)
