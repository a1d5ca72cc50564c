"""Peak extra memory of one forward+backward of the chunked reverse-KL / single-step term (one fresh process).

usage: loss_memory.py N CHUNK [--vocab 49152] [--hidden 576] [--threads 2] [--fused]

Builds student hidden states [N, H] (requires grad), a student head Linear(H, V) (trainable, its .grad
pre-allocated), teacher hidden states [N, H] and a frozen teacher head, then runs
    t = chunked_token_terms(h, student_head, targets=y, teacher_hidden=th, teacher_head=teacher_head,
                            divergence="rkl", chunk_size=CHUNK)
    (t.divergence.mean() - t.logprobs.mean()).backward()
i.e. the single-step term plus the log-probs the PPO term needs. With --fused the same loss goes through
    f = fused_token_loss(h, student_head, lambda lp, div, a, b: {"single_step": div.sum() / N,
                         "nll": -lp.sum() / N}, <same arguments>)
    f.loss.backward()
(gradients formed chunk by chunk in the forward pass, no head recompute in backward). "Extra memory" = peak
RSS during
forward+backward minus the RSS just before it (inputs, weights and gradient buffers already resident).
Prints 'LOSS_MEMORY {json}'.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("n", type=int)
    ap.add_argument("chunk", type=int)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fused", action="store_true", help="measure fused_token_loss instead")
    a = ap.parse_args()

    import torch

    from minillm.losses import chunked_token_terms, fused_token_loss

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    H, V, N = a.hidden, a.vocab, a.n
    student_head = torch.nn.Linear(H, V, bias=False)
    teacher_head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.normal_(0, 0.05, generator=g)
        teacher_head.weight.normal_(0, 0.05, generator=g)
    student_head.weight.grad = torch.zeros_like(student_head.weight)
    h = torch.randn(N, H, generator=g).requires_grad_(True)
    h.grad = torch.zeros_like(h)
    th = torch.randn(N, H, generator=g)
    y = torch.randint(0, V, (N,), generator=g)

    def loss_of(hidden, targets, teacher_h):
        kw = dict(targets=targets, teacher_hidden=teacher_h, teacher_head=teacher_head, divergence="rkl",
                  chunk_size=a.chunk)
        if a.fused:
            n = hidden.shape[0]
            return fused_token_loss(hidden, student_head,
                                    lambda lp, div, start, stop: {"single_step": div.sum() / n,
                                                                  "nll": -lp.sum() / n},
                                    **kw).loss
        t = chunked_token_terms(hidden, student_head, **kw)
        return t.divergence.mean() - t.logprobs.mean()

    # warm-up on 4 positions: first-call costs (lazy imports, thread pools, kernels) are not the loss's memory
    hw = h[:4].detach().requires_grad_(True)
    loss_of(hw, y[:4], th[:4]).backward()
    del hw

    base = rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = loss_of(h, y, th)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = max(0, peak - base)
    print("LOSS_MEMORY " + json.dumps({
        "n": N, "chunk": a.chunk, "fused": a.fused, "vocab": V, "hidden": H, "baseline_rss_mb": base / 2**20,
        "peak_before_mb": peak_before / 2**20, "peak_rss_mb": peak / 2**20, "extra_mb": extra / 2**20,
        "valid": peak > peak_before, "seconds": dt,
        "logits_chunk_mb": min(N, a.chunk) * V * 4 / 2**20}), flush=True)


if __name__ == "__main__":
    main()
