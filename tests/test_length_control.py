"""experiments/table1/length_control.py: Rouge-L at a reference model's answer length, on hand-made files."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from minillm.evaluation.metrics import rouge_l

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "table1" / "length_control.py"
spec = importlib.util.spec_from_file_location("length_control", SCRIPT)
lc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lc)

REFS = {"a": ["the cat sat on the mat"], "b": ["paris is the capital of france", "paris"]}
ANSWERS = {  # model -> seed -> prompt id -> answer
    "sft": {10: {"a": "the cat sat on a rug", "b": "the capital is paris"},
            20: {"a": "a cat sat", "b": "paris"}},
    # the same content as the reference, then a long run-on: cut to sft's length it loses the run-on
    "rambler": {10: {"a": "the cat sat on the mat and then it went on and on about nothing at all",
                     "b": "paris is the capital of france and also of many other things in the world"},
                20: {"a": "the cat sat on the mat forever and ever", "b": "paris paris paris paris"}},
}


def _write(root: Path) -> None:
    for model, seeds in ANSWERS.items():
        for seed, answers in seeds.items():
            for set_name in ("dollyeval", "sni"):
                path = root / "eval" / "rouge" / model / set_name / f"seed{seed}.jsonl"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("".join(json.dumps({"id": k, "response": v, "references": REFS[k],
                                                    "rougeL": 0.0}) + "\n"
                                        for k, v in answers.items()))


def test_truncate_words():
    assert lc.truncate_words("a  b\nc d", 3) == "a b c" and lc.truncate_words("a b", 5) == "a b"
    assert lc.truncate_words("a b", 0) == ""


def test_length_control_against_brute_force(tmp_path):
    _write(tmp_path)
    res = lc.length_control(tmp_path, "sft")
    for set_name in ("dollyeval", "sni"):
        ram, sft = res["rambler"][set_name], res["sft"][set_name]
        assert ram["n"] == 2 and ram["seeds"] == [10, 20]
        # brute force: per prompt, average over seeds of the cut answer's Rouge-L, then the paired difference
        cut = {k: sum(rouge_l(" ".join(ANSWERS["rambler"][s][k].split()[:len(ANSWERS["sft"][s][k].split())]),
                              REFS[k])
                      for s in (10, 20)) / 2 for k in REFS}
        own = {k: sum(rouge_l(ANSWERS["sft"][s][k], REFS[k]) for s in (10, 20)) / 2 for k in REFS}
        diffs = [cut[k] - own[k] for k in REFS]
        assert ram["rougeL_at_ref_length"] == pytest.approx(sum(cut.values()) / 2)
        assert ram["paired_vs_ref"][0] == pytest.approx(sum(diffs) / 2)
        assert ram["paired_vs_ref"][1] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)  # stdev of 2 / sqrt(2)
        full = {k: sum(rouge_l(ANSWERS["rambler"][s][k], REFS[k]) for s in (10, 20)) / 2 for k in REFS}
        assert ram["rougeL"] == pytest.approx(sum(full.values()) / 2)
        # cutting the run-on helps the rambler; the reference model at its own length is unchanged
        assert ram["rougeL_at_ref_length"] > ram["rougeL"]
        assert sft["rougeL_at_ref_length"] == pytest.approx(sft["rougeL"]) and "paired_vs_ref" not in sft
        assert ram["words"] == pytest.approx(sum(len(a.split()) for s in (10, 20)
                                                 for a in ANSWERS["rambler"][s].values()) / 4)
        assert ram["recall"] > ram["precision"] and all(math.isfinite(v) for v in (ram["precision"],
                                                                                   ram["recall"]))
    md = lc.to_markdown(res, "sft")
    assert md.count("| rambler |") == 2 and "cut − sft (paired)" in md


def test_length_control_errors_name_the_missing_files(tmp_path):
    _write(tmp_path)
    with pytest.raises(SystemExit, match="no generations of the reference model 'kd'.*rambler, sft"):
        lc.length_control(tmp_path, "kd")
    (tmp_path / "eval" / "rouge" / "rambler" / "sni" / "seed20.jsonl").unlink()
    with pytest.raises(SystemExit, match=r"rambler/sni/seed20\.jsonl"):
        lc.length_control(tmp_path, "sft")
    assert lc.length_control(tmp_path, "sft", seeds=[10])["rambler"]["sni"]["seeds"] == [10]
    bad = tmp_path / "eval" / "rouge" / "sft" / "sni" / "seed10.jsonl"
    bad.write_text('{"id": "a", "response": "x"}\n')
    with pytest.raises(SystemExit, match=r"seed10\.jsonl:1: not a generation record"):
        lc.length_control(tmp_path, "sft", seeds=[10])
    bad.write_text('{"id": "a", "response": "x", "references": ["x"]}\n{not json\n')
    with pytest.raises(SystemExit, match=r"seed10\.jsonl:2: not valid JSON"):
        lc.length_control(tmp_path, "sft", seeds=[10])
