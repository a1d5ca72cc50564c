"""Output ownership (issue 22): one run per output folder; nothing a user made is replaced or mixed."""

from __future__ import annotations

import dataclasses
import json

import pytest

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import ConfigError, ModelError
from minillm.models import save_pretrained_atomic
from minillm.ownership import MANIFEST, _lock
from minillm.testing import tiny_llama, tiny_tokenizer


def _cfg(tiny_dirs, instruction_file, out, **kw) -> TrainConfig:
    return build_config(TrainConfig, None, dict(
        method="sft", student=str(tiny_dirs["student"]), train_data=str(instruction_file),
        output_dir=str(out), batch_size=2, max_steps=1, max_length=200, max_prompt_length=160,
        valid_fraction=0.0, **kw))


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_new_run_into_a_finished_run_is_refused_and_overwrite_moves_it_aside(tiny_dirs, instruction_file,
                                                                                tmp_path):
    out = tmp_path / "run"
    api.train(_cfg(tiny_dirs, instruction_file, out))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == "train" and manifest["method"] == "sft"
    assert manifest["inputs"]["train_data"]["blake2b"]
    before = {k: v for k, v in _tree(out).items() if k != ".minillm.lock"}
    with pytest.raises(ConfigError, match=rf"already holds run {manifest['run_id']}.*resume=true.*new "
                                          r"output_dir.*overwrite=true"):
        api.train(_cfg(tiny_dirs, instruction_file, out, learning_rate=1e-3))
    assert {k: v for k, v in _tree(out).items() if k != ".minillm.lock"} == before  # untouched
    api.train(_cfg(tiny_dirs, instruction_file, out, learning_rate=1e-3, overwrite=True))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(moved) == 1
    assert {k: v for k, v in _tree(moved[0]).items() if k != ".minillm.lock"} == before  # nothing deleted
    assert json.loads((out / MANIFEST).read_text())["run_id"] != manifest["run_id"]


def test_a_folder_not_made_by_minillm_is_refused(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for resume in (False, True):
        with pytest.raises(ConfigError, match=r"not empty and was not made by minillm \(notes.txt\)"):
            api.train(_cfg(tiny_dirs, instruction_file, out, resume=resume))
    assert (out / "notes.txt").read_text() == "my notes"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        api.train(_cfg(tiny_dirs, instruction_file, blocker))


def test_two_runs_into_one_folder_at_once_are_refused(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    held = _lock(out)  # another run holds the folder
    try:
        with pytest.raises(ConfigError, match=r"is in use by pid \d+"):
            api.train(_cfg(tiny_dirs, instruction_file, out))
    finally:
        held.close()
    api.train(_cfg(tiny_dirs, instruction_file, out))  # free again


def test_resume_continues_its_own_run(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tiny_dirs, instruction_file, out, save_every=1)
    api.train(cfg)
    run_id = json.loads((out / MANIFEST).read_text())["run_id"]
    api.train(dataclasses.replace(cfg, resume=True, max_steps=2))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["run_id"] == run_id and [s["resume"] for s in manifest["sittings"]] == [False, True]


def test_a_model_save_never_replaces_a_folder_that_is_not_a_model(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    target = tmp_path / "target"
    target.mkdir()
    (target / "results.csv").write_text("1,2")
    with pytest.raises(ModelError, match=r"holds files that are not a model's \(results.csv\)"):
        save_pretrained_atomic(model, tok, target)
    assert (target / "results.csv").read_text() == "1,2"
    save_pretrained_atomic(model, tok, tmp_path / "m")
    save_pretrained_atomic(model, tok, tmp_path / "m")  # a model folder is replaced by the new save
    assert (tmp_path / "m" / "config.json").is_file()


def test_one_writer_per_generation_output_and_evaluation_folder(tmp_path):
    """A second `generate` into the same output, or `evaluate` into the same folder, while the first holds
    it, is refused (they would interleave their records)."""
    from conftest import make_instructions
    from minillm.config import SamplingConfig
    from minillm.data import InstructionExample
    from minillm.evaluation.runner import evaluate_models
    from minillm.generation import generate_file
    from minillm.io import write_jsonl
    from minillm.ownership import file_lock

    tok = tiny_tokenizer()
    model = tiny_llama(tok)
    examples = [InstructionExample(instruction="say hi", input="", outputs=["hi"], id="0")]
    out = tmp_path / "gen.jsonl"
    with file_lock(tmp_path / "gen.jsonl.lock", "another generate"):
        with pytest.raises(ConfigError, match=r"output=.*gen.jsonl is being written by pid \d+"):
            generate_file(model, tok, examples, out, sampling=SamplingConfig(max_new_tokens=2))
    generate_file(model, tok, examples, out, sampling=SamplingConfig(max_new_tokens=2))
    assert out.is_file() and not (tmp_path / "gen.jsonl.lock").exists()
    data = write_jsonl(tmp_path / "set.jsonl", make_instructions(2))
    (tmp_path / "eval").mkdir()
    with file_lock(tmp_path / "eval" / ".minillm.lock", "another evaluate"):
        with pytest.raises(ConfigError, match=r"output_dir=.*eval is being written by pid \d+"):
            evaluate_models({"m": (model, tok)}, [str(data)], tmp_path / "eval", seeds=[1], max_new_tokens=2)


def test_a_run_that_fails_before_writing_leaves_nothing_and_blocks_nothing(tiny_dirs, tmp_path):
    out = tmp_path / "runs" / "run"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    cfg = build_config(TrainConfig, None, dict(method="sft", student=str(tiny_dirs["student"]),
                                               train_data=str(bad), output_dir=str(out), max_steps=1))
    with pytest.raises(Exception, match="bad.jsonl:2"):
        api.train(cfg)
    assert not out.parent.exists()  # the folders it created for its claim are gone again
    out.mkdir(parents=True)
    (out / MANIFEST).write_text("{}")  # a claim left by a run killed before it wrote anything
    with pytest.raises(Exception, match="bad.jsonl:2"):  # is taken over, not refused as another run
        api.train(cfg)
    assert out.is_dir()  # it existed before: left in place
