"""`fused_token_loss` against the checkpointed `chunked_token_terms` path (fp64), and MiniLLM on both paths.

The reference is `chunked_token_terms` followed by the loss applied to its full [N] outputs (what
MiniLLM did before the fused path): loss values, per-token outputs and the gradients w.r.t. the
hidden states, the head weight (tied to an embedding that also feeds the hidden states, so autograd
must add both contributions) and an upstream body parameter must agree to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor

from minillm.losses import (
    DIVERGENCES,
    can_fuse,
    chunk_share,
    chunked_token_terms,
    fused_token_loss,
    ppo_clipped_loss,
    single_step_loss,
    token_divergence,
    token_loss,
)
from minillm.models import lm_head_fn

DTYPE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-11}
N, H, VS, VT, VOCAB = 11, 6, 9, 10, 7  # student head 9 wide, teacher 10 wide, shared ids 0..6


class FakeLM(torch.nn.Module):
    """Just enough of a Hugging Face causal LM for `lm_head_fn`."""

    def __init__(self, head: torch.nn.Module, **config):
        super().__init__()
        self.head = head
        self.config = SimpleNamespace(**config)

    def get_output_embeddings(self):
        return self.head


class GainHead(torch.nn.Module):
    """Not a plain Linear (trainable gain): exercises the generic autograd path of the fused loss."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear
        self.gain = torch.nn.Parameter(torch.tensor(1.3, dtype=linear.weight.dtype))

    def forward(self, h: Tensor) -> Tensor:
        return self.linear(h) * self.gain


