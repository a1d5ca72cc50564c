"""Shared fixtures: tiny models saved as HF folders and small instruction files, built in code."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


WORDS = ("red green blue cat dog bird fish tree river city one two three yes no good bad water fire "
         "paris france capital mountain flower").split()


def make_instructions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        inp = " ".join(rng.choices(WORDS, k=rng.randint(0, 4)))
        rows.append({"instruction": f"Tell me about the {a} and the {b}.", "input": inp,
                     "output": " ".join([a, b] + rng.choices(WORDS, k=rng.randint(2, 8))) + ".",
                     "id": str(i)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'teacher': dir, 'student': dir, 'gpt2': dir} of tiny random models with the tiny tokenizer."""
    from minillm.testing import tiny_gpt2, tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    tok = tiny_tokenizer()
    out = {}
    for name, model in (("teacher", tiny_llama(tok, hidden_size=48, layers=2, seed=1)),
                        ("student", tiny_llama(tok, hidden_size=32, layers=1, seed=2)),
                        ("gpt2", tiny_gpt2(tok, hidden_size=32, layers=1, seed=3))):
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[name] = str(d)
    return out


@pytest.fixture(scope="session")
def instruction_file(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    return str(write_jsonl(root / "train.jsonl", make_instructions(48)))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# Cases tried by the generated / fault suites (tests/test_properties.py, tests/test_faults.py), shown in the
# terminal summary of every run (CI included): suite name -> count.
SUITE_CASES: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter):
    for name, count in sorted(SUITE_CASES.items()):
        terminalreporter.write_line(f"{name}: {count} cases tried")
