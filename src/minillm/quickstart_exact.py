"""The quickstart's first stage, "what reverse KL does, exactly": MiniLLM and word-level KD in a tiny world
where every sequence-level probability is computed exactly.

The world (`minillm.world` at a tiny size): 4 prompts, each selecting a mixture of two sparse Markov chains
(modes of mass 0.6 / 0.4) over 6 content tokens, responses of 1-4 tokens. A teacher (2-layer Llama, width
32) is fitted to samples of it. The student is a Llama with no decoder layer (embedding, norm, head: each
next token depends on the current token only, a bigram model), so it cannot remember which prompt or mode
it is in and cannot copy the teacher; it is initialised by SFT on the teacher's samples (the paper's
pipeline), then word-level KD and MiniLLM train from that initialisation with the same budget. Every
response of at most 4 tokens is enumerated (`minillm.world.exact`: 1,555 per prompt), so the sequence-level
reverse KL(q || p) that MiniLLM minimises and the forward KL(p || q) that KD minimises are exact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .io import write_text
from .world import World, WorldSpec
from .world.exact import enumerate_model, enumerate_truth, sequence_kls
from .world.pipeline import Budget, fit, new_model, save_world, write_model_data, write_truth_data

__all__ = ["EXACT_BUDGETS", "EXACT_SPEC", "exact_stage", "plot_distributions"]

logger = logging.getLogger("minillm")

EXACT_SPEC = WorldSpec(vocab=6, prompts=4, modes=2, mode_mass=(0.6, 0.4), length=2, max_length=4,
                       mode_tokens=3, branching=2, prompt_length=2, seed=0)
# steps of the teacher fit, the student's SFT initialisation, and of KD / MiniLLM (same budget for both)
EXACT_BUDGETS = {
    "tiny": dict(teacher_steps=150, init_steps=150, method_steps=40, samples=200),
    "small": dict(teacher_steps=1500, init_steps=300, method_steps=100, samples=400),
    "full": dict(teacher_steps=3000, init_steps=600, method_steps=200, samples=800),
}
TEACHER_SIZE, STUDENT_SIZE = (32, 2), (16, 0)  # (width, layers)
METHODS = ("kd", "minillm")


def exact_stage(out: Path, budget: str = "small") -> dict:
    """Train and measure; writes out/results.json and out/distributions.png; returns the results.

    Runs on one CPU thread: these models are so small that a second thread costs more than it gives."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _exact_stage(Path(out), budget)
    finally:
        torch.set_num_threads(threads)


def _exact_stage(out: Path, budget: str) -> dict:
    from .models import load_model

    b = EXACT_BUDGETS[budget]
    world = World(EXACT_SPEC)
    save_world(world, out / "world")
    truth = write_truth_data(world, out / "data" / "truth.jsonl", b["samples"], seed=0)
    teacher = fit(world, "teacher", out / "teacher", new_model(world, out / "models" / "teacher0",
                                                               *TEACHER_SIZE, seed=1),
                  truth, Budget(b["teacher_steps"], 32, 1e-2))
    samples = write_model_data(teacher, world, out / "data" / "teacher.jsonl", b["samples"], seed=1)
    student0 = new_model(world, out / "models" / "student0", *STUDENT_SIZE, seed=2)
    init = fit(world, "sft", out / "init", student0, samples, Budget(b["init_steps"], 32, 1e-2))
    models = {"init": init}
    same = Budget(b["method_steps"], 16, 5e-3)
    for name in METHODS:  # KD on the teacher's samples; MiniLLM samples its own (prompts from the same file)
        models[name] = fit(world, name, out / name, init, samples, same, teacher=teacher)
    loaded = {name: load_model(str(path)) for name, path in models.items()}
    teacher_model = load_model(str(teacher))
    results = measure_exact(world, teacher_model, loaded)
    results.update(budget=budget, steps=b, spec=world.spec.to_dict(),
                   sizes={"teacher": TEACHER_SIZE, "student": STUDENT_SIZE})
    plot_distributions(world, teacher_model, loaded, out / "distributions.png", results)
    write_text(out / "results.json", json.dumps(results, indent=1))
    return results