class Setup:
    """A tied toy model: hidden = tanh(embedding(x) @ A + c), with embedding weight = head weight W."""

    def __init__(self, head_kind: str, n: int = N, seed: int = 0, dtype=DTYPE):
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.W = torch.nn.Parameter(2.0 * torch.randn(VS, H, generator=gen, dtype=dtype))
        self.A = torch.nn.Parameter(torch.randn(H, H, generator=gen, dtype=dtype))
        self.c = torch.randn(H, generator=gen, dtype=dtype)
        self.x = torch.randint(0, VS, (n,), generator=gen)
        self.targets = torch.randint(0, VOCAB, (n,), generator=gen)
        self.teacher_hidden = torch.randn(n, H + 1, generator=gen, dtype=dtype)
        self.teacher_head = torch.nn.Linear(H + 1, VT, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            self.teacher_head.weight.copy_(2.0 * torch.randn(VT, H + 1, generator=gen, dtype=dtype))
        self.teacher_logits = self.teacher_head(self.teacher_hidden)
        linear = torch.nn.Linear(H, VS, bias=head_kind == "linear", dtype=dtype)
        linear.weight = self.W  # tied
        self.fused_kw: dict = {}
        if head_kind == "linear":  # a bare nn.Linear with bias: the hand-written matmul gradients
            self.head = linear
            self.extra_params = [linear.bias]
        elif head_kind == "lm_head":  # lm_head_fn with logit scale and soft-capping: linear_split()
            self.head = lm_head_fn(FakeLM(linear, logit_scale=0.7, final_logit_softcapping=4.0))
            self.extra_params = []
        elif head_kind == "generic":  # autograd through the head, gain is a trainable head parameter
            self.head = GainHead(linear)
            self.extra_params = [self.head.gain]
        elif head_kind == "function":  # a plain function: parameters passed explicitly
            self.head = lambda h: torch.nn.functional.linear(h, self.W) / 1.5
            self.extra_params = []
            self.fused_kw = {"head_parameters": [self.W]}
        else:
            raise ValueError(head_kind)

    def hidden(self) -> Tensor:
        return torch.tanh(torch.nn.functional.embedding(self.x, self.W).to(self.A.dtype) @ self.A + self.c)

    def params(self) -> list[Tensor]:
        return [self.W, self.A, *self.extra_params]


def teacher_kw(s: Setup, teacher: str) -> dict:
    if teacher == "hidden":
        return {"teacher_hidden": s.teacher_hidden, "teacher_head": s.teacher_head}
    return {"teacher_logits": s.teacher_logits}


def grads_of(loss: Tensor, hidden: Tensor, s: Setup) -> list[Tensor]:
    return list(torch.autograd.grad(loss, [hidden, *s.params()]))


def assert_all_close(got, want, tol=TOL):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def ppo_inputs(s: Setup, seed: int = 1):
    """old log-probs away from the current ones (so some tokens clip), advantages, weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp = chunked_token_terms(s.hidden(), s.head, targets=s.targets, vocab_size=VOCAB,
                                 temperature=1.3).logprobs
    old = lp + 0.4 * torch.randn(s.n, generator=gen, dtype=DTYPE)
    signs = torch.tensor([1.0, -1.0], dtype=DTYPE).repeat(s.n)[:s.n]
    adv = torch.randn(s.n, generator=gen, dtype=DTYPE).abs() * signs
    w = 0.3 + 1.5 * torch.rand(s.n, generator=gen, dtype=DTYPE)
    ss_w = 0.5 + torch.rand(s.n, generator=gen, dtype=DTYPE)
    return old, adv, w, ss_w


# ------------------------------------------------------------------------------------------------
# The MiniLLM terms (PPO clip + weighted single-step) against the checkpointed path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 4, N, 100])
@pytest.mark.parametrize("head_kind", ["linear", "lm_head", "generic", "function"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_fused_minillm_terms_match_checkpointed_path(chunk_size, head_kind, teacher):
    s = Setup(head_kind)
    old, adv, w, ss_w = ppo_inputs(s)
    kw = dict(targets=s.targets, divergence="rkl", vocab_size=VOCAB, temperature=1.3, chunk_size=chunk_size,
              **teacher_kw(s, teacher))

    hidden = s.hidden()
    ref = chunked_token_terms(hidden, s.head, **kw)
    ones = torch.ones(s.n, dtype=DTYPE)
    pg, stats = ppo_clipped_loss(ref.logprobs, old, adv, w, ones, clip_eps=0.2)
    ss = single_step_loss(ref.divergence, ones, weights=ss_w)
    assert 0 < stats["clip_fraction"] < 1  # both branches of the clip are exercised
    want_grads = grads_of(0.37 * (pg + ss), hidden, s)

    def loss_fn(lp, div, start, stop):
        assert lp.requires_grad and div.requires_grad
        o = torch.ones_like(lp)
        pg_sum, _ = ppo_clipped_loss(lp, old[start:stop], adv[start:stop], w[start:stop], o, clip_eps=0.2,
                                     reduction="sum")
        ss_sum = single_step_loss(div, o, weights=ss_w[start:stop], reduction="sum")
        return {"pg": pg_sum / s.n, "single_step": ss_sum / s.n}

    hidden = s.hidden()
    f = fused_token_loss(hidden, s.head, loss_fn, **kw, **s.fused_kw)
    assert f.loss.requires_grad and not f.terms["pg"].requires_grad
    torch.testing.assert_close(f.terms["pg"], pg.detach(), **TOL)
    torch.testing.assert_close(f.terms["single_step"], ss.detach(), **TOL)
    torch.testing.assert_close(f.loss.detach(), (pg + ss).detach(), **TOL)
    for got, want in zip(f[2:], ref):  # logprobs, divergence, teacher_logprobs, entropy
        assert not got.requires_grad
        torch.testing.assert_close(got, want.detach(), **TOL)
    # non-additive statistics from the detached per-token values equal the reference ones
    _, fused_stats = ppo_clipped_loss(f.logprobs, old, adv, w, ones, clip_eps=0.2)
    for k in stats:
        torch.testing.assert_close(fused_stats[k], stats[k], **TOL)
    assert_all_close(grads_of(0.37 * f.loss, hidden, s), want_grads)


# ------------------------------------------------------------------------------------------------
# Every divergence, with and without targets, via a simple callback
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
@pytest.mark.parametrize("head_kind", ["lm_head", "generic"])
def test_every_divergence_matches(kind, chunk_size, head_kind):
    s = Setup(head_kind, seed=2)
    coef = torch.linspace(0.5, 1.5, s.n, dtype=DTYPE)
    kw = dict(targets=s.targets, divergence=kind, vocab_size=VOCAB, temperature=0.8, chunk_size=chunk_size,
              beta=0.3, skew_alpha=0.2, teacher_hidden=s.teacher_hidden, teacher_head=s.teacher_head)
    hidden = s.hidden()
    ref = chunked_token_terms(hidden, s.head, **kw)
    want = (coef * ref.divergence).sum() / s.n - (coef.flip(0) * ref.logprobs).sum() / s.n
    want_grads = grads_of(want, hidden, s)

    hidden = s.hidden()
    f = fused_token_loss(
        hidden, s.head,
        lambda lp, div, a, b: {"div": (coef[a:b] * div).sum() / s.n,
                               "nll": -(coef.flip(0)[a:b] * lp).sum() / s.n},
        **kw)
    torch.testing.assert_close(f.loss.detach(), want.detach(), **TOL)
    for got, ref_value in zip(f[2:], ref):
        torch.testing.assert_close(got, ref_value.detach(), **TOL)
    assert_all_close(grads_of(f.loss, hidden, s), want_grads)


def test_divergence_only_and_logprobs_only():
    s = Setup("lm_head", seed=3)
    kw = dict(vocab_size=VOCAB, chunk_size=3)
    # divergence without targets
    hidden = s.hidden()
    ref = chunked_token_terms(hidden, s.head, divergence="fkl", teacher_logits=s.teacher_logits, **kw)
    want_grads = grads_of(ref.divergence.sum(), hidden, s)
    hidden = s.hidden()
    f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"kd": div.sum()}, divergence="fkl",
                         teacher_logits=s.teacher_logits, **kw)
    assert f.logprobs is None and f.teacher_logprobs is None
    torch.testing.assert_close(f.divergence, ref.divergence.detach(), **TOL)
    assert_all_close(grads_of(f.loss, hidden, s), want_grads)
    # targets without a teacher (plain cross-entropy)
    hidden = s.hidden()
    ref = chunked_token_terms(hidden, s.head, targets=s.targets, **kw)
    want_grads = grads_of(-ref.logprobs.mean(), hidden, s)
    hidden = s.hidden()
    f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"ce": -lp.sum() / s.n}, targets=s.targets,
                         **kw)
    assert f.divergence is None and f.teacher_logprobs is None
    torch.testing.assert_close(f.entropy, ref.entropy, **TOL)
    assert_all_close(grads_of(f.loss, hidden, s), want_grads)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "skl", "srkl"])
def test_masked_vocabulary_entries(kind):
    """-inf logits (token ids removed from both distributions) give exact zeros, no NaN, same gradients."""
    s = Setup("function", seed=13)
    banned = torch.zeros(VS, dtype=torch.bool)
    banned[[1, 4]] = True
    s.head = lambda h: torch.nn.functional.linear(h, s.W).masked_fill(banned, -torch.inf)
    teacher_logits = s.teacher_logits.masked_fill(torch.nn.functional.pad(banned, (0, VT - VS)), -torch.inf)
    targets = torch.where(banned[s.targets], 0, s.targets)
    kw = dict(targets=targets, divergence=kind, teacher_logits=teacher_logits, vocab_size=VOCAB, chunk_size=4)
    hidden = s.hidden()
    ref = chunked_token_terms(hidden, s.head, **kw)
    want = (ref.divergence - ref.logprobs).mean()
    want_grads = grads_of(want, hidden, s)
    hidden = s.hidden()
    f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum() / s.n},
                         head_parameters=[s.W], **kw)
    torch.testing.assert_close(f.loss.detach(), want.detach(), **TOL)
    for got, ref_value in zip(f[2:], ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref_value.detach(), **TOL)
    got_grads = grads_of(f.loss, hidden, s)
    assert all(torch.isfinite(g).all() for g in got_grads)
    assert_all_close(got_grads, want_grads)


# ------------------------------------------------------------------------------------------------
# Gradient plumbing: .backward(), accumulation into existing .grad, frozen heads, no grad
# ------------------------------------------------------------------------------------------------


def test_backward_accumulates_into_existing_grads_with_other_terms():
    s = Setup("linear", seed=4)
    kw = dict(targets=s.targets, divergence="rkl", teacher_logits=s.teacher_logits, vocab_size=VOCAB,
              chunk_size=4)

    def run(fused: bool) -> list[Tensor]:
        for p in s.params():
            p.grad = torch.full_like(p, 0.25)  # gradients already there (accumulation over micro-batches)
        hidden = s.hidden()
        if fused:
            loss = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum() / s.n},
                                    **kw).loss
        else:
            t = chunked_token_terms(hidden, s.head, **kw)
            loss = (t.divergence - t.logprobs).mean()
        (loss / 3 + (s.A ** 2).sum() + hidden.pow(3).mean()).backward()
        return [p.grad.clone() for p in s.params()]

    assert_all_close(run(True), run(False))


def test_frozen_head_still_gives_the_hidden_gradient():
    for head_kind in ("lm_head", "generic"):
        s = Setup(head_kind, seed=5)
        for p in [s.W, *s.extra_params]:
            p.requires_grad_(False)
        kw = dict(targets=s.targets, divergence="jsd", teacher_logits=s.teacher_logits, vocab_size=VOCAB,
                  chunk_size=4)
        hidden = s.hidden()
        t = chunked_token_terms(hidden, s.head, **kw)
        want = torch.autograd.grad((t.divergence - t.logprobs).mean(), [hidden, s.A])
        hidden = s.hidden()
        f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum() / s.n}, **kw)
        assert_all_close(torch.autograd.grad(f.loss, [hidden, s.A]), want)
        assert s.W.grad is None


def test_head_only_gradient_when_hidden_is_a_constant():
    s = Setup("linear", seed=6)
    kw = dict(targets=s.targets, divergence="tvd", teacher_logits=s.teacher_logits, vocab_size=VOCAB,
              chunk_size=5)
    hidden = s.hidden().detach()
    t = chunked_token_terms(hidden, s.head, **kw)
    want = torch.autograd.grad((t.divergence - t.logprobs).mean(), [s.W, s.head.bias])
    f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum() / s.n}, **kw)
    assert_all_close(torch.autograd.grad(f.loss, [s.W, s.head.bias]), want)


def test_without_grad_only_values_are_computed():
    s = Setup("lm_head", seed=7)
    kw = dict(targets=s.targets, divergence="rkl", teacher_logits=s.teacher_logits, vocab_size=VOCAB,
              chunk_size=4)
    seen = []

    def loss_fn(lp, div, a, b):
        seen.append(lp.requires_grad or div.requires_grad)
        return {"x": (div - lp).sum() / s.n}

    with torch.no_grad():
        hidden = s.hidden()
        t = chunked_token_terms(hidden, s.head, **kw)
        f = fused_token_loss(hidden, s.head, loss_fn, **kw)
    assert not f.loss.requires_grad and not any(seen) and len(seen) == 3
    torch.testing.assert_close(f.loss, (t.divergence - t.logprobs).mean(), **TOL)


def test_empty_input():
    s = Setup("lm_head", n=0)
    hidden = s.hidden()
    f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum()}, targets=s.targets,
                         divergence="rkl", teacher_logits=s.teacher_logits, vocab_size=VOCAB)
    assert f.loss.item() == 0 and f.logprobs.shape == (0,) and f.entropy.shape == (0,)
    f.loss.backward()
    assert float(s.W.grad.abs().sum()) == 0.0


def test_linear_heads_take_no_per_chunk_weight_gradient_from_autograd(monkeypatch):
    """Plain Linear / lm_head_fn heads: autograd only differentiates w.r.t. the logits inside a chunk."""
    for head_kind, uses_autograd_for_head in (("linear", False), ("lm_head", False), ("generic", True)):
        s = Setup(head_kind, seed=8)
        inputs_seen = []
        real_grad = torch.autograd.grad

        def spy(outputs, inputs, *args, **kwargs):
            inputs_seen.extend(inputs)
            return real_grad(outputs, inputs, *args, **kwargs)

        with monkeypatch.context() as m:
            m.setattr(torch.autograd, "grad", spy)
            f = fused_token_loss(s.hidden(), s.head, lambda lp, div, a, b: {"x": -lp.sum()},
                                 targets=s.targets, vocab_size=VOCAB, chunk_size=4)
        assert len(inputs_seen) > 0
        assert any(t is s.W for t in inputs_seen) == uses_autograd_for_head
        f.loss.backward()
        assert s.W.grad is not None and float(s.W.grad.abs().sum()) > 0


def test_second_backward_through_the_same_graph_is_refused():
    s = Setup("lm_head", seed=9)
    f = fused_token_loss(s.hidden(), s.head, lambda lp, div, a, b: {"x": -lp.sum()}, targets=s.targets,
                         vocab_size=VOCAB, chunk_size=4)
    f.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        f.loss.backward()


def test_argument_errors():
    s = Setup("lm_head", seed=10)
    with pytest.raises(ValueError, match="head_parameters"):
        fused_token_loss(s.hidden(), lambda h: h @ s.W.T, lambda lp, div, a, b: {"x": -lp.sum()},
                         targets=s.targets, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="same names"):
        fused_token_loss(s.hidden(), s.head, lambda lp, div, a, b: {f"x{a}": -lp.sum()}, targets=s.targets,
                         vocab_size=VOCAB, chunk_size=4)
    with pytest.raises(TypeError, match="scalar"):
        fused_token_loss(s.hidden(), s.head, lambda lp, div, a, b: {"x": -lp}, targets=s.targets,
                         vocab_size=VOCAB)
    with pytest.raises(ValueError, match="needs a teacher"):
        fused_token_loss(s.hidden(), s.head, lambda lp, div, a, b: {"x": div.sum()}, divergence="rkl")


def test_lm_head_fn_exposes_trainable_parameters_and_matches_the_call():
    s = Setup("lm_head", seed=11)
    head = s.head
    assert head.trainable_parameters == [s.W]
    weight, bias, post, = head.linear_split()
    h = s.hidden()
    torch.testing.assert_close(post(torch.nn.functional.linear(head.cast_input(h), weight, bias)), head(h))
    s.W.requires_grad_(False)
    assert head.trainable_parameters == []
    lora_like = lm_head_fn(FakeLM(GainHead(torch.nn.Linear(H, VS))))
    assert lora_like.linear_split() is None and len(lora_like.trainable_parameters) == 3


def test_reduced_precision_heads_close_to_the_checkpointed_path():
    """bf16 autocast (the lm_head_fn head runs in fp32 inside it) and bf16 head weights: same maths up to bf16
    rounding."""
    for case in ("autocast", "bf16_weights"):
        s = Setup("lm_head", n=37, seed=12, dtype=torch.float32)
        if case == "bf16_weights":
            s.head.module.to(torch.bfloat16)  # hidden states stay fp32: lm_head_fn casts them
        kw = dict(targets=s.targets, divergence="rkl", teacher_logits=s.teacher_logits.float(),
                  vocab_size=VOCAB, chunk_size=8)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else torch.enable_grad()
        params = [s.head.module.weight, s.A]
        with ctx:
            hidden = s.hidden()
            t = chunked_token_terms(hidden, s.head, **kw)
            want = torch.autograd.grad((t.divergence - t.logprobs).mean(), [hidden, *params])
            hidden = s.hidden()
            f = fused_token_loss(hidden, s.head, lambda lp, div, a, b: {"x": (div - lp).sum() / s.n}, **kw)
            got = torch.autograd.grad(f.loss, [hidden, *params])
        torch.testing.assert_close(f.loss.detach(), (t.divergence - t.logprobs).mean().detach(), rtol=1e-5,
                                   atol=1e-5)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            cos = torch.nn.functional.cosine_similarity(g.double().flatten(), w.double().flatten(), dim=0)
            assert cos > 0.9999, (case, float(cos))
            # only the head weight differs: its gradient is accumulated in fp32 here, in bf16 by autograd
            torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=0.01 * float(w.abs().max()))


# ------------------------------------------------------------------------------------------------
# token_loss: the one entry point, on both paths, against full-logit fp64 references
# ------------------------------------------------------------------------------------------------


def ce_plus_divergence(n: int, coef: float = 0.5):
    """A CE + divergence loss as a chunk-additive callback: token means times each chunk's share."""

    def loss_fn(lp, div, start, stop):
        share = chunk_share(start, stop, n)
        return {"ce": -lp.mean() * share, "div": coef * div.mean() * share}

    return loss_fn


def full_logit_reference(hidden: Tensor, head, s: Setup, kind: str, temperature: float, coef: float = 0.5):
    """(CE, coef * divergence) token means from the full [N, V] logits, normalised here in fp64."""
    student = head(hidden)[:, :VOCAB].double() / temperature
    ls = torch.log_softmax(student, -1)
    lt = torch.log_softmax(s.teacher_logits[:, :VOCAB].double() / temperature, -1)
    ce = -ls.gather(-1, s.targets[:, None]).squeeze(-1).mean()
    q, p = ls.exp(), lt.exp()
    div = {"rkl": (q * (ls - lt)).sum(-1), "fkl": (p * (lt - ls)).sum(-1),
           "tvd": 0.5 * (q - p).abs().sum(-1)}[kind]
    torch.testing.assert_close(div, token_divergence(student, lt, kind), **TOL)  # same maths, other code
    return ce, coef * div.mean()


HEAD_KINDS = ["linear", "lm_head", "generic", "function", "plain"]


def entry_setup(head_kind: str, seed: int = 13) -> Setup:
    """Setup(head_kind); "plain" is a plain-function head without head_parameters (the chunked fallback)."""
    s = Setup("function" if head_kind == "plain" else head_kind, seed=seed)
    if head_kind == "plain":
        s.fused_kw = {}
    return s


def takes_fused_path(loss: Tensor) -> bool:
    return "FusedLossFunction" in type(loss.grad_fn).__name__


@pytest.mark.parametrize("head_kind", HEAD_KINDS)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["rkl", "fkl", "tvd"])
def test_token_loss_equals_the_full_logit_reference(head_kind, fused, kind):
    s = entry_setup(head_kind)
    hidden = s.hidden()
    ce, div = full_logit_reference(hidden, s.head, s, kind, temperature=1.3)
    want_grads = grads_of(ce + div, hidden, s)

    hidden = s.hidden()
    f = token_loss(hidden, s.head, ce_plus_divergence(s.n), targets=s.targets,
                   teacher_logits=s.teacher_logits, divergence=kind, vocab_size=VOCAB, temperature=1.3,
                   chunk_size=4, fused=fused, **s.fused_kw)
    assert takes_fused_path(f.loss) == (fused and head_kind != "plain")
    assert set(f.terms) == {"ce", "div"} and not any(v.requires_grad for v in f.terms.values())
    torch.testing.assert_close(f.terms["ce"], ce.detach(), **TOL)
    torch.testing.assert_close(f.terms["div"], div.detach(), **TOL)
    torch.testing.assert_close(f.loss.detach(), (ce + div).detach(), **TOL)
    for value in f[2:]:
        assert value is not None and not value.requires_grad and value.shape == (s.n,)
    assert_all_close(grads_of(f.loss, hidden, s), want_grads)


