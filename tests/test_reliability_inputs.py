"""Bad inputs give clear errors and never lose or mix data (issue 22): non-finite numbers, torn `.partial`
records, unusable output paths, colliding model labels, `prune --out` onto foreign files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from conftest import make_instructions, write_jsonl
from minillm.cli import main, run
from minillm.config import (
    EvalConfig,
    GenerateConfig,
    MiniLLMConfig,
    SamplingConfig,
    TrainConfig,
    build_config,
)
from minillm.config.options import nested_groups
from minillm.errors import ConfigError

TRAIN = {"student": "s", "train_data": "d.jsonl"}


def _float_options(cls) -> list[str]:
    """Every float option of `cls`, nested groups as `group.name`."""
    hints = typing.get_type_hints(cls)
    out = [f.name for f in dataclasses.fields(cls) if hints[f.name] is float]
    for head, sub in nested_groups(cls).items():
        sub_hints = typing.get_type_hints(sub)
        out += [f"{head}.{f.name}" for f in dataclasses.fields(sub) if sub_hints[f.name] is float]
    return out


def _base_values(cls, tmp_path) -> dict:
    if cls is GenerateConfig:
        return {"model": "m", "data": "d.jsonl", "output": str(tmp_path / "out.jsonl")}
    if cls is EvalConfig:
        return {"models": "m", "data": "d.jsonl"}
    method = cls.methods[0]
    return {**TRAIN, "method": method, **({"teacher": "t"} if method != "sft" else {})}


def _classes():
    from minillm.config import METHOD_CONFIGS

    return [*dict.fromkeys(METHOD_CONFIGS.values()), GenerateConfig, EvalConfig]


# ------------------------------------------------------------------------------- 1. non-finite numbers

@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_every_float_option_refuses_nan_and_infinity(cls, tmp_path):
    keys = _float_options(cls)
    assert keys, cls
    for key in keys:
        for raw, shown in (("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), (float("nan"), "nan"),
                           (float("-inf"), "-inf")):
            with pytest.raises(ConfigError, match=rf"`{key}` must be a finite number; got {shown}\b"):
                build_config(cls, None, {**_base_values(cls, tmp_path), key: raw})


def test_non_finite_numbers_in_yaml_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: s\ntrain_data: d\nlearning_rate: .nan\n")  # YAML's own NaN, a float
    with pytest.raises(ConfigError, match=r"c\.yaml: `learning_rate` must be a finite number; got nan"):
        build_config(TrainConfig, str(path))
    path.write_text("student: s\ntrain_data: d\nsampling:\n  temperature: .inf\n")
    with pytest.raises(ConfigError, match=r"`sampling.temperature` must be a finite number; got inf"):
        build_config(TrainConfig, str(path))


def test_non_finite_numbers_are_refused_on_direct_construction_too():
    cfg = MiniLLMConfig(**TRAIN, teacher="t", clip_eps=float("inf"))
    with pytest.raises(ConfigError, match=r"`clip_eps` must be a finite number; got inf"):
        cfg.validate()


def test_integer_options_too_large_for_an_integer_are_config_errors():
    for raw in ("1e999", "inf", float("inf")):
        with pytest.raises(ConfigError, match=r"`max_steps` expects int"):
            build_config(TrainConfig, None, {**TRAIN, "max_steps": raw})


def test_cli_refuses_non_finite_numbers_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "minillm.cli", "sft", "student=s", "train_data=d",
                           "learning_rate=nan"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "`learning_rate` must be a finite number; got nan" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["distill", "method=kd", "student=s", "teacher=t", "train_data=d", "--kd_ratio", "nan"],
     "`kd_ratio` must be a finite number; got nan"),
    (["distill", "method=minillm", "student=s", "teacher=t", "train_data=d", "--teacher_mix_alpha", "nan"],
     "`teacher_mix_alpha` must be a finite number; got nan"),
    (["generate", "model=m", "data=d", "output=o.jsonl", "--temperature", "inf"],
     "`sampling.temperature` must be a finite number; got inf"),
    (["evaluate", "models=m", "data=d", "top_p=-inf"], "`sampling.top_p` must be a finite number; got -inf"),
])
def test_cli_commands_exit_2_on_non_finite_numbers(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


# ---------------------------------------------------------------------- 2. generate: resume and paths

@pytest.fixture(scope="module")
def tiny_pair():
    from minillm.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_llama(tok, hidden_size=32, layers=1, seed=2), tok


def _examples(n: int = 8, seed: int = 0):
    from minillm.data import InstructionExample

    return [InstructionExample(instruction=r["instruction"], input=r["input"], outputs=[r["output"]],
                               id=r["id"]) for r in make_instructions(n, seed)]


def _generate(tiny_pair, out, examples=None, seed=0):
    from minillm.generation import generate_file

    model, tok = tiny_pair
    return generate_file(model, tok, examples or _examples(), out, sampling=SamplingConfig(max_new_tokens=4),
                         batch_size=4, seed=seed, model_name="tiny")


@pytest.mark.parametrize("tail", [b'{"instruction": "Tell me ab', b'{"id": "7", "response": "\xe2\x82'],
                         ids=["torn-json", "torn-utf8"])
def test_generate_resume_drops_a_torn_last_record(tiny_pair, tmp_path, caplog, tail):
    full = _generate(tiny_pair, tmp_path / "full.jsonl").read_bytes()
    lines = full.split(b"\n")
    assert len([ln for ln in lines if ln]) == 8
    out = tmp_path / "gen.jsonl"
    # killed (or out of disk) while writing record 8 of 8: 7 whole records and a torn one
    Path(str(out) + ".partial").write_bytes(b"\n".join(lines[:7]) + b"\n" + tail)
    with caplog.at_level("WARNING", logger="minillm"):
        _generate(tiny_pair, out)
    assert out.read_bytes() == full
    assert "dropped 1 record(s)" in caplog.text and "torn or not valid JSON" in caplog.text


def test_generate_resume_drops_records_of_another_job(tiny_pair, tmp_path, caplog):
    full = _generate(tiny_pair, tmp_path / "full.jsonl").read_text()
    other = _generate(tiny_pair, tmp_path / "other.jsonl", seed=9).read_text()  # same ids, other seed
    shuffled = _generate(tiny_pair, tmp_path / "shuffled.jsonl", examples=_examples()[::-1]).read_text()
    for foreign, reason in ((other, "other settings"), (shuffled, "has id '7', expected '0'")):
        out = tmp_path / "gen.jsonl"
        out.unlink(missing_ok=True)
        Path(str(out) + ".partial").write_text(foreign)
        caplog.clear()
        with caplog.at_level("WARNING", logger="minillm"):
            _generate(tiny_pair, out)
        assert out.read_text() == full  # nothing of the other job is kept
        assert "dropped 8 record(s)" in caplog.text and reason in caplog.text


def test_generate_into_a_directory_fails_before_any_work(tmp_path, tiny_pair):
    folder = tmp_path / "outdir"
    folder.mkdir()
    # the model does not exist: the output is checked first, so the error is about the output
    with pytest.raises(ConfigError, match=r"output=.*outdir is a directory.*generations\.jsonl"):
        run(["generate", "model=/does/not/exist", "data=/does/not/exist.jsonl", f"output={folder}"])
    with pytest.raises(ConfigError, match="is a directory"):
        _generate(tiny_pair, folder)
    assert list(folder.iterdir()) == []


def test_generate_output_in_an_unwritable_place_fails_before_any_work(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"file\.txt is a file, so the folder .* cannot be created"):
        run(["generate", "model=/does/not/exist", "data=/does/not/exist.jsonl",
             f"output={blocker / 'sub' / 'gen.jsonl'}"])
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _deny_writes(monkeypatch, read_only)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "model=/does/not/exist", "data=/does/not/exist.jsonl",
              f"output={read_only / 'gen.jsonl'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"cannot write into {read_only}" in err


# ---------------------------------------------------------------------------- 3. evaluate: model labels

def test_colliding_model_labels_are_made_unique_not_dropped():
    from minillm.config.commands import model_labels

    assert model_labels(["a/student", "b/student"]) == {"a-student": "a/student", "b-student": "b/student"}
    assert model_labels(["runs/x/best", "runs/y/best", "z/final"]) == {
        "x-best": "runs/x/best", "y-best": "runs/y/best", "z-final": "z/final"}
    assert model_labels(["p/a/s", "q/a/s"]) == {"p-a-s": "p/a/s", "q-a-s": "q/a/s"}
    assert model_labels(["student=x", "y/student"]) == {"student": "x", "y-student": "y/student"}
    assert model_labels(["gpt2", "a/m"]) == {"gpt2": "gpt2", "m": "a/m"}  # no collision: unchanged
    cfg = build_config(EvalConfig, None, {"models": "a/student,b/student,c/other", "data": "x.jsonl"})
    assert cfg.models == ["a-student=a/student", "b-student=b/student", "c/other"]
    from minillm.api import _model_labels  # what `minillm evaluate` evaluates

    assert _model_labels(cfg.models) == {"a-student": "a/student", "b-student": "b/student",
                                         "other": "c/other"}


@pytest.mark.parametrize("models, message", [
    ("a/s,a/s", r"'a/s' is listed twice"),
    ("n=a,n=b", r"the label 'n' is given to both 'a' and 'b'"),
    ("s,./s", r"'s' and './s' would both be labelled 's'.*name them"),
])
def test_model_labels_that_cannot_be_told_apart_are_refused(models, message):
    with pytest.raises(ConfigError, match=message):
        build_config(EvalConfig, None, {"models": models, "data": "x.jsonl"})


def test_evaluate_two_models_with_the_same_folder_name(tmp_path, tiny_pair):
    model, tok = tiny_pair
    for parent in ("a", "b"):
        model.save_pretrained(tmp_path / parent / "student")
        tok.save_pretrained(tmp_path / parent / "student")
    data = write_jsonl(tmp_path / "set.jsonl", make_instructions(2))
    out = tmp_path / "eval"
    assert run(["evaluate", f"models={tmp_path / 'a' / 'student'},{tmp_path / 'b' / 'student'}",
                f"data={data}", "seeds=1", "max_new_tokens=2", "batch_size=2", f"output_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert sorted(results) == ["a-student", "b-student"]
    assert (out / "a-student" / "set" / "seed1.jsonl").is_file()
    assert (out / "b-student" / "set" / "seed1.jsonl").is_file()


# ----------------------------------------------------------------------------------------- 4. prune --out

@pytest.fixture(scope="module")
def source_model(tmp_path_factory, tiny_pair):
    from minillm.models import save_pretrained_atomic
    from minillm.testing import tiny_llama

    _, tok = tiny_pair
    return str(save_pretrained_atomic(tiny_llama(tok, layers=3), tok, tmp_path_factory.mktemp("src") / "m"))


def _deny_writes(monkeypatch, folder: Path) -> None:
    """`folder` reads as not writable (tests may run as root, for whom a chmod-ed folder stays writable;
    the checks ask os.access)."""
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != folder and real_access(p, mode, **kw))


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_prune_refuses_a_folder_holding_other_files(tmp_path, source_model, capsys):
    from minillm.models import prune_command

    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"not the output of an earlier `minillm prune` \(notes\.txt, "
                                          r"sub/data\.bin\).*Choose a new --out, or move or remove"):
        prune_command(source_model, 2, "spread", str(out))
    # refused before the model is loaded: a missing model is not what is reported
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", "/does/not/exist", "--layers", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not the output of an earlier" in err and "Traceback" not in err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_prune_refuses_a_file(tmp_path, source_model, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"precious")
    with pytest.raises(SystemExit) as exit_:
        main(["prune", "--model", source_model, "--layers", "2", "--out", str(target)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert f"{target} is a file, not a folder" in err and "Choose a new --out" in err
    assert target.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_prune_replaces_only_its_own_output(tmp_path, source_model, capsys):
    from transformers import AutoConfig

    from minillm.models import prune_command

    empty = tmp_path / "empty"
    empty.mkdir()
    assert prune_command(source_model, 1, "first", str(empty)) == empty
    assert AutoConfig.from_pretrained(empty).num_hidden_layers == 1
    out = tmp_path / "student"
    prune_command(source_model, 1, "first", str(out))
    marker = json.loads((out / "prune.json").read_text())
    assert marker["layers"] == 1 and "model.safetensors" in marker["files"]
    prune_command(source_model, 2, "spread", str(out))  # an earlier prune output is replaced
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "student"]  # no temporary folders left
    (out / "my_eval.json").write_text("{}")  # the user adds a file: no longer prune's alone
    before = _tree(out)
    with pytest.raises(ConfigError, match=r"holds files an earlier `minillm prune` did not write \(my_eval"):
        prune_command(source_model, 1, "first", str(out))
    assert _tree(out) == before


def test_prune_into_an_unwritable_place_names_the_path(tmp_path, source_model, monkeypatch):
    from minillm.models import prune_command

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"file\.txt is a file, so the folder .* cannot be created"):
        prune_command(source_model, 1, "first", str(blocker / "out"))
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _deny_writes(monkeypatch, read_only)
    with pytest.raises(ConfigError, match=rf"--out=.*cannot write into {read_only} .*writable --out"):
        prune_command(source_model, 1, "first", str(read_only / "out"))
    assert list(read_only.iterdir()) == []
