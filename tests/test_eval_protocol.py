"""`minillm evaluate --protocol minillm`: the paper's settings enforced, its sets recognised, the published
Table 1 numbers beside ours (marked as published), and every metric (Rouge-L, exact match, length, Dist-4)
per set as mean ± std over seeds in results.md / results.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from minillm.config import EvalConfig, SamplingConfig, build_config
from minillm.errors import ConfigError
from minillm.evaluation import runner
from minillm.evaluation.metrics import distinct_n, exact_match, mean_and_std, rouge_l
from minillm.evaluation.protocol import SETTINGS, data_notes, recognise_set
from minillm.evaluation.published import PAIRS, SETS, TABLE1, nearest_pair, published_block
from minillm.evaluation.report import format_mean_std
from minillm.testing import tiny_llama, tiny_tokenizer

SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "minillm_spec.md"
SEEDS = (10, 20, 30, 40, 50)
FAST_TOKENS = 8  # generation is cut to this many tokens in these tests, after the config was recorded


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n: int, **extra) -> list[dict]:
    words = "the river is blue and the water is good and the fish are red".split()
    return [{"instruction": f"name the {w} of the city.", "input": "" if i % 2 else "one two",
             "output": [" ".join(words[: 3 + i]), "blue"], "id": f"x{i}", **extra}
            for i, w in enumerate(["capital", "colour", "first", "river", "bird"][:n])]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """A set named by its file stem, one by a `set` field, one by a provenance `source` field."""
    root = tmp_path_factory.mktemp("sets")
    return [_write(root / "dolly.jsonl", _rows(3)),
            _write(root / "answers.jsonl", _rows(2, set="selfinst")),
            _write(root / "prepared.jsonl", _rows(4, source="someone/repo:data/uinst/valid.jsonl@abc"))]


class _Spy:
    """Records the SamplingConfig of every generation, then generates for real but only FAST_TOKENS
    tokens (the protocol's 256 would make the tests slow)."""

    def __init__(self):
        self.configs = []
        self.real = runner.generate_rollouts

    def __call__(self, *args, config, **kw):
        self.configs.append(config)
        return self.real(*args, config=dataclasses.replace(config, max_new_tokens=FAST_TOKENS), **kw)


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory, tok, data_files):
    spy = _Spy()
    mp = pytest.MonkeyPatch()
    mp.setattr(runner, "generate_rollouts", spy)
    out = tmp_path_factory.mktemp("protocol")
    try:
        summary = runner.evaluate_models({"tiny": (tiny_llama(tok, seed=0), tok)}, data_files, out,
                                         protocol="minillm", batch_size=4)
    finally:
        mp.undo()
    return out, summary, spy


# ------------------------------------------------------------------------------------------- settings

def test_protocol_settings_are_applied(protocol_run, data_files):
    out, summary, spy = protocol_run
    assert spy.configs and all(
        (c.temperature, c.top_k, c.top_p, c.max_new_tokens, c.no_repeat_ngram_size, c.greedy)
        == (1.0, 0, 1.0, 256, 0, False) for c in spy.configs)
    # one batch per (set, seed): 3 sets x 5 seeds
    assert len(spy.configs) == 15
    assert summary["protocol"]["name"] == "minillm" and summary["protocol"]["settings"]["seeds"] == [*SEEDS]
    # sets named as in the paper, in Table 1's order, whatever the files are called
    assert list(summary["results"]["tiny"]) == ["dolly", "selfinst", "unni"]
    assert summary["protocol"]["sets"] == dict(zip(["dolly", "selfinst", "unni"], data_files))
    for s in ("dolly", "selfinst", "unni"):
        assert sorted(p.name for p in (out / "tiny" / s).iterdir()) == [f"seed{x}.jsonl" for x in SEEDS]
    record = json.loads((out / "tiny" / "dolly" / "seed10.jsonl").read_text().splitlines()[0])
    assert record["prompt"].startswith("Below is an instruction that describes a task, paired with an input")
    # what cannot be checked by settings is reported: sizes and the >= 11-word subsets
    notes = "\n".join(summary["protocol"]["notes"])
    assert "the paper's DollyEval has 500" in notes and "the paper's SelfInst has 252 or 242" in notes
    assert "unni: 4 of 4 examples have references shorter than 11 words" in notes
    assert "Notes (where this run differs" in (out / "results.md").read_text()


@pytest.mark.parametrize("override, option", [
    ({"temperature": "0.7"}, "sampling.temperature"), ({"top_k": "50"}, "sampling.top_k"),
    ({"top_p": "0.9"}, "sampling.top_p"), ({"max_new_tokens": "128"}, "sampling.max_new_tokens"),
    ({"no_repeat_ngram_size": "6"}, "sampling.no_repeat_ngram_size"), ({"seeds": "1,2,3"}, "seeds"),
    ({"template": "chat"}, "template"), ({"max_prompt_length": "512"}, "max_prompt_length"),
    ({"limit": "10"}, "limit")])
