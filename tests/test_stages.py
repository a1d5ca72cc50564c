"""minillm.stages.Stages: a finished stage is skipped and read back, by its marker or by its own output."""

from __future__ import annotations

import json
import logging

from minillm.stages import Stages


def test_marker_stage_runs_once_and_reads_back(tmp_path, caplog):
    calls = []

    def work():
        calls.append(1)
        return {"answer": 42, "path": tmp_path}

    with caplog.at_level(logging.INFO, logger="minillm"):
        first = Stages(tmp_path / "stages").run("data", work)
        again = Stages(tmp_path / "stages")
        second = again.run("data", work)
    assert first["answer"] == 42 and calls == [1]
    assert second == {"answer": 42, "path": str(tmp_path)}  # the marker holds JSON (default=str)
    assert again.skipped == ["data"] and again.ran == []
    marker = json.loads((tmp_path / "stages" / "data.json").read_text())
    assert set(marker) == {"seconds", "info"} and marker["seconds"] >= 0
    assert (
        "run data" in caplog.text and f"skip data (marker {tmp_path / 'stages' / 'data.json'})" in caplog.text
    )
    assert list(again.marker_seconds()) == ["data"]


def test_a_stage_that_fails_leaves_no_marker(tmp_path):
    stages = Stages(tmp_path)

    def boom():
        raise RuntimeError("died midway")

    try:
        stages.run("train", boom)
    except RuntimeError:
        pass
    assert not stages.done("train") and not (tmp_path / "train.json").exists()
    assert stages.run("train", lambda: 1) == 1 and stages.ran == ["train"]


def test_output_stage_is_skipped_when_its_output_exists(tmp_path):
    out = tmp_path / "summary.json"
    stages = Stages()  # no markers: a stage is done when its own output exists
    assert stages.run("init", lambda: out.write_text("{}") and "trained", output=out,
                      cached=lambda: "read") == "trained"
    assert stages.run("init", lambda: "trained again", output=out, cached=lambda: "read") == "read"
    assert stages.ran == ["init"] and stages.skipped == ["init"] and set(stages.seconds) == {"init"}
    assert stages.run("report", lambda: "always") == "always"  # neither output nor markers: always runs


def test_drop_stale_removes_a_marker_whose_result_no_longer_fits(tmp_path):
    stages = Stages(tmp_path)
    stages.run("eval", lambda: {"seeds": [10]})
    stages.drop_stale("eval", lambda info: info["seeds"] != [10])
    assert stages.done("eval")
    stages.drop_stale("eval", lambda info: info["seeds"] != [10, 20])
    assert not stages.done("eval")
