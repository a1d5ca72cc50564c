"""A Trainer-free MiniLLM step built from the library's own pieces, with a timer around each phase.

It does exactly what `algorithms/minillm.py` does for one round with num_rollouts = batch_size and
ppo_epochs = 1 (no L_PT): rollout (generate_rollouts with teacher mixing and the teacher's hidden
states), rewards / advantages / whitening, then one update: student hidden states, chunked log-probs +
single-step reverse KL, PPO-clipped long-term term, backward, gradient clipping, AdamW step.
Used by phases.py (CPU) and gpu_step.py (GPU) so that per-phase figures come from the same code.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from minillm.losses import (
    advantages,
    chunked_token_terms,
    per_token_rewards,
    ppo_clipped_loss,
    single_step_loss,
    whiten,
)
from minillm.models import final_hidden
from minillm.sampling import SamplingConfig, generate_rollouts


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_rollout(student, prompt_ids, prompt_mask, *, max_new_tokens, teacher=None, alpha=0.0, vocab=None,
                  hidden=False, eos_token_id=-1, pad_token_id=0, seed=0, autocast=None, draft_length=None,
                  draft_adaptive=None, stats=None):
    """(rollout, seconds). eos_token_id=-1 (no token matches) makes every row decode exactly
    max_new_tokens. draft_length / draft_adaptive: the speculative sampler's (draft_length 0 = lockstep;
    None = the config default)."""
    device = prompt_ids.device
    gen = torch.Generator().manual_seed(seed)
    given = {"draft_length": draft_length, "draft_adaptive": draft_adaptive}
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, **{k: v for k, v in given.items() if v is not None})
    ctx = torch.autocast(torch.device(device).type, dtype=autocast) if autocast else nullcontext()
    _sync(device)
    t0 = time.perf_counter()
    with ctx:
        r = generate_rollouts(student, prompt_ids, prompt_mask, config=cfg, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id, teacher=teacher, teacher_mix_alpha=alpha,
                              shared_vocab_size=vocab, generator=gen, return_teacher_hidden=hidden,
                              stats=stats)
    _sync(device)
    return r, time.perf_counter() - t0


def make_batch(r, *, gamma=0.95, length_norm=True, device="cpu") -> dict:
    """What MiniLLM.collect_round + mini_batch hand to MiniLLM.loss (advantage=lmops, token weights)."""
    mask = r.response_mask
    rewards = per_token_rewards(r.teacher_logprobs, r.student_logprobs, mask, reward_scaling=0.5,
                                reward_clip=100.0)
    adv = whiten(advantages(rewards, mask, gamma=gamma, length_norm=length_norm, variant="lmops"), mask)
    ids, attn = r.full_sequence()
    b = {"input_ids": ids, "attention_mask": attn, "response_ids": r.response_ids, "response_mask": mask,
         "old_logprobs": r.student_logprobs, "weights": r.importance_weights * mask, "advantages": adv,
         "teacher_hidden": r.teacher_hidden}
    b = {k: (v.to(device) if v is not None else None) for k, v in b.items()}
    b["prompt_len"] = r.prompt_ids.shape[1]
    return b


def update_step(student, student_head, teacher_head, batch, optimizer, *, vocab=None, chunk_size=512,
                single_step=True, autocast=None, max_grad_norm=1.0) -> dict:
    """One MiniLLM optimiser step on `batch`; returns seconds per phase and token counts."""
    device = batch["input_ids"].device
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else nullcontext()
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    T = batch["response_ids"].shape[1]
    student.train(False)  # MiniLLM.train_mode = False (no dropout)
    _sync(device)
    t0 = time.perf_counter()
    with ctx:
        hidden = final_hidden(student, ids, attn)
        _sync(device)
        t1 = time.perf_counter()
        valid = batch["response_mask"].bool()
        h = hidden[:, P - 1:P - 1 + T][valid]
        th = batch["teacher_hidden"][valid] if single_step else None
        t = chunked_token_terms(h, student_head, targets=batch["response_ids"][valid], teacher_hidden=th,
                                teacher_head=teacher_head if th is not None else None,
                                divergence="rkl" if single_step else None, vocab_size=vocab,
                                chunk_size=chunk_size)
        ones = torch.ones_like(t.logprobs)
        loss, _ = ppo_clipped_loss(t.logprobs, batch["old_logprobs"][valid], batch["advantages"][valid],
                                   batch["weights"][valid], ones, clip_eps=0.2)
        if single_step:
            loss = loss + single_step_loss(t.divergence, ones)
    _sync(device)
    t2 = time.perf_counter()
    loss.backward()
    _sync(device)
    t3 = time.perf_counter()
    params = [p for p in student.parameters() if p.requires_grad]
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    t4 = time.perf_counter()
    return {"body_forward_s": t1 - t0, "loss_terms_s": t2 - t1, "backward_s": t3 - t2, "optimizer_s": t4 - t3,
            "update_s": t4 - t0, "response_tokens": int(valid.sum()), "sequence_tokens": int(attn.sum()),
            "padded_tokens": int(ids.numel()), "loss": float(loss.detach())}


def update_gradient(student, student_head, teacher_head, batch, *, vocab=None, chunk_size=512, autocast=None,
                    fused=False, backward_under_autocast=False, body_autocast=True):
    """(flat gradient of all student parameters, loss) of one MiniLLM update's loss on `batch` (no step).

    The loss is the PPO-clipped term + the single-step reverse KL, as `update_step`; `fused` uses
    `fused_token_loss` (as algorithms/minillm.py does) instead of `chunked_token_terms`. `autocast` is a
    dtype for CPU/GPU autocast around the forward; backward runs outside it unless `backward_under_autocast`.
    `body_autocast=False` runs the student body in fp32 and only the loss (heads included) under autocast,
    which isolates what the heads contribute to the bf16 error.
    """
    from minillm.losses import fused_token_loss

    device = batch["input_ids"].device
    student.zero_grad(set_to_none=True)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else torch.autocast(device.type,
                                                                                      enabled=False)
    ids, attn, P = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
    T = batch["response_ids"].shape[1]
    with ctx:
        if body_autocast:
            hidden = final_hidden(student, ids, attn)
        else:
            with torch.autocast(device.type, enabled=False):
                hidden = final_hidden(student, ids, attn)
        valid = batch["response_mask"].bool()
        h = hidden[:, P - 1:P - 1 + T][valid]
        old, adv, w = batch["old_logprobs"][valid], batch["advantages"][valid], batch["weights"][valid]
        kw = dict(targets=batch["response_ids"][valid], teacher_hidden=batch["teacher_hidden"][valid],
                  teacher_head=teacher_head, divergence="rkl", vocab_size=vocab, chunk_size=chunk_size)
        if fused:
            n = max(int(valid.sum()), 1)

            def token_loss(lp, div, start, stop):
                ones, share = torch.ones_like(lp), (stop - start) / n
                pg = ppo_clipped_loss(lp, old[start:stop], adv[start:stop], w[start:stop], ones)[0]
                return {"pg": pg * share, "single_step": single_step_loss(div, ones) * share}

            loss = fused_token_loss(h, student_head, token_loss, **kw).loss
        else:
            t = chunked_token_terms(h, student_head, **kw)
            ones = torch.ones_like(t.logprobs)
            loss = ppo_clipped_loss(t.logprobs, old, adv, w, ones)[0] + single_step_loss(t.divergence, ones)
        if backward_under_autocast:
            loss.backward()
    if not backward_under_autocast:
        loss.backward()
    grad = torch.cat([p.grad.flatten().float() for p in student.parameters() if p.grad is not None])
    student.zero_grad(set_to_none=True)
    return grad, float(loss.detach())


def gradient_agreement(g_ref, loss_ref, g, loss) -> dict:
    """Cosine, relative L2 error and losses of a gradient against a reference (fp32) one (sums in fp64:
    over tens of millions of entries fp32 sums are off by ~1e-3, enough to give a cosine above 1)."""
    g_ref, g = g_ref.double(), g.double()
    return {"update_grad_cosine": float(torch.nn.functional.cosine_similarity(g_ref, g, dim=0)),
            "update_grad_rel_err": float((g - g_ref).norm() / g_ref.norm()),
            "update_loss_fp32": loss_ref, "update_loss_bf16": loss}