def test_config_refuses_settings_that_contradict_the_protocol(tmp_path, override, option):
    base = {"models": "m", "data": "dolly.jsonl", "output_dir": str(tmp_path / "o"), "protocol": "minillm"}
    with pytest.raises(ConfigError, match=f"`{option}` = .*protocol needs"):
        build_config(EvalConfig, None, {**base, **override}).validate()
    build_config(EvalConfig, None, {**base, "protocol": "none", **override}).validate()  # free without it


def test_config_protocol_defaults_pass_and_other_refusals(tmp_path):
    out = str(tmp_path / "o")
    cfg = EvalConfig(models=["m"], data=["dolly.jsonl"], output_dir=out, protocol="minillm",
                     seeds=[50, 40, 30, 20, 10], published="opt-1.3b")
    cfg.validate()  # the defaults are the paper's; seed order does not matter
    with pytest.raises(ConfigError, match="greedy"):
        EvalConfig(models=["m"], data=["d.jsonl"], output_dir=out, protocol="minillm",
                   sampling=SamplingConfig(greedy=True)).validate()
    with pytest.raises(ConfigError, match="published=llama-7b needs protocol=minillm"):
        EvalConfig(models=["m"], data=["d.jsonl"], output_dir=out, published="llama-7b").validate()
    with pytest.raises(ConfigError, match="`protocol` must be one of none, minillm"):
        build_config(EvalConfig, None, {"models": "m", "data": "d.jsonl", "protocol": "paper"})
    with pytest.raises(ConfigError, match="protocol=minillm needs data"):
        EvalConfig(models=["m"], calibration=["c.jsonl"], output_dir=out, protocol="minillm").validate()
    assert set(SETTINGS) >= {"seeds", "temperature", "top_k", "top_p", "max_new_tokens", "template"}


def test_runner_refuses_contradictions_and_unknown_sets(tmp_path, tok, data_files):
    model = {"tiny": (tiny_llama(tok, seed=0), tok)}
    with pytest.raises(ConfigError, match=r"`temperature` = 0.5 .*`top_p` = 0.9"):
        runner.evaluate_models(model, data_files, tmp_path, protocol="minillm", temperature=0.5, top_p=0.9)
    other = _write(tmp_path / "mine.jsonl", _rows(2))
    with pytest.raises(ConfigError, match="cannot tell which of the paper's test sets"):
        runner.evaluate_models(model, [other], tmp_path, protocol="minillm")
    twice = _write(tmp_path / "dolly_eval.jsonl", _rows(2))
    with pytest.raises(ConfigError, match="both the paper's set 'dolly'"):
        runner.evaluate_models(model, [data_files[0], twice], tmp_path, protocol="minillm")
    assert not list(tmp_path.glob("tiny"))  # refused before anything was generated


def test_recognise_set_by_set_field_stem_and_source(tmp_path):
    assert recognise_set("data/dolly_eval500.jsonl") == "dolly"
    assert recognise_set("sni_test_minillm_11plus.jsonl") == "sni"
    assert recognise_set("MiniLLM/Vicuna") == "vicuna"  # a hub name: its stem
    assert recognise_set(_write(tmp_path / "a.jsonl", _rows(1, set="S-NI"))) == "sni"
    # the `set` field wins over the file name
    assert recognise_set(_write(tmp_path / "dolly.jsonl", _rows(1, set="unni"))) == "unni"
    src = _write(tmp_path / "b.jsonl", _rows(1, source="yizhongw/self-instruct:data/user_oriented.jsonl"))
    assert recognise_set(src) == "selfinst"
    # `minillm data prepare` output: test.jsonl / 11_.jsonl, recognised by the upstream repository in `source`
    for source, expected in (("databricks/databricks-dolly-15k:dolly.jsonl", "dolly"),
                             ("lm-sys/FastChat:question.jsonl", "vicuna"),
                             ("allenai/natural-instructions:tasks/task1.json", "sni"),
                             ("orhonovich/unnatural-instructions:core_data.jsonl", "unni"),
                             ("MiniLLM/uinst:11_/valid.jsonl", "unni")):
        (tmp_path / expected).mkdir(exist_ok=True)
        assert recognise_set(_write(tmp_path / expected / "11_.jsonl", _rows(1, source=source))) == expected
    with pytest.raises(ConfigError, match="`set` field"):
        recognise_set(_write(tmp_path / "c.jsonl", _rows(1, source="my/own/data")))


