"""Diagnostic (GPU): step the student decode of gpu_step.py by hand with left-padded prompts and report the
first decode step whose logits are non-finite (the sampler then indexes past the vocabulary)."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from minillm.models import position_ids_from_mask
from minillm.sampling import Decoder, sample_from_probs

dev = torch.device("cuda")
torch.manual_seed(0)
V = 50257
sp = dict(bos_token_id=V - 1, eos_token_id=V - 1)
with torch.device(dev):
    teacher = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_layer=48, n_embd=1600, n_head=25, vocab_size=V,
                                         **sp)).to(torch.bfloat16).eval()
    student = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_layer=12, n_embd=768, n_head=12, vocab_size=V,
                                         **sp)).to(torch.bfloat16).eval()
B, P = 32, 64
g = torch.Generator().manual_seed(1)
ids = torch.randint(0, V - 1, (B, P), generator=g)
mask = torch.ones_like(ids)
for i in range(B):
    pad = (i * P) // (2 * B)
    mask[i, :pad] = 0
    ids[i, :pad] = V - 1
ids, mask = ids.to(dev), mask.to(dev)
for name, m in (("student", student), ("teacher", teacher)):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        d = Decoder(m)
        am = mask.clone()
        pos = position_ids_from_mask(am)
        logits, h = d.step(ids, am, pos)
        for t in range(128):
            lf = logits.float()
            bad = ~torch.isfinite(lf).all(-1)
            if bad.any():
                rows = bad.nonzero().flatten().tolist()
                print(name, "NONFINITE at step", t, "rows", rows[:8], "hidden finite",
                      bool(torch.isfinite(h.float()).all()),
                      "pads of first bad row", int((mask[rows[0]] == 0).sum()), flush=True)
                break
            e = (lf - lf.amax(-1, keepdim=True)).exp()
            tok = sample_from_probs(e, gen)
            if int(tok.max()) >= V:
                print(name, "INDEX OUT OF RANGE at step", t, flush=True)
                break
            am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
            logits, h = d.step(tok[:, None], am, position_ids_from_mask(am)[:, -1:])
        else:
            print(name, "all 128 steps finite", flush=True)
