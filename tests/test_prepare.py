"""`minillm data prepare`: the paper's sets from fixtures in their public formats, built here in code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minillm.cli import DATA_SETS, run
from minillm.data import InstructionExample, load_instructions
from minillm.data.prepare import SETS, Options, prepare
from minillm.data.templates import build_prompt
from minillm.errors import DataError, MiniLLMError
from minillm.testing import tiny_tokenizer

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


def words(text: str) -> int:
    return len(text.split())


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shared(name: str) -> list[dict]:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return read(path)


# ------------------------------------------------------------------------------ fixtures (public shapes)

def dolly_rows(n: int, long_every: int = 0) -> list[dict]:
    """databricks-dolly-15k.jsonl records; every `long_every`-th has a 120-word context."""
    return [{"instruction": f"Question number {i}?",
             "context": " ".join(["word"] * 120) if long_every and i % long_every == 3 else "",
             "response": f"Answer {i}.", "category": "open_qa"} for i in range(n)]


def selfinst_rows(n: int) -> list[dict]:
    """self-instruct human_eval/user_oriented_instructions.jsonl records (one instance each)."""
    return [{"id": f"user_oriented_task_{i}", "motivation_app": "Grammarly",
             "instruction": f"Fix the grammar of sentence {i}.",
             "instances": [{"input": "he go to school " * (i % 3), "output": f"He goes to school ({i})."}]}
            for i in range(n)]


def vicuna_table(root: Path, n: int = 80, answered: int | None = None) -> Path:
    """FastChat's fastchat/eval/table: question.jsonl and answer/answer_gpt35.jsonl."""
    table = root / "fastchat" / "eval" / "table"
    jsonl(table / "question.jsonl", [{"question_id": i + 1, "text": f"Question {i + 1}?",
                                      "category": ("generic", "fermi", "coding")[i % 3]} for i in range(n)])
    jsonl(table / "answer" / "answer_gpt35.jsonl",
          [{"answer_id": f"a{i + 1}", "question_id": i + 1, "model_id": "gpt-3.5-turbo:20230327",
            "text": f"Answer to question {i + 1}.", "metadata": {}}
           for i in range(n if answered is None else answered)])
    return table / "question.jsonl"


def sni_task(definition: str, outputs: list[list[str]], prefix: str) -> dict:
    """An allenai/natural-instructions task file."""
    return {"Contributors": ["x"], "Source": ["y"], "Categories": ["Title Generation"],
            "Definition": [definition], "Positive Examples": [], "Negative Examples": [],
            "Instances": [{"id": f"{prefix}-{k}", "input": f"Input {k}.", "output": out}
                          for k, out in enumerate(outputs)]}


def sni_checkout(root: Path, tasks: dict[str, dict], listed: list[str] | None = None) -> Path:
    for name, task in tasks.items():
        (root / "tasks").mkdir(parents=True, exist_ok=True)
        (root / "tasks" / f"{name}.json").write_text(json.dumps(task))
    split = root / "splits" / "default" / "test_tasks.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n".join(listed if listed is not None else list(tasks)) + "\n")
    return root


def unni_rows(n: int) -> list[dict]:
    """Unnatural Instructions core_data.jsonl records (one instance each)."""
    return [{"instruction": f"Answer question {i} about the text.",
             "instances": [{"instruction_with_input": f"Answer question {i} about the text.\nText: t{i}",
                            "input": f"Text: t{i}", "constraints": "None.",
                            "output": " ".join(["w"] * (1 + 4 * (i % 4)))}]} for i in range(n)]


# ----------------------------------------------------------------------------------------------- dolly

def test_dolly_filter_then_split_in_file_order(tmp_path):
    src = jsonl(tmp_path / "databricks-dolly-15k.jsonl", dolly_rows(1800, long_every=10))
    report = prepare("dolly", src, tmp_path / "out", Options(count_tokens=words, max_prompt_length=100))
    test, valid, train = (read(tmp_path / "out" / f"{s}.jsonl") for s in ("test", "valid", "train"))
    assert (len(test), len(valid), len(train)) == (500, 1000, 1800 - 180 - 1500)
    kept = [f"dolly-{i}" for i in range(1800) if i % 10 != 3]
    assert [r["id"] for r in test + valid + train] == kept  # file order, long contexts dropped
    assert test[0] == {"instruction": "Question number 0?", "input": "", "output": "Answer 0.",
                       "source": "databricks/databricks-dolly-15k:databricks-dolly-15k.jsonl",
                       "id": "dolly-0", "category": "open_qa"}
    assert "dolly: kept 1620 of 1800; dropped 180 whose prompt (MiniLLM template) is longer than 100 tokens" \
        in report
    assert "test 500 (first 500), valid 1000 (next 1000), train 120 (the rest)" in "\n".join(report)
    examples = load_instructions(str(tmp_path / "out" / "test.jsonl"))
    assert len(examples) == 500 and examples[0].extra == {"source": test[0]["source"], "category": "open_qa"}


