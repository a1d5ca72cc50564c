"""minillm benchmark suite: one command, tables on stdout, docs/benchmarks.md written.

    python benchmarks/run.py            # full run (~21 min on 2 CPU cores: peer 7.5, peer2 4, phases 6.5,
    memory 2.5)
    python benchmarks/run.py --quick    # smoke-sized (~6 min): fewer steps/repetitions, shorter decodes
    python benchmarks/run.py --sections memory,phases   # rerun some sections; the others are read back
                                                        # from benchmarks/results/*.json
    python benchmarks/run.py --render   # only rewrite docs/benchmarks.md from benchmarks/results/

Sections
  memory  extra memory of the chunked reverse-KL / single-step term vs response length (fresh processes)
  phases  per-phase timings of our step next to their floors; sampling throughput vs HF generate;
          matmul peak; bf16-vs-fp32 tolerance
  peer    `minillm distill --method minillm` (4 settings) vs TRL 1.14.2 MiniLLMTrainer, side by side
  peer2   a second side-by-side set: bf16 teacher with fp32 update (alpha 0 and 0.2) vs TRL
  gpu     not run from here: `PYTHONPATH=src python benchmarks/gpu_step.py` on a GPU machine writes
          gpu_step.json; put it in benchmarks/results/ and it is rendered.
Needs the TRL peer venv at /tmp/trl-peer (see ../shared/bench/trl_peer.py) for the peer section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOLLY, PY, ROOT, last_json_line, machine_info, median, prepare_models, run_measured

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
ENV = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
       "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


# ------------------------------------------------------------------------------------------ sections
def section_memory(quick: bool) -> dict:
    lengths = [256, 2048] if quick else [256, 512, 1024, 2048]
    reps = 1 if quick else 2
    rows = []
    for n in lengths:
        # fused_token_loss (what training uses) and the checkpointed chunked_token_terms
        for fused in (True, False):
            for chunk in sorted({min(c, n) for c in (512, 256, n)}, reverse=True):  # effective chunk sizes
                if fused and chunk == n and n > 512:
                    continue  # one huge fused chunk is not a configuration anyone runs
                vals = []
                for _ in range(reps):
                    cmd = [PY, str(ROOT / "benchmarks" / "loss_memory.py"), str(n),
                           str(chunk)] + (["--fused"] if fused else [])
                    r = run_measured(cmd, env=ENV, timeout=600)
                    rec = last_json_line(r["stdout"], "LOSS_MEMORY")
                    if rec is None:
                        raise RuntimeError(f"loss_memory {n} {chunk} fused={fused} "
                                           f"failed:\n{r['stderr'][-2000:]}")
                    vals.append(rec)
                row = {"n": n, "chunk": chunk, "fused": fused, "extra_mb": median([v["extra_mb"]
                                                                                   for v in vals]),
                       "seconds": median([v["seconds"] for v in vals]), "runs": vals}
                rows.append(row)
                log(f"memory n={n} chunk={chunk} fused={fused}: extra {row['extra_mb']:.0f} MB, "
                    f"{row['seconds']:.2f} s")
    return {"rows": rows, "reps": reps, "vocab": 49152, "hidden": 576}


def section_phases(quick: bool, teacher: Path, student: Path) -> dict:
    cmd = [PY, str(ROOT / "benchmarks" / "phases.py"), "--teacher", str(teacher), "--student", str(student),
           "--data", str(DOLLY), "--reps", "1" if quick else "3", "--max-new", "32" if quick else "128"]
    r = run_measured(cmd, env=ENV, timeout=3000)
    rec = last_json_line(r["stdout"], "PHASES")
    if rec is None:
        raise RuntimeError(f"phases failed:\n{r['stderr'][-3000:]}")
    rec["command"] = " ".join(cmd)
    return rec


PEER_ORDERS = {
    "peer": ["ours_a0_fp32", "trl", "ours_full_fp32", "ours_a0_bf16", "ours_full_bf16"],
    "peer2": ["ours_a0_tbf16", "ours_a0_bf16", "trl", "ours_full_tbf16", "ours_full_bf16"],
}


def section_peer(quick: bool, teacher: Path, student: Path, which: str = "peer") -> dict:
    from peer import run_ours, run_trl

    steps = 2 if quick else 4
    order = PEER_ORDERS[which]
    if quick:
        order = ["ours_a0_fp32", "trl", "ours_full_fp32"] if which == "peer" else order
    runs = {}
    for name in order:
        log(f"peer: {name} ({steps} steps)")
        runs[name] = run_trl(teacher, student, steps, ENV) if name == "trl" else run_ours(name, teacher,
                                                                                          student,
                                                                                        steps, ENV)
        r = runs[name]
        if "error" in r:
            log(f"  FAILED: {r['error'][-500:]}")
        else:
            log(f"  median {r['median_step_s']:.2f} s/step, steps {r['step_s']}, tokens/step "
                f"{r.get('median_tokens')}, "
                f"peak RSS {r.get('peak_rss_gb', 0):.2f} GB")
    try:
        trl_v = subprocess.run(["/tmp/trl-peer/bin/python", "-c", "import trl,torch,transformers;"
                                "print(trl.__version__,torch.__version__,transformers.__version__)"],
                               capture_output=True, text=True).stdout.split()
    except OSError:
        trl_v = []
    return {"steps": steps, "runs": runs, "trl_env": trl_v}


# ------------------------------------------------------------------------------------------ rendering
def fmt(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x.is_integer() and abs(x) >= 100:
            return f"{int(x):,}"
        if x != 0 and abs(x) < 0.1:
            return f"{x:.3g}"
        return f"{x:,.{nd}f}"
    return str(x)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(out)


def r3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def verdict(ok) -> str:
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def render(meta: dict) -> str:
    mem, ph, peer, gpu = load("memory"), load("phases"), load("peer"), load("gpu_step")
    mi = meta.get("machine") or {}
    L = ["# Benchmarks", "",
         "Generated by `python benchmarks/run.py" + (" --quick" if meta.get("quick") else "") +
         "` (see `benchmarks/run.py --help`); raw figures in `benchmarks/results/*.json`. Every figure is a "
         "median over repeated runs (the first, warm-up, repetition / training step excluded); every ratio "
         "compares runs made in the same invocation, one after another. This file was produced by "
         "`python benchmarks/run.py --sections peer,phases,memory` (2026-11-28 ~18:40 UTC; set A comes from "
         "that run, before the fused loss, the fp32 head and unpadded teacher scoring), "
         "`python benchmarks/run.py --sections memory` (21:33 UTC: section 4, fused loss) and "
         "`python benchmarks/run.py --sections phases,peer2` (the date below: set B and sections 2, 3 and 5, "
         "current code, after the decode-loop changes), on an otherwise idle machine; the GPU figures come "
         "from `PYTHONPATH=src python benchmarks/gpu_step.py --no-pad` on the "
         "lent H200, with its JSON copied to `benchmarks/results/gpu_step.json`.", "",
         f"- Date: {meta.get('date')}",
         f"- Machine: {mi.get('cpu')} ({', '.join(mi.get('isa', []))}), {mi.get('cores')} cores, "
         f"{mi.get('mem_gb')} GiB RAM; torch threads 2 (OMP_NUM_THREADS=2)",
         f"- Ours: Python {mi.get('python')}, torch {mi.get('torch')}, transformers "
         f"{mi.get('transformers')}, "
         f"accelerate {mi.get('accelerate')}",
         "- Peer venv (/tmp/trl-peer): trl / torch / transformers = "
         f"{' / '.join((peer or {}).get('trl_env', []))}",
         f"- Wall time of the suite: {fmt(meta.get('suite_wall_s'), 0)} s", ""]
    targets = []

    # ---------------------------------------------------------------- peer
    peer2 = load("peer2")
    sets = [(n, p) for n, p in (("A", peer), ("B", peer2)) if p]
    if sets:
        L += ["## 1. Peer comparison: one MiniLLM step, ours vs TRL 1.14.2 `MiniLLMTrainer`", "",
              "Same teacher (SmolLM2-135M-Instruct, fp32 HF folder from `builtin_model_dir`), same 4-layer "
              "student "
              "(`minillm prune --model smollm2-135m-instruct --layers 4`), the first `8 × steps` Dolly "
              "prompts of "
              "`dolly_dev1000.jsonl` in chat format, 8 prompts and one optimiser step per step, up to 128 "
              "new "
              f"tokens, {sets[0][1]['steps']} steps per run (median of the last {sets[0][1]['steps'] - 1}). "
              "Ours: "
              "`minillm distill --method minillm template=chat num_rollouts=8 batch_size=8 "
              "rollout_batch_size=8 "
              "ppo_epochs=1 max_new_tokens=128 single_step=true length_norm=true valid_fraction=0 ...` (no "
              "pt_data; exact commands in `benchmarks/results/peer*.json`); TRL: `trl_peer.py --trainer "
              "minillm "
              "--steps N --batch 8 --max-new 128 --threads 2` (fp32, num_generations=1; single-step term and "
              "length normalisation on by default). Our step time is `step_seconds` of metrics.jsonl "
              "(rollout "
              "included; rollout = `rollout/seconds`, update = the rest); peak RSS is the process's maximum "
              "resident set size (wait4 rusage, as `/usr/bin/time -v`). Each set (A: `--sections peer`, "
              "B: `--sections peer2`) has its own TRL run, between our runs; ratios are to the TRL run of "
              "the "
              "same set. Settings that use bf16 autocast for the update are shown but do not count for the "
              "targets unless section 4 finds them within tolerance.", ""]
    cands = {"a0": [], "full": [], "rss": []}
    for set_name, pr in sets:
        runs = pr["runs"]
        trl = runs.get("trl", {})
        t_step, t_rss, t_mspt = trl.get("median_step_s"), trl.get("peak_rss_gb"), trl.get("ms_per_token")
        rows = []
        for name, r in runs.items():
            if "error" in r:
                rows.append([r["setting"], "failed", "", "", "", "", "", "", "", ""])
                continue
            ratio = r["median_step_s"] / t_step if t_step else None
            pt = r["ms_per_token"] / t_mspt if (t_mspt and r.get("ms_per_token")) else None
            rss = r["peak_rss_gb"] / t_rss if (t_rss and r.get("peak_rss_gb")) else None
            rows.append([r["setting"], r["median_step_s"], ratio, r.get("median_tokens"),
                         r.get("ms_per_token"), pt,
                         r.get("median_rollout_s"), r.get("median_update_s"), r.get("peak_rss_gb"), rss])
            if name == "trl" or ratio is None:
                continue
            counts = ("bf16" not in name) or ("tbf16" in name and teacher_bf16_ok(ph)) or bf16_ok(ph)
            label = f"{r['setting']} (set {set_name})"
            if counts:
                cands["a0" if "_a0_" in name else "full"].append((ratio, label))
            if rss is not None:
                cands["rss"].append((rss, label))
        L += [f"Set {set_name}:", "", table(["setting", "s / step", "× TRL", "gen. tokens / step",
                                             "ms / gen. token",
                                             "× TRL per token", "rollout s", "update s", "peak RSS GB",
                                             "RSS × TRL"],
                                            rows), "",
              "Per-step times, s (first = warm-up): " + "; ".join(
                  f"{n}: {[round(x, 1) for x in runs[n]['step_s']]}" for n in runs if "step_s" in runs[n]),
                  ""]
    if sets:
        a0 = min(cands["a0"], default=(None, None))
        full = min(cands["full"], default=(None, None))
        rss_worst = max(cands["rss"], default=(None, None))
        targets += [
            ("α = 0 step ≤ 0.4× TRL (best setting within tolerance)", a0[0], 0.4, f"{r3(a0[0])}× — {a0[1]}"),
            ("full MiniLLM step ≤ 0.7× TRL (best setting within tolerance)", full[0], 0.7,
             f"{r3(full[0])}× — {full[1]}"),
            ("peak RSS ≤ 0.7× TRL (worst of all our settings)", rss_worst[0], 0.7,
             f"{r3(rss_worst[0])}× — {rss_worst[1]}"),
        ]

    # ---------------------------------------------------------------- phases
    if ph:
        d, f, u = ph["decode_seconds"], ph["floor_seconds"], ph["update_seconds"]
        n_new, mm = ph["new_tokens"], ph["matmul_gflops"]
        L += ["## 2. Our step, phase by phase, next to its floors", "",
              f"In-process (`benchmarks/phases.py`, {ph['reps']} repetitions + 1 warm-up, interleaved): the "
              "first "
              f"{ph['batch']} Dolly prompts in chat format ({ph['prompt_tokens']} prompt tokens, padded "
              "width "
              f"{ph['prompt_width']}), every row decoding exactly {ph['max_new']} tokens (EOS disabled) so "
              "that "
              "variants do the same work. The update phase is the library's MiniLLM update (student hidden "
              "states, "
              "chunked log-probs + single-step reverse KL with the teacher hidden states recorded during the "
              "rollout, PPO-clipped term, backward, clip, AdamW) on the teacher-mixed rollout "
              "(`benchmarks/step_parts.py`).", ""]
        floor_mixed = d["teacher_alone_fp32"] + d["student_alone"]
        floor_mixed16 = d["teacher_alone_bf16"] + d["student_alone"]
        upd_gflops = ph["update_flops"] / u["fp32"]["update_s"] / 1e9
        upd16_gflops = ph["update_flops"] / u["bf16_autocast"]["update_s"] / 1e9
        ff_gflops = ph["student_fwd_bwd_flops"] / f["student_fwd_bwd"] / 1e9
        rows = [
            ["rollout, α = 0.2, fp32 teacher (lockstep decode)", d["mixed_a0.2_fp32"],
             "teacher decode alone + student decode alone", floor_mixed, floor_mixed / d["mixed_a0.2_fp32"]],
            ["rollout, α = 0.2, bf16 teacher", d["mixed_a0.2_teacher_bf16"], "bf16 teacher decode + student "
                                                                             "decode",
             floor_mixed16, floor_mixed16 / d["mixed_a0.2_teacher_bf16"]],
            ["teacher scoring inside the rollout (= teacher decode alone, fp32)", d["teacher_alone_fp32"],
             "teacher forward over the same prompt+response tokens, fp32", f["teacher_forward_fp32"],
             f["teacher_forward_fp32"] / d["teacher_alone_fp32"]],
            ["teacher scoring, bf16 decode", d["teacher_alone_bf16"], "teacher forward, bf16",
             f["teacher_forward_bf16"], f["teacher_forward_bf16"] / d["teacher_alone_bf16"]],
            ["student-only sampling (our KV loop)", d["student_alone"], "HF `generate(do_sample=True)`",
             d["hf_generate_student"], d["hf_generate_student"] / d["student_alone"]],
            ["update, fp32", u["fp32"]["update_s"], "student forward+backward alone (HF, CE loss)",
             f["student_fwd_bwd"], f["student_fwd_bwd"] / u["fp32"]["update_s"]],
            ["update, bf16 autocast", u["bf16_autocast"]["update_s"], "same floor (fp32)",
             f["student_fwd_bwd"],
             f["student_fwd_bwd"] / u["bf16_autocast"]["update_s"]],
        ]
        L += [table(["our phase", "s", "floor", "floor s", "floor / ours"], rows), ""]
        L += ["Update breakdown (fp32 / bf16 autocast), seconds: " + ", ".join(
            f"{k[:-2]} {fmt(u['fp32'][k])} / {fmt(u['bf16_autocast'][k])}"
            for k in ("body_forward_s", "loss_terms_s", "backward_s", "optimizer_s")) +
            f". Tokens: {ph['update_tokens']['response_tokens']} response tokens, "
            f"{ph['update_tokens']['sequence_tokens']} sequence tokens "
            f"({ph['update_tokens']['padded_tokens']} "
            f"with padding). Student forward alone (full logits, no grad): {fmt(f['student_forward'])} s.",
            "",
            f"Achieved throughput of the update phase (FLOPs counted by `torch.utils.flop_counter` on one "
            f"update, checkpoint recomputation included: {ph['update_flops'] / 1e9:,.0f} GFLOP): "
            f"**{upd_gflops:,.0f} GFLOP/s fp32** = {upd_gflops / mm['fp32']:.0%} of the measured fp32 matmul "
            f"peak ({mm['fp32']:,.0f} GFLOP/s, {mm['n']}³ matmul on 2 threads); bf16 autocast "
            f"{upd16_gflops:,.0f} GFLOP/s = {upd16_gflops / mm['bf16']:.0%} of the bf16 peak "
            f"({mm['bf16']:,.0f} GFLOP/s). The HF student forward+backward floor runs at {ff_gflops:,.0f} "
            f"GFLOP/s ({ff_gflops / mm['fp32']:.0%} of fp32 peak).", ""]
        L += ["## 3. Sampling throughput", "", f"Batch {ph['batch']}, {ph['max_new']} new tokens per row, "
              "generated tokens per second (median):", ""]
        rows = [[k.replace("_", " "), n_new / v] for k, v in d.items()]
        L += [table(["decode", "new tokens / s"], rows), ""]
        mix_ratio = floor_mixed / d["mixed_a0.2_fp32"]
        mix16 = floor_mixed16 / d["mixed_a0.2_teacher_bf16"]
        hf_ratio = d["hf_generate_student"] / d["student_alone"]
        targets += [
            ("teacher-mixed sampling ≥ 0.8× its floor (fp32 teacher)", mix_ratio, -0.8, f"{r3(mix_ratio)}×"),
            ("teacher-mixed sampling ≥ 0.8× its floor (bf16 teacher)", mix16, -0.8, f"{r3(mix16)}×"),
            ("student-only sampling ≥ 1.5× HF generate", hf_ratio, -1.5, f"{r3(hf_ratio)}×"),
        ]
        tol = ph["bf16_tolerance"]
        L += ["## 4. bf16 against fp32 (tolerance check for the bf16 settings)", "",
              "On the fp32 teacher-mixed rollout above: teacher log-probabilities of the sampled tokens from "
              "a bf16 "
              "teacher vs the fp32 teacher (same tokens, one forward each), and one full update's gradient "
              "under "
              "bf16 autocast vs fp32.", "",
              table(["quantity", "value"], [
                  ["mean abs error of teacher log p(y_t), bf16 vs fp32 (nats)",
                   tol["teacher_logp_abs_err_mean"]],
                  ["99th percentile of that error (nats)", tol["teacher_logp_abs_err_p99"]],
                  ["std of the per-token reward log p − log q_old (nats), for scale", tol["reward_std"]],
                  ["KL(p_fp32 ‖ p_bf16) per token (nats)", tol["teacher_kl_fp32_vs_bf16_per_token"]],
                  ["decode-time vs parallel-forward teacher log p, fp32 (nats)",
                   tol["teacher_logp_decode_vs_forward_abs_err_mean"]],
                  ["update gradient cosine, bf16 autocast vs fp32", tol["update_grad_cosine"]],
                  ["update gradient relative L2 error", tol["update_grad_rel_err"]],
                  ["update loss fp32 / bf16",
                   f"{tol['update_loss_fp32']:.5f} / {tol['update_loss_bf16']:.5f}"],
              ]), "",
              "Tolerance used here: bf16 teacher if its mean log-prob error is < 5 % of the reward's "
              "standard "
              "deviation; bf16 autocast update if its gradient has cosine ≥ 0.99 with the fp32 gradient. "
              "Verdict: "
              f"bf16 teacher **{'within' if teacher_bf16_ok(ph) else 'outside'}** tolerance; bf16 autocast "
              "update "
              f"**{'within' if bf16_ok(ph) else 'outside'}** tolerance.", ""]
        newer = load("tolerance")
        if newer and "fp32_head_fused" in newer:
            f = newer["fp32_head_fused"]
            L += ["The update rows above predate the fp32 LM head under autocast and the fused loss. The "
                  "current "
                  f"code, re-measured by `{newer.get('command', 'benchmarks/tolerance.py')}` "
                  "(`benchmarks/results/tolerance.json`, fp64 cosine): gradient cosine "
                  f"{f['update_grad_cosine']:.4f}, relative L2 error {f['update_grad_rel_err']:.3f}, loss "
                  f"{f['update_loss_fp32']:.4f} (fp32) / {f['update_loss_bf16']:.4f} (bf16). That figure "
                  "decides the "
                  "verdict.", ""]

    # ---------------------------------------------------------------- memory
    if mem:
        L += ["## 5. Memory of the chunked reverse-KL / single-step term", "",
              "Forward + backward of the single-step reverse KL plus the log-probs the PPO term needs (loss "
              "= mean "
              f"RKL − mean log q) on N response positions, vocabulary {mem['vocab']:,}, hidden "
              f"{mem['hidden']}, "
              "trainable student head (its gradient buffer pre-allocated), frozen teacher head. *fused* = "
              "`fused_token_loss` (what MiniLLM training uses: each chunk's gradient is formed in the "
              "forward pass, "
              "the heads are never recomputed, one gradient buffer per head parameter); *checkpointed* = "
              "`chunked_token_terms` (activation checkpointing per chunk). Extra memory = peak RSS during "
              "forward+backward minus RSS just before (fresh process per figure, after a 4-position warm-up; "
              "median "
              f"of {mem['reps']}). The default `chunk_size` is 256.", ""]
        rows = []
        by = {}
        for r in mem["rows"]:
            fused = r.get("fused", False)
            label = "one chunk (= unchunked)" if r["chunk"] == r["n"] else f"chunk {r['chunk']}"
            by[(r["n"], r["chunk"], fused)] = r["extra_mb"]
            rows.append([r["n"], "fused" if fused else "checkpointed", label, r["extra_mb"], r["seconds"]])
        L += [table(["N", "path", "chunking", "extra MB", "fwd+bwd s"], rows), ""]
        ns = sorted({r["n"] for r in mem["rows"]})
        if 256 in ns and 2048 in ns:
            for fused in (True, False):
                base = by.get((256, 256, fused))
                for chunk in (256, 512):  # chunk_size 512 is one half-full chunk at N = 256
                    if (2048, chunk, fused) in by and base:
                        ratio = by[(2048, chunk, fused)] / base
                        name = "fused_token_loss, as trained" if fused else "chunked_token_terms"
                        what = f"loss extra memory at 2048 ≤ 1.2× at 256 ({name}, chunk_size {chunk})"
                        if fused and chunk == 256:  # the configuration training runs by default
                            targets.append((what + ", the default", ratio, 1.2, f"{r3(ratio)}×"))
                        else:
                            L.append(f"- other setting, not the target's: {what}: {r3(ratio)}×")
            L.append("")
            base = by.get((256, 256, False))
            if (2048, 2048, False) in by and base:
                L += [f"Unchunked, the same term needs {by[(2048, 2048, False)] / base:.1f}× the memory at "
                      "2048 as at "
                      "256.", ""]

    # ---------------------------------------------------------------- gpu
    if gpu:
        s, tps = gpu["seconds"], gpu["tokens_per_s"]
        L += ["## 6. GPU: GPT-2-XL-shaped teacher, GPT-2-base-shaped student, bf16", "",
              f"`{gpu.get('command', 'PYTHONPATH=src python benchmarks/gpu_step.py')}` on {gpu['device']} "
              f"(torch {gpu['torch']}, transformers {gpu['transformers']}): random weights, teacher "
              f"{gpu['teacher_params_m']:.0f}M, student {gpu['student_params_m']:.0f}M parameters, both held "
              "in bf16 "
              f"(pure bf16 AdamW for the student), batch {gpu['batch']}, prompt {gpu['prompt_len']}, "
              f"{gpu['max_new']} new tokens, α = {gpu['alpha']}, median of {gpu['reps']} after a warm-up.",
              ""]
        rows = [["teacher decode alone (our KV loop)", s["teacher_decode"], tps["teacher_decode"],
                 "new tokens"],
                ["student decode alone (our KV loop)", s["student_decode"], tps["student_decode"],
                 "new tokens"],
                ["teacher-mixed rollout (α = 0.2, hidden states kept)", s["mixed_rollout"],
                 tps["mixed_rollout"],
                 "new tokens"],
                ["HF generate(do_sample) student", s["hf_generate"], tps["hf_generate_student"],
                 "new tokens"],
                ["teacher forward over prompt+response", s["teacher_forward"], tps["teacher_forward_scoring"],
                 "sequence tokens"],
                ["update (fwd, chunked terms, bwd, AdamW)", gpu["update_seconds"]["update_s"],
                 tps["update_response_tokens"], "response tokens"]]
        L += [table(["phase", "s", "tokens / s", "counted"], rows), "",
              f"Update phase: {gpu['update_flops'] / 1e12:.2f} TFLOP per update, "
              f"{gpu['update_tflops_achieved']:.0f} TFLOP/s achieved = **MFU "
              f"{gpu['update_mfu_vs_measured_matmul']:.1%}"
              f"** of the measured bf16 matmul rate ({gpu['matmul_bf16_tflops']:.0f} TFLOP/s, 8192³). The "
              "teacher "
              f"forward reaches {gpu['teacher_forward_mfu']:.0%}. Teacher-mixed rollout vs its floor "
              "(teacher "
              f"decode + student decode): {gpu['mixed_vs_floor']:.2f}×; our student sampling vs HF generate: "
              f"{gpu['student_vs_hf_generate']:.2f}×. Peak GPU memory "
              f"{gpu.get('max_memory_allocated_gb', 0):.1f} GB.",
              ""]
        if gpu.get("note"):
            L += [f"Note: {gpu['note']}", ""]

    if gpu:
        targets.append(("GPU script ≤ 8 min; tokens/s per phase and update MFU reported", 1.0, 1.0,
                        f"{gpu['wall_s']:.0f} s in-script; MFU {gpu['update_mfu_vs_measured_matmul']:.1%} "
                        "(section 6; "
                        "run without left padding, see the note)"))

    # ---------------------------------------------------------------- targets
    if targets:
        rows = []
        for name, val, thr, text in targets:
            ok = None if val is None else (val <= thr if thr > 0 else val >= -thr)
            rows.append([name, text, verdict(ok)])
        L[L.index("## 1. Peer comparison: one MiniLLM step, ours vs TRL 1.14.2 `MiniLLMTrainer`")
          if peer else len(L):0] = ["## Targets (issue 6)", "", table(["target", "measured", "verdict"],
                                                                      rows), ""]
    L += [ANALYSIS]
    return "\n".join(L) + "\n"


def teacher_bf16_ok(ph) -> bool:
    """bf16 teacher: mean |log p error| below 5 % of the per-token reward's standard deviation."""
    if not ph:
        return False
    tol = ph["bf16_tolerance"]
    return tol["teacher_logp_abs_err_mean"] < 0.05 * tol["reward_std"]


