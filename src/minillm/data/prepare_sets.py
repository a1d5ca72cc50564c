"""The paper's five instruction sets, read from the files they are published in (`minillm data prepare`).

One builder per set turns the public files into records of the project's instruction schema
(`instruction`, `input`, `output`, `source`, `id` + extra fields) and appends to `report` what it
kept and dropped, and why. Builders validate everything and return the records per output name;
they never write (`minillm.data.prepare` writes once every set has been built).

What the MiniLLM release did, as far as its files show (spec §2.2, §4.1):
- prompt-length filter: an example is dropped when its prompt in MiniLLM's template is longer than
  256 tokens (`process_data_dolly.py --max-prompt-length 256`; Dolly and SelfInst);
- length buckets (S-NI, UnNI): by the longest reference's length in tokens, [0,5], [6,10], [11,inf);
  the released S-NI `11_` file holds references of only 4 to 10 whitespace words (so the unit is
  tokens), and counted with a GPT-2-style BPE tokenizer every one of its multi-reference examples
  has its longest reference at >= 11 tokens while some have a shorter first one.
Token counts need the tokenizer (`count_tokens`); without one the filter is off and the buckets count
whitespace words, and the report says so.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillm.data.instructions import InstructionExample
from minillm.data.templates import build_prompt
from minillm.errors import DataError
from minillm.io import iter_jsonl

BUCKETS = (("0_5", 0, 5), ("6_10", 6, 10), ("11_", 11, None))
DOLLY_TEST, DOLLY_VALID = 500, 1000  # DollyEval; `--dev-num 1000`
VICUNA_ANSWERS = "answer_gpt35.jsonl"

DOLLY_FORMAT = "a databricks-dolly-15k record {instruction, context, response, category}"
SELFINST_FORMAT = ("a Self-Instruct user-oriented record {id, motivation_app, instruction, "
                   "instances: [{input, output}]}")
QUESTION_FORMAT = "a FastChat question record {question_id, text, category}"
ANSWER_FORMAT = "a FastChat answer record {answer_id, question_id, model_id, text, metadata}"
SNI_FORMAT = "an S-NI task file {Definition: [str], Instances: [{id, input, output: [str]}], ...}"
UNNI_FORMAT = ("an Unnatural Instructions core record {instruction, instances: [{instruction_with_input, "
               "input, constraints, output}]}")

Records = dict[str | None, list[dict]]  # output name (None: the --out file itself) -> records


@dataclass
class Options:
    """Settings of a prepare run; `count_tokens(text)` is the tokenizer's length (None: no tokenizer)."""

    count_tokens: Callable[[str], int] | None = None
    max_prompt_length: int = 256
    seed: int = 42
    sample_size: int = 10_000
    instances_per_task: int = 100
    answers: Path | None = None


# ------------------------------------------------------------------------------------------ validation

def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({"str": "a string", "list": "a list", "int": "a number"}.get(k.__name__, k.__name__)
                       for k in kinds)


