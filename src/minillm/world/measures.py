"""Exact measures of a causal LM against a controlled world's ground truth (issue 24).

The truth p is the `World`'s process; the model q is any causal LM over the world's tokenizer ids whose
`model(input_ids=, attention_mask=)` returns `.logits` (an HF model, or `TruthLM`, the process itself as a
model). Responses are scored on prompt + response; log q(y) sums the token log-softmax (fp32 logits, the
sum in float64) over the response, its eos included. Sampling is ancestral (temperature 1, no top-k/top-p).

What `measure` reports (averages over prompts of per-prompt values, also listed under "per_prompt"):

* reverse_kl = mean over model samples of log q(y) - log p(y). p has a finite support (content tokens,
  at most max_length of them), so one sample outside it (noise == 0: outside the chains; any noise: an
  unk / prompt token / too long) makes it +inf. reverse_kl_support is then the estimate of KL(q_S || p)
  with q_S = q restricted to p's support S (noise == 0: the noise-free support; noise > 0: every content
  sequence of at most max_length tokens) and renormalised: mean over the samples in S of
  (log q - log p) - log(share in S) -- the sampled version of `exact_kls`' reverse_kl_support (a
  Monte-Carlo estimate, so it can come out slightly negative).
* forward_kl = mean over truth samples of log p - log q (always finite).
* precision = mean log p of the model's samples inside the noise-free support (nan if none);
  outside_support = the share of model samples outside the noise-free support (incomplete samples, cut at
  max_new_tokens, count as outside).
* mode_coverage = share of modes hit by >= 1 in-support sample; mode_mass_l1 = L1 distance between the
  model's empirical mode masses (modes by noise-free posterior, outside-support as an extra bin) and w.
* length / truth_length: mean content tokens of the model's samples / exact expectation under p.
* exacc_err: ExAccErr (minillm.evaluation.exposure_bias.exacc_err_curve, reused as it is) with the truth as
  the teacher: e_t = KL(p(.|prefix) || q(.|prefix)) along model-sampled and truth-sampled prefixes, pooled
  over prompts, reported at the curve's last length (exacc_err_length) and in full (exacc_err_curve). With
  noise == 0 p(.|prefix) is undefined once a model sample leaves the support: such a sample's errors stop
  at that position (the error of the step that left the support is kept); exacc_err_cut_share says how
  many were cut.
* with `reference` (the teacher): reverse_kl_ref = mean over model samples of log q - log r and
  forward_kl_ref = mean over the reference's samples of log r - log q: the sequence-level divergences to
  the model the student was distilled from (what MiniLLM minimises is KL(q || r)), as opposed to the truth.
"""

from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace

import numpy as np
import torch

from minillm.evaluation.exposure_bias import exacc_err_curve
from minillm.world.process import EOS_ID, World

_TAG_MODEL, _TAG_TRUTH, _TAG_REF = 2, 4, 6  # seed domains (process.py uses 1 and 3)


def _seed(seed: int, i: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, i, tag]).generate_state(1)[0])


@contextlib.contextmanager
def _evaluating(model):
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _score_batch(model, world: World, i: int, batch: list[list[int]], with_kl: bool):
    """(log q per response [B] float64, per-response e_t arrays or None) from one forward pass."""
    prompt = world.prompt_ids(i)
    P, T = len(prompt), max(max(len(r) for r in batch), 1)
    ids = torch.full((len(batch), P + T), EOS_ID, dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[:, :P] = torch.tensor(prompt)
    for b, r in enumerate(batch):
        ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :P + len(r)] = 1
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, P - 1:P - 1 + T]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    width = logits.shape[-1]
    response = ids[:, P:].to(device)
    if int(response.max()) >= width or int(response.min()) < 0:
        raise ValueError(f"a response holds a token id outside the model's {width} logits "
                         f"(ids {int(response.min())} .. {int(response.max())})")
    lse = torch.logsumexp(logits, dim=-1)
    token_lp = (logits.gather(-1, response[..., None]).squeeze(-1) - lse).double().cpu()
    valid = torch.arange(T)[None, :] < torch.tensor([len(r) for r in batch])[:, None]
    logq = torch.where(valid, token_lp, torch.zeros((), dtype=torch.float64)).sum(dim=1).numpy()
    if not with_kl:
        return logq, None
    if width < world.vocab_size:
        raise ValueError(f"the model has {width} logits but the world's tokenizer {world.vocab_size} ids")
    logq_full = (logits[..., :world.vocab_size].double() - lse.double()[..., None]).cpu().numpy()
    kls = []
    for b, (r, rows) in enumerate(zip(batch, world.next_token_tables(i, batch))):
        defined = np.isfinite(rows).any(axis=1)
        cut = len(r) if defined.all() else int(np.argmin(defined))
        p = np.exp(rows[:cut])
        with np.errstate(invalid="ignore"):
            terms = np.where(p > 0, p * (rows[:cut] - logq_full[b, :cut]), 0.0)
        kls.append(terms.sum(axis=1))
    return logq, kls


