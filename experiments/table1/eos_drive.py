"""Which way does a MiniLLM update push the decision to stop? A one-round diagnostic for issue 7.

The table-1 run's MiniLLM answers grew to the 256-token cap. This script measures, without training, the
direction of the first update on the student's end-of-sequence (EOS) logit for each return variant:

1. Draw `--rollouts` teacher-mixed rollouts of training prompts from the run's student and teacher
   (alpha = 0.2, temperature 1, top-k 0, top-p 1, <= 256 tokens): round 1 of MiniLLM.
2. Per variant, rewards r_t = log p(y_t) - log q(y_t), the long-term advantages (`minillm.losses.advantages`)
   and their whitening over the valid tokens, exactly as the trainer builds them.
3. At theta = theta_old (ratio = importance weight w_t), the PPO loss of the package (`ppo_clipped_loss`,
   clip 0.2) and the single-step loss (`single_step_loss` of the exact token reverse KL) are formed from the
   student's logits, and autograd gives dL/dz_t[EOS] at every visited position. Reported:

       EOS drive = -sum_t dL/dz_t[EOS]   (> 0: gradient descent raises P(stop); < 0: lowers it)

   Both losses are token means, so the drive is the mean over tokens of the per-position push. The
   long-term drive splits into the sampled-EOS part (A_t w_t (1 - q_t(EOS)) where y_t = EOS) and the
   continuation part (-A_t w_t q_t(EOS) elsewhere).

Also printed: the mean whitened advantage of the EOS tokens and of the other tokens, and the share of EOS
tokens whose advantage is negative. It is a first-order, one-step measurement (the logits' gradient, not the
parameters'), meant to test the hypothesis in docs/results.md, not to replace the training rows.

    python experiments/table1/eos_drive.py --out /work/table1-run [--student PATH] [--rollouts 64]

Writes OUT/diagnostics/eos_drive[-<tag>].json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from minillm.data import PromptDataset, collate_prompts, load_instructions
from minillm.io import write_text
from minillm.losses import advantages, per_token_rewards, ppo_clipped_loss, single_step_loss, whiten
from minillm.models import check_compatibility, load_model, load_tokenizer, position_ids_from_mask
from minillm.sampling import SamplingConfig, generate_rollouts

VARIANTS = {  # name -> (advantage variant, gamma, length_norm); names as the table-1 rows
    "minillm (released: lmops, gamma 0.95, length-normalised)": ("lmops", 0.95, True),
    "minillm-nolen (lmops, gamma 0.95)": ("lmops", 0.95, False),
    "minillm-seqret (paper: R_t+1, gamma 1)": ("paper", 1.0, False),
    "paper, length-normalised (R_t+1 / n, gamma 1)": ("paper", 1.0, True),
}


def logit_drives(z_student: torch.Tensor, z_teacher: torch.Tensor, targets: torch.Tensor,
                 old_logprobs: torch.Tensor,
                 weights: torch.Tensor, adv: dict[str, torch.Tensor], *, eos: int, clip_eps: float | None,
                 scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-dL/dz_t[EOS] per token ([N]) of the single-step loss and of the PPO loss under each advantage in
    `adv`.

    z_*: [N, V] logits at N visited positions; the losses are the package's token means times `scale`
    (the share of these N tokens in the round), at theta = theta_old (ratio = `weights`).
    """
    z = z_student.detach().float().clone().requires_grad_(True)
    log_q = z.log_softmax(-1)
    log_p = z_teacher.detach().float().log_softmax(-1)
    ones = torch.ones(z.shape[0])
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # exact token reverse KL, differentiable through q
    (g,) = torch.autograd.grad(single_step_loss(kl, ones) * scale, z, retain_graph=True)
    single = -g[:, eos]
    lp = log_q.gather(1, targets[:, None]).squeeze(1)
    long_term = {}
    for name, a in adv.items():
        loss, _ = ppo_clipped_loss(lp, old_logprobs, a, weights, ones, clip_eps=clip_eps)
        (g,) = torch.autograd.grad(loss * scale, z, retain_graph=True)
        long_term[name] = -g[:, eos]
    return single, long_term