@pytest.mark.parametrize("head_kind", ["linear", "lm_head", "generic", "function"])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_token_loss_paths_agree(head_kind, teacher):
    s = Setup(head_kind, seed=14)
    kw = dict(targets=s.targets, divergence="jsd", beta=0.3, vocab_size=VOCAB, temperature=0.9, chunk_size=3,
              **teacher_kw(s, teacher), **s.fused_kw)
    results = {}
    for fused in (True, False):
        hidden = s.hidden()
        f = token_loss(hidden, s.head, ce_plus_divergence(s.n, coef=0.7), fused=fused, **kw)
        assert takes_fused_path(f.loss) == fused
        results[fused] = (f, grads_of(f.loss, hidden, s))
    (f, grads), (ref, grads_ref) = results[True], results[False]
    assert f.terms.keys() == ref.terms.keys()
    for name in f.terms:
        torch.testing.assert_close(f.terms[name], ref.terms[name], **TOL)
    for got, want in zip(f, ref):
        if isinstance(got, Tensor):
            torch.testing.assert_close(got.detach(), want.detach(), **TOL)
    assert_all_close(grads, grads_ref)


def test_token_loss_fallback_calls_the_callback_once_and_handles_no_grad_and_empty_input():
    s = entry_setup("plain", seed=15)
    assert not can_fuse(s.head) and can_fuse(s.head, [s.W]) and can_fuse(s.teacher_head)
    calls = []

    def loss_fn(lp, div, start, stop):
        calls.append((start, stop, lp.requires_grad))
        return {"x": -lp.sum() / s.n}

    f = token_loss(s.hidden(), s.head, loss_fn, targets=s.targets, vocab_size=VOCAB, chunk_size=4)
    assert calls == [(0, s.n, True)] and f.divergence is None and f.teacher_logprobs is None
    f.loss.backward()
    assert float(s.W.grad.abs().sum()) > 0
    calls.clear()
    with torch.no_grad():
        f = token_loss(s.hidden(), s.head, loss_fn, targets=s.targets, vocab_size=VOCAB, chunk_size=4)
    assert calls == [(0, s.n, False)] and not f.loss.requires_grad
    torch.testing.assert_close(f.loss, f.terms["x"], **TOL)
    s = entry_setup("plain", seed=15)
    empty = s.hidden()[:0]
    f = token_loss(empty, s.head, lambda lp, div, a, b: {}, targets=s.targets[:0], vocab_size=VOCAB)
    assert f.loss.item() == 0 and f.terms == {} and f.logprobs.shape == (0,) and f.entropy.shape == (0,)
    with pytest.raises(TypeError, match="scalar"):
        token_loss(s.hidden(), s.head, lambda lp, div, a, b: {"x": -lp}, targets=s.targets, vocab_size=VOCAB)


