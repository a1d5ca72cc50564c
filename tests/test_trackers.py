"""Experiment trackers through Accelerate's tracker API (`report_to`): TensorBoard by default, W&B offline,
metrics.jsonl alone with `none`, and clear refusals of unknown or uninstalled trackers."""

from __future__ import annotations

import json
import time

import pytest

from minillm import api
from minillm.config import TrainConfig, build_config
from minillm.errors import ConfigError


def _cfg(tiny_dirs, instruction_file, out, **kw) -> TrainConfig:
    base = dict(method="sft", student=tiny_dirs["student"], train_data=instruction_file, output_dir=str(out),
                batch_size=4, learning_rate=1e-2, max_steps=3, valid_fraction=0.2, max_length=200,
                max_prompt_length=160, seed=3)
    base.update(kw)
    return build_config(TrainConfig, None, base)


def _wandb_records(path) -> tuple[dict, tuple, dict, bool]:
    """(history by step, (project, run name), config, whether the exit record was written) of an offline
    W&B run file: a LevelDB-style log (a 7-byte W&B header, then 32 KiB blocks of records with a 7-byte
    header: crc32, length, type) of `wandb_internal_pb2.Record` messages (W&B 0.30 has no Python reader)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, part, history, run, config, ended = 7, b"", {}, None, {}, False
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a record still being written
            break
        part, pos = part + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind not in (1, 4):  # FIRST / MIDDLE pieces of a record spanning blocks
            continue
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(part)
        part, what = b"", rec.WhichOneof("record_type")
        if what == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[int(items["_step"])] = items
        elif what == "run":
            run = (rec.run.project, rec.run.display_name)
        elif what == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        ended |= what == "exit"
    return history, run, config, ended


def _logged_steps(out) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_gets_the_metrics_and_the_config(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it (CI runs this test)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    api.train(_cfg(tiny_dirs, instruction_file, out, report_to="wandb,tensorboard", tracker_project="proj"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    history = list(runs[0].glob("run-*.wandb"))
    assert history and history[0].stat().st_size > 0
    # wandb.finish() returns before W&B's service process has written the whole file: wait for its exit record
    deadline = time.monotonic() + 60
    while not (records := _wandb_records(history[0]))[3] and time.monotonic() < deadline:
        time.sleep(0.2)
    history, run, config, ended = records
    assert ended, "the W&B run file never got its exit record"
    assert run == ("proj", "run")
    metrics: dict[int, dict] = {}  # training and validation records of a step merged, as W&B shows them
    for rec in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        metrics.setdefault(rec["step"], {}).update(rec)
    assert sorted(history) == [1, 2, 3]  # every logged step, with the values metrics.jsonl holds
    for step, values in history.items():
        assert values["loss"] == pytest.approx(metrics[step]["loss"], rel=1e-12)
    assert history[3]["valid_loss"] == pytest.approx(metrics[3]["valid_loss"], rel=1e-12)
    assert config["learning_rate"] == 1e-2 and config["method"] == "sft"
    assert any((out / "tensorboard").iterdir())  # both trackers at once


def test_report_to_none_writes_metrics_jsonl_only(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "run"
    api.train(_cfg(tiny_dirs, instruction_file, out, report_to="none"))
    assert not (out / "tensorboard").exists()
    assert {1, 2, 3} <= set(_logged_steps(out))


@pytest.mark.parametrize("value, message", [
    ("tensorbored", "unknown tracker 'tensorbored'"),
    ("none,wandb", "`none` cannot be combined"),
])
def test_bad_report_to_is_refused(tiny_dirs, instruction_file, tmp_path, value, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tiny_dirs, instruction_file, tmp_path / "run", report_to=value).validate()


def test_uninstalled_tracker_names_the_package(tiny_dirs, instruction_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to=mlflow needs the mlflow package.*pip install mlflow"):
        _cfg(tiny_dirs, instruction_file, tmp_path / "run", report_to="mlflow").validate()