def test_data_notes_flag_what_is_not_the_papers_split():
    from minillm.data import InstructionExample

    long_ref = " ".join(["word"] * 11)
    exs = [InstructionExample("i", "", [long_ref], "0"),
           InstructionExample("i", "", ["short", long_ref], "1")]
    assert data_notes("sni", exs) == []  # every example has a >= 11-word reference
    assert "1 of 1 examples" in data_notes("unni", [InstructionExample("i", "", ["two words"], "0")])[0]
    assert data_notes("vicuna", exs * 40) == [] and "has 80" in data_notes("vicuna", exs)[0]
    # a `bucket` field (minillm data prepare, lengths in tokens) is trusted over the word count
    short = InstructionExample("i", "", ["two words"], "0", extra={"bucket": "11_"})
    assert data_notes("unni", [short]) == []
    other = InstructionExample("i", "", ["two words"], "0", extra={"bucket": "0_5"})
    assert "length bucket(s) 0_5" in data_notes("sni", [other])[0]


# ------------------------------------------------------------------------------------------- published

def test_published_numbers_appear_marked_as_published(protocol_run):
    out, summary, _ = protocol_run
    block = summary["published"]
    assert block["measured"] is False and block["pair"] == "gpt2-120m"  # tiny model: nearest is GPT-2 120M
    assert "smallest model evaluated" in block["chosen_by"] and "Table 1" in block["source"]
    minillm = next(r for r in block["rows"] if r["method"] == "MiniLLM")
    assert minillm["rougeL"] == {"dolly": 24.6, "selfinst": 13.2, "vicuna": 16.9, "sni": 25.3, "unni": 26.6}
    assert [r["method"] for r in block["rows"]] == ["Teacher", "SFT w/o KD", "KD", "SeqKD", "MiniLLM"]
    md = (out / "results.md").read_text()
    assert "| (published) GPT-2 1.5B Teacher | 27.6 | 14.3 | 31.8 |" in md
    assert "| (published) GPT-2 120M MiniLLM | 24.6 | 13.2 | 26.6 |" in md
    assert "NOT re-measured" in md and "minillm_spec.md" in md
    assert json.loads((out / "results.json").read_text())["published"] == block


def test_published_block_named_or_none_reuses_generations(protocol_run, data_files, tok, monkeypatch,
                                                          tmp_path):
    first, summary, _ = protocol_run
    out = tmp_path / "copy"
    shutil.copytree(first, out)
    monkeypatch.setattr(runner, "generate_rollouts", lambda *a, **k: pytest.fail("regenerated"))
    model = {"tiny": (tiny_llama(tok, seed=0), tok)}
    named = runner.evaluate_models(model, data_files, out, protocol="minillm", batch_size=4,
                                   published="llama-7b")
    assert named["published"]["pair"] == "llama-7b" and named["results"] == summary["results"]
    md = (out / "results.md").read_text()
    assert "| (published) LLaMA 13B Teacher | 29.7 | 23.4 | 38.5 |" in md
    assert "| (published) LLaMA 7B KD | – | 20.2 | – |" in md  # not recovered: a dash, never a guess
    none = runner.evaluate_models(model, data_files, out, protocol="minillm", batch_size=4, published="none")
    assert none["published"] is None and "(published)" not in (out / "results.md").read_text()


def test_nearest_pair_by_student_parameters():
    assert nearest_pair(124_000_000, "gpt2") == "gpt2-120m"
    assert nearest_pair(134_515_008, "llama") == "gpt2-120m"  # SmolLM2-135M: size beats family
    assert nearest_pair(774_000_000) == "gpt2-760m" and nearest_pair(1_400_000_000) == "opt-1.3b"
    assert nearest_pair(6_738_415_616, "llama") == "llama-7b"  # a near-tie decided by the family
    assert nearest_pair(6_700_000_000, "opt") == "opt-6.7b"
    assert published_block("opt-1.3b", "test")["teacher"] == "OPT 13B"


def test_published_table_is_the_spec_table():
    """Every cell of published.TABLE1 equals the spec's Table 1 (§4.5), '–' -> None, '*' dropped."""
    if not SPEC.is_file():
        pytest.skip(f"{SPEC} not available")
    text = SPEC.read_text().split("**Table 1 (partial)**", 1)[1].split("Consistency checks", 1)[0]
    parsed = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 11 or cells[0] not in ("GPT-2", "OPT", "LLaMA") or cells[2] == "(all rows)":
            continue
        parsed[tuple(cells[:3])] = tuple(None if c == "–" else float(c.rstrip("*")) for c in cells[3:])
    assert parsed == TABLE1
    assert {(p.family, p.student) for p in PAIRS.values()} == {k[:2] for k in TABLE1 if k[2] != "Teacher"}
    assert SETS == ("dolly", "selfinst", "vicuna", "sni", "unni")


