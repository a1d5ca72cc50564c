"""Every method runs through the same CLI; SeqKD trains on teacher text; evaluate/report end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_data, write_jsonl
from minillm.cli import run

COMMON = ["max_steps=2", "batch_size=4", "max_length=200", "max_prompt_length=160", "valid_fraction=0.2",
          "max_new_tokens=8", "eval_num_prompts=4", "rollout_batch_size=4"]


@pytest.mark.parametrize("method, extra", [
    ("kd", []), ("rkl", []), ("jsd", ["jsd_beta=0.3"]), ("tvd", []), ("skl", []), ("srkl", []),
    ("onpolicy", ["divergence=rkl", "onpolicy_fraction=0.5"]),
    ("minillm", ["num_rollouts=4", "ppo_epochs=1", "advantage=paper", "importance_weight=prefix"]),
])
def test_every_method_trains(tiny_dirs, instruction_file, tmp_path, method, extra):
    out = tmp_path / method
    assert run(["distill", f"method={method}", f"student={tiny_dirs['student']}",
                f"teacher={tiny_dirs['teacher']}",
                f"train_data={instruction_file}", f"output_dir={out}", *COMMON, *extra]) == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "final" / "model.safetensors").exists()


def test_seqkd_trains_on_the_teachers_own_samples(tiny_dirs, instruction_file, tmp_path):
    from minillm.data import load_instructions
    from minillm.generation import generate_file
    from minillm.models import load_model, load_tokenizer
    from minillm.sampling import SamplingConfig

    out = tmp_path / "seqkd"
    assert run(["distill", "method=seqkd", f"student={tiny_dirs['student']}",
                f"teacher={tiny_dirs['teacher']}",
                f"train_data={instruction_file}", f"output_dir={out}", "seed=5", *COMMON]) == 0
    records = [json.loads(x) for x in (out / "seqkd_teacher_data.jsonl").read_text().splitlines()]
    # regenerate with the teacher directly, same seed and settings: identical text, not the dataset's outputs
    examples = load_instructions(instruction_file)
    from minillm.algorithms.common import split_train_valid

    train, _ = split_train_valid(examples, None, 0.2, 5)
    teacher = load_model(tiny_dirs["teacher"])
    tok = load_tokenizer(tiny_dirs["teacher"])
    again = generate_file(teacher, tok, train, tmp_path / "again.jsonl", max_prompt_length=160,
                          sampling=SamplingConfig(max_new_tokens=8), batch_size=4, seed=5)
    expected = [json.loads(x) for x in again.read_text().splitlines()]
    assert [r["response"] for r in records] == [r["response"] for r in expected]
    originals = {e.id: e.outputs[0] for e in train}
    assert sum(r["response"] == originals[r["id"]] for r in records) == 0


def test_generate_is_resumable(tiny_dirs, instruction_file, tmp_path):
    out = tmp_path / "gen.jsonl"
    args = ["generate", f"model={tiny_dirs['student']}", f"data={instruction_file}", f"output={out}",
            "max_new_tokens=6", "batch_size=4", "limit=12", "max_prompt_length=160"]
    assert run(args) == 0
    full = out.read_text()
    # simulate an interruption after the first batch: a partial file with 4 records (+ a torn line)
    lines = full.splitlines()
    out.unlink()
    Path(str(out) + ".partial").write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    assert run(args) == 0
    assert out.read_text() == full
    # a response shorter than the cap stopped at EOS; one at the cap is finished only if its last token
    # was EOS
    for rec in map(json.loads, full.splitlines()):
        assert isinstance(rec["finished"], bool)
        if rec["length"] < 6:
            assert rec["finished"]


def test_evaluate_and_report_on_dollyeval(tiny_dirs, tmp_path):
    dolly = shared_data("dolly_eval500.jsonl")
    out1, out2 = tmp_path / "e1", tmp_path / "e2"
    base = ["evaluate", f"data={dolly}", "limit=20", "seeds=10,20", "max_new_tokens=8", "batch_size=10"]
    assert run(base + [f"models=student={tiny_dirs['student']}", f"output_dir={out1}"]) == 0
    assert run(base + [f"models=gpt2={tiny_dirs['gpt2']}", f"output_dir={out2}", "exposure_bias=true",
                       f"teacher={tiny_dirs['teacher']}"]) == 0
    res = json.loads((out1 / "results.json").read_text())["results"]["student"]["dolly_eval500"]
    assert len(res["rougeL"]["per_seed"]) == 2
    assert (out2 / "exposure_bias.json").exists() and (out2 / "exposure_bias_gpt2.png").exists()
    assert run(["report", str(out1), str(out2), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "student" in table and "gpt2" in table
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_evaluate_sequence_kl(tiny_dirs, tmp_path):
    from minillm.config import EvalConfig, SamplingConfig
    from minillm.errors import ConfigError

    dolly = shared_data("dolly_eval500.jsonl")
    out = tmp_path / "kl"
    assert run(["evaluate", f"data={dolly}", "limit=6", "seeds=10,20", "max_new_tokens=6", "batch_size=6",
                f"models=s={tiny_dirs['student']}", f"teacher={tiny_dirs['teacher']}", "sequence_kl=true",
                f"output_dir={out}"]) == 0
    kl = json.loads((out / "sequence_kl.json").read_text())
    row = kl["results"]["s"]["dolly_eval500"]
    assert kl["seeds"] == [10, 20] and row["num_prompts"] == 5 and row["num_seeds"] == 2  # 1 prompt too long
    assert row["reverse_kl"] > 0 and row["forward_kl"] > 0  # two different random models
    # the teacher was evaluated too (its samples give the forward KL) and is in the Rouge-L table
    assert set(json.loads((out / "results.json").read_text())["results"]) == {"s", "teacher"}
    assert "| s | dolly_eval500 |" in (out / "sequence_kl.md").read_text()
    with pytest.raises(ConfigError, match="temperature"):
        EvalConfig(models=["m"], data=["d"], teacher="t", sequence_kl=True,
                   sampling=SamplingConfig(temperature=0.7)).validate()
    with pytest.raises(ConfigError, match="needs teacher"):
        EvalConfig(models=["m"], data=["d"], sequence_kl=True).validate()


def test_calibration_command(tiny_dirs, tmp_path):
    rows = [{"instruction": f"Is this positive or negative? {t}", "input": "", "output": lab,
             "labels": ["negative", "positive"]} for t, lab in
            [("great fun", "positive"), ("awful", "negative"), ("lovely", "positive"),
             ("bad", "negative")] * 3]
    data = write_jsonl(tmp_path / "sst2_like.jsonl", rows)
    assert run(["evaluate", f"models=s={tiny_dirs['student']}", f"calibration={data}",
                f"output_dir={tmp_path / 'cal'}"]) == 0
    res = json.loads((tmp_path / "cal" / "calibration.json").read_text())["s"]["sst2_like"]
    assert 0.0 <= res["ece"] <= 1.0 and res["n"] == 12
    assert (tmp_path / "cal" / "reliability_s_sst2_like.png").exists()


def test_bad_inputs_get_clear_messages(tiny_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')
    code = None
    try:
        from minillm.cli import main

        main(["sft", f"student={tiny_dirs['student']}", f"train_data={bad}", f"output_dir={tmp_path / 'o'}"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and ":2" in err and "Traceback" not in err
    from minillm.errors import ModelError

    with pytest.raises(ModelError, match="no such folder"):
        run(["sft", "student=./does/not/exist", f"train_data={bad}"])
