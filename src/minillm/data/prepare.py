"""`minillm data prepare SET SRC --out OUT`: the paper's instruction sets as the project's instruction JSONL.

SET is one of dolly, selfinst, vicuna, sni, unni; SRC is the set's public file (folder for S-NI)
or `hub` for the authors' processed copy (MiniLLM/dolly, MiniLLM/self-inst, MiniLLM/Vicuna,
MiniLLM/sinst, MiniLLM/uinst). What each set does: `minillm.data.prepare_sets`.

OUT is one file for selfinst and vicuna, and a folder for the sets that make several files:
dolly -> train.jsonl, valid.jsonl, test.jsonl (test = DollyEval); sni and unni -> one file per
reference-length bucket, 0_5.jsonl, 6_10.jsonl, 11_.jsonl (the paper's tables use 11_). Every
record has `instruction`, `input`, `output` (a string or a list of references), `source` and `id`,
plus the set's extra fields, and reads with `minillm.data.load_instructions`.

Everything is read and validated before anything is written, and each file is written atomically
(`minillm.io.write_jsonl`): a bad input leaves OUT as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from minillm.data.instructions import load_instructions
from minillm.data.prepare_sets import BUILDERS, DOLLY_VALID, Options, Records, make_record
from minillm.errors import DataError
from minillm.io import write_jsonl

__all__ = ["HUB_REPOS", "SETS", "Options", "prepare", "token_counter"]

SETS = tuple(BUILDERS)
FOLDER_SETS = ("dolly", "sni", "unni")
HUB_REPOS = {"dolly": "MiniLLM/dolly", "selfinst": "MiniLLM/self-inst", "vicuna": "MiniLLM/Vicuna",
             "sni": "MiniLLM/sinst", "unni": "MiniLLM/uinst"}
PUBLIC_FILES = {
    "dolly": "databricks-dolly-15k.jsonl",
    "selfinst": "self-instruct's human_eval/user_oriented_instructions.jsonl",
    "vicuna": "FastChat's fastchat/eval/table/question.jsonl (with answer/answer_gpt35.jsonl beside it)",
    "sni": "an allenai/natural-instructions checkout (tasks/ and splits/default/test_tasks.txt)",
    "unni": "Unnatural Instructions' core_data.jsonl",
}


def token_counter(tokenizer: str) -> Callable[[str], int]:
    """Number of tokens of a text (no special tokens) under a tokenizer: folder, .gguf, hub id or built-in."""
    from minillm.models import load_tokenizer  # imports torch: only when token counts are asked for

    tok = load_tokenizer(tokenizer)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def prepare(set_name: str, src: str | Path, out: str | Path, opts: Options | None = None) -> list[str]:
    """Build SET from SRC (a path, or "hub") into OUT; returns the report lines (counts kept/dropped, files).

    Raises DataError, with nothing written, on a file of the wrong format (naming file:line and the
    expected format), an S-NI task without Definition/Instances, a Vicuna question without an
    answer, or a set left empty by the filters.
    """
    if set_name not in BUILDERS:
        raise DataError(f"unknown set '{set_name}'; choose one of: {', '.join(SETS)}")
    out = Path(out).expanduser()
    if set_name in FOLDER_SETS and out.is_file():
        raise DataError(f"--out '{out}' is a file, but {set_name} writes several files: give a folder")
    if set_name not in FOLDER_SETS and out.is_dir():
        raise DataError(f"--out '{out}' is a folder, but {set_name} writes one JSONL file: give a file path")
    report: list[str] = []
    if str(src) == "hub":
        records = _from_hub(set_name, report)
    else:
        records = BUILDERS[set_name](Path(src).expanduser(), opts or Options(), report)
    if not any(records.values()):
        raise DataError(f"{set_name}: no examples left after filtering ({'; '.join(report)}); nothing "
                        "written")
    for name, rows in records.items():
        path = out if name is None else out / name
        if rows:
            write_jsonl(path, rows)
            report.append(f"wrote {path} ({len(rows)} examples)")
        else:
            report.append(f"{path}: no examples, not written")
    return report


# -------------------------------------------------------------------------------------- hub copies

def _hub_snapshot(set_name: str) -> Path:
    """The folder of the authors' copy of SET, downloaded (or cached when offline); DataError if neither."""
    from huggingface_hub import snapshot_download

    from minillm.errors import ModelError
    from minillm.models.hub import from_hub, hub_offline

    repo = HUB_REPOS[set_name]
    try:
        return Path(from_hub(partial(snapshot_download, repo_type="dataset"), repo))
    except ModelError as error:  # offline and not cached, no connection, or no such dataset
        cause = error.__cause__ or error
        reason = ("offline mode is on: HF_HUB_OFFLINE is set" if hub_offline() else
                  f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}")
        raise DataError(
            f"cannot get {repo} (the processed {set_name} set): the Hugging Face hub is unreachable or has "
            f"no such dataset ({reason}). Pass a local file instead: `minillm data prepare {set_name} FILE "
            f"--out ...` with {PUBLIC_FILES[set_name]}."
        ) from error


def _hub_file(folder: Path, rel: str, repo: str, **extra) -> list[dict]:
    """The examples of one processed file of a hub copy (its `prompt` field dropped: prompts are rebuilt)."""
    if not (folder / rel).is_file():
        raise DataError(f"the hub copy {repo} has no {rel} (files: "
                        f"{sorted(str(p.relative_to(folder)) for p in folder.rglob('*.jsonl'))})")
    rows = []
    for e in load_instructions(str(folder / rel)):
        fields = {k: v for k, v in e.extra.items() if k not in ("prompt", "source")} | extra
        rows.append(make_record(e.instruction, e.input, e.outputs[0] if len(e.outputs) == 1 else e.outputs,
                                f"{repo}:{rel}", e.id, **fields))
    return rows


def _from_hub(set_name: str, report: list[str]) -> Records:
    """The authors' processed copy, as released: no filter or sampling is applied again.

    dolly: `valid.jsonl` is the test set (DollyEval), the first 1,000 lines of `raw.jsonl` the
    validation split and the rest the training split (`--dev-num 1000`); sni/unni: every
    `<bucket>/valid.jsonl` becomes `<bucket>.jsonl`; selfinst/vicuna: `valid.jsonl`.
    """
    folder, repo = _hub_snapshot(set_name), HUB_REPOS[set_name]
    if set_name == "dolly":
        raw = _hub_file(folder, "raw.jsonl", repo)
        records: Records = {"train.jsonl": raw[DOLLY_VALID:], "valid.jsonl": raw[:DOLLY_VALID],
                            "test.jsonl": _hub_file(folder, "valid.jsonl", repo)}
    elif set_name in FOLDER_SETS:
        records = {f"{p.parent.name}.jsonl": _hub_file(folder, f"{p.parent.name}/valid.jsonl", repo,
                                                       bucket=p.parent.name)
                   for p in sorted(folder.glob("*/valid.jsonl"))}
    else:
        records = {None: _hub_file(folder, "valid.jsonl", repo)}
    counts = ", ".join(f"{name or 'valid.jsonl'} {len(rows)}" for name, rows in records.items())
    report.append(f"{set_name}: the processed copy {repo} ({folder}), as released: {counts}")
    return records