def test_dolly_real_records_split_into_dolly_eval_and_dev(tmp_path):
    """DollyEval then the 1,000 validation records, in the released order: the split reproduces both."""
    evaluation, dev = shared("dolly_eval500.jsonl"), shared("dolly_dev1000.jsonl")
    src = jsonl(tmp_path / "databricks-dolly-15k.jsonl",
                [{"instruction": r["instruction"], "context": r["input"], "response": r["output"],
                  "category": r.get("category", "open_qa")} for r in evaluation + dev])
    report = prepare("dolly", src, tmp_path / "out")
    assert [r["instruction"] for r in read(tmp_path / "out" / "test.jsonl")] == \
        [r["instruction"] for r in evaluation]
    assert [r["output"] for r in read(tmp_path / "out" / "valid.jsonl")] == [r["output"] for r in dev]
    assert not (tmp_path / "out" / "train.jsonl").exists()
    assert f"{tmp_path / 'out' / 'train.jsonl'}: no examples, not written" in report
    assert "prompt-length filter off (no --tokenizer): kept all 1500" in report[1]


# -------------------------------------------------------------------------------------------- selfinst

def test_selfinst_one_example_per_instance_and_counts(tmp_path):
    rows = selfinst_rows(251)
    rows[5]["instances"].append({"input": "", "output": "Second answer."})  # 252 instances, as the paper's
    src = jsonl(tmp_path / "user_oriented_instructions.jsonl", rows)
    report = prepare("selfinst", src, tmp_path / "selfinst.jsonl")
    out = read(tmp_path / "selfinst.jsonl")
    assert len(out) == 252 and report[0].startswith("selfinst: 251 instructions, 252 instances")
    assert [r["id"] for r in out[4:8]] == ["user_oriented_task_4", "user_oriented_task_5-0",
                                           "user_oriented_task_5-1", "user_oriented_task_6"]
    assert out[1] == {"instruction": "Fix the grammar of sentence 1.", "input": "he go to school ",
                      "output": "He goes to school (1).", "id": "user_oriented_task_1",
                      "source": "yizhongw/self-instruct:user_oriented_instructions.jsonl",
                      "motivation_app": "Grammarly"}


def test_selfinst_prompt_filter_with_a_real_tokenizer_via_cli(tmp_path, capsys):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    src = jsonl(tmp_path / "user_oriented_instructions.jsonl", selfinst_rows(30))
    lengths = [len(tok.encode(build_prompt(InstructionExample(r["instruction"], r["instances"][0]["input"],
                                                              [], "")), add_special_tokens=False))
               for r in selfinst_rows(30)]
    limit = sorted(lengths)[15]
    assert run(["data", "prepare", "selfinst", str(src), "--out", str(tmp_path / "s.jsonl"),
                "--tokenizer", str(tmp_path / "tok"), "--max-prompt-length", str(limit)]) == 0
    kept = sum(n <= limit for n in lengths)
    assert 0 < kept < 30 and len(read(tmp_path / "s.jsonl")) == kept
    assert f"kept {kept} of 30; dropped {30 - kept}" in capsys.readouterr().out


def test_selfinst_real_seed_tasks_in_the_public_shape(tmp_path):
    seeds = shared("selfinst_seed.jsonl")
    src = jsonl(tmp_path / "user_oriented_instructions.jsonl",
                [{"id": r["id"], "motivation_app": r["name"], "instruction": r["instruction"],
                  "instances": [{"input": r["input"], "output": r["output"]}]} for r in seeds])
    prepare("selfinst", src, tmp_path / "s.jsonl")
    examples = load_instructions(str(tmp_path / "s.jsonl"))
    assert len(examples) == 175 and [e.id for e in examples] == [r["id"] for r in seeds]
    assert [e.outputs for e in examples] == [[r["output"]] for r in seeds]