# ------------------------------------------------------------------------------------------------
# MiniLLM: the fused loss_terms give the checkpointed path's values and gradients
# ------------------------------------------------------------------------------------------------


def _minillm_trainer(tiny_dirs, instruction_file, out: Path, **kw):
    from minillm.algorithms import build_algorithm
    from minillm.algorithms.common import split_train_valid
    from minillm.api import load_pair
    from minillm.config import TrainConfig, build_config
    from minillm.data import load_instructions
    from minillm.trainer import Trainer

    corpus = out.parent / "pt.txt"
    corpus.write_text("the cat likes the dog and the river.\n\nred green blue water fire tree city "
                      "mountain flower paris france capital one two three.\n\nyes no good bad.\n")
    base = dict(method="minillm", student=tiny_dirs["gpt2"], teacher=tiny_dirs["teacher"],
                train_data=instruction_file, output_dir=str(out), batch_size=4, num_rollouts=8, ppo_epochs=1,
                rollout_batch_size=8, max_new_tokens=8, max_steps=2, learning_rate=1e-3, valid_fraction=0.2,
                max_length=200, max_prompt_length=160, seed=5, pt_data=str(corpus), pt_seq_len=12,
                kd_ratio=0.5, chunk_size=7, temperature=1.2, eval_num_prompts=2)
    base.update(kw)
    cfg = build_config(TrainConfig, None, base)
    cfg.validate()
    student, teacher, tok, shared = load_pair(cfg)
    train, valid = split_train_valid(load_instructions(cfg.train_data), None, cfg.valid_fraction, cfg.seed)
    return Trainer(cfg, student, tok, build_algorithm("minillm", train, valid, cfg), teacher=teacher,
                   shared_vocab_size=shared)