def _score(model, world: World, i: int, responses: list[list[int]], batch_size: int, with_kl: bool):
    logq, kls = [], []
    with _evaluating(model):
        for start in range(0, len(responses), batch_size):
            lq, kl = _score_batch(model, world, i, responses[start:start + batch_size], with_kl)
            logq.append(lq)
            kls += kl or []
    return (np.concatenate(logq) if logq else np.zeros(0)), kls


def model_log_probs(model, world: World, i: int, responses: list[list[int]],
                    batch_size: int = 64) -> np.ndarray:
    """float64 [N]: log q(y | prompt i) of a causal LM, summed over each response's tokens (eos included)."""
    return _score(model, world, i, [list(r) for r in responses], batch_size, with_kl=False)[0]


def _draw(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row from softmax(logits) with the given uniforms [B]."""
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    return (cdf <= (uniforms * cdf[:, -1])[:, None]).sum(dim=-1).clamp(max=probs.shape[-1] - 1)


def sample_model(model, world: World, i: int, n: int, seed: int, max_new_tokens: int | None = None,
                 temperature: float = 1.0, batch_size: int = 256) -> list[list[int]]:
    """n ancestral samples of prompt i (temperature `temperature`, no top-k / top-p), each ending with the
    eos id or cut at `max_new_tokens` (default world.max_length + 1).

    Sample r's token t is drawn by inverse CDF with uniform U[r, t] of one CPU torch.Generator seeded with
    `seed`, so the samples depend on the seed only (not on batch_size or device, up to float round-off).
    A KV-cache loop when the model returns a cache, else full re-forwards.
    """
    limit = max_new_tokens or world.max_length + 1
    device = _device(model)
    uniforms = torch.rand(n, limit, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    prompt = torch.tensor(world.prompt_ids(i), dtype=torch.long, device=device)
    # transformers renamed `past_key_values` to `cache` during 5.x (argument and output); take either.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with _evaluating(model):
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            seqs, cache = prompt.repeat(b, 1), None
            alive = torch.ones(b, dtype=torch.bool, device=device)
            for t in range(limit):
                if cache is None:
                    res = model(input_ids=seqs)
                else:
                    res = model(input_ids=seqs[:, -1:], use_cache=True, **{cache_kwarg: cache})
                u = uniforms[start:start + b, t].to(device=device, dtype=torch.float32)
                tok = _draw(res.logits[:, -1] / temperature, u)
                tok = torch.where(alive, tok, torch.full_like(tok, EOS_ID))
                seqs = torch.cat([seqs, tok[:, None]], dim=1)
                alive &= tok != EOS_ID
                cache = getattr(res, "cache", None)
                cache = getattr(res, "past_key_values", None) if cache is None else cache
                if not alive.any():
                    break
            for row in seqs[:, len(prompt):].tolist():
                out.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


class TruthLM(torch.nn.Module):
    """The world's process as a causal LM (logits = exact next-token log-probs), e.g. as the ideal model
    in `measure` or `exact_kls` (it should score ~0 on every divergence). Rows whose prefix is impossible
    are uniform; the prompt is recognised by its first token."""

    def __init__(self, world: World):
        super().__init__()
        self.world = world
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.by_first = {world.prompt_ids(i)[0]: i for i in range(world.spec.prompts)}

    def forward(self, input_ids, attention_mask=None, **_):
        B, L = input_ids.shape
        P = self.world.spec.prompt_length
        logits = torch.zeros(B, L, self.world.vocab_size, dtype=torch.float64)
        lengths = (attention_mask.sum(1) if attention_mask is not None else torch.full((B,), L)).tolist()
        for b, row in enumerate(input_ids.tolist()):
            response = row[P:int(lengths[b])]
            table = self.world.next_token_tables(self.by_first[row[0]], [response + [EOS_ID]])[0]
            table[~np.isfinite(table).any(axis=1)] = 0.0
            logits[b, P - 1:P + len(response)] = torch.from_numpy(table)
        return SimpleNamespace(logits=logits.to(self.anchor.device))


def _content_length(y: list[int]) -> int:
    return len(y) - (1 if y and y[-1] == EOS_ID else 0)


def _prompt_measures(model, world: World, i: int, n: int, seed: int, batch_size: int,
                     reference=None) -> tuple[dict, list, list]:
    """One prompt's numbers, and the e_t arrays along model-sampled and truth-sampled prefixes."""
    ys = sample_model(model, world, i, n, seed=_seed(seed, i, _TAG_MODEL))
    xs = world.sample(i, n, np.random.default_rng(np.random.SeedSequence([seed, i, _TAG_TRUTH])))
    logq_y, kl_y = _score(model, world, i, ys, batch_size, with_kl=True)
    logq_x, kl_x = _score(model, world, i, xs, batch_size, with_kl=True)
    logp_y, logp_x = world.log_prob(i, ys), world.log_prob(i, xs)
    inside = world.support_mask(i, ys)
    share_in = float(inside.mean())
    modes = world.modes_of(i, ys)
    K = world.spec.modes
    counts = np.bincount(np.where(inside, modes, K), minlength=K + 1) / len(ys)
    truth = np.append(world.weights[i], 0.0)
    diff = logq_y - logp_y
    possible = np.isfinite(logp_y)  # p's own support (= the noise-free one when noise == 0)
    share_p = float(possible.mean())
    row = {
        "prompt_index": int(i),
        "reverse_kl": float(diff.mean()),
        "reverse_kl_support": (float(diff[possible].mean() - np.log(share_p)) if possible.any()
                               else float("nan")),
        "forward_kl": float((logp_x - logq_x).mean()),
        "precision": float(logp_y[inside].mean()) if inside.any() else float("nan"),
        "outside_support": 1.0 - share_in,
        "mode_coverage": float((counts[:K] > 0).mean()),
        "mode_mass_l1": float(np.abs(counts - truth).sum()),
        "mode_masses": [float(c) for c in counts],
        "truth_mode_masses": [float(c) for c in truth],
        "length": float(np.mean([_content_length(y) for y in ys])),
        "truth_sample_length": float(np.mean([_content_length(x) for x in xs])),
        "exacc_err_cut": int(sum(len(e) < len(y) for e, y in zip(kl_y, ys))),
    }
    if reference is not None:
        row.update(_reference_measures(model, reference, world, i, ys, logq_y, n, seed, batch_size))
    return row, kl_y, kl_x


def _reference_measures(model, reference, world: World, i: int, ys: list, logq_y: np.ndarray, n: int,
                        seed: int, batch_size: int) -> dict:
    """Sequence-level reverse / forward KL of the model to a reference model r (Monte Carlo, n samples
    each; the reference's samples depend on (seed, prompt) only, so every model meets the same ones)."""
    logr_y = _score(reference, world, i, ys, batch_size, with_kl=False)[0]
    rs = sample_model(reference, world, i, n, seed=_seed(seed, i, _TAG_REF))
    logr_r = _score(reference, world, i, rs, batch_size, with_kl=False)[0]
    logq_r = _score(model, world, i, rs, batch_size, with_kl=False)[0]
    return {"reverse_kl_ref": float((logq_y - logr_y).mean()),
            "forward_kl_ref": float((logr_r - logq_r).mean())}


def _mean(values: list[float]) -> float:
    """Mean over prompts; inf if any is inf; nan-valued prompts (no sample to measure on) are skipped."""
    v = np.array(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if len(v) else float("nan")


def measure(model, world: World, n_samples: int = 64, seed: int = 0, prompts=None,
            batch_size: int = 64, reference=None) -> dict:
    """The model against the truth, averaged over `prompts` (default all): see the module docstring.

    `n_samples` model samples and as many truth samples per prompt, seeded by (seed, prompt). Plain floats
    (inf where a divergence is infinite, nan where a value has no sample to be measured on) and lists.
    """
    prompts = list(range(world.spec.prompts)) if prompts is None else [int(i) for i in prompts]
    rows, student_kl, truth_kl = [], [], []
    for i in prompts:
        row, kl_y, kl_x = _prompt_measures(model, world, i, n_samples, seed, batch_size, reference)
        rows.append(row)
        student_kl += [torch.from_numpy(e) for e in kl_y]
        truth_kl += [torch.from_numpy(e) for e in kl_x]
    keys = ("reverse_kl", "reverse_kl_support", "forward_kl", "precision", "outside_support", "mode_coverage",
            "mode_mass_l1", "length", "truth_sample_length")
    keys += ("reverse_kl_ref", "forward_kl_ref") if reference is not None else ()
    out = {key: _mean([r[key] for r in rows]) for key in keys}
    curve = exacc_err_curve(student_kl, truth_kl)
    out.update({
        "truth_length": world.expected_length(),
        "exacc_err": float(curve["exacc_err"][-1]),
        "exacc_err_length": int(curve["length"][-1]),
        "exacc_err_cut_share": sum(r["exacc_err_cut"] for r in rows) / (n_samples * len(rows)),
        "exacc_err_curve": curve,
        "n_samples": int(n_samples),
        "prompts": prompts,
        "noise": float(world.spec.noise),
        "per_prompt": rows,
    })
    return out


def exact_kls(model, world: World, i: int, batch_size: int = 256) -> dict:
    """Exact sequence-level KLs of the model against prompt i's truth, by enumerating p's support S
    (noise == 0: the chains' responses; noise > 0: every content sequence up to max_length; a ValueError
    from `World.enumerate` when S is too large).

    * forward_kl = sum_S p (log p - log q): exact.
    * mass_outside = 1 - sum_S q: the model's mass on responses outside S (too long, other tokens, off the
      chains), by subtraction; a softmax model always has some.
    * reverse_kl = sum_y q log(q / p): +inf whenever mass_outside > 1e-12 (p = 0 there), else the sum over S.
    * reverse_kl_support = KL(q_S || p) with q_S = q restricted to S and renormalised:
      (1 / Q) sum_S q (log q - log p) - log Q, Q = sum_S q. Finite, >= 0, 0 iff q_S = p.
    * reverse_kl_partial = sum_S q (log q - log p) (the unnormalised part of the reverse KL inside S).
    """
    support = world.enumerate(i, noisy=world.spec.noise > 0)
    responses = [list(y) for y, _ in support]
    logp = world.log_prob(i, responses)
    logq = model_log_probs(model, world, i, responses, batch_size=batch_size)
    q = np.exp(logq)
    inside = float(q.sum())
    partial = float((q * (logq - logp)).sum())
    outside = max(0.0, 1.0 - inside)
    return {
        "prompt_index": int(i),
        "support_size": len(responses),
        "forward_kl": float((np.exp(logp) * (logp - logq)).sum()),
        "reverse_kl": float("inf") if outside > 1e-12 else partial,
        "reverse_kl_support": partial / inside - float(np.log(inside)),
        "reverse_kl_partial": partial,
        "mass_outside": outside,
        "truth_entropy": float(-(np.exp(logp) * logp).sum()),
    }