def measure_exact(world: World, teacher, students: dict) -> dict:
    """Exact sequence-level KLs of every student to the teacher (and of the teacher to the truth), per
    prompt and averaged over prompts, plus each model's mass on the truth's support."""
    per_prompt = []
    for i in range(world.spec.prompts):
        p = enumerate_model(teacher, world, i)
        truth = enumerate_truth(world, i)
        support = truth.probs > 0
        row = {"prompt": world.prompt_text(i),
               "teacher_to_truth_forward_kl": sequence_kls(p, truth)["reverse_kl"],
               "teacher_support_mass": float(p.probs[support].sum())}
        for name, model in students.items():
            q = enumerate_model(model, world, i)
            row[name] = {**sequence_kls(q, p), "support_mass": float(q.probs[support].sum())}
        per_prompt.append(row)
    mean = {name: {k: float(np.mean([r[name][k] for r in per_prompt]))
                   for k in ("reverse_kl", "forward_kl", "support_mass")} for name in students}
    return {"mean": mean, "per_prompt": per_prompt,
            "teacher_support_mass": float(np.mean([r["teacher_support_mass"] for r in per_prompt]))}


def plot_distributions(world: World, teacher, students: dict, out_png: Path, results: dict, prompt: int = 0,
                       top: int = 12) -> Path:
    """For one prompt: the teacher's, the KD student's and the MiniLLM student's probabilities of the
    teacher's `top` most likely responses, and of everything else."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = enumerate_model(teacher, world, prompt)
    order = np.argsort(-p.probs)[:top]
    labels = [" ".join(world.tokens[t] for t in p.responses[j]) for j in order] + ["all other"]
    dists = {"teacher": p.probs}
    dists.update({name: enumerate_model(students[name], world, prompt).probs for name in METHODS})
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(dists)
    for k, (name, probs) in enumerate(dists.items()):
        shown = list(probs[order]) + [1.0 - float(probs[order].sum())]
        ax.bar(np.arange(len(labels)) + (k - 1) * width, shown, width, label=name)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("probability of the whole response")
    kd, ml = results["mean"]["kd"], results["mean"]["minillm"]
    ax.set_title(f"prompt '{world.prompt_text(prompt)}'. Exact means over prompts: reverse KL(q||p) KD "
                 f"{kd['reverse_kl']:.3f} vs MiniLLM {ml['reverse_kl']:.3f}; forward KL KD "
                 f"{kd['forward_kl']:.3f} vs MiniLLM {ml['forward_kl']:.3f}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def exact_section(results: dict, seconds: float | None) -> list[str]:
    """The report's first section: what the exact stage measured, in words and numbers."""
    m = results["mean"]
    kd, ml = m["kd"], m["minillm"]
    seeks = ml["reverse_kl"] < kd["reverse_kl"]
    covers = kd["forward_kl"] < ml["forward_kl"]
    steps, sizes = results["steps"], results["sizes"]
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    verdict = ("MiniLLM ends with the lower reverse KL and KD with the lower forward KL: each method wins "
               "the divergence it minimises, which is the mode-seeking (reverse KL) versus mode-covering "
               "(forward KL) trade-off." if seeks and covers else
               "This run does not show the expected ordering (MiniLLM lower on reverse KL, KD lower on "
               "forward KL); see the per-prompt numbers in exact/results.json.")
    lines = [
        "## What reverse KL does, exactly" + took, "",
        "A tiny world where every probability is exact (`minillm.world`): 4 prompts, each a mixture of two "
        "sparse Markov chains over 6 tokens (modes of mass 0.6 / 0.4), responses of 1-4 tokens. A teacher "
        f"(width {sizes['teacher'][0]}, {sizes['teacher'][1]} layers) was fitted to samples of it "
        f"({steps['teacher_steps']} steps). The student cannot copy it: a Llama with no decoder layer (width "
        f"{sizes['student'][0]}; each next token depends on the current token only, a bigram model, so it "
        "cannot remember which mode it is in). It was initialised by SFT on the teacher's samples "
        f"({steps['init_steps']} steps), then trained {steps['method_steps']} more steps with word-level KD "
        "and, separately, with MiniLLM. Every response is enumerated, so the sequence-level KLs below are "
        "exact (mean over the 4 prompts; code: `src/minillm/world/exact.py`).", "",
        "| student | reverse KL(q ‖ p) | forward KL(p ‖ q) | mass on the true support |",
        "|---|---|---|---|",
    ]
    for name, label in (("init", "initialisation (SFT)"), ("kd", "word-level KD"), ("minillm", "MiniLLM")):
        lines.append(f"| {label} | {m[name]['reverse_kl']:.3f} | {m[name]['forward_kl']:.3f} | "
                     f"{m[name]['support_mass']:.3f} |")
    lines += ["", f"The teacher puts {results['teacher_support_mass']:.3f} of its mass on the true support. "
              + verdict + " Reverse KL is what MiniLLM minimises (the paper's Eq. 1); forward KL is what KD "
              "and SFT minimise.", "", "![exact distributions](exact/distributions.png)", ""]
    return lines
