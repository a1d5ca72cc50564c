"""GPU check: a tiny MiniLLM run end to end in bf16 on CUDA, and a sweep of student-only decodes on
left-padded prompts to reproduce (or rule out) the device-side assert "gather index out of bounds".

    PYTHONPATH=src python benchmarks/gpu_check.py            # on the GPU machine (writes $OUT/gpu_check.json)
    PYTHONPATH=src python benchmarks/gpu_check.py --cpu      # CPU smoke test in fp32 (< 3 min on 2 cores)

Worst case on the GPU machine: setup + 150 s (train) + 150 s (evaluate) + 200 s (sweep) < 9 min, so one
`run` call with timeout_s=600 fits (the 420 sweep cases use tiny models; not yet timed on a GPU).

Phases (each caught and recorded on its own, so one failing phase does not hide the others; the exit status
is 1 when any phase failed):
  setup     tiny random Llama teacher / student folders with the tiny BPE tokenizer (minillm.testing) and
            instruction files whose prompts range from a few tokens to a few hundred (left padding in every
            batch of more than one prompt).
  train     `minillm.api.train(MiniLLMConfig(...))`: precision=bf16, teacher_dtype=bfloat16 (fp32 with --cpu),
            teacher-mixed rollouts, L_PT on the built-in corpus, eval_every so the validation decodes
            (student-only, left padded) run mid-training too.
  evaluate  `minillm.api.evaluate(EvalConfig(...))` of the trained student and the teacher: two seeds,
            sequence-level KL to the teacher and exposure bias (dtype bfloat16 on CUDA).
  sweep     `minillm.sampling.generate_rollouts` of the student alone (teacher_mix_alpha 0, no teacher) over
            model families (tiny Llama with vocab 320, Llama with SmolLM2's 49,152 vocab, GPT-2 with 50,257),
            batch sizes, prompt widths, pad patterns, weight dtypes / autocast and attention kernels. Every
            draw is watched (a wrapper around minillm.sampling.draw.sample_from_probs): non-finite
            probabilities and a drawn index >= vocab (what `scores.gather(1, token)` then asserts on) are
            recorded with the step, the rows and their pad counts before the gather runs.

Every phase runs in a child process with CUDA_LAUNCH_BLOCKING=1 and TORCH_USE_CUDA_DSA=1, so a device-side
assert is raised at the op that caused it (its traceback is kept in the JSON) and a dead CUDA context cannot
take the later phases with it; the sweep resumes after a crashed case in a fresh child. `--guard` turns a
would-be out-of-range draw into a Python error instead (the sweep then goes on in the same child).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve()
SRC = HERE.parents[1] / "src"
DEBUG_ENV = {"CUDA_LAUNCH_BLOCKING": "1", "TORCH_USE_CUDA_DSA": "1", "TORCH_SHOW_CPP_STACKTRACES": "1",
             "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = ("red green blue cat dog bird fish tree river city one two three yes no good bad water fire paris "
         "france capital mountain flower").split()


# ------------------------------------------------------------------ setup (parent process, no CUDA)
def make_rows(n: int, seed: int) -> list[dict]:
    """Instructions whose prompts differ a lot in length: a bare question, or one with a long input."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        kind = i % 4
        if kind == 0:
            instruction, inp = f"Name the {a}.", ""
        elif kind == 1:
            instruction, inp = f"Tell me about the {a} and the {b}.", " ".join(rng.choices(WORDS, k=4))
        elif kind == 2:
            instruction, inp = f"Summarize this text about the {a}.", " ".join(rng.choices(WORDS, k=40))
        else:
            instruction, inp = f"Explain the {a}.", " ".join(rng.choices(WORDS, k=rng.randint(60, 90)))
        output = " ".join([a, b] + rng.choices(WORDS, k=rng.randint(2, 8))) + "."
        rows.append({"instruction": instruction, "input": inp, "output": output, "id": str(i)})
    return rows


