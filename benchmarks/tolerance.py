"""The update half of section 4 (bf16 vs fp32 tolerance) alone, with the LM head as it was and as it is.

usage: tolerance.py [--teacher DIR --student DIR --data FILE] [--tiny] [--batch 8] [--max-new 128] [--threads
2]

Measures numbers only (no timings). Same inputs as `phases.py`: the first --batch Dolly prompts in
chat format, a teacher-mixed rollout (alpha 0.2, fp32 teacher with its hidden states, every row decoding
exactly --max-new tokens: eos disabled, seed 3 = the rollout phases.py keeps), then one MiniLLM update's
loss and gradient (PPO-clipped term + single-step reverse KL, `step_parts.update_gradient`) in fp32 and
under bf16 autocast, compared by cosine / relative L2 error / loss:

  legacy_head   the LM heads as before this change: the module called under autocast, bf16 logits
  fp32_head     `lm_head_fn` heads (fp32 projection with autocast off), chunked_token_terms (= phases.py)
  fp32_head_fused            the same through fused_token_loss (what algorithms/minillm.py runs)
  fp32_head_backward_in_autocast   chunked, backward called inside the autocast region (what the trainer
                               did before it moved backward out of it)
  *_fp32_body   the student body in fp32, only the loss (both heads) under autocast: the heads' own share

Defaults: the teacher and 4-layer student of the benchmark suite (`common.prepare_models`). Prints
'TOLERANCE {json}'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_parts import gradient_agreement, make_batch, timed_rollout, update_gradient


class LegacyHead:
    """The LM head before it ran in fp32 under autocast: the output embedding called as is."""

    def __init__(self, head):
        self.head = head

    def __call__(self, hidden):
        h = self.head
        autocast = torch.is_autocast_enabled(hidden.device.type)
        if not autocast and h.weight is not None and hidden.dtype != h.weight.dtype:
            hidden = hidden.to(h.weight.dtype)
        return h.postprocess(h.module(hidden))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher")
    ap.add_argument("--student")
    ap.add_argument("--data")
    ap.add_argument("--tiny", action="store_true", help="smoke test on minillm.testing tiny models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minillm.data import PromptDataset, collate_prompts, load_instructions
    from minillm.models import check_compatibility, lm_head_fn, load_model, load_tokenizer

    if a.tiny:
        from minillm.data import InstructionExample
        from minillm.testing import tiny_llama, tiny_tokenizer

        tok = tiny_tokenizer()
        student, teacher = tiny_llama(tok, layers=1), tiny_llama(tok, layers=2, seed=1)
        vocab = len(tok)
        examples = [InstructionExample(instruction=f"say something {i}", input="", outputs=["x"], id=str(i),
                                       extra={})
                    for i in range(a.batch)]
        template = "raw"
    else:
        from common import DOLLY, prepare_models

        if not (a.teacher and a.student):
            t_dir, s_dir = prepare_models()
            a.teacher, a.student = a.teacher or str(t_dir), a.student or str(s_dir)
        tok = load_tokenizer(a.student)
        student = load_model(a.student, dtype="float32")
        teacher = load_model(a.teacher, dtype="float32")
        vocab = check_compatibility(load_tokenizer(a.teacher), tok, teacher, student)
        examples = load_instructions(a.data or str(DOLLY), limit=4 * a.batch)
        template = "chat"
    teacher.requires_grad_(False)
    prompts = PromptDataset(examples, tok, template=template, max_prompt_length=256)
    batch = collate_prompts([prompts[i] for i in range(a.batch)], tok.pad_token_id)
    r, _ = timed_rollout(student, batch["input_ids"], batch["attention_mask"], max_new_tokens=a.max_new,
                         teacher=teacher, alpha=0.2, vocab=vocab, hidden=True, pad_token_id=tok.pad_token_id,
                         seed=a.seed)
    b32 = make_batch(r)
    s_head, t_head = lm_head_fn(student), lm_head_fn(teacher)
    kw = dict(vocab=vocab, chunk_size=a.chunk)
    res = {"response_tokens": int(r.response_mask.sum()), "threads": torch.get_num_threads()}
    g32, loss32 = update_gradient(student, s_head, t_head, b32, **kw)
    g32_legacy, loss32_legacy = update_gradient(student, LegacyHead(s_head), LegacyHead(t_head), b32, **kw)
    res["fp32_legacy_vs_fp32_head"] = gradient_agreement(g32, loss32, g32_legacy, loss32_legacy)
    variants = {
        "legacy_head": dict(student_head=LegacyHead(s_head), teacher_head=LegacyHead(t_head)),
        "fp32_head": dict(student_head=s_head, teacher_head=t_head),
        "fp32_head_fused": dict(student_head=s_head, teacher_head=t_head, fused=True),
        "fp32_head_backward_in_autocast": dict(student_head=s_head, teacher_head=t_head,
                                               backward_under_autocast=True),
        # fp32 body: only the loss (heads) under autocast, i.e. the heads' own share of the error
        "legacy_head_fp32_body": dict(student_head=LegacyHead(s_head), teacher_head=LegacyHead(t_head),
                                      body_autocast=False),
        "fp32_head_fp32_body": dict(student_head=s_head, teacher_head=t_head, body_autocast=False),
    }
    for name, v in variants.items():
        v = dict(v)
        g, loss = update_gradient(student, v.pop("student_head"), v.pop("teacher_head"), b32,
                                  autocast=torch.bfloat16, **kw, **v)
        res[name] = gradient_agreement(g32, loss32, g, loss)
        print(name, res[name], flush=True)
    g32_fused, loss32_fused = update_gradient(student, s_head, t_head, b32, fused=True, **kw)
    res["fp32_fused_vs_fp32_chunked"] = gradient_agreement(g32, loss32, g32_fused, loss32_fused)
    print("TOLERANCE " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