def _problem(record: Any, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    """Why `record` lacks the required `fields` (name -> type), or None when it has them."""
    if not isinstance(record, dict):
        return f"got a JSON {type(record).__name__}, not an object"
    missing = [name for name in fields if name not in record]
    if missing:
        return f"missing {', '.join(repr(m) for m in missing)} (fields present: {sorted(record)})"
    for name, kind in fields.items():
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"field '{name}' must be {_type_name(kind)}, got {type(record[name]).__name__}"
    return None


def _instance_problem(instances: list, fields: dict[str, type | tuple[type, ...]]) -> str | None:
    for k, instance in enumerate(instances):
        if problem := _problem(instance, fields):
            return f"instances[{k}]: {problem}"
    return None


def read_records(path: Path, shape: str, check: Callable[[Any], str | None]) -> list[dict]:
    """The records of a JSONL file; the first one `check` objects to raises DataError naming file:line."""
    if not path.is_file():
        raise DataError(f"no such file: '{path}' (expected a JSONL file of {shape} per line)")
    records = []
    for where, record in iter_jsonl(path, shape):
        if problem := check(record):
            raise DataError(f"{where}: not {shape}: {problem}")
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records; expected a JSONL file of {shape} per line")
    return records


def make_record(instruction: str, input_text: str, output: str | list[str], source: str, example_id: Any,
                **extra: Any) -> dict:
    """One record of the project's instruction schema (what `minillm.data.load_instructions` reads)."""
    return {"instruction": instruction, "input": input_text, "output": output, "source": source,
            "id": str(example_id), **extra}


# ------------------------------------------------------------------------------- filter and buckets

def prompt_filter(rows: list[dict], opts: Options, what: str, report: list[str]) -> list[dict]:
    """Rows whose MiniLLM-template prompt has at most `max_prompt_length` tokens (all without a tokenizer)."""
    if opts.count_tokens is None:
        report.append(f"{what}: prompt-length filter off (no --tokenizer): kept all {len(rows)}")
        return rows
    kept = [row for row in rows if opts.count_tokens(build_prompt(InstructionExample(
        row["instruction"], row["input"], [], row["id"]))) <= opts.max_prompt_length]
    report.append(f"{what}: kept {len(kept)} of {len(rows)}; dropped {len(rows) - len(kept)} whose prompt "
                  f"(MiniLLM template) is longer than {opts.max_prompt_length} tokens")
    return kept


def bucketed(rows: list[dict], opts: Options, what: str, report: list[str]) -> Records:
    """Rows split into [0,5], [6,10], [11,inf) by their longest reference's length (fields `bucket`,
    `ref_length`, `length_unit` added): in tokens with a tokenizer, else in whitespace words."""
    unit = "tokens" if opts.count_tokens else "words"
    length = opts.count_tokens or (lambda text: len(text.split()))
    out: Records = {f"{name}.jsonl": [] for name, _, _ in BUCKETS}
    for row in rows:
        refs = row["output"] if isinstance(row["output"], list) else [row["output"]]
        n = max(length(ref) for ref in refs)
        name = next(name for name, low, high in BUCKETS if n >= low and (high is None or n <= high))
        out[f"{name}.jsonl"].append({**row, "bucket": name, "ref_length": n, "length_unit": unit})
    counts = ", ".join(f"{name} {len(out[f'{name}.jsonl'])}" for name, _, _ in BUCKETS)
    note = "" if opts.count_tokens else " (the paper counts tokens: pass --tokenizer)"
    report.append(f"{what}: by the longest reference's length in {unit}{note}: {counts}")
    return out


# ------------------------------------------------------------------------------------------------ sets

def build_dolly(src: Path, opts: Options, report: list[str]) -> Records:
    """databricks-dolly-15k.jsonl -> train / valid / test, in file order (15,011 records).

    As MiniLLM's released files show: the prompt-length filter first (15k -> ~12.9k with the paper's
    tokenizer), then the first 500 kept records are the test set (DollyEval = MiniLLM/dolly
    `valid.jsonl`: dolly-15k records 0, 1, 2, 3, 7, 8, 10, ... - the skipped ones have long
    contexts), the next 1,000 the validation split (`--dev-num 1000` on `raw.jsonl`), the rest
    (~11.4k) the training split. `input` is Dolly's `context`; `id` is "dolly-<record index>".
    """
    records = read_records(src, DOLLY_FORMAT, lambda r: _problem(
        r, {"instruction": str, "context": str, "response": str, "category": str}))
    source = f"databricks/databricks-dolly-15k:{src.name}"
    rows = [make_record(r["instruction"], r["context"], r["response"], source, f"dolly-{i}",
                        category=r["category"]) for i, r in enumerate(records)]
    report.append(f"dolly: {len(rows)} records in {src}")
    kept = prompt_filter(rows, opts, "dolly", report)
    test, valid, train = kept[:DOLLY_TEST], kept[DOLLY_TEST:DOLLY_TEST + DOLLY_VALID], \
        kept[DOLLY_TEST + DOLLY_VALID:]
    report.append(f"dolly: split in file order: test {len(test)} (first {DOLLY_TEST}), valid {len(valid)} "
                  f"(next {DOLLY_VALID}), train {len(train)} (the rest)")
    return {"train.jsonl": train, "valid.jsonl": valid, "test.jsonl": test}


def build_selfinst(src: Path, opts: Options, report: list[str]) -> Records:
    """yizhongw/self-instruct `human_eval/user_oriented_instructions.jsonl` -> one example per instance.

    The full file has 252 instructions with one instance each: 252 examples, 242 after the
    prompt-length filter in MiniLLM's release (issue #167). `id` is the record's id ("-<k>" added
    when a record has several instances); `motivation_app` is kept.
    """
    records = read_records(src, SELFINST_FORMAT, lambda r: _problem(
        r, {"id": (str, int), "instruction": str, "instances": list}) or _instance_problem(
        r["instances"], {"input": str, "output": str}))
    rows = []
    for r in records:
        for k, instance in enumerate(r["instances"]):
            example_id = r["id"] if len(r["instances"]) == 1 else f"{r['id']}-{k}"
            extra = {"motivation_app": r["motivation_app"]} if "motivation_app" in r else {}
            rows.append(make_record(r["instruction"], instance["input"], instance["output"],
                                    f"yizhongw/self-instruct:{src.name}", example_id, **extra))
    report.append(f"selfinst: {len(records)} instructions, {len(rows)} instances (paper: 252 before the "
                  "filter, 242 after)")
    return {None: prompt_filter(rows, opts, "selfinst", report)}


def _question_file(src: Path) -> Path:
    for candidate in (src, src / "question.jsonl", src / "fastchat" / "eval" / "table" / "question.jsonl"):
        if candidate.is_file():
            return candidate
    raise DataError(f"no Vicuna questions at '{src}': pass FastChat's fastchat/eval/table/question.jsonl, "
                    "its folder, or the FastChat checkout")


def build_vicuna(src: Path, opts: Options, report: list[str]) -> Records:
    """lm-sys/FastChat `fastchat/eval/table/question.jsonl` + a reference answer file -> 80 examples.

    The references default to `answer/answer_gpt35.jsonl` beside question.jsonl, gpt-3.5-turbo's
    answers: the spec (§4.1) does not have MiniLLM use GPT-4 answers as references, it cites a
    summary of the paper that says ChatGPT's, and copies of the released MiniLLM/Vicuna file read
    like ChatGPT ("Certainly! Here's ..."). Pass `answers` (--answers) for another model's file.
    Every question needs exactly one answer; answers to other questions are ignored (and counted).
    `id` is the question_id; `category` is kept, and `reference` names the answer file and model.
    """
    question_path = _question_file(src)
    answer_path = opts.answers or question_path.parent / "answer" / VICUNA_ANSWERS
    questions = read_records(question_path, QUESTION_FORMAT, lambda r: _problem(
        r, {"question_id": (int, str), "text": str}))
    answers = read_records(answer_path, ANSWER_FORMAT, lambda r: _problem(
        r, {"question_id": (int, str), "text": str}))
    by_question: dict[str, dict] = {}
    for answer in answers:
        if str(answer["question_id"]) in by_question:
            raise DataError(f"{answer_path}: two answers to question_id {answer['question_id']}; keep one")
        by_question[str(answer["question_id"])] = answer
    unanswered = [str(q["question_id"]) for q in questions if str(q["question_id"]) not in by_question]
    if unanswered:
        raise DataError(f"{answer_path}: no answer to question_id {', '.join(unanswered[:10])}"
                        f"{' ...' if len(unanswered) > 10 else ''} ({len(unanswered)} of {len(questions)} "
                        f"questions in {question_path}); pass --answers with a file that answers every one")
    rows = []
    for q in questions:
        answer = by_question[str(q["question_id"])]
        rows.append(make_record(q["text"], "", answer["text"], f"lm-sys/FastChat:{question_path.name}",
                                q["question_id"], category=q.get("category", ""),
                                reference=f"{answer_path.name}:{answer.get('model_id', '')}"))
    unused = len(by_question) - len(rows)
    report.append(f"vicuna: {len(rows)} questions with references from {answer_path.name} (paper: 80); "
                  f"{unused} answers to other questions ignored")
    return {None: rows}


def _sni_problem(task: Any) -> str | None:
    if problem := _problem(task, {"Definition": list, "Instances": list}):
        return problem
    if not task["Definition"] or not all(isinstance(d, str) for d in task["Definition"]):
        return "'Definition' must be a non-empty list of strings"
    for k, instance in enumerate(task["Instances"]):
        problem = _problem(instance, {"id": (str, int), "input": str, "output": list})
        outputs = instance.get("output") if isinstance(instance, dict) else None
        if problem is None and not (outputs and all(isinstance(o, str) for o in outputs)):
            problem = "'output' must be a non-empty list of strings"
        if problem:
            return f"Instances[{k}]: {problem}"
    return None


def _sni_task(path: Path, name: str, limit: int) -> tuple[list[dict], int]:
    """The first `limit` instances of one S-NI task file as records, and its number of instances."""
    try:
        task = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected "
                        f"{SNI_FORMAT}") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason}); expected {SNI_FORMAT}") from None
    if problem := _sni_problem(task):
        raise DataError(f"{path}: not {SNI_FORMAT}: {problem}")
    rows = [make_record(task["Definition"][0], inst["input"], list(inst["output"]),
                        f"allenai/natural-instructions:tasks/{path.name}", inst["id"], task=name)
            for inst in task["Instances"][:limit]]
    return rows, len(task["Instances"])


