"""The MiniLLM paper's published Table 1 numbers, as data: printed beside a `protocol=minillm` evaluation,
never re-measured.

Source: Gu, Dong, Wei, Huang, "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024
(arXiv 2306.08543 v6), Table 1, as recorded in the project's research brief `minillm_spec.md` §4.5
("Paper numbers"). The brief recovered the cells from two independent third-party summaries of the
paper plus an ICLR review; cells it could not recover are None here (shown "–"), never guessed, and the
GPT-2 340M and OPT 2.7B blocks are absent for that reason. S-NI and UnNI are the ≥ 11-word subsets.

Rouge-L is what `minillm evaluate` measures; the GPT-4 feedback scores (Dolly, SelfInst, Vicuna) are kept
for completeness in results.json but are not reproducible here (the paper's GPT-4 prompt is unpublished).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SOURCE = ("Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024 (arXiv 2306.08543 "
          "v6), Table 1; cells as recorded in the project's research brief minillm_spec.md §4.5 (recovered "
          "from third-party summaries of the paper; '–' = not recovered)")

SETS = ("dolly", "selfinst", "vicuna", "sni", "unni")  # Table 1's column order
GPT4_SETS = ("dolly", "selfinst", "vicuna")


@dataclass(frozen=True)
class Pair:
    """One teacher -> student block of Table 1; `student_params` is the real parameter count of the
    student checkpoint family (the paper's size labels are rounded)."""

    family: str
    student: str
    teacher: str
    student_params: int
    model_type: str  # transformers' model_type of the family: a tie-break when two sizes are close


PAIRS = {
    "gpt2-120m": Pair("GPT-2", "120M", "1.5B", 124_439_808, "gpt2"),
    "gpt2-760m": Pair("GPT-2", "760M", "1.5B", 774_030_080, "gpt2"),
    "opt-1.3b": Pair("OPT", "1.3B", "13B", 1_315_758_080, "opt"),
    "opt-6.7b": Pair("OPT", "6.7B", "13B", 6_658_473_984, "opt"),
    "llama-7b": Pair("LLaMA", "7B", "13B", 6_738_415_616, "llama"),
}

# (family, size, method) -> (Dolly GPT4, Dolly R-L, SelfInst GPT4, SelfInst R-L, Vicuna GPT4, Vicuna R-L,
# S-NI R-L, UnNI R-L); None = not recovered. Copied cell by cell from minillm_spec.md §4.5, Table 1.
_ = None
TABLE1: dict[tuple[str, str, str], tuple] = {
    ("GPT-2", "1.5B", "Teacher"): (58.4, 27.6, 42.9, 14.3, 48.6, 16.3, 27.6, 31.8),
    ("GPT-2", "120M", "SFT w/o KD"): (38.6, 23.3, 26.3, 10.0, 32.8, 14.7, 16.3, 18.5),
    ("GPT-2", "120M", "KD"): (40.3, 22.8, 27.8, 10.8, 31.9, 13.4, 19.7, 22.0),
    ("GPT-2", "120M", "SeqKD"): (41.2, 22.7, 26.2, 10.1, 31.0, 14.3, 16.4, 18.8),
    ("GPT-2", "120M", "MiniLLM"): (44.7, 24.6, 29.2, 13.2, 34.1, 16.9, 25.3, 26.6),
    ("GPT-2", "760M", "SFT w/o KD"): (50.7, 25.4, 38.3, 12.4, 43.1, 16.1, 21.5, 27.1),
    ("GPT-2", "760M", "MiniLLM"): (54.7, 26.4, 44.6, 15.9, 45.7, 18.3, 29.3, 37.7),
    ("OPT", "13B", "Teacher"): (70.3, 29.2, 56.1, 18.4, 58.0, 17.8, 30.4, 36.1),
    ("OPT", "1.3B", "SFT w/o KD"): (52.6, 26.0, 37.7, 11.4, 40.5, 15.6, 23.1, 28.4),
    ("OPT", "1.3B", "SeqKD"): (51.0, 26.1, 36.6, _, 42.6, _, _, _),
    ("OPT", "1.3B", "MiniLLM"): (60.7, 26.7, 47.0, 14.8, 50.6, 17.9, 28.6, 33.4),
    ("OPT", "6.7B", "SFT w/o KD"): (67.9, 27.6, 56.4, 16.4, 57.3, 17.8, 30.3, 28.6),
    ("OPT", "6.7B", "MiniLLM"): (70.8, 29.0, 58.5, 17.5, 60.1, 18.7, 32.5, 36.7),
    ("LLaMA", "13B", "Teacher"): (79.0, 29.7, 75.5, 23.4, 65.1, 19.4, 35.8, 38.5),
    ("LLaMA", "7B", "SFT w/o KD"): (73.0, 26.3, 69.2, 20.8, 61.6, 17.5, 32.4, 35.8),
    ("LLaMA", "7B", "KD"): (_, _, _, 20.2, _, _, _, _),
    ("LLaMA", "7B", "SeqKD"): (73.6, 27.5, 71.5, 20.8, 62.6, _, _, _),
    ("LLaMA", "7B", "MiniLLM"): (76.4, 29.0, 73.1, 23.2, 64.1, 20.7, 35.5, 40.2),
}
del _


def nearest_pair(num_params: int, model_type: str | None = None) -> str:
    """The Table 1 block whose student is nearest to `num_params` parameters (on a log scale).

    A model of the block's family (same transformers `model_type`) gets a 5 % head start, which only
    decides near-ties such as a 6.7B LLaMA between OPT 6.7B and LLaMA 7B.
    """
    if num_params <= 0:
        raise ValueError(f"num_params must be > 0, got {num_params}")

    def distance(key: str) -> float:
        pair = PAIRS[key]
        return abs(math.log(num_params / pair.student_params)) + (0.0 if model_type == pair.model_type
                                                                  else 0.05)

    return min(PAIRS, key=distance)


def published_block(key: str, chosen_by: str) -> dict:
    """The rows of one Table 1 block (teacher first), JSON-ready, marked as published."""
    if key not in PAIRS:
        raise KeyError(f"no published Table 1 block {key!r}; known: {', '.join(PAIRS)}")
    pair = PAIRS[key]
    rows = []
    for (family, size, method), cells in TABLE1.items():
        if family != pair.family or size not in (pair.teacher, pair.student):
            continue
        gpt4 = dict(zip(GPT4_SETS, cells[0:6:2]))
        rouge = {**dict(zip(GPT4_SETS, cells[1:6:2])), "sni": cells[6], "unni": cells[7]}
        rows.append({"model": f"{family} {size}", "method": method, "rougeL": rouge, "gpt4": gpt4})
    rows.sort(key=lambda r: r["method"] != "Teacher")  # teacher first, then Table 1's order
    return {"measured": False, "source": SOURCE, "pair": key, "chosen_by": chosen_by,
            "student": f"{pair.family} {pair.student}", "teacher": f"{pair.family} {pair.teacher}",
            "rows": rows}


def published_table_rows(block: dict, sets: list[str]) -> list[str]:
    """Markdown rows for the Table 1 layout (one column per set in `sets`), each labelled as published."""
    out = []
    for row in block["rows"]:
        cells = [_cell(row["rougeL"].get(s)) for s in sets]
        out.append(f"| (published) {row['model']} {row['method']} | {' | '.join(cells)} |")
    return out


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