def phase_setup(work: Path) -> dict:
    from minillm.data import build_prompt, load_instructions
    from minillm.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    dirs = {}
    for name, model in (("teacher", tiny_llama(tok, hidden_size=64, layers=2, heads=4, kv_heads=2, seed=1)),
                        ("student", tiny_llama(tok, hidden_size=32, layers=1, heads=4, kv_heads=2, seed=2))):
        d = work / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs[name] = str(d)
    for name, n, seed in (("train", 48, 0), ("valid", 16, 1)):
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_rows(n, seed)))
        dirs[name] = str(path)
    lengths = [len(tok(build_prompt(ex, "minillm", tok))["input_ids"])
               for ex in load_instructions(dirs["valid"])]
    return {"dirs": dirs, "vocab": len(tok),
            "valid_prompt_tokens": {"min": min(lengths), "max": max(lengths)}}


# ------------------------------------------------------------------ child phases
def phase_train(a, work: Path) -> dict:
    import minillm
    from minillm.api import train
    from minillm.config import MiniLLMConfig, SamplingConfig

    bf16 = not a.cpu
    out = work / "train_run"
    cfg = MiniLLMConfig(
        student=str(work / "student"), teacher=str(work / "teacher"), train_data=str(work / "train.jsonl"),
        valid_data=str(work / "valid.jsonl"), output_dir=str(out), max_prompt_length=384, max_length=512,
        precision="bf16" if bf16 else "fp32", teacher_dtype="bfloat16" if bf16 else "float32",
        num_rollouts=8, rollout_batch_size=8, batch_size=4, ppo_epochs=1, max_steps=4, eval_every=2,
        eval_num_prompts=8, learning_rate=1e-4, sampling=SamplingConfig(max_new_tokens=a.max_new),
        pt_data=str(Path(minillm.__file__).parent / "resources" / "pretrain_corpus.txt"), pt_seq_len=64,
        save_every=2, seed=0)
    t0 = time.perf_counter()
    best = train(cfg)
    res = {"seconds": time.perf_counter() - t0, "best": str(best),
           "summary": json.loads((out / "summary.json").read_text())}
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    res["valid"] = [{k: v for k, v in r.items() if k.startswith("valid_") or k == "step"}
                    for r in recs if any(k.startswith("valid_") for k in r)]
    res["last_train"] = {k: v for k, v in recs[-1].items() if isinstance(v, (int, float))} if recs else {}
    res["rounds"] = [{k: v for k, v in r.items() if k.startswith("rollout/") or k == "step"}
                     for r in recs if "rollout/round" in r]
    if not res["valid"]:
        raise RuntimeError("training logged no validation metrics (eval_every did not run)")
    return res


def phase_evaluate(a, work: Path) -> dict:
    from minillm.api import evaluate
    from minillm.config import EvalConfig, SamplingConfig

    student = work / "train_run" / "best"
    if not student.exists():
        student = work / "train_run" / "final"
    if not student.exists():  # the train phase failed: evaluate the untrained student
        student = work / "student"
    out = work / "eval_run"
    cfg = EvalConfig(models=[f"student={student}"], data=[str(work / "valid.jsonl")], output_dir=str(out),
                     seeds=[10, 20], sampling=SamplingConfig(max_new_tokens=a.max_new), batch_size=8,
                     max_prompt_length=384, dtype="float32" if a.cpu else "bfloat16",
                     teacher=str(work / "teacher"), sequence_kl=True, exposure_bias=True)
    t0 = time.perf_counter()
    evaluate(cfg)
    res = {"seconds": time.perf_counter() - t0, "model": str(student)}
    res["results"] = json.loads((out / "results.json").read_text())["results"]
    if (out / "sequence_kl.json").exists():
        res["sequence_kl"] = json.loads((out / "sequence_kl.json").read_text())["results"]
    return res


