"""experiments/world/run.py at its tiny size: every stage end to end, the results JSON, the page, resume."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).resolve().parents[1] / "experiments" / "world" / "run.py"


def _driver():
    sys.path.insert(0, str(DRIVER.parent))
    spec = importlib.util.spec_from_file_location("world_run", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_world_end_to_end_and_resume(tmp_path):
    run = _driver()
    out, docs = tmp_path / "run", tmp_path / "docs" / "world.md"
    args = ["--out", str(out), "--size", "tiny", "--seeds", "1", "--docs", str(docs)]
    run.main(args)
    results = json.loads((out / "results.json").read_text())
    s = results["settings"]
    main = results["summary"]["main"]
    for student in s["students"]:
        assert set(main[student]["table"]) == set(s["rows"])
        for row, table in main[student]["table"].items():
            for key in ("reverse_kl_support", "forward_kl", "outside_support", "length"):
                assert math.isfinite(table[key]["mean"]), (student, row, key)
        assert set(main[student]["paired"]) == set(s["rows"]) - {"minillm"}
    teacher = results["worlds"]["main"]["measures"]["teacher"]
    assert all(math.isfinite(teacher[k]) for k in ("reverse_kl_support", "forward_kl", "outside_support"))
    assert set(results["summary"]) == {"main"} | {f"len{n}" for n in s["lengths"] if n != s["spec"]["length"]}
    page = docs.read_text()
    assert "Do the paper's claims hold here?" in page and f"{teacher['forward_kl']:.3f}" in page
    assert all(Path(p).exists() for p in results["plots"].values())
    markers = sorted(p.stem for p in (out / "stages").glob("*.json"))
    assert "teacher" in markers and any(m.startswith("method-") for m in markers)
    stamps = {p: p.stat().st_mtime for p in (out / "stages").glob("*.json")}
    again = run.main(args)  # a re-run skips every finished stage and rewrites the same numbers
    assert again["sitting"]["ran"] == [] and sorted(again["sitting"]["skipped"]) == markers
    assert {p: p.stat().st_mtime for p in (out / "stages").glob("*.json")} == stamps
    assert again["summary"]["main"] == json.loads(json.dumps(results["summary"]["main"]))