def build_sni(src: Path, opts: Options, report: list[str]) -> Records:
    """allenai/natural-instructions checkout -> the test tasks' first 100 instances, by length bucket.

    Test tasks: `splits/default/test_tasks.txt` (119 tasks); instances: the first
    `instances_per_task` (100, S-NI's evaluation default; the released MiniLLM S-NI examples of a
    task are all among its first 100) - ~9K examples in the paper (spec §4.1). `instruction` is the
    task's Definition, `output` the list of references, `task` the task name, `id` the instance id.
    """
    split_file, tasks_dir = src / "splits" / "default" / "test_tasks.txt", src / "tasks"
    if not split_file.is_file() or not tasks_dir.is_dir():
        raise DataError(f"'{src}' is not an allenai/natural-instructions checkout: expected "
                        "splits/default/test_tasks.txt and a tasks/ folder of task JSON files")
    rows: list[dict] = []
    total, names = 0, []
    for line_no, line in enumerate(split_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not (name := line.strip()):
            continue
        path = tasks_dir / f"{name}.json"
        if not path.is_file():
            raise DataError(f"{split_file}:{line_no}: test task '{name}' has no file {path}")
        task_rows, n = _sni_task(path, name, opts.instances_per_task)
        rows.extend(task_rows)
        total, names = total + n, names + [name]
    report.append(f"sni: {len(names)} test tasks (paper: 119), {total} instances; kept the first "
                  f"{opts.instances_per_task} per task: {len(rows)} (paper: ~9K)")
    return bucketed(rows, opts, "sni", report)


def build_unni(src: Path, opts: Options, report: list[str]) -> Records:
    """Unnatural Instructions `core_data.jsonl` -> a seeded sample of 10,000 instances, by length bucket.

    One example per instance (`instruction`: the record's instruction, `input` and `output`: the
    instance's; `constraints` kept); `random.Random(seed).sample` picks `sample_size` of them
    (MiniLLM's seed is not published), kept in file order; `id` is "unni-<record>-<instance>".
    """
    records = read_records(src, UNNI_FORMAT, lambda r: _problem(r, {"instruction": str, "instances": list})
                           or _instance_problem(r["instances"], {"input": str, "output": str}))
    rows = [make_record(r["instruction"], inst["input"], inst["output"],
                        f"orhonovich/unnatural-instructions:{src.name}", f"unni-{i}-{k}",
                        **({"constraints": inst["constraints"]} if "constraints" in inst else {}))
            for i, r in enumerate(records) for k, inst in enumerate(r["instances"])]
    if len(rows) > opts.sample_size:
        picked = sorted(random.Random(opts.seed).sample(range(len(rows)), opts.sample_size))
        report.append(f"unni: {len(rows)} instances; sampled {opts.sample_size} with seed {opts.seed}")
        rows = [rows[i] for i in picked]
    else:
        report.append(f"unni: {len(rows)} instances, not more than the sample size {opts.sample_size}: "
                      "kept all")
    return bucketed(rows, opts, "unni", report)


BUILDERS: dict[str, Callable[[Path, Options, list[str]], Records]] = {
    "dolly": build_dolly, "selfinst": build_selfinst, "vicuna": build_vicuna, "sni": build_sni,
    "unni": build_unni,
}