def sweep_cases(a) -> list[dict]:
    if a.cpu:
        grid = dict(family=["llama320", "llama49k"], numerics=["fp32"], attn=["sdpa", "eager"],
                    compact=[True], batch=[1, 5], width=[40], pads=["ramp", "extreme"])
    else:  # the model keys (family, numerics, attn) outermost: each model is built once
        grid = dict(family=["llama320", "llama49k", "gpt2_50k"], numerics=["bf16", "fp32+autocast"],
                    attn=["sdpa", "eager"], compact=[True, False], batch=[1, 4, 16, 64], width=[48, 200],
                    pads=["none", "ramp", "extreme", "single"])
    cases = []
    for values in itertools.product(*grid.values()):
        c = dict(zip(grid.keys(), values))
        if c["batch"] == 1 and c["pads"] != "none" and c["pads"] != "ramp":
            continue  # one row: every pad pattern is "no padding" or a shorter prompt
        if not c["compact"] and (c["attn"] != "sdpa" or c["width"] != 48):
            continue  # compaction off: only on the default kernel and the short width
        cases.append(c)
    return cases


def pad_counts(pattern: str, batch: int, width: int) -> list[int]:
    if pattern == "none":
        return [0] * batch
    if pattern == "ramp":  # as benchmarks/gpu_step.py: 0 .. width / 2
        return [(i * width) // (2 * max(batch, 1)) + (width // 4 if batch == 1 else 0) for i in range(batch)]
    if pattern == "extreme":  # one full row, every other row a single real token
        return [0] + [width - 1] * (batch - 1)
    if pattern == "single":  # every row a single real token but one, at the end
        return [width - 1] * (batch - 1) + [0]
    raise ValueError(pattern)


class DrawWatch:
    """Wraps minillm.sampling.draw.sample_from_probs: records non-finite probabilities and out-of-range draws
    (index >= vocab, which `scores.gather(1, token)` in draw_next asserts on) before they are used."""

    def __init__(self, guard: bool):
        import minillm.sampling.draw as draw

        self.draw, self.orig, self.guard = draw, draw.sample_from_probs, guard
        self.reset(None, None)
        draw.sample_from_probs = self

    def reset(self, case, pads):
        self.case, self.pads, self.steps = case, pads, 0
        self.first_nonfinite, self.first_oob, self.nonfinite_steps, self.oob_steps = None, None, 0, 0

    def __call__(self, probs, generator=None, *, rows=None, batch=None):
        import torch

        step = self.steps
        self.steps += 1
        bad = ~torch.isfinite(probs).all(-1)
        idx = self.orig(probs, generator, rows=rows, batch=batch)
        V = probs.shape[-1]
        oob = idx >= V
        n_bad, n_oob = int(bad.sum()), int(oob.sum())
        if n_bad:
            self.nonfinite_steps += 1
            if self.first_nonfinite is None:
                r = self._rows(bad, rows)
                self.first_nonfinite = {"step": step, "rows": r, "n_rows": n_bad,
                                        "pads_of_rows": self._pads(r),
                                        "has_nan": bool(torch.isnan(probs).any()),
                                        "has_inf": bool(torch.isinf(probs).any())}
        if n_oob:
            self.oob_steps += 1
            if self.first_oob is None:
                r = self._rows(oob, rows)
                self.first_oob = {"step": step, "rows": r, "n_rows": n_oob, "vocab": V,
                                  "max_index": int(idx.max()), "pads_of_rows": self._pads(r)}
            if self.guard:
                raise RuntimeError(f"guard: drawn index {int(idx.max())} >= vocab {V} at decode step {step}")
        return idx

    @staticmethod
    def _rows(flags, rows) -> list[int]:
        """Rows (of the original, uncompacted batch) where `flags` is set; the first 16."""
        at = flags.nonzero().flatten()
        if rows is not None:
            at = rows.to(at.device)[at]
        return at[:16].tolist()

    def _pads(self, rows: list[int]):
        return [self.pads[i] for i in rows] if self.pads else None

    def report(self) -> dict:
        return {"pad_counts": self.pads, "draw_steps": self.steps,
                "nonfinite_prob_steps": self.nonfinite_steps, "oob_draw_steps": self.oob_steps,
                "first_nonfinite": self.first_nonfinite, "first_oob": self.first_oob}


def build_family(name: str, work: Path, numerics: str, attn: str, device):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if numerics == "bf16" else torch.float32
    torch.manual_seed(0)
    if name == "llama320":
        from minillm.models import load_model

        model = load_model(str(work / "student"), dtype="bfloat16" if numerics == "bf16" else "float32")
        eos = model.config.eos_token_id
    elif name == "llama49k":
        V = 49152
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=1024,
                                             bos_token_id=V - 1, eos_token_id=V - 1, pad_token_id=V - 1))
        eos = V - 1
    elif name == "gpt2_50k":
        V = 50257
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=128, n_layer=2, n_head=4, n_positions=1024,
                                           bos_token_id=V - 1, eos_token_id=V - 1, pad_token_id=V - 1))
        eos = V - 1
    else:
        raise ValueError(name)
    model.set_attn_implementation(attn)
    return model.to(device=device, dtype=dtype).eval(), eos


