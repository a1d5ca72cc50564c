"""Instruction-following examples from JSONL files or hub datasets, in one normalised form.

Accepted record layouts (one JSON object per line):
- Alpaca / MiniLLM: `instruction`, `input` (optional), `output` (a string or a list of reference strings);
- Dolly (databricks-dolly-15k): `instruction`, `context`, `response`.
Every other field (category, task, id-like metadata, a teacher's generated answer, ...) is kept in
`extra`, so recipes such as SeqKD can train on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.errors import DataError
from minillm.io import iter_jsonl

_INPUT_FIELDS = ("input", "context")
_OUTPUT_FIELDS = ("output", "response")
_KNOWN_FIELDS = {"instruction", "id", *_INPUT_FIELDS, *_OUTPUT_FIELDS}


@dataclass
class InstructionExample:
    """One task: the instruction, its optional input/context, and one or more reference answers."""

    instruction: str
    input: str
    outputs: list[str]
    id: str
    extra: dict[str, Any] = field(default_factory=dict)


def _field(record: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        if name in record:
            return name, record[name]
    return None, None


def _to_example(record: Any, where: str, default_id: str, require_output: bool = True) -> InstructionExample:
    """Validate one record; `where` ("file:line" or "dataset record N") prefixes every error."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'output' fields, "
                        f"got {type(record).__name__}")
    instruction = record.get("instruction")
    if instruction is None:
        raise DataError(f"{where}: missing field 'instruction' (fields present: {sorted(record)}); every "
                        "record "
                        "needs 'instruction' and 'output' (or Dolly's 'response')")
    if not isinstance(instruction, str):
        raise DataError(f"{where}: field 'instruction' must be a string, got {type(instruction).__name__}")

    input_name, input_text = _field(record, _INPUT_FIELDS)
    if input_text is None:
        input_text = ""
    if not isinstance(input_text, str):
        raise DataError(f"{where}: field '{input_name}' must be a string, got {type(input_text).__name__}")

    output_name, output = _field(record, _OUTPUT_FIELDS)
    if output_name is None and not require_output:  # prompt-only files (generation, RL prompts)
        output_name, output = "output", []
    elif output_name is None:
        raise DataError(f"{where}: missing field 'output' (or Dolly's 'response'); fields present: "
                        f"{sorted(record)}")
    outputs = [output] if isinstance(output, str) else output
    if not (isinstance(outputs, list) and (outputs or not require_output) and all(isinstance(o, str)
                                                                                  for o in outputs)):
        raise DataError(f"{where}: field '{output_name}' must be a string or a non-empty list of strings, "
                        f"got {type(output).__name__} ({str(output)[:40]})")

    example_id = record.get("id", default_id)
    extra = {k: v for k, v in record.items() if k not in _KNOWN_FIELDS}
    return InstructionExample(instruction, input_text, list(outputs), str(example_id), extra)


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    """Alpaca's `alpaca_data.json` style: one JSON list of records."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: not valid JSON ({error.msg} at column {error.colno})"
        ) from error
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records or one JSON object per line")
    for index, record in enumerate(records, start=1):
        yield f"{path} (record {index})", record


def _starts_with_list(path: Path) -> bool:
    with path.open(encoding="utf-8") as f:
        while char := f.read(1):
            if not char.isspace():
                return char == "["
    return False


def _load_file(path: Path, limit: int | None, require_output: bool = True) -> list[InstructionExample]:
    examples = []
    try:
        records = _read_json_array(path) if _starts_with_list(path) else iter_jsonl(path)
        for where, record in records:
            if limit is not None and len(examples) >= limit:
                break
            examples.append(_to_example(record, where, default_id=f"{path.stem}-{len(examples)}",
                                        require_output=require_output))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error.reason})") from error
    if not examples:
        raise DataError(f"{path}: file is empty (no JSON records); expected one JSON object per line with "
                        "'instruction' and 'output' fields")
    return examples


def _load_hub(name: str, split: str, limit: int | None,
              require_output: bool = True) -> list[InstructionExample]:
    import datasets  # on use: 2.2 s to import (measured, 2 cores), needed only for hub datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except OSError as error:  # ConnectionError (offline/unreachable) and DatasetNotFoundError both are
        raise DataError(
            f"cannot load dataset '{name}' (split '{split}'): it is not a local file, and the Hugging Face "
            "hub is "
            f"unreachable (offline?) or has no such dataset ({type(error).__name__}: {error}). Pass a local "
            ".jsonl "
            "file with 'instruction'/'input'/'output' fields instead."
        ) from error
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [_to_example(dict(record), f"dataset '{name}' split '{split}' record {i + 1}", f"{name}-{i}",
                        require_output)
            for i, record in enumerate(dataset)]


def _looks_like_file(source: str) -> bool:
    return source.lower().endswith((".jsonl", ".json")) or source.startswith(("/", ".",
                                                                              "~")) or "\\" in source


def load_instructions(source: str, *, limit: int | None = None, split: str = "train",
                      require_output: bool = True) -> list[InstructionExample]:
    """Examples from a local .jsonl/.json file or a hub dataset name (`split` applies to hub datasets).

    `limit` keeps the first `limit` examples (file order), e.g. for quick runs. With
    `require_output=False` records without `output` are accepted (prompt-only files); their
    `outputs` is empty.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of examples, got {limit}")
    path = Path(str(source)).expanduser()
    if path.is_file():
        return _load_file(path, limit, require_output)
    if path.is_dir():
        raise DataError(f"'{path}' is a folder; pass a .jsonl file (one JSON object per line)")
    if _looks_like_file(str(source)):
        raise DataError(f"no such file: '{path}'")
    return _load_hub(str(source), split, limit, require_output)