def test_empty_after_filtering_is_an_error(tmp_path):
    src = jsonl(tmp_path / "user_oriented_instructions.jsonl", selfinst_rows(3))
    with pytest.raises(DataError, match="selfinst: no examples left after filtering .*nothing written"):
        prepare("selfinst", src, tmp_path / "s.jsonl", Options(count_tokens=words, max_prompt_length=5))
    assert not (tmp_path / "s.jsonl").exists()


# ---------------------------------------------------------------------------------------------- vicuna

def test_vicuna_80_questions_with_gpt35_references(tmp_path):
    question = vicuna_table(tmp_path / "FastChat")
    report = prepare("vicuna", tmp_path / "FastChat", tmp_path / "vicuna.jsonl")  # the checkout folder
    out = read(tmp_path / "vicuna.jsonl")
    assert len(out) == 80 and "vicuna: 80 questions with references from answer_gpt35.jsonl" in report[0]
    assert out[1] == {"instruction": "Question 2?", "input": "", "output": "Answer to question 2.",
                      "source": "lm-sys/FastChat:question.jsonl", "id": "2", "category": "fermi",
                      "reference": "answer_gpt35.jsonl:gpt-3.5-turbo:20230327"}
    other = jsonl(tmp_path / "answer_gpt4.jsonl", [{"answer_id": "x", "question_id": i + 1,
                                                    "model_id": "gpt-4", "text": "G", "metadata": {}}
                                                   for i in range(81)])
    report = prepare("vicuna", question, tmp_path / "v4.jsonl", Options(answers=other))
    assert {r["output"] for r in read(tmp_path / "v4.jsonl")} == {"G"} and "1 answers to other" in report[0]
    assert len(load_instructions(str(tmp_path / "v4.jsonl"))) == 80


def test_vicuna_question_without_answer_is_an_error(tmp_path):
    question = vicuna_table(tmp_path, n=80, answered=78)
    with pytest.raises(DataError, match=r"answer_gpt35\.jsonl: no answer to question_id 79, 80 \(2 of 80"):
        prepare("vicuna", question, tmp_path / "vicuna.jsonl")
    assert not (tmp_path / "vicuna.jsonl").exists()


# ------------------------------------------------------------------------------------------------- sni

def test_sni_first_100_instances_per_test_task_in_length_buckets(tmp_path):
    long_ref = "one two three four five six seven eight nine ten eleven twelve"
    tasks = {
        "task1_title": sni_task("Write a title.", [["a b c"], ["a b c d e f g"], [long_ref]] * 40, "task1"),
        "task2_multi": sni_task("Answer.", [["short", long_ref]] * 5, "task2"),  # longest reference counts
        "task3_train_only": sni_task("Not a test task.", [["x"]], "task3"),
    }
    root = sni_checkout(tmp_path / "natural-instructions", tasks, listed=["task1_title", "", "task2_multi"])
    report = prepare("sni", root, tmp_path / "sni")
    buckets = {name: read(tmp_path / "sni" / f"{name}.jsonl") for name in ("0_5", "6_10", "11_")}
    assert [len(rows) for rows in buckets.values()] == [34, 33, 33 + 5]
    assert "sni: 2 test tasks (paper: 119), 125 instances; kept the first 100 per task: 105" in report[0]
    assert "in words (the paper counts tokens: pass --tokenizer): 0_5 34, 6_10 33, 11_ 38" in report[1]
    assert buckets["11_"][-1] == {"instruction": "Answer.", "input": "Input 4.",
                                  "output": ["short", long_ref],
                                  "source": "allenai/natural-instructions:tasks/task2_multi.json",
                                  "id": "task2-4", "task": "task2_multi", "bucket": "11_", "ref_length": 12,
                                  "length_unit": "words"}
    assert max(int(r["id"].split("-")[1]) for r in buckets["0_5"]) == 99  # instances 100.. are not read
    examples = load_instructions(str(tmp_path / "sni" / "11_.jsonl"))
    assert examples[-1].outputs == ["short", long_ref] and examples[-1].extra["task"] == "task2_multi"