def eos_drive(student, teacher, tokenizer, prompts: list[list[int]], *, rollouts: int, alpha: float = 0.2,
              max_new_tokens: int = 256, batch_size: int = 16, seed: int = 0, clip_eps: float = 0.2,
              shared_vocab_size: int | None = None) -> dict:
    """The measurements above on `rollouts` prompts (token-id lists, drawn with `seed`)."""
    eos = tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=gen)[:rollouts].tolist()
    config = SamplingConfig(max_new_tokens=max_new_tokens)
    parts = []
    for start in range(0, len(order), batch_size):
        items = [{"prompt_ids": prompts[i], "prompt": "", "references": [], "id": i}
                 for i in order[start:start + batch_size]]
        batch = collate_prompts(items, tokenizer.pad_token_id)
        r = generate_rollouts(student, batch["input_ids"], batch["attention_mask"], config=config,
                              eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, teacher=teacher,
                              teacher_mix_alpha=alpha, shared_vocab_size=shared_vocab_size, generator=gen)
        parts.append(r)

    # per-token quantities of every rollout, flattened over the valid tokens (the trainer's token mean)
    per = {"rewards": [], "mask": []}
    adv_by_variant = {name: [] for name in VARIANTS}
    lengths, capped = [], 0
    for r in parts:
        mask = r.response_mask
        rewards = per_token_rewards(r.teacher_logprobs, r.student_logprobs, mask)
        for name, (variant, gamma, norm) in VARIANTS.items():
            adv_by_variant[name].append(advantages(rewards, mask, gamma=gamma, length_norm=norm,
                                                   variant=variant))
        per["rewards"].append(rewards)
        per["mask"].append(mask)
        lengths += r.lengths.tolist()
        capped += int(((r.lengths >= max_new_tokens) & (r.response_ids[:, -1] != eos)).sum())
    # whitening is over all rollouts of the round (the trainer whitens the round's buffer)
    flat_mask = torch.cat([m.flatten() for m in per["mask"]])
    whitened = {}
    for name in VARIANTS:
        flat_adv = torch.cat([a.flatten() for a in adv_by_variant[name]])
        whitened[name] = whiten(flat_adv, flat_mask)

    # the student's and teacher's logits on the rollouts, and dL/dz[EOS] per loss term
    out = {name: {"drive_eos_sampled": 0.0, "drive_continue": 0.0} for name in VARIANTS}
    ss_drive, n_tokens = 0.0, float(flat_mask.sum())
    eos_adv = {name: [] for name in VARIANTS}
    other_adv = {name: [] for name in VARIANTS}
    offset = 0
    for r in parts:
        ids, attn = r.full_sequence()
        P, T = r.prompt_ids.shape[1], r.response_ids.shape[1]
        pos = position_ids_from_mask(attn)
        with torch.no_grad():
            z_s = (
                student(input_ids=ids, attention_mask=attn, position_ids=pos)
                .logits[:, P - 1 : P - 1 + T]
                .float()
            )
            z_t = (
                teacher(input_ids=ids, attention_mask=attn, position_ids=pos)
                .logits[:, P - 1 : P - 1 + T]
                .float()
            )
        V = shared_vocab_size or min(z_s.shape[-1], z_t.shape[-1])
        z_s, z_t = z_s[..., :V], z_t[..., :V]
        valid = r.response_mask.bool()
        n = int(valid.sum())
        adv = {name: whitened[name][offset:offset + valid.numel()].view(valid.shape)[valid]
               for name in VARIANTS}
        d_ss, d_lt = logit_drives(z_s[valid], z_t[valid], r.response_ids[valid], r.student_logprobs[valid],
                                  r.importance_weights[valid], adv, eos=eos, clip_eps=clip_eps,
                                  scale=n / n_tokens)
        ss_drive += float(d_ss.sum())
        is_eos = r.response_ids[valid] == eos
        for name in VARIANTS:
            out[name]["drive_eos_sampled"] += float(d_lt[name][is_eos].sum())
            out[name]["drive_continue"] += float(d_lt[name][~is_eos].sum())
            eos_adv[name] += adv[name][is_eos].tolist()
            other_adv[name] += adv[name][~is_eos].tolist()
        offset += valid.numel()

    def mean(x):
        return sum(x) / len(x) if x else float("nan")

    for name in VARIANTS:
        o = out[name]
        o["drive_long_term"] = o["drive_eos_sampled"] + o["drive_continue"]
        o["eos_advantage_mean"] = mean(eos_adv[name])
        o["eos_advantage_negative_share"] = mean([float(x < 0) for x in eos_adv[name]])
        o["other_advantage_mean"] = mean(other_adv[name])
    return {"rollouts": len(order), "alpha": alpha, "tokens": int(n_tokens), "mean_length": mean(lengths),
            "capped": capped, "reward_mean": float((torch.cat([x.flatten()
                                                               for x in per["rewards"]]) * flat_mask).sum()
                                                   / n_tokens),
            "drive_single_step": ss_drive, "variants": out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the table-1 run directory (reads its stage markers)")
    p.add_argument("--student", help="student model directory (default: the run's student init)")
    p.add_argument("--tag", default="", help="suffix of the output file name")
    p.add_argument("--rollouts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(args.out)
    stage = {n: json.loads((root / "stages" / f"{n}.json").read_text())["info"]
             for n in ("data", "init", "teacher-select")}
    student_path = args.student or stage["init"]["model"]
    teacher_path = stage["teacher-select"]["path"]
    settings = json.loads((root / "settings.json").read_text())
    tok = load_tokenizer(student_path)
    student = load_model(student_path, dtype="bfloat16")
    teacher = load_model(teacher_path, dtype=settings.get("teacher_dtype", "bfloat16"))
    shared = check_compatibility(load_tokenizer(teacher_path), tok, teacher, student)
    # run.py's TEMPLATE
    ds = PromptDataset(load_instructions(stage["data"]["train"]), tok, template="minillm",
                       max_prompt_length=settings["max_prompt_length"])
    prompts = [ds[i]["prompt_ids"] for i in range(len(ds))]
    t0 = time.perf_counter()
    res = eos_drive(student, teacher, tok, prompts, rollouts=args.rollouts,
                    alpha=settings["teacher_mix_alpha"],
                    max_new_tokens=settings["train_max_new_tokens"], batch_size=args.batch_size,
                    seed=args.seed,
                    clip_eps=settings["clip_eps"], shared_vocab_size=shared)
    res.update(student=student_path, teacher=teacher_path, seconds=time.perf_counter() - t0, seed=args.seed)
    dest = root / "diagnostics" / f"eos_drive{'-' + args.tag if args.tag else ''}.json"
    write_text(dest, json.dumps(res, indent=1))

    print(f"student {student_path}; {res['rollouts']} rollouts, {res['tokens']} tokens, mean length "
          f"{res['mean_length']:.1f}, capped {res['capped']}, mean reward {res['reward_mean']:.3f}")
    print(f"single-step term EOS drive: {res['drive_single_step']:+.5f}\n")
    print("| return | long-term EOS drive | from sampled EOS | from continuations | A(EOS) mean | A(EOS) < 0 "
          "| "
          "A(other) mean |")
    print("|---|---|---|---|---|---|---|")
    for name, o in res["variants"].items():
        print(f"| {name} | {o['drive_long_term']:+.5f} | {o['drive_eos_sampled']:+.5f} | "
              f"{o['drive_continue']:+.5f} | "
              f"{o['eos_advantage_mean']:+.3f} | {o['eos_advantage_negative_share']:.2f} | "
              f"{o['other_advantage_mean']:+.3f} |")
    print(f"\nwritten {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