# ------------------------------------------------------------------------------------------- metrics

def _brute_dist4(texts: list[str]) -> float:
    """Distinct / total word 4-grams by explicit enumeration into a counting dict."""
    counts: dict[str, int] = {}
    for text in texts:
        words = text.split()
        for i in range(len(words)):
            if i + 4 <= len(words):
                key = "\x00".join(words[i:i + 4])
                counts[key] = counts.get(key, 0) + 1
    total = sum(counts.values())
    return 100.0 * len(counts) / total if total else 0.0


def test_dist4_exact_on_a_fixed_text():
    texts = ["the cat sat on the mat and the cat sat on the mat again",
             "the cat sat on the rug", "a b c", "", "  the   cat sat   on  "]
    # 4-grams: text 1 has 11, 8 distinct ("the cat sat on", "cat sat on the", "sat on the mat" twice); text 2
    # adds 3, one new ("sat on the rug"); the last text adds 1, already seen; "a b c" and "" add none
    assert distinct_n(texts, 4) == pytest.approx(_brute_dist4(texts), abs=1e-12)
    assert _brute_dist4(texts) == pytest.approx(100 * 9 / 15)
    assert distinct_n(["w1 w2 w3 w4 w1 w2 w3 w4"], 4) == pytest.approx(100 * 4 / 5)


def test_every_metric_per_set_with_mean_and_std(protocol_run):
    out, summary, _ = protocol_run
    md = (out / "results.md").read_text()
    assert "| model | set | n (dropped) | Rouge-L | exact match | length (tokens) | Dist-4 |" in md
    for set_name, r in summary["results"]["tiny"].items():
        per_seed = [[json.loads(x) for x in (out / "tiny" / set_name / f"seed{s}.jsonl").read_text()
                     .splitlines()] for s in SEEDS]
        expected = {
            "rougeL": [sum(rouge_l(x["response"], x["references"]) for x in rows) / len(rows)
                       for rows in per_seed],
            "exact_match": [sum(exact_match(x["response"], x["references"]) for x in rows) / len(rows)
                            for rows in per_seed],
            "length": [sum(x["length"] for x in rows) / len(rows) for rows in per_seed],
            "dist4": [_brute_dist4([x["response"] for x in rows]) for rows in per_seed],
        }
        for key, values in expected.items():
            stat = r[key]
            assert stat["per_seed"] == pytest.approx(values, abs=1e-9)
            mean, std = mean_and_std(values)
            assert (stat["mean"], stat["std"]) == (pytest.approx(mean), pytest.approx(std))
            assert math.isfinite(stat["std"])
        assert all(0 < x["length"] <= FAST_TOKENS for rows in per_seed for x in rows)
        cells = " | ".join(format_mean_std(r[k]) for k in ("rougeL", "exact_match", "length", "dist4"))
        assert f"| tiny | {set_name} | {r['n']} ({r['n_dropped']}) | {cells} |" in md
        assert " ± " in cells
    assert json.loads((out / "results.json").read_text()) == summary


# ------------------------------------------------------------------------------------------- API + progress

def test_api_evaluate_protocol_logs_the_table(tmp_path, tok, data_files, caplog, capsys, monkeypatch):
    from minillm import api

    model_dir = tmp_path / "student"
    tiny_llama(tok, seed=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    spy = _Spy()
    monkeypatch.setattr(runner, "generate_rollouts", spy)
    cfg = EvalConfig(models=[f"s={model_dir}"], data=data_files[:1], output_dir=str(tmp_path / "ev"),
                     protocol="minillm", published="opt-6.7b")
    with caplog.at_level(logging.INFO, logger="minillm"):
        out = api.evaluate(cfg)
    summary = json.loads((out / "results.json").read_text())
    assert summary["published"]["pair"] == "opt-6.7b" and list(summary["results"]["s"]) == ["dolly"]
    logged = caplog.text
    assert "| s | dolly |" in logged and "(published) OPT 6.7B MiniLLM | 29.0 |" in logged
    assert "Dist-4" in logged
    err = capsys.readouterr().err
    assert "s/dolly/seed50" in err and "batch" in err  # the progress bar (tqdm, on stderr)


def test_exposure_bias_shows_progress(tok, capsys):
    from minillm.evaluation.exposure_bias import measure_exposure_bias

    measure_exposure_bias(tiny_llama(tok, seed=1), tiny_llama(tok, seed=0), tok, ["one two", "the cat"],
                          max_new_tokens=4, batch_size=1)
    err = capsys.readouterr().err
    assert "exposure bias: student samples" in err and "exposure bias: teacher samples" in err