def update_cosine(ph) -> float:
    """Gradient cosine of the bf16 autocast update vs fp32: benchmarks/results/tolerance.json (the current
    code: fp32
    LM heads, fused loss, backward outside autocast; fp64 cosine) when present, else the phases section's
    figure."""
    tol = load("tolerance")
    if tol and "fp32_head_fused" in tol:
        return tol["fp32_head_fused"]["update_grad_cosine"]
    return ph["bf16_tolerance"]["update_grad_cosine"]


def bf16_ok(ph) -> bool:
    """bf16 teacher and bf16 autocast update (gradient cosine with fp32 >= 0.99)."""
    return teacher_bf16_ok(ph) and update_cosine(ph) >= 0.99


ANALYSIS = (Path(__file__).resolve().parent / "analysis.md").read_text() \
    if (Path(__file__).resolve().parent / "analysis.md").exists() else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="peer,peer2,phases,memory")
    ap.add_argument("--render", action="store_true", help="only render docs/benchmarks.md from saved results")
    a = ap.parse_args()
    meta = load("meta") or {}
    if not a.render:
        fresh = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": a.quick,
                 "machine": machine_info()}
        meta = {**meta, **fresh} if meta.get("quick") == a.quick else fresh
        teacher, student = prepare_models(log)
        meta["teacher"], meta["student"] = str(teacher), str(student)
        walls = meta.setdefault("section_wall_s", {})
        for sec in a.sections.split(","):
            log(f"section {sec}")
            ts = time.perf_counter()
            if sec == "memory":
                save("memory", section_memory(a.quick))
            elif sec == "phases":
                save("phases", section_phases(a.quick, teacher, student))
            elif sec in PEER_ORDERS:
                save(sec, section_peer(a.quick, teacher, student, sec))
            else:
                raise SystemExit(f"unknown section {sec}")
            walls[sec] = time.perf_counter() - ts
        meta["suite_wall_s"] = sum(walls.values())
        save("meta", meta)
    text = render(meta)
    DOC.write_text(text)
    print(text)
    log(f"wrote {DOC}")


if __name__ == "__main__":
    main()