def run_case(c: dict, work: Path, device, watch: DrawWatch, max_new: int, models: dict) -> dict:
    import torch

    from minillm.config import SamplingConfig
    from minillm.models import final_hidden, lm_head_fn, position_ids_from_mask
    from minillm.sampling import generate_rollouts

    key = (c["family"], c["numerics"], c["attn"])
    if key not in models:
        models.clear()  # one family at a time on the device
        models[key] = build_family(c["family"], work, c["numerics"], c["attn"], device)
    model, eos = models[key]
    V = model.config.vocab_size
    B, P = c["batch"], c["width"]
    pads = pad_counts(c["pads"], B, P)
    g = torch.Generator().manual_seed(1000 * B + P + 7 * len(c["pads"]))
    ids = torch.randint(0, V - 1, (B, P), generator=g)
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        ids[i, :p], mask[i, :p] = eos, 0
    ids, mask = ids.to(device), mask.to(device)
    res = {"vocab": V, "pad_counts": pads}
    with torch.no_grad():  # prefill diagnostic, as gpu_step.py: non-finite hidden states / last logits
        autocast = c["numerics"] == "fp32+autocast"
        with torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            hid = final_hidden(model, ids, mask, position_ids_from_mask(mask))
            last = lm_head_fn(model)(hid[:, -1])
        real = mask.bool()
        res["prefill_nonfinite_real_positions"] = int((~torch.isfinite(hid.float())).any(-1)[real].sum())
        res["prefill_nonfinite_pad_positions"] = int((~torch.isfinite(hid.float())).any(-1)[~real].sum())
        res["prefill_nonfinite_last_logit_rows"] = int((~torch.isfinite(last.float())).any(-1).sum())
    watch.reset(c, pads)
    inject = os.environ.get("GPU_CHECK_INJECT", "")  # self-test of the bookkeeping: crash:K or nan:K
    if inject == f"crash:{c['index']}":
        os._exit(134)  # what a device-side assert does to the child, without a GPU
    if inject == f"nan:{c['index']}":
        model.get_output_embeddings().weight.data[0, 0] = float("nan")
        models.clear()
    t0 = time.perf_counter()
    r = generate_rollouts(model, ids, mask, config=SamplingConfig(max_new_tokens=max_new), eos_token_id=eos,
                          pad_token_id=eos, generator=torch.Generator().manual_seed(1),
                          student_autocast=torch.bfloat16 if c["numerics"] == "fp32+autocast" else None,
                          compact=c["compact"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    res["decode_seconds"] = time.perf_counter() - t0
    m = r.response_mask.bool()
    res["max_response_id"] = int(r.response_ids.max())
    res["mean_length"] = float(r.lengths.float().mean())
    res["nonfinite_logprobs"] = int((~torch.isfinite(r.student_logprobs[m])).sum())
    res.update(watch.report())
    res["ok"] = (res["max_response_id"] < V and not res["nonfinite_logprobs"] and not res["oob_draw_steps"]
                 and not res["nonfinite_prob_steps"])
    return res


def phase_sweep(a, work: Path) -> dict:
    """Child: cases a.start.. of the sweep, one JSON line per case start and end in a.progress."""
    import torch

    device = torch.device("cpu" if a.cpu else "cuda")
    watch = DrawWatch(a.guard)
    cases = sweep_cases(a)
    models: dict = {}
    with open(a.progress, "a") as prog:
        for k in range(a.start, len(cases)):
            prog.write(json.dumps({"case": k, "event": "start", **cases[k]}) + "\n")
            prog.flush()
            try:
                res = run_case({**cases[k], "index": k}, work, device, watch, a.max_new, models)
            except Exception as e:  # a Python-level error (or a guard): record and go on
                if "device-side assert" in str(e) or "CUDA error" in str(e):
                    raise  # the context is dead: the parent restarts the sweep after this case
                res = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:500]}",
                       "traceback": traceback.format_exc()[-3000:], **watch.report()}
            prog.write(json.dumps({"case": k, "event": "end", **cases[k], **res}) + "\n")
            prog.flush()
    return {"cases": len(cases) - a.start}