def test_sni_real_instances_in_the_public_shape(tmp_path):
    rows = shared("sni_test_partial_first100.jsonl")
    tasks: dict[str, dict] = {}
    for r in rows:
        task = tasks.setdefault(r["task"], {"Definition": [r["instruction"]], "Instances": []})
        task["Instances"].append({"id": r["id"], "input": r["input"], "output": r["output"]})
    prepare("sni", sni_checkout(tmp_path / "ni", tasks), tmp_path / "sni")
    long = read(tmp_path / "sni" / "11_.jsonl")
    # by words only task957 (E2E NLG sentences) has references of >= 11 words: 95 of its first 100
    assert len(long) == 95 and {r["task"] for r in long} == {"task957_e2e_nlg_text_generation_generate"}
    assert sum(len(read(p)) for p in (tmp_path / "sni").glob("*.jsonl")) == 300


@pytest.mark.parametrize("task, message", [
    ({"Instances": []}, r"task1_x\.json: not an S-NI task file .*missing 'Definition'"),
    ({"Definition": ["d"]}, r"missing 'Instances'"),
    ({"Definition": ["d"], "Instances": [{"id": "1", "input": "i", "output": "a string"}]},
     r"Instances\[0\]: field 'output' must be a list"),
    ({"Definition": [], "Instances": []}, "'Definition' must be a non-empty list of strings"),
])
def test_sni_task_file_without_definition_or_instances(tmp_path, task, message):
    good = sni_task("Fine.", [["a"]], "task0")
    root = sni_checkout(tmp_path / "ni", {"task0_ok": good, "task1_x": task})
    with pytest.raises(DataError, match=message):
        prepare("sni", root, tmp_path / "sni")
    assert not (tmp_path / "sni").exists()  # the good task was not written either


def test_sni_missing_task_file_and_not_a_checkout(tmp_path):
    root = sni_checkout(tmp_path / "ni", {"task0_ok": sni_task("Fine.", [["a"]], "t")},
                        listed=["task0_ok", "task9_gone"])
    with pytest.raises(DataError, match=r"test_tasks\.txt:2: test task 'task9_gone' has no file"):
        prepare("sni", root, tmp_path / "sni")
    with pytest.raises(DataError, match="not an allenai/natural-instructions checkout"):
        prepare("sni", tmp_path, tmp_path / "sni")


# ------------------------------------------------------------------------------------------------ unni

def test_unni_seeded_sample_in_length_buckets(tmp_path):
    src = jsonl(tmp_path / "core_data.jsonl", unni_rows(40))
    report = prepare("unni", src, tmp_path / "a", Options(sample_size=20, seed=1))
    prepare("unni", src, tmp_path / "b", Options(sample_size=20, seed=1))
    prepare("unni", src, tmp_path / "c", Options(sample_size=20, seed=2))
    ids = {d: [r["id"] for p in sorted((tmp_path / d).glob("*.jsonl")) for r in read(p)] for d in "abc"}
    assert len(ids["a"]) == 20 and ids["a"] == ids["b"] and ids["a"] != ids["c"]
    assert report[0] == "unni: 40 instances; sampled 20 with seed 1"
    row = read(tmp_path / "a" / "11_.jsonl")[0]  # outputs of 1, 5, 9, 13 words: 13 -> 11_
    assert row["ref_length"] == 13 and row["constraints"] == "None." and row["id"].startswith("unni-")
    assert row["source"] == "orhonovich/unnatural-instructions:core_data.jsonl"
    assert row["input"].startswith("Text")
    small = read(tmp_path / "a" / "0_5.jsonl")
    assert {r["ref_length"] for r in small} == {1, 5} and [r["id"] for r in small] == sorted(
        (r["id"] for r in small), key=lambda i: int(i.split("-")[1]))  # file order kept