@pytest.mark.parametrize("variant", [dict(), dict(importance_weight="prefix", single_step_weighted=True,
                                                   teacher_mix_alpha=0.5, kd_ratio=0.0)])
def test_minillm_loss_terms_fused_equal_checkpointed(tiny_dirs, instruction_file, tmp_path, variant):
    tr = _minillm_trainer(tiny_dirs, instruction_file, tmp_path / "run", **variant)
    alg = tr.algorithm
    assert alg.fused and can_fuse(tr.ctx.student_head)
    assert tr.student.get_output_embeddings().weight is tr.student.get_input_embeddings().weight  # tied
    batch = next(alg.micro_batches())
    params = [(n, p) for n, p in tr.student.named_parameters() if p.requires_grad]

    def run(fused: bool):
        alg.fused = fused
        tr.optimizer.zero_grad(set_to_none=True)
        out = alg.loss(batch)
        (out.loss / 2).backward()
        return out, {n: p.grad.clone() for n, p in params}

    ref, grads_ref = run(False)
    out, grads = run(True)
    assert set(out.terms) == set(ref.terms) == {"pg", "single_step", "pt"}
    assert set(out.metrics) == set(ref.metrics) and "rollout_loss" in out.metrics
    torch.testing.assert_close(out.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    for k in out.terms:
        torch.testing.assert_close(out.terms[k], ref.terms[k], rtol=1e-5, atol=1e-6)
    for k in out.metrics:
        torch.testing.assert_close(torch.as_tensor(out.metrics[k]).double(),
                                   torch.as_tensor(ref.metrics[k]).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics["rollout_loss"], out.terms["pg"] + out.terms["single_step"],
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.loss.detach(), out.metrics["rollout_loss"] + out.terms["pt"], rtol=1e-6,
                               atol=1e-7)
    for n, _ in params:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-4,
                                   atol=1e-6 * float(grads_ref[n].abs().max()) + 1e-8)
    assert float(grads["transformer.wte.weight"].abs().sum()) > 0


def test_minillm_metrics_keep_pg_and_single_step(tiny_dirs, instruction_file, tmp_path):
    tr = _minillm_trainer(tiny_dirs, instruction_file, tmp_path / "run")
    tr.train()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "pg" in r]
    assert len(steps) == 2
    for r in steps:
        assert {"single_step", "pt", "rollout_loss", "loss", "ppo/clip_fraction"} <= set(r)
        assert r["rollout_loss"] == pytest.approx(r["pg"] + r["single_step"], rel=1e-5, abs=1e-6)
        assert r["loss"] == pytest.approx(r["rollout_loss"] + r["pt"], rel=1e-5, abs=1e-6)