PHASES = {"train": phase_train, "evaluate": phase_evaluate, "sweep": phase_sweep}


def child_main(a) -> None:
    """Run one phase in this process; write its result (or error) to a.result."""
    work = Path(a.work)
    out: dict = {}
    try:
        import torch

        if not a.cpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (use --cpu for the CPU smoke test)")
        torch.manual_seed(0)
        if a.cpu:
            torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        out = {"status": "ok", **PHASES[a.phase](a, work)}
    except BaseException as e:  # noqa: BLE001 - recorded, and the exit status says it failed
        out = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:4000],
               "traceback": traceback.format_exc()[-6000:]}
    Path(a.result).write_text(json.dumps(out, indent=1, default=str))
    sys.exit(0 if out["status"] == "ok" else 1)


# ------------------------------------------------------------------ parent
def run_child(a, phase: str, work: Path, timeout: float, extra: list[str] | None = None) -> dict:
    result = work / f"phase_{phase}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE), "--phase", phase, "--work", str(work), "--result", str(result),
           "--max-new", str(a.max_new)] + (["--cpu"] if a.cpu else []) + (["--guard"] if a.guard else [])
    cmd += extra or []
    env = {**os.environ, **DEBUG_ENV,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    if a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = "timeout", _text(e.stdout), _text(e.stderr)
    res = json.loads(result.read_text()) if result.exists() else {"status": "failed",
                                                                   "error": f"child exited with {rc} "
                                                                            "and no result"}
    res["child_seconds"] = time.perf_counter() - t0
    res["child_rc"] = rc
    if rc != 0:
        res["stderr_tail"] = stderr[-6000:]
        res["stdout_tail"] = stdout[-2000:]
        res["status"] = "failed"
    log_dir = Path(a.out) / "gpu_check_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{phase}.log", "a") as f:
        f.write(f"$ {' '.join(cmd)}\n--- rc {rc}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n")
    return res


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def read_events(progress: Path) -> list[dict]:
    if not progress.exists():
        return []
    return [json.loads(x) for x in progress.read_text().splitlines() if x.strip()]


def assert_lines(text: str) -> list[str]:
    keys = ("device-side assert", "Assertion", "index out of bounds", "CUDA error", "RuntimeError", "File \"")
    lines = [x.strip() for x in text.splitlines() if any(k in x for k in keys)]
    return lines[-14:]


