"""Evaluation: metrics against their reference implementations, ExAccErr, ECE, the seed runner, reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from minillm.data import load_instructions
from minillm.errors import ConfigError, DataError
from minillm.evaluation import runner
from minillm.evaluation.calibration import (
    evaluate_calibration,
    expected_calibration_error,
    label_word_probabilities,
    reliability_diagram,
)
from minillm.evaluation.exposure_bias import (
    exacc_err_curve,
    measure_exposure_bias,
    plot_exposure_bias,
    prefix_forward_kl,
)
from minillm.evaluation.metrics import (
    distinct_n,
    exact_match,
    mean_and_std,
    normalize_answer,
    rouge_l,
    rouge_l_scores,
)
from minillm.evaluation.report import render_report
from minillm.sampling import SamplingConfig, generate_rollouts
from minillm.testing import tiny_llama, tiny_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared/data folder not available")

PROMPTS = ["### Instruction:\nwrite a story about the cat.\n\n### Response:\n", "Tell me about paris france.",
           "one two three", "the river and the mountain"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# ---------------------------------------------------------------------------------------------- metrics

def _reference_rouge_l(prediction, references):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * max(scorer.score(r, prediction)["rougeL"].fmeasure for r in references)


@needs_data
def test_rouge_l_matches_rouge_score_including_multi_reference_sni():
    cases = [("The cats are running quickly.", ["the cat runs quickly"]),
             ("Paris is the capital of France", ["The capital of France is Paris.", "Paris"]),
             ("", ["something"]),
             ("completely unrelated words", ["nothing shared here"])]
    multi = next(ex for ex in load_instructions(str(DATA / "sni_test_minillm_11plus.jsonl"))
                 if len(ex.outputs) > 1)
    cases.append((multi.outputs[1][: len(multi.outputs[1]) // 2], multi.outputs))
    for prediction, references in cases:
        expected = _reference_rouge_l(prediction, references)
        assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)
    # max over references, not the first one: the truncated second reference scores best against itself
    assert rouge_l(cases[-1][0], multi.outputs) > rouge_l(cases[-1][0], multi.outputs[:1])
    assert rouge_l("the cat", "the cat") == 100.0


def test_rouge_l_precision_recall_by_hand():
    # LCS of "the cat sat on the mat today" and "the cat sat on the mat" is 6 words: P = 6/7, R = 1
    p, r, f = rouge_l_scores("the cat sat on the mat today", "the cat sat on the mat")
    assert (p, r) == (pytest.approx(600 / 7), pytest.approx(100.0)) and f == pytest.approx(100 * 12 / 13)
    # P and R come from the reference with the best F, as rouge_l picks it (here the short second one)
    refs = ["the cat sat on the mat today and every day after that", "the cat sat"]
    p, r, f = rouge_l_scores("the cat sat down", refs)
    assert f == pytest.approx(rouge_l("the cat sat down", refs)) and (p, r) == (pytest.approx(75.0),
                                                                                pytest.approx(100.0))
    assert rouge_l_scores("", "x") == (0.0, 0.0, 0.0)


def test_exact_match_squad_normalisation():
    assert normalize_answer("  The Eiffel   Tower!! ") == "eiffel tower"
    assert exact_match("the Eiffel tower.", ["Louvre", "Eiffel Tower"]) == 100.0
    assert exact_match("An apple", "apple") == 100.0
    assert exact_match("apples", "apple") == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_distinct_n_hand_counted():
    # 4-grams: "a b c d", "b c d e" | "a b c d" | (too short) -> 3 total, 2 distinct
    assert distinct_n(["a b c d e", "a b c d", "x y"], n=4) == pytest.approx(100 * 2 / 3)
    assert distinct_n(["a a a a a a"], n=4) == pytest.approx(100 / 3)
    assert distinct_n(["one two"], n=4) == 0.0
    assert distinct_n(["a b", "a c"], n=1) == pytest.approx(75.0)


def test_mean_and_std():
    assert mean_and_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_and_std([5.0]) == (5.0, 0.0)


# ---------------------------------------------------------------------------------------------- exposure bias

def test_exacc_err_curve_alive_samples_and_cumsum():
    curve = exacc_err_curve([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0])], [torch.tensor([1.0, 1.0])])
    # t=1: mean(1, 3) = 2; t=2: only the first sample is alive -> 2. Teacher side: 1, 1.
    assert curve["R"] == [2.0, 4.0]
    assert curve["epsilon"] == [1.0, 2.0]
    assert curve["exacc_err"] == [100.0, 100.0]
    assert curve["student_alive"] == [2, 1] and curve["length"] == [1, 2]
    assert exacc_err_curve([torch.zeros(3)], [torch.zeros(4)])["exacc_err"] == [0.0, 0.0, 0.0]


def test_prefix_forward_kl_matches_full_forward(tok):
    teacher, student = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    ids = [tok.encode(p) for p in PROMPTS[:3]]
    width = max(map(len, ids))
    prompt_ids = torch.tensor([[tok.eos_token_id] * (width - len(i)) + i for i in ids])
    prompt_mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    rollout = generate_rollouts(student, prompt_ids, prompt_mask, config=SamplingConfig(max_new_tokens=12),
                                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                                generator=torch.Generator().manual_seed(0))
    kls = prefix_forward_kl(student, teacher, rollout, shared_vocab_size=len(tok), chunk_size=5)
    full, mask = rollout.full_sequence()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        lp = torch.log_softmax(teacher(full, attention_mask=mask, position_ids=pos).logits.double(), -1)
        lq = torch.log_softmax(student(full, attention_mask=mask, position_ids=pos).logits.double(), -1)
    expected = (lp.exp() * (lp - lq)).sum(-1)[:, width - 1:-1]
    for b, kl in enumerate(kls):
        assert len(kl) == int(rollout.lengths[b]) > 0
        torch.testing.assert_close(kl.double(), expected[b, :len(kl)], atol=1e-5, rtol=1e-4)


def test_exposure_bias_identical_student_is_zero(tok):
    model = tiny_llama(tok, seed=0)
    curve = measure_exposure_bias(model, tiny_llama(tok, seed=0), tok, PROMPTS, max_new_tokens=16,
                                  samples_per_prompt=2, seed=1)
    assert max(abs(v) for v in curve["exacc_err"]) < 1e-6
    assert curve["num_prompts"] == 4 and len(curve["length"]) >= 2


def test_exposure_bias_prefix_independent_noise_is_small(tok):
    """Head noise changes q everywhere alike, so own vs teacher prefixes make no systematic difference."""
    student = tiny_llama(tok, seed=0)
    with torch.no_grad():
        w = student.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.std())
    curve = measure_exposure_bias(student, tiny_llama(tok, seed=0), tok, PROMPTS, max_new_tokens=24,
                                  samples_per_prompt=8, seed=1)
    assert max(abs(v) for v in curve["exacc_err"]) < 5.0


def test_exposure_bias_self_reinforcing_student_grows(tok, tmp_path):
    """A student that, once it emits token X, keeps emitting X (degenerate repetition): the error lives
    on prefixes the student itself produces, the textbook case of exposure bias."""
    teacher, student = tiny_llama(tok, seed=0), tiny_llama(tok, seed=0)
    x = tok.convert_tokens_to_ids("Z")
    with torch.no_grad():
        v = torch.randn(student.config.hidden_size, generator=torch.Generator().manual_seed(1))
        v /= v.norm()
        student.model.embed_tokens.weight[x] = 10 * v  # dominates the residual stream after X ...
        student.lm_head.weight[x] = 2 * v              # ... so X is predicted again after X
    curve = measure_exposure_bias(student, teacher, tok, PROMPTS, max_new_tokens=32, samples_per_prompt=8,
                                  seed=1)
    err = curve["exacc_err"]
    half = len(err) // 2
    assert err[0] == pytest.approx(0.0, abs=1e-6)  # the first step conditions on the prompt only
    assert min(err[half:]) > 100.0
    assert sum(err[half:]) / (len(err) - half) > sum(err[:half]) / half  # grows with length
    assert plot_exposure_bias(curve, tmp_path / "eb.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- calibration

def test_ece_calibrated_and_overconfident():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(200_000, generator=gen)
    correct = torch.rand(200_000, generator=gen) < conf
    assert expected_calibration_error(conf, correct) < 0.01
    assert expected_calibration_error([0.9] * 10, [1] * 6 + [0] * 4) == pytest.approx(0.3)
    assert expected_calibration_error([1.0, 0.0], [1, 0]) == pytest.approx(0.0)  # edges fall in bins


def test_label_word_probabilities_and_evaluate_calibration(tok, tmp_path):
    model = tiny_llama(tok, seed=0)
    records = [{"instruction": "Is the sentence good or bad?", "input": text, "output": gold,
                "labels": ["good", "bad"], "id": f"s{i}"}
               for i, (text, gold) in enumerate([("the cat is good.", "good"), ("fire and water", "bad"),
                                                 ("a red flower", "good")])]
    path = tmp_path / "cls.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_instructions(str(path))
    result = evaluate_calibration(model, tok, examples, batch_size=2)
    assert result["n"] == 3 and result["label_words"] == ["good", "bad"]
    assert 0.0 <= result["ece"] <= 1.0 and all(0.5 <= c <= 1.0 for c in result["confidences"])

    prompt = "### Response:\n"
    probs = label_word_probabilities(model, tok, [prompt, "one two three " + prompt], ["good", "bad"],
                                     batch_size=2)
    ids = [tok.encode(w)[0] for w in ("good", "bad")]
    with torch.no_grad():
        last = model(torch.tensor([tok.encode(prompt)])).logits[0, -1]
    torch.testing.assert_close(probs[0], torch.softmax(last[ids], -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    reliability_diagram(result["confidences"], result["correct"], tmp_path / "rd.png")
    assert (tmp_path / "rd.png").stat().st_size > 0
    with pytest.raises(DataError, match="not one of the label words"):
        evaluate_calibration(model, tok, examples, ["yes", "no"])


# ------------------------------------------------------------------------------------------ runner + report

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return path


EVAL_KW = {"seeds": (10, 20), "max_new_tokens": 16, "batch_size": 8, "limit": 20, "max_prompt_length": 512}


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_dir):
    if not DATA.is_dir():
        pytest.skip("shared/data folder not available")
    out = tmp_path_factory.mktemp("eval")
    summary = runner.evaluate_models({"tiny": str(tiny_model_dir)}, [str(DATA / "dolly_eval500.jsonl")], out,
                                     **EVAL_KW)
    return out, summary


def test_evaluate_models_writes_results(eval_run):
    out, summary = eval_run
    r = summary["results"]["tiny"]["dolly_eval500"]
    assert r["seeds"] == [10, 20] and r["n"] + r["n_dropped"] == 20 and r["n"] > 0
    files = [out / "tiny" / "dolly_eval500" / f"seed{s}.jsonl" for s in (10, 20)]
    per_seed = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    assert all(len(rows) == r["n"] for rows in per_seed)
    row = per_seed[0][0]
    assert set(row) >= {"id", "prompt", "response", "references", "rougeL", "length"}
    assert row["rougeL"] == pytest.approx(rouge_l(row["response"], row["references"]))
    assert 0 <= row["length"] <= 16
    means = [sum(x["rougeL"] for x in rows) / len(rows) for rows in per_seed]
    assert r["rougeL"]["per_seed"] == pytest.approx(means)
    assert r["rougeL"]["mean"] == pytest.approx(sum(means) / 2)
    assert [x["response"] for x in per_seed[0]] != [x["response"] for x in per_seed[1]]  # seeds differ
    assert json.loads((out / "results.json").read_text()) == summary
    md = (out / "results.md").read_text()
    assert "| tiny |" in md and "dolly_eval500" in md and "no_repeat_ngram_size=0" in md


def test_evaluate_models_resumes_without_regenerating(eval_run, tiny_model_dir, monkeypatch):
    out, summary = eval_run
    calls = []
    real = runner.generate_rollouts
    monkeypatch.setattr(runner, "generate_rollouts", lambda *a, **k: calls.append(1) or real(*a, **k))
    seed10 = out / "tiny" / "dolly_eval500" / "seed10.jsonl"
    mtime = seed10.stat().st_mtime_ns
    again = runner.evaluate_models({"tiny": str(tiny_model_dir)}, [str(DATA / "dolly_eval500.jsonl")], out,
                                   **EVAL_KW)
    assert calls == [] and seed10.stat().st_mtime_ns == mtime and again == summary

    seed10.unlink()  # only the missing (model, set, seed) is regenerated, identically
    third = runner.evaluate_models({"tiny": str(tiny_model_dir)}, [str(DATA / "dolly_eval500.jsonl")], out,
                                   **EVAL_KW)
    n = summary["results"]["tiny"]["dolly_eval500"]["n"]
    assert len(calls) == -(-n // 8) and third == summary

    with pytest.raises(ConfigError, match="max_new_tokens"):
        runner.evaluate_models({"tiny": str(tiny_model_dir)}, [str(DATA / "dolly_eval500.jsonl")], out,
                               **{**EVAL_KW, "max_new_tokens": 8})


def test_generation_file_with_unicode_line_separators_is_complete(tmp_path):
    """A sampled response may hold U+2028 / U+0085 / U+001E: JSONL records are split on "\\n" only (a
    500-record
    S-NI file of the Table 1 run had one, and str.splitlines() cut that record in two)."""
    import json

    rows = [{"id": "a", "response": "one\u2028two\x85three\x1efour\rfive"}, {"id": "b", "response": "ok"}]
    path = tmp_path / "seed10.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert len(path.read_text(encoding="utf-8").splitlines()) > 2  # the trap this test guards against
    assert runner._read_complete(path, ["a", "b"]) == rows
    assert runner._read_complete(path, ["a"]) is None


def test_evaluate_models_rejects_bad_names(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="folder name"):
        runner.evaluate_models({"a/b": str(tiny_model_dir)}, ["x.jsonl"], tmp_path)
    with pytest.raises(ConfigError, match="same set name"):
        runner.evaluate_models({"m": str(tiny_model_dir)}, ["a/x.jsonl", "b/x.jsonl"], tmp_path)


def test_render_report_from_two_runs(eval_run, tmp_path, tok):
    out, summary = eval_run
    second = tmp_path / "run2"
    runner.evaluate_models({"other": (tiny_llama(tok, seed=3), tok)}, [str(DATA / "dolly_eval500.jsonl")],
                           second, **{**EVAL_KW, "seeds": (10,), "limit": 8})
    rows = render_report([out, second], tmp_path / "report.md", tmp_path / "report.png")
    assert set(rows) == {"tiny", "other"}
    md = (tmp_path / "report.md").read_text()
    mean = summary["results"]["tiny"]["dolly_eval500"]["rougeL"]["mean"]
    assert f"| tiny | {mean:.2f} ± " in md and "| other |" in md
    # one seed has no spread: the cell says so instead of a measured-looking "± 0.00"
    assert re.search(r"\| other \| \d+\.\d\d \(1 seed\) \|", md) and "± 0.00" not in md.split("| other |")[1]
    assert (tmp_path / "report.png").stat().st_size > 0
    with pytest.raises(DataError, match="results.json"):
        render_report([tmp_path / "missing"], tmp_path / "r.md", tmp_path / "r.png")


def test_compare_to_teacher_sequence_kls_by_brute_force(tok, instruction_file):
    """Sequence reverse KL = sum over the student's sampled response of log q - log p (full forwards here),
    its
    mean and median over responses; forward KL from the teacher's samples; same per-batch seeds as the
    code."""
    from minillm.data import PromptDataset, collate_prompts
    from minillm.evaluation.sequence_kl import compare_to_teacher
    from minillm.models import position_ids_from_mask

    student = tiny_llama(tok, hidden_size=32, layers=1, seed=2)
    teacher = tiny_llama(tok, hidden_size=48, layers=2, seed=1)
    examples = load_instructions(instruction_file)[:5]
    got = compare_to_teacher({"s": student}, teacher, tok, examples, seeds=(7,), max_new_tokens=6,
                             batch_size=8)

    def seq_logprob(model, r):
        ids, mask = r.full_sequence()
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask,
                           position_ids=position_ids_from_mask(mask)).logits
        lp = logits[:, r.prompt_ids.shape[1] - 1:-1, :len(tok)].float().log_softmax(-1)
        return (lp.gather(2, r.response_ids[..., None]).squeeze(-1) * r.response_mask).sum(1)

    ds = PromptDataset(examples, tok, template="minillm", max_prompt_length=256)
    batch = collate_prompts([ds[i] for i in range(len(ds))], tok.pad_token_id)
    kw = dict(config=SamplingConfig(max_new_tokens=6), eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    s = generate_rollouts(student, batch["input_ids"], batch["attention_mask"],
                          generator=torch.Generator().manual_seed(7 * 100_003 + 1), **kw)
    t = generate_rollouts(teacher, batch["input_ids"], batch["attention_mask"],
                          generator=torch.Generator().manual_seed(7 * 100_003), **kw)
    rkl = seq_logprob(student, s) - seq_logprob(teacher, s)
    fkl = seq_logprob(teacher, t) - seq_logprob(student, t)
    assert got["s"]["reverse_kl"] == pytest.approx(float(rkl.mean()), abs=1e-3)
    # odd count: exact median
    assert got["s"]["reverse_kl_median"] == pytest.approx(float(rkl.median()), abs=1e-3)
    assert got["s"]["forward_kl"] == pytest.approx(float(fkl.mean()), abs=1e-3)
    assert got["s"]["length"] == pytest.approx(float(s.lengths.float().mean()))
    assert got["s"]["ids"] == [ds[i]["id"] for i in range(len(ds))]
    # one seed: the values
    assert got["s"]["per_prompt"]["reverse_kl"] == pytest.approx(rkl.tolist(), abs=1e-3)
    assert sum(got["s"]["per_prompt"]["rougeL"]) / len(ds) == pytest.approx(got["s"]["rougeL"])
    assert set(got["teacher"]["per_prompt"]) == {"rougeL"}


def test_per_prompt_values_average_over_seeds_and_pair(tok, instruction_file):
    from minillm.evaluation.sequence_kl import compare_to_teacher, paired_difference

    student = tiny_llama(tok, hidden_size=32, layers=1, seed=2)
    teacher = tiny_llama(tok, hidden_size=48, layers=2, seed=1)
    examples = load_instructions(instruction_file)[:4]
    kw = dict(max_new_tokens=5, batch_size=8)
    one = [compare_to_teacher({"s": student}, teacher, tok, examples, seeds=(seed,), **kw)["s"]
           for seed in (3, 4)]
    both = compare_to_teacher({"s": student, "same": student}, teacher, tok, examples, seeds=(3, 4), **kw)
    for key in ("rougeL", "reverse_kl"):
        expect = [(a + b) / 2 for a, b in zip(one[0]["per_prompt"][key], one[1]["per_prompt"][key])]
        assert both["s"]["per_prompt"][key] == pytest.approx(expect, abs=1e-4)
        # the same model under the same random numbers: identical samples, a paired difference of exactly 0
        assert paired_difference(both["same"]["per_prompt"][key], both["s"]["per_prompt"][key]) == (0.0, 0.0)


def test_paired_difference_brute_force():
    from minillm.evaluation.sequence_kl import paired_difference

    after, before = [3.0, 5.0, 4.0, 8.0], [1.0, 2.0, 4.0, 5.0]
    diffs = [2.0, 3.0, 0.0, 3.0]
    mean = sum(diffs) / 4
    sd = (sum((d - mean) ** 2 for d in diffs) / 3) ** 0.5
    assert paired_difference(after, before) == pytest.approx((mean, sd / 2))
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0], [1.0, 2.0])


def test_kl_from_generations_by_brute_force(tok, instruction_file, tmp_path):
    """KL from `evaluate_models` files: per record, a full forward of prompt + sampled ids (EOS included)
    under
    student and teacher; reverse KL on the student's file, forward KL on the teacher's; Rouge-L from the
    file."""
    import statistics

    from minillm.data import PromptDataset
    from minillm.evaluation.sequence_kl import kl_from_generations, teacher_self_logprobs

    student = tiny_llama(tok, hidden_size=32, layers=1, seed=2)
    teacher = tiny_llama(tok, hidden_size=48, layers=2, seed=1)
    examples = load_instructions(instruction_file)[:7]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input,
                                        "output": e.outputs[0],
                                        "id": e.id}) + "\n" for e in examples))
    out = tmp_path / "gen"
    runner.evaluate_models({"s": (student, tok), "t": (teacher, tok)}, [str(data)], out, seeds=(3, 4),
                           max_new_tokens=6, batch_size=4, max_prompt_length=512)
    files = {m: {seed: out / m / "set" / f"seed{seed}.jsonl" for seed in (3, 4)} for m in ("s", "t")}
    got = kl_from_generations(student, teacher, tok, examples, files["s"], files["t"], max_prompt_length=512,
                              batch_size=3, name="s")

    ds = PromptDataset(examples, tok, template="minillm", max_prompt_length=512)
    prompts = {str(ds[i]["id"]): ds[i]["prompt_ids"] for i in range(len(ds))}

    def seq_logprob(model, prompt_ids, response_ids):
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            lp = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)
        return float(lp.gather(1, torch.tensor(response_ids)[:, None]).sum())

    rkl, fkl, rouge, lengths = {}, {}, {}, {}
    for seed in (3, 4):
        s_rows = [json.loads(x) for x in files["s"][seed].read_text().splitlines()]
        t_rows = [json.loads(x) for x in files["t"][seed].read_text().splitlines()]
        for r in s_rows:  # the stored ids are what was sampled: they decode to the stored response
            ids = (
                r["response_ids"][:-1] if r["response_ids"][-1:] == [tok.eos_token_id] else r["response_ids"]
            )
            assert tok.decode(ids, skip_special_tokens=True).strip() == r["response"]
        rkl[seed] = [seq_logprob(student, prompts[r["id"]], r["response_ids"])
                     - seq_logprob(teacher, prompts[r["id"]], r["response_ids"]) for r in s_rows]
        fkl[seed] = [seq_logprob(teacher, prompts[r["id"]], r["response_ids"])
                     - seq_logprob(student, prompts[r["id"]], r["response_ids"]) for r in t_rows]
        rouge[seed] = [r["rougeL"] for r in s_rows]
        lengths[seed] = [len(r["response_ids"]) for r in s_rows]
    mean = statistics.mean
    assert got["s"]["reverse_kl"] == pytest.approx(mean([mean(rkl[3]), mean(rkl[4])]), abs=1e-3)
    assert got["s"]["reverse_kl_median"] == pytest.approx(mean([statistics.median(rkl[s]) for s in (3, 4)]),
                                                          abs=1e-3)
    assert got["s"]["forward_kl"] == pytest.approx(mean([mean(fkl[3]), mean(fkl[4])]), abs=1e-3)
    assert got["s"]["rougeL"] == pytest.approx(mean([mean(rouge[3]), mean(rouge[4])]))
    assert got["s"]["length"] == pytest.approx(mean([mean(lengths[3]), mean(lengths[4])]))
    assert got["s"]["per_prompt"]["reverse_kl"] == pytest.approx([(a + b) / 2 for a, b in zip(rkl[3],
                                                                                              rkl[4])],
                                                                 abs=1e-3)
    assert got["s"]["num_seeds"] == 2 and got["s"]["ids"] == [ds[i]["id"] for i in range(len(ds))]
    assert set(got["teacher"]) >= {"rougeL", "length"} and "reverse_kl" not in got["teacher"]

    # the teacher's log p of its own samples, computed once and passed in, is what the call computes itself
    self_logp = teacher_self_logprobs(teacher, tok, examples, files["t"], max_prompt_length=512, batch_size=2)
    for seed in (3, 4):
        t_rows = [json.loads(x) for x in files["t"][seed].read_text().splitlines()]
        assert self_logp[seed] == pytest.approx(
            {r["id"]: seq_logprob(teacher, prompts[r["id"]], r["response_ids"]) for r in t_rows}, abs=1e-3)
    again = kl_from_generations(student, teacher, tok, examples, files["s"], files["t"],
                                max_prompt_length=512,
                                batch_size=3, name="s", teacher_logprobs=self_logp)
    for key in ("reverse_kl", "forward_kl", "rougeL", "length"):
        assert again["s"][key] == pytest.approx(got["s"][key], abs=1e-4), key
    with pytest.raises(ValueError, match="no seed-4 entry"):
        kl_from_generations(student, teacher, tok, examples, files["s"], files["t"], max_prompt_length=512,
                            name="s", teacher_logprobs={3: self_logp[3]})


def test_kl_from_generations_rejects_unusable_files(tok, instruction_file, tmp_path):
    from minillm.evaluation.sequence_kl import kl_from_generations

    model = tiny_llama(tok, hidden_size=32, layers=1, seed=2)
    examples = load_instructions(instruction_file)[:3]
    good = [{"id": e.id, "response": "x", "references": ["x"], "response_ids": [5, 6]} for e in examples]
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "response_ids"}) + "\n"
                           for r in good))
    with pytest.raises(DataError, match="old.jsonl: record 1 has no .*response_ids"):
        kl_from_generations(model, model, tok, examples, {1: old}, {1: good})
    with pytest.raises(DataError, match="no generation for prompt id"):
        kl_from_generations(model, model, tok, examples, {1: good[:2]}, {1: good})
    with pytest.raises(DataError, match="outside the 4 ids"):
        kl_from_generations(model, model, tok, examples, {1: good}, {1: good}, shared_vocab_size=4)
    with pytest.raises(ValueError, match="same non-empty seeds"):
        kl_from_generations(model, model, tok, examples, {1: good}, {2: good})
    same = kl_from_generations(model, model, tok, examples, {1: good}, {1: good})["student"]
    assert same["reverse_kl"] == pytest.approx(0.0, abs=1e-5) and same["forward_kl"] == pytest.approx(0.0,
                                                                                                      abs=1e-5)
