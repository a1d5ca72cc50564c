"""Property-based checks of the CLI (issue 22, deliverable 6): generated configs, data files and model paths.

For every command that parses a config or reads data (`sft`, `distill --method kd|seqkd|minillm|onpolicy`,
`generate`, `evaluate`, `prune`, `plan`), whatever the input:
- the outcome is exit code 0 or 2 (a user error printed as a message), never a Python traceback;
- no file outside the command's output location is created, modified or deleted (the whole temporary tree is
  snapshotted before and after), and a user's file inside an existing output folder is left alone.

The commands run in-process on tiny models (saved once per module) with max_steps=1, batches of 2 and at most
4 new tokens, so a run that passes every check costs well under a second. Run with `-s` to see how many cases
each test tried (a summary line at the end of the module; every test must have tried some).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import traceback
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SUITE_CASES, make_instructions, write_jsonl
from minillm.cli import main

CASES: Counter = Counter()  # test name -> generated cases run
OUTCOMES: Counter = Counter()  # (test name, exit code) -> count
# model folders with broken contents (made by World)
BAD_MODEL_FOLDERS = ("zero-byte-safetensors", "truncated-safetensors", "garbage-safetensors", "no-weights",
                     "bad-config-json", "config-only")
LAST: dict[str, str] = {"stderr": ""}  # what the last command printed on stderr
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)

TRAIN_CHEAP = [
    "max_steps=1",
    "batch_size=2",
    "max_length=200",
    "max_prompt_length=160",
    "valid_fraction=0.25",
    "max_new_tokens=2",
    "eval_num_prompts=2",
    "rollout_batch_size=2",
    "chunk_size=64",
]
METHOD_CHEAP = {
    "sft": [],
    "kd": [],
    "seqkd": [],
    "onpolicy": [],
    "minillm": ["num_rollouts=2", "ppo_epochs=1", "pt_seq_len=16"],
}
GEN_CHEAP = ["max_new_tokens=2", "batch_size=4", "max_prompt_length=160", "limit=4"]
EVAL_CHEAP = [*GEN_CHEAP, "seeds=1"]

# options that set how much work a run does: generated values for them are either refused ones or small
COST_KEYS = {
    "max_steps",
    "epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "max_prompt_length",
    "eval_num_prompts",
    "rollout_batch_size",
    "num_rollouts",
    "ppo_epochs",
    "max_new_tokens",
    "sampling.max_new_tokens",
    "pt_seq_len",
    "chunk_size",
    "limit_train",
    "limit",
    "seeds",
    "lora_r",
    "draft_length",
    "exposure_bias_samples",
    "fsdp",
    "precision",
    "gradient_checkpointing",
    "eval_every",
    "save_every",
}
REFUSED_VALUES = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "-3",
    "1.5",
    "1e999",
    "",
    " ",
    "abc",
    "[1, 2]",
    "{a: 1}",
    "None",
    "maybe",
    "0x10",
    "1,2",
    "½",
]
SMALL_VALUES = ["1", "2", "true", "false"]
ANY_VALUES = [
    *REFUSED_VALUES,
    *SMALL_VALUES,
    "0",
    "-0",
    "0.5",
    "3e-4",
    "1e-999",
    "99999999999999999999999",
    str(2**63),
    str(-(2**63) - 1),
    "1e308",
    "-1e308",
    "null",
    "~",
    "[",
    "]",
    "[]",
    "=",
    "a=b",
    "é",
    "😀",
    "x" * 5000,
    "true,false",
    "10,20",
    "[1, nan]",
    "minillm",
    "kd",
    "sft",
    "rkl",
    "bf16",
    "fp32",
    "float16",
    "shard",
    "chat",
    "raw",
    "paper",
    "prefix",
    "token",
    "cosine",
    "constant",
    "valid_loss",
]
UNKNOWN_KEYS = [
    "learnig_rate",
    "foo",
    "sampling.bogus",
    "a.b.c",
    "sampling",
    "teacher_mix_alfa",
    "Method",
    "max-steps",
    "__class__",
    "é",
    "top-k",
    "sampling.",
    ".x",
]


# --------------------------------------------------------------------------------------------- the world


class World:
    """Tiny models, good and bad inputs, saved once per module under `root`; one work folder per case."""

    def __init__(self, root: Path):
        from minillm.testing import tiny_llama, tiny_tokenizer

        self.root = root
        tok = tiny_tokenizer()
        self.models = {}
        for name, hidden, layers, seed in (("student", 16, 1, 2), ("teacher", 24, 2, 1)):
            d = root / "models" / name
            tiny_llama(tok, hidden_size=hidden, layers=layers, seed=seed).save_pretrained(d)
            tok.save_pretrained(d)
            self.models[name] = str(d)
        data = root / "data"
        data.mkdir()
        self.train = str(write_jsonl(data / "train.jsonl", make_instructions(8)))
        self.corpus = data / "corpus.txt"
        self.corpus.write_text("red green blue cat dog.\n\nbird fish tree river city.\n")
        self.user_file = data / "notes.txt"
        self.user_file.write_text("a user's notes")
        bad = root / "bad"
        bad.mkdir()
        weights = (Path(self.models["student"]) / "model.safetensors").read_bytes()
        self.bad_models = {"missing": str(bad / "no_such_model"), "empty-folder": str(bad / "empty")}
        (bad / "empty").mkdir()
        for kind, blob in (
            ("zero-byte-safetensors", b""),
            ("truncated-safetensors", weights[: len(weights) // 2]),
            ("garbage-safetensors", b"\x00" * 64),
        ):
            d = bad / kind
            shutil.copytree(self.models["student"], d)
            (d / "model.safetensors").write_bytes(blob)
        d = bad / "no-weights"
        shutil.copytree(self.models["student"], d)
        (d / "model.safetensors").unlink()
        d = bad / "bad-config-json"
        shutil.copytree(self.models["student"], d)
        (d / "config.json").write_text("{not json")
        d = bad / "config-only"
        d.mkdir()
        shutil.copy(Path(self.models["student"]) / "config.json", d / "config.json")
        gguf = bad / "truncated.gguf"
        gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01\x00")
        (bad / "magic-only.gguf").write_bytes(b"GGUF")
        (bad / "not-gguf.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf")
        self.bad_models.update(
            {
                k: str(bad / k)
                for k in BAD_MODEL_FOLDERS
            }
        )
        self.bad_models.update(
            {
                "truncated-gguf": str(gguf),
                "magic-only-gguf": str(bad / "magic-only.gguf"),
                "not-a-gguf": str(bad / "not-gguf.gguf"),
                "plain-file": str(self.user_file),
                "data-file": self.train,
            }
        )
        self.work_root = root / "work"
        self.work_root.mkdir()

    def input_paths(self) -> list[str]:
        """Paths to offer as values of any option: missing, folders, files of the wrong kind."""
        return [
            str(self.root / "missing" / "x.jsonl"),
            str(self.root / "data"),
            str(self.user_file),
            self.train,
            str(self.corpus),
            self.models["student"],
            str(self.root / "bad" / "empty"),
            "nope.jsonl",
            "~/no_such_minillm_dir/x",
            "./",
            "/",
        ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = World(tmp_path_factory.mktemp("props"))
    yield w
    summary = ", ".join(f"{name}: {n}" for name, n in sorted(CASES.items()))
    codes = ", ".join(f"{name}/exit {code}: {n}" for (name, code), n in sorted(OUTCOMES.items(), key=str))
    print(f"\nproperty cases tried: {sum(CASES.values())} ({summary})\noutcomes: {codes}")
    SUITE_CASES[f"property suite ({summary})"] = sum(CASES.values())


# ------------------------------------------------------------------------------------- running a command


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.join(dirpath, name)] = "dir"
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "link:" + os.readlink(p)
                continue
            with open(p, "rb") as f:
                out[p] = hashlib.sha1(f.read()).hexdigest()
    return out


def _inside(path: str, location: Path) -> bool:
    """`path` is the output location, inside it, or a sibling the command writes next to it (.partial, .tmp,
    a lock, a temporary folder made for an atomic rename)."""
    p, loc = Path(path), Path(os.path.abspath(location))
    if p == loc or loc in p.parents:
        return True
    sibling = next((q for q in (p, *p.parents) if q.parent == loc.parent), None)
    return sibling is not None and (
        sibling.name.startswith((loc.name + ".", loc.stem + "."))
        or sibling.name.startswith("." + loc.name)
        or sibling.name.startswith(loc.name + "-tmp")
        or sibling.name.startswith("tmp")
        and loc.name in sibling.name
    )


def _last(argv: list[str], key: str) -> str | None:
    """The value the CLI takes for `key` (the last of key=value / --key value / --key=value)."""
    value = None
    for i, item in enumerate(argv):
        for spelling in (key, "--" + key, "--" + key.replace("_", "-")):
            if item.startswith(spelling + "="):
                value = item.split("=", 1)[1]
            elif item == spelling and spelling.startswith("--") and i + 1 < len(argv):
                value = argv[i + 1]
    return value


def location_key(command: str) -> str | None:
    """The option that names where `command` writes (None: it writes nothing)."""
    keys = {"generate": "output", "prune": "out", "plan": None, "evaluate": "output_dir"}
    return keys.get(command, "output_dir")


def run_cli(world: World, name: str, argv: list[str], work: Path, *, protected: tuple[Path, ...] = (),
            config_location: str | None = None) -> int:
    """Run `minillm argv` in-process with cwd=`work`; assert exit 0/2, no traceback, nothing touched outside
    the output location (and none of `protected`, a user's files, touched at all). `config_location`: the
    output location a --config file sets, used when the command line sets none."""
    CASES[name] += 1
    command = argv[0]
    key = location_key(command)
    default = {"evaluate": "runs/eval", "sft": "runs/minillm", "distill": "runs/minillm"}.get(command)
    raw = _last(argv, key) if key else None
    raw = config_location if raw is None else raw
    raw = default if raw is None else raw
    locations = [] if raw is None else [Path(os.path.abspath(work / Path(raw).expanduser()))]
    before = _snapshot(world.root)
    err, out = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                main(list(argv))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - a traceback is exactly what this suite looks for
                code = None
                tb = traceback.format_exc()
    finally:
        os.chdir(cwd)
    OUTCOMES[(name, code)] += 1
    LAST["stderr"] = err.getvalue()
    if code is None:
        pytest.fail(f"traceback from `minillm {' '.join(map(repr, argv))}`:\n{tb[-4000:]}")
    assert code in (0, 2), (argv, code, err.getvalue()[-3000:])
    if code == 2:
        message = err.getvalue()
        assert "minillm: error:" in message or "usage:" in message, (argv, message[-2000:])
    after = _snapshot(world.root)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    created_parents = {
        p
        for p in changed
        if p not in before and after.get(p) == "dir" and any(Path(p) in loc.parents for loc in locations)
    }  # output folders made for it
    outside = [
        p for p in changed if p not in created_parents and not any(_inside(p, loc) for loc in locations)
    ]
    assert not outside, (
        f"`minillm {' '.join(argv)}` (exit {code}) touched files outside its output "
        f"location {locations}: {outside[:10]}"
    )
    touched = [p for p in changed if any(Path(p) == q or q in Path(p).parents for q in protected)]
    assert not touched, f"`minillm {' '.join(argv)}` (exit {code}) changed the user's files {touched}"
    return code


@contextlib.contextmanager
def work_dir(world: World):
    """A fresh folder per case, with a user's folder (holding a file) and a user's file to aim outputs at."""
    work = Path(tempfile.mkdtemp(dir=world.work_root))
    (work / "user_dir").mkdir()
    (work / "user_dir" / "notes.txt").write_text("keep me")
    (work / "user_file.txt").write_text("keep me too")
    (work / "empty_dir").mkdir()
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def output_choices(work: Path) -> list[str]:
    return [
        str(work / "out"),
        str(work / "user_dir"),
        str(work / "user_file.txt"),
        str(work / "empty_dir"),
        str(work / "user_file.txt" / "sub"),
        "relative_out",
        str(work / "deep" / "er" / "out"),
    ]


def protected_files(work: Path, argv: list[str]) -> tuple[Path, ...]:
    """The user's files that must survive: all of them, except a file `generate output=` names (the user asked
    for it to be written)."""
    files = [work / "user_dir" / "notes.txt", work / "user_file.txt"]
    if argv[0] == "generate":
        target = _last(argv, "output")
        files = [f for f in files if target is None or Path(os.path.abspath(work / target)) != f]
    return tuple(files)


# ----------------------------------------------------------------------------------- generated overrides

COMMANDS = ["sft", "kd", "seqkd", "minillm", "onpolicy", "generate", "evaluate"]


def _config_class(command: str):
    from minillm.config import METHOD_CONFIGS, EvalConfig, GenerateConfig

    return {"generate": GenerateConfig, "evaluate": EvalConfig}.get(command) or METHOD_CONFIGS[command]


def _keys(command: str) -> list[str]:
    import dataclasses

    from minillm.config.options import nested_groups, nested_names

    cls = _config_class(command)
    groups = nested_groups(cls)
    return sorted({f.name for f in dataclasses.fields(cls) if f.name not in groups} | set(nested_names(cls)))


def base_argv(world: World, command: str, work: Path) -> list[str]:
    """A valid, cheap invocation of `command` (a run of it takes well under a second)."""
    s, t = world.models["student"], world.models["teacher"]
    if command == "generate":
        return [
            "generate",
            f"model={s}",
            f"data={world.train}",
            f"output={work / 'out' / 'gen.jsonl'}",
            *GEN_CHEAP,
        ]
    if command == "evaluate":
        return ["evaluate", f"models={s}", f"data={world.train}", f"output_dir={work / 'out'}", *EVAL_CHEAP]
    head = ["sft"] if command == "sft" else ["distill", f"--method={command}", f"teacher={t}"]
    return [
        *head,
        f"student={s}",
        f"train_data={world.train}",
        f"output_dir={work / 'out'}",
        *TRAIN_CHEAP,
        *METHOD_CHEAP[command],
    ]


def _costly(key: str) -> bool:
    """A key that sets a run's size, however it is spelled: the CLI and YAML read `max-steps` as max_steps
    (a huge value there trains for hours: found when new options reshuffled the derandomized cases)."""
    return key.replace("-", "_") in COST_KEYS


def _value_for(key: str, world: World, work: Path):
    paths = world.input_paths() + (output_choices(work) if key in ("output", "output_dir") else [])
    if _costly(key):
        return st.sampled_from(REFUSED_VALUES + SMALL_VALUES)
    return st.one_of(
        st.sampled_from(ANY_VALUES),
        st.sampled_from(paths),
        st.integers(-(10**20), 10**20).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
    )


@st.composite
def override_cases(draw, world: World, work: Path):
    command = draw(st.sampled_from(COMMANDS))
    keys = _keys(command)
    argv = base_argv(world, command, work)
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(UNKNOWN_KEYS)))
        value = draw(_value_for(key, world, work))
        form = draw(st.sampled_from(["kv", "flag", "dashes"]))
        argv.append(
            f"{key}={value}"
            if form == "kv"
            else f"--{key}={value}"
            if form == "flag"
            else f"--{key.replace('_', '-')}={value}"
        )
    return command, argv


@settings(max_examples=220, **SETTINGS)
@given(data=st.data())
def test_generated_overrides_exit_cleanly(world, data):
    with work_dir(world) as work:
        command, argv = data.draw(override_cases(world, work), label="case")
        run_cli(world, "overrides", argv, work, protected=protected_files(work, argv))


# -------------------------------------------------------------------------------------------- YAML configs

YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(ANY_VALUES),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=10),
)
YAML_VALUES = st.one_of(
    YAML_SCALARS,
    st.lists(YAML_SCALARS, max_size=3),
    st.dictionaries(
        st.sampled_from(["temperature", "top_k", "bogus", "max_new_tokens"]), YAML_SCALARS, max_size=2
    ),
)
BAD_YAML_TEXT = [
    "student: s\nlearning_rate: [1,\n",
    "a: b: c\n",
    "\t- x\n",
    "key: 'unterminated\n",
    "- 1\n- 2\n",
    "just a string\n",
    "42\n",
    "~\n",
    "",
    "---\n...\n",
    "!!python/object:os.system {}\n",
    "a: &x [*x]\n",
    "? [1, 2]\n: 3\n",
    "1: 2\n",
    "null: x\n",
    "learning_rate: 2024-01-01\n",
    "sampling: 5\n",
    "sampling: [1, 2]\n",
    "sampling:\n  bogus: 1\n",
    "sampling:\n  temperature: .nan\n",
    "method: [kd]\n",
    "method: {a: 1}\n",
    "student: !!binary aGVsbG8=\n",
    "a: 1\na: 2\n",
    'x: "\\0"\n',
]


@st.composite
def yaml_cases(draw, world: World, work: Path):
    command = draw(st.sampled_from([*COMMANDS, "plan"]))
    argv = base_argv(world, command if command != "plan" else "minillm", work)
    path = work / "config.yaml"
    kind = draw(st.sampled_from(["mapping", "mapping", "mapping", "text", "bytes", "folder", "missing"]))
    if kind == "mapping":
        keys = _keys(command) if command != "plan" else _keys("minillm")
        mapping = {}
        where = location_key(command)
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(UNKNOWN_KEYS)))
            mapping[key] = (
                draw(st.sampled_from(REFUSED_VALUES + SMALL_VALUES))
                if _costly(key)
                else draw(st.one_of(st.sampled_from(output_choices(work)), YAML_VALUES))
                if key == where
                else draw(YAML_VALUES)
            )
        path.write_text(yaml.safe_dump(mapping, allow_unicode=draw(st.booleans())))
    elif kind == "text":
        path.write_text(draw(st.sampled_from(BAD_YAML_TEXT)))
    elif kind == "bytes":
        path.write_bytes(
            draw(
                st.sampled_from(
                    [
                        b"student: \xff\xfe\n",
                        b"\xef\xbb\xbfstudent: s\n",
                        b"\x00\x01\x02",
                        "méthod: kd\n".encode("latin-1"),
                    ]
                )
            )
        )
    elif kind == "folder":
        path.mkdir()
    if command == "plan":
        student = draw(st.sampled_from([[], ["--student", world.models["student"]]]))
        return command, ["plan", "--config", str(path), *student, "--gpus", "1"]
    # the YAML's values are overridden by the command line, so the cost settings come first: only the
    # YAML's own keys (and the ones the command line does not set) are tested
    head = [a for a in argv if "=" not in a or a.startswith("--method")]
    tail = [a for a in argv if a not in head]
    keep = [
        a
        for a in tail
        if a.split("=", 1)[0] not in (mapping if kind == "mapping" else {}) or _costly(a.split("=", 1)[0])
    ]
    return command, [*head, "--config", str(path), *keep]


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_generated_yaml_configs_exit_cleanly(world, data):
    with work_dir(world) as work:
        command, argv = data.draw(yaml_cases(world, work), label="case")
        run_cli(world, "yaml", argv, work, protected=protected_files(work, argv),
                config_location=yaml_location(work / "config.yaml", location_key(command)))


def yaml_location(path: Path, key: str | None) -> str | None:
    """The output location a YAML config sets as the CLI reads it (a scalar as its text; None, a boolean,
    a list or a mapping are refused, so they set none)."""
    try:
        mapping = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError):
        return None
    if not key or not isinstance(mapping, dict):
        return None
    value = mapping.get(key)
    return None if value is None or isinstance(value, (bool, list, dict)) else str(value)


# ------------------------------------------------------------------------------------ instruction data files

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
GOOD_RECORD = st.builds(
    lambda i, o, x: {"instruction": i or "Say hi.", "input": x, "output": o or "hi."}, TEXT, TEXT, TEXT
)
DOLLY_RECORD = st.builds(
    lambda i, c, r, cat: {
        "instruction": i or "Say hi.",
        "context": c,
        "response": r or "hi.",
        "category": cat,
    },
    TEXT,
    TEXT,
    TEXT,
    TEXT,
)
ODD_VALUE = st.one_of(
    st.none(),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.just([]),
    st.just([1, 2]),
    st.just({"a": 1}),
    st.just(["ok", 3]),
    st.just("x" * 20000),
    TEXT,
)
FIELDS = ["instruction", "input", "output", "context", "response", "id", "category"]


@st.composite
def odd_record(draw):
    kind = draw(st.sampled_from(["good", "dolly", "missing", "types", "non-dict", "huge"]))
    if kind == "good":
        return draw(GOOD_RECORD)
    if kind == "dolly":
        return draw(DOLLY_RECORD)
    record = draw(st.one_of(GOOD_RECORD, DOLLY_RECORD))
    if kind == "missing":
        for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            record.pop(name, None)
    elif kind == "types":
        for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            record[name] = draw(ODD_VALUE)
    elif kind == "huge":
        record[draw(st.sampled_from(["instruction", "input", "output"]))] = "word " * 20000
    else:
        return draw(st.one_of(st.none(), st.integers(), st.just("a string"), st.just([record]), TEXT))
    return record


@st.composite
def data_file_bytes(draw) -> bytes:
    records = draw(st.lists(odd_record(), max_size=6))
    layout = draw(
        st.sampled_from(
            [
                "jsonl",
                "jsonl",
                "jsonl",
                "array",
                "empty",
                "blank-lines",
                "truncated",
                "invalid-utf8",
                "bom",
                "not-json",
                "crlf",
            ]
        )
    )
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans()), allow_nan=True) for r in records]
    if layout == "array":
        return json.dumps(records, allow_nan=True).encode()
    if layout == "empty":
        return draw(st.sampled_from([b"", b"\n\n", b"   \n", b"[]", b"{}", b"null"]))
    text = "\n".join(lines) + ("\n" if draw(st.booleans()) else "")
    if layout == "blank-lines":
        text = "\n\n  \n".join(lines) + "\n\n"
    elif layout == "crlf":
        text = "\r\n".join(lines) + "\r\n"
    data = text.encode()
    if layout == "truncated" and data:
        data = data.rstrip(b"\n")[: -draw(st.integers(1, max(1, min(20, len(data) - 1))))]
    elif layout == "invalid-utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + data[at:]
    elif layout == "bom":
        data = b"\xef\xbb\xbf" + data
    elif layout == "not-json":
        data = b"instruction,output\nhi,there\n"
    return data


DATA_SLOTS = {
    "sft": ["train_data", "valid_data"],
    "kd": ["train_data", "valid_data"],
    "seqkd": ["train_data", "seqkd_data"],
    "minillm": ["train_data", "pt_data"],
    "onpolicy": ["train_data"],
    "generate": ["data"],
    "evaluate": ["data", "calibration"],
}


@settings(max_examples=200, **SETTINGS)
@given(data=st.data())
def test_generated_data_files_exit_cleanly(world, data):
    with work_dir(world) as work:
        command = data.draw(st.sampled_from(COMMANDS), label="command")
        slot = data.draw(st.sampled_from(DATA_SLOTS[command]), label="slot")
        suffix = data.draw(st.sampled_from([".jsonl", ".json", ".txt"]), label="suffix")
        path = work / f"input{suffix}"
        content = data.draw(data_file_bytes(), label="file")
        path.write_bytes(content)
        argv = [*base_argv(world, command, work), f"{slot}={path}"]
        run_cli(world, "data", argv, work, protected=(*protected_files(work, argv), path))


# ------------------------------------------------------------------------------------------ bad model paths

ROLES = {
    "sft student": ("sft", "student"),
    "kd student": ("kd", "student"),
    "kd teacher": ("kd", "teacher"),
    "minillm teacher": ("minillm", "teacher"),
    "seqkd teacher": ("seqkd", "teacher"),
    "onpolicy student": ("onpolicy", "student"),
    "generate model": ("generate", "model"),
    "evaluate models": ("evaluate", "models"),
    "prune --model": ("prune", "--model"),
    "plan --student": ("plan", "--student"),
    "plan --teacher": ("plan", "--teacher"),
}
BAD_MODELS = [
    "missing",
    "empty-folder",
    *BAD_MODEL_FOLDERS,
    "truncated-gguf",
    "magic-only-gguf",
    "not-a-gguf",
    "plain-file",
    "data-file",
]


def model_argv(world: World, role: str, path: str, work: Path) -> list[str]:
    command, key = ROLES[role]
    s, t = world.models["student"], world.models["teacher"]
    if command == "prune":
        return ["prune", "--model", path, "--layers", "1", "--out", str(work / "out")]
    if command == "plan":
        pair = {"--student": s, "--teacher": t, key: path}
        return ["plan", "--student", pair["--student"], "--teacher", pair["--teacher"], "--gpus", "1"]
    return [*base_argv(world, command, work), f"{key}={path}"]


@settings(max_examples=len(ROLES) * len(BAD_MODELS) + 20, **SETTINGS)
@given(role=st.sampled_from(sorted(ROLES)), kind=st.sampled_from(BAD_MODELS))
def test_bad_model_paths_exit_2(world, role, kind):
    with work_dir(world) as work:
        argv = model_argv(world, role, world.bad_models[kind], work)
        code = run_cli(world, "models", argv, work, protected=protected_files(work, argv))
        # `plan` reads only config.json (the shapes), so a folder with an intact config.json is fine for it
        readable_config = kind in (
            "zero-byte-safetensors",
            "truncated-safetensors",
            "garbage-safetensors",
            "no-weights",
            "config-only",
        )
        assert code == (0 if role.startswith("plan") and readable_config else 2), (
            role,
            kind,
            "a model that cannot be loaded was accepted",
        )


# ------------------------------------------------------------------------------------------ prune and plan

FLAG_VALUES = st.one_of(
    st.sampled_from(
        [
            "0",
            "-1",
            "1",
            "2",
            "3",
            "100",
            "nan",
            "inf",
            "-inf",
            "1e999",
            "",
            "abc",
            "0.5",
            "-0.5",
            "1.5",
            "99999999999999999999",
        ]
    ),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
PLAN_FLAGS = [
    "--gpus",
    "--gpu-memory",
    "--headroom",
    "--batch-size",
    "--max-length",
    "--rollout-batch-size",
    "--max-prompt-length",
    "--max-new-tokens",
    "--num-rollouts",
    "--chunk-size",
    "--lora-r",
    "--teacher-mix-alpha",
    "--pt-seq-len",
    "--kd-ratio",
    "--method",
    "--precision",
    "--teacher-dtype",
]


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_generated_prune_and_plan_flags_exit_cleanly(world, data):
    with work_dir(world) as work:
        s, t = world.models["student"], world.models["teacher"]
        if data.draw(st.booleans(), label="prune"):
            layers = data.draw(st.one_of(st.sampled_from(["1", "2"]), FLAG_VALUES), label="layers")
            out = data.draw(st.sampled_from(output_choices(work)), label="out")
            strategy = data.draw(st.sampled_from(["spread", "ends", "first", "middle", ""]), label="strategy")
            argv = ["prune", "--model", t, "--layers", layers, "--out", out, "--strategy", strategy]
        else:
            argv = ["plan", "--student", s, "--teacher", t]
            flags = data.draw(st.lists(st.sampled_from(PLAN_FLAGS), min_size=1, max_size=4), label="flags")
            for flag in flags:
                argv += [
                    flag,
                    data.draw(
                        st.one_of(
                            FLAG_VALUES,
                            st.sampled_from(
                                ["minillm", "sft", "kd", "bf16", "fp32", "float16", "bfloat16", "pt.txt"]
                            ),
                        ),
                        label=flag,
                    ),
                ]
            if data.draw(st.booleans(), label="json"):
                argv.append("--json")
            if data.draw(st.booleans(), label="pt_data"):
                argv += ["--pt-data", data.draw(st.sampled_from(world.input_paths()), label="pt")]
        run_cli(world, "prune/plan", argv, work, protected=protected_files(work, argv))


# ------------------------------------------------------------- regressions: tracebacks this suite found


def _yaml_file(work: Path, content: bytes | None) -> str:
    path = work / "config.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    "case, message",
    [
        # evaluate output_dir=<a file>: FileExistsError from mkdir after the config was resolved
        (
            "evaluate-output-dir-file",
            r"output_dir=.*user_file\.txt is a file, but output_dir names the folder",
        ),
        ("sft-output-dir-file", r"output_dir=.*user_file\.txt is a file, but output_dir names the folder"),
        ("eval-output-dir-under-file", r"user_file\.txt is a file, so the folder .* cannot be created"),
        # `--output_dir=a output_dir=b`: the flag silently won over the later key=value
        ("flag-and-key-value-differ", r"`output_dir` is given twice with different values"),
        # a YAML config that is not UTF-8: UnicodeDecodeError
        ("yaml-invalid-utf8", r"config\.yaml:2: not a UTF-8 text file"),
        ("yaml-is-a-folder", r"config\.yaml is a folder; pass a YAML file"),
        # `method: [kd]` in YAML: TypeError (unhashable list) in TrainConfig.class_for
        ("yaml-method-list", r"`method` expects str, got \['kd'\]"),
    ],
)
def test_config_regressions(world, case, message):
    with work_dir(world) as work:
        argv = {
            "evaluate-output-dir-file": [
                *base_argv(world, "evaluate", work),
                f"output_dir={work / 'user_file.txt'}",
            ],
            "sft-output-dir-file": [*base_argv(world, "sft", work), f"output_dir={work / 'user_file.txt'}"],
            "eval-output-dir-under-file": [
                *base_argv(world, "evaluate", work),
                f"output_dir={work / 'user_file.txt' / 'sub'}",
            ],
            "flag-and-key-value-differ": [
                *base_argv(world, "evaluate", work),
                f"--output_dir={work / 'a'}",
                f"output_dir={work / 'b'}",
            ],
            "yaml-invalid-utf8": ["sft", "--config", "utf8"],
            "yaml-is-a-folder": ["sft", "--config", "folder"],
            "yaml-method-list": ["distill", "--config", "list"],
        }[case]
        yaml_files = {"utf8": b"max_steps: 1\nstudent: \xff\xfe\n", "folder": None, "list": b"method: [kd]\n"}
        argv = [_yaml_file(work, yaml_files[a]) if a in yaml_files else a for a in argv]
        assert run_cli(world, "regressions", argv, work, protected=protected_files(work, argv)) == 2
        assert re.search(message, LAST["stderr"]), LAST["stderr"][-2000:]


@pytest.mark.parametrize(
    "command, kind, message",
    [
        # SafetensorError ("header too small", "incomplete metadata", "invalid JSON in header")
        ("generate", "zero-byte-safetensors", r"model\.safetensors \(0 bytes\)\) are truncated or corrupt"),
        ("evaluate", "truncated-safetensors", r"model\.safetensors \(\d+ bytes\)\) are truncated or corrupt"),
        ("sft", "garbage-safetensors", r"model\.safetensors \(64 bytes\)\) are truncated or corrupt"),
        ("prune", "zero-byte-safetensors", r"are truncated or corrupt"),
        # struct.error from transformers' GGUF reader on a file cut short after the magic bytes
        ("generate", "truncated-gguf", r"truncated\.gguf' \(10 bytes\): it is truncated or corrupt"),
        ("sft", "magic-only-gguf", r"magic-only\.gguf' \(4 bytes\): it is truncated or corrupt"),
    ],
)
def test_corrupt_model_regressions(world, command, kind, message):
    with work_dir(world) as work:
        role = {"generate": "generate model", "evaluate": "evaluate models", "sft": "sft student"}.get(
            command, "prune --model"
        )
        argv = model_argv(world, role, world.bad_models[kind], work)
        assert run_cli(world, "regressions", argv, work, protected=protected_files(work, argv)) == 2
        assert re.search(message, LAST["stderr"]), LAST["stderr"][-2000:]


def test_seqkd_data_not_utf8(world):
    with work_dir(world) as work:
        path = work / "input.jsonl"
        path.write_bytes(b"\xc2")
        argv = [*base_argv(world, "seqkd", work), f"seqkd_data={path}"]
        err, cwd = io.StringIO(), os.getcwd()
        os.chdir(work)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                with pytest.raises(SystemExit) as exit_:
                    main(argv)
        finally:
            os.chdir(cwd)
        assert exit_.value.code == 2 and "input.jsonl" in err.getvalue()