def parent_sweep(a, work: Path) -> dict:
    progress = work / "sweep_progress.jsonl"
    progress.unlink(missing_ok=True)
    n = len(sweep_cases(a))
    t0 = time.perf_counter()
    start, crashes, children = 0, [], 0
    deadline = time.perf_counter() + a.sweep_budget
    while start < n and children < a.max_restarts and time.perf_counter() < deadline:
        children += 1
        res = run_child(a, "sweep", work, timeout=max(30.0, deadline - time.perf_counter()),
                        extra=["--start", str(start), "--progress", str(progress)])
        events = read_events(progress)
        started = [e["case"] for e in events if e["event"] == "start"]
        ended = {e["case"] for e in events if e["event"] == "end"}
        if res["status"] == "ok":
            start = n
            break
        hung = [k for k in started if k not in ended and k >= start]
        if not hung:  # failed outside a case (import, CUDA init): no point retrying
            tail = res.get("stderr_tail", "") + res.get("traceback", "")
            crashes.append({"case": None, **{k: res.get(k) for k in ("error", "child_rc")},
                            "assert_lines": assert_lines(tail)})
            break
        k = hung[0]
        crashes.append({"case": k, **sweep_cases(a)[k], "child_rc": res.get("child_rc"),
                        "error": res.get("error"),
                        "assert_lines": assert_lines(res.get("stderr_tail", "") + res.get("traceback", "")),
                        "stderr_tail": res.get("stderr_tail", "")[-3000:]})
        start = k + 1
    events = read_events(progress)
    done = [e for e in events if e["event"] == "end"]
    bad = [e for e in done if not e.get("ok")]
    out = {"cases_total": n, "cases_done": len(done), "cases_crashed": len(crashes),
           "cases_flagged": len(bad), "children": children, "crashes": crashes,
           "flagged": [{k: v for k, v in e.items() if k not in ("traceback",)} for e in bad[:40]],
           "slowest_decode_s": max((e.get("decode_seconds", 0) for e in done), default=None),
           "child_seconds": time.perf_counter() - t0}
    by_family: dict = {}
    for e in done:
        f = by_family.setdefault(e["family"], {"ok": 0, "flagged": 0})
        f["ok" if e.get("ok") else "flagged"] += 1
    out["by_family"] = by_family
    out["reproduced_gather_oob"] = bool(crashes and any("index out of bounds" in " ".join(c["assert_lines"])
                                                        for c in crashes)) or any(e.get("oob_draw_steps")
                                                                                  for e in done)
    out["complete"] = len(done) == n  # False: --sweep-budget / --max-restarts ran out (not a failure)
    out["status"] = "ok" if not crashes and not bad else "failed"
    if out["status"] != "ok":
        out["error"] = (f"{len(crashes)} case(s) crashed the child, {len(bad)} flagged, "
                        f"{len(done)}/{n} done")
    (Path(a.out) / "gpu_check_sweep.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU smoke test in fp32 (small sweep)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."),
                    help="folder for gpu_check.json (default $OUT)")
    ap.add_argument("--work", default="", help="scratch folder for models and runs (default: a temp folder)")
    ap.add_argument("--max-new", type=int, default=24, help="max_new_tokens of every decode")
    ap.add_argument("--phases", default="train,evaluate,sweep", help="comma-separated subset of the phases")
    ap.add_argument("--guard", action="store_true",
                    help="raise a Python error on an out-of-range draw instead of letting the gather assert")
    ap.add_argument("--phase-timeout", type=float, default=150.0, help="seconds per train / evaluate child")
    ap.add_argument("--sweep-budget", type=float, default=200.0, help="seconds for the whole sweep")
    ap.add_argument("--max-restarts", type=int, default=12, help="sweep children at most (one per crash)")
    # internal: one phase in a child process
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--progress", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.phase:
        return child_main(a)

    for k, v in DEBUG_ENV.items():
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(SRC))
    t_start = time.perf_counter()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"mode": "cpu-fp32" if a.cpu else "cuda-bf16", "work": str(work),
                    "env": {k: os.environ.get(k) for k in DEBUG_ENV}, "phases": {}}
    try:
        import torch
        import transformers

        report["torch"], report["transformers"] = torch.__version__, transformers.__version__
        report["cuda_available"] = torch.cuda.is_available()  # no CUDA context is made in this process
        report["torch_cuda"] = torch.version.cuda
    except Exception as e:  # noqa: BLE001
        report["import_error"] = repr(e)
    if not a.cpu:
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            report["gpu"] = q.stdout.strip()
        except Exception as e:  # noqa: BLE001
            report["gpu"] = f"nvidia-smi: {e!r}"

    t0 = time.perf_counter()
    try:
        report["phases"]["setup"] = {"status": "ok", **phase_setup(work)}
    except Exception as e:  # noqa: BLE001
        report["phases"]["setup"] = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-4000:]}
    report["phases"]["setup"]["seconds"] = time.perf_counter() - t0
    print("setup", report["phases"]["setup"]["status"], flush=True)

    for phase in [p.strip() for p in a.phases.split(",") if p.strip()]:
        if report["phases"]["setup"]["status"] != "ok":
            report["phases"][phase] = {"status": "skipped", "error": "setup failed"}
            continue
        try:
            if phase == "sweep":
                res = parent_sweep(a, work)
            elif phase in PHASES:
                res = run_child(a, phase, work, timeout=a.phase_timeout)
                if res["status"] != "ok":
                    res["assert_lines"] = assert_lines(res.get("stderr_tail", "") + res.get("traceback", ""))
            else:
                res = {"status": "failed", "error": f"unknown phase {phase!r}"}
        except Exception as e:  # noqa: BLE001 - the parent's own bookkeeping failed
            res = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()}
        report["phases"][phase] = res
        print(phase, res["status"], round(res.get("child_seconds", 0.0), 1), res.get("error", "") or "",
              flush=True)

    report["wall_s"] = time.perf_counter() - t_start
    failed = [p for p, r in report["phases"].items() if r.get("status") != "ok"]
    report["failed_phases"] = failed
    path = out_dir / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1, default=str))

    print("=" * 72)
    print(f"gpu_check ({report['mode']}, torch {report.get('torch')}, {report.get('gpu', 'cpu')}): "
          f"{len(report['phases']) - len(failed)}/{len(report['phases'])} phases ok, "
          f"{report['wall_s']:.0f} s -> {path}")
    tr = report["phases"].get("train", {})
    if tr.get("status") == "ok":
        print(f"  train: {tr['summary']['steps']} steps, best {tr['summary']['best']}, {tr['seconds']:.1f} s")
    ev = report["phases"].get("evaluate", {})
    if ev.get("status") == "ok":
        r = next(iter(next(iter(ev["results"].values())).values()))
        print(f"  evaluate: rougeL {r['rougeL']['mean']:.2f}, length {r['length']['mean']:.1f}, "
              f"{ev['seconds']:.1f} s")
    sw = report["phases"].get("sweep", {})
    if "cases_total" in sw:
        print(f"  sweep: {sw['cases_done']}/{sw['cases_total']} cases done"
              f"{'' if sw['complete'] else ' (budget ran out: raise --sweep-budget)'}, "
              f"{sw['cases_crashed']} crashed, "
              f"{sw['cases_flagged']} flagged (non-finite / out-of-range draws), "
              f"gather OOB reproduced: {sw['reproduced_gather_oob']}; by family {sw['by_family']}")
        for c in sw["crashes"][:5]:
            print("    crash", {k: c.get(k) for k in ("case", "family", "batch", "width", "pads", "numerics",
                                                       "attn", "compact")})
            for line in c.get("assert_lines", [])[-4:]:
                print("      ", line)
    for p in failed:
        r = report["phases"][p]
        print(f"  FAILED {p}: {r.get('error', '')}")
        for line in r.get("assert_lines", [])[-4:]:
            print("      ", line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