def test_unni_real_answers_are_all_short(tmp_path):
    rows = shared("unni_sample1050.jsonl")
    src = jsonl(tmp_path / "core_data.jsonl",
                [{"instruction": r["instruction"],
                  "instances": [{"instruction_with_input": f"{r['instruction']}\n{r['input']}",
                                 "input": r["input"], "constraints": "None.", "output": r["output"]}]}
                 for r in rows])
    report = prepare("unni", src, tmp_path / "unni", Options(sample_size=1000))
    assert len(read(tmp_path / "unni" / "0_5.jsonl")) == 1000  # this sample's answers have 1-2 words
    assert not (tmp_path / "unni" / "11_.jsonl").exists() and "0_5 1000, 6_10 0, 11_ 0" in report[1]


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("set_name, expected", [
    ("dolly", r"a databricks-dolly-15k record \{instruction, context, response, category\}: "
              r"missing 'context'"),
    ("selfinst", r"a Self-Instruct user-oriented record .*missing 'id'"),
    ("vicuna", r"a FastChat question record \{question_id, text, category\}: missing 'question_id'"),
    ("unni", r"an Unnatural Instructions core record .*missing 'instances'"),
])
def test_wrong_format_names_the_format_and_the_first_bad_line(tmp_path, set_name, expected):
    src = jsonl(tmp_path / "question.jsonl",
                [{"instruction": "i", "input": "", "output": "o"}] * 2)  # already the instruction schema
    with pytest.raises(DataError, match=rf"question\.jsonl:1: not {expected}"):
        prepare(set_name, src, tmp_path / "out")
    broken = jsonl(tmp_path / "dolly.jsonl", [dolly_rows(1)[0], dolly_rows(1)[0], "{not json"])
    with pytest.raises(DataError, match=r"dolly\.jsonl:3: not valid JSON .*databricks-dolly-15k record"):
        prepare("dolly", broken, tmp_path / "out")
    bad_instance = jsonl(tmp_path / "u.jsonl",
                         [unni_rows(1)[0], {"instruction": "x", "instances": [{"input": ""}]}])
    with pytest.raises(DataError, match=r"u\.jsonl:2: .*instances\[0\]: missing 'output'"):
        prepare("unni", bad_instance, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_prepare_keeps_the_previous_output(tmp_path):
    out = tmp_path / "vicuna.jsonl"
    out.write_text("previous\n")
    with pytest.raises(DataError, match="no answer"):
        prepare("vicuna", vicuna_table(tmp_path, answered=3), out)
    assert out.read_text() == "previous\n"
    with pytest.raises(DataError, match="is a file, but dolly writes several files: give a folder"):
        prepare("dolly", tmp_path / "x.jsonl", out)
    with pytest.raises(DataError, match="no such file"):
        prepare("dolly", tmp_path / "missing.jsonl", tmp_path / "d")


# ------------------------------------------------------------------------------------------- hub + cli

def test_hub_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"cannot get MiniLLM/sinst .*hub is unreachable or has no such "
                                        r"dataset \(offline mode is on: HF_HUB_OFFLINE is set\)\. "
                                        r"Pass a local file"):
        prepare("sni", "hub", tmp_path / "sni")


def test_hub_copy_is_converted_as_released(monkeypatch, tmp_path):
    from minillm.data import prepare as prepare_module

    copy = tmp_path / "snapshot"
    jsonl(copy / "raw.jsonl", [{"instruction": f"q{i}", "prompt": "P", "input": "", "output": f"a{i}"}
                               for i in range(1003)])
    jsonl(copy / "valid.jsonl",
          [{"instruction": "t", "prompt": "P", "input": "c", "output": "o", "category": "qa"}])
    monkeypatch.setattr(prepare_module, "_hub_snapshot", lambda set_name: copy)
    report = prepare("dolly", "hub", tmp_path / "dolly")
    assert [len(read(tmp_path / "dolly" / f"{s}.jsonl")) for s in ("train", "valid", "test")] == [3, 1000, 1]
    assert read(tmp_path / "dolly" / "test.jsonl")[0] == {
        "instruction": "t", "input": "c", "output": "o", "source": "MiniLLM/dolly:valid.jsonl",
        "id": "valid-0", "category": "qa"}
    assert "as released: train.jsonl 3, valid.jsonl 1000, test.jsonl 1" in report[0]


def test_cli_lists_the_sets_and_refuses_overrides(capsys):
    assert DATA_SETS == SETS
    with pytest.raises(SystemExit):
        run(["data", "prepare", "alpaca", "x", "--out", "y"])
    assert "invalid choice: 'alpaca'" in capsys.readouterr().err
    with pytest.raises(DataError, match="no such file"):
        run(["data", "prepare", "dolly", "missing.jsonl", "--out", "y"])
    with pytest.raises(MiniLLMError, match="takes flags .*not key=value: got seed=3"):
        run(["data", "prepare", "unni", "core_data.jsonl", "--out", "y", "seed=3"])
