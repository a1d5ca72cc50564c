"""Every numeric piece of `minillm.losses` against a brute-force reference, in fp64.

Brute-force references are explicit Python loops over the vocabulary / positions (so they share no
code path with the vectorised implementation); gradients come from autograd on those loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from minillm.losses import (
    DIVERGENCES,
    advantages,
    chunked_token_terms,
    masked_mean,
    per_token_rewards,
    ppo_clipped_loss,
    prefix_importance_weights,
    pt_loss,
    single_step_loss,
    token_divergence,
    whiten,
)

DTYPE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}
INF = math.inf


# ------------------------------------------------------------------------------------------------
# Brute-force references
# ------------------------------------------------------------------------------------------------


def bf_softmax(row: Tensor) -> list[Tensor]:
    exps = [torch.exp(row[v]) for v in range(row.shape[0])]
    total = sum(exps)
    return [e / total for e in exps]


def bf_kl(a: list[Tensor], b: list[Tensor]) -> Tensor:
    """Σ_v a_v log(a_v / b_v), skipping a_v = 0 (0·log 0 = 0)."""
    terms = [a_v * torch.log(a_v / b_v) for a_v, b_v in zip(a, b) if a_v.item() > 0]
    return sum(terms, torch.zeros((), dtype=DTYPE))


def bf_divergence(
    student_row: Tensor, teacher_row: Tensor, kind: str, beta: float, skew_alpha: float
) -> Tensor:
    q, p = bf_softmax(student_row), bf_softmax(teacher_row)
    if kind == "fkl":
        return bf_kl(p, q)
    if kind == "rkl":
        return bf_kl(q, p)
    if kind == "jsd":
        m = [beta * p_v + (1 - beta) * q_v for p_v, q_v in zip(p, q)]
        return beta * bf_kl(p, m) + (1 - beta) * bf_kl(q, m)
    if kind == "tvd":
        return 0.5 * sum(torch.abs(p_v - q_v) for p_v, q_v in zip(p, q))
    if kind == "skl":
        return bf_kl(p, [skew_alpha * p_v + (1 - skew_alpha) * q_v for p_v, q_v in zip(p, q)])
    return bf_kl(q, [(1 - skew_alpha) * p_v + skew_alpha * q_v for p_v, q_v in zip(p, q)])


def random_logits(n: int, v: int, seed: int, scale: float = 3.0) -> Tensor:
    return scale * torch.randn(n, v, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def masked_logit_pair() -> tuple[Tensor, Tensor]:
    """Student/teacher logits [6, 7] with -inf entries: both masked (rows 0, 3), student only (row 1),
    teacher only (row 2), and a whole-row-but-one mask (row 5)."""
    student, teacher = random_logits(6, 7, 0), random_logits(6, 7, 1)
    for row, col in [(0, 2), (3, 5), (3, 6)]:
        student[row, col] = teacher[row, col] = -INF
    student[1, 4] = -INF
    teacher[2, 6] = -INF
    student[5, 1:] = teacher[5, 1:] = -INF
    return student, teacher


# ------------------------------------------------------------------------------------------------
# Token divergences
# ------------------------------------------------------------------------------------------------

CASES = [(kind, 0.5, 0.1) for kind in DIVERGENCES] + [
    ("jsd", 0.1, 0.1),
    ("jsd", 0.9, 0.1),
    ("skl", 0.5, 0.3),
    ("srkl", 0.5, 0.3),
]


@pytest.mark.parametrize(("kind", "beta", "skew_alpha"), CASES)
def test_divergence_matches_brute_force(kind, beta, skew_alpha):
    student, teacher = masked_logit_pair()
    expected = torch.stack([bf_divergence(s, t, kind, beta, skew_alpha) for s, t in zip(student, teacher)])
    got = token_divergence(student, teacher, kind, beta=beta, skew_alpha=skew_alpha)
    assert not got.isnan().any()
    finite = expected.isfinite()
    assert torch.equal(got.isinf(), ~finite)  # support mismatch gives +inf, never NaN
    torch.testing.assert_close(got[finite], expected[finite], **TOL)

    # Gradients on the rows with a finite value (an infinite loss has no useful gradient).
    rows = finite.nonzero().squeeze(-1)
    s_lib = student[rows].clone().requires_grad_(True)
    s_bf = student[rows].clone().requires_grad_(True)
    token_divergence(s_lib, teacher[rows], kind, beta=beta, skew_alpha=skew_alpha).sum().backward()
    sum(bf_divergence(s, t, kind, beta, skew_alpha) for s, t in zip(s_bf, teacher[rows])).backward()
    assert not s_lib.grad.isnan().any()
    torch.testing.assert_close(s_lib.grad, s_bf.grad, **TOL)


def test_infinite_divergences_are_the_support_mismatches():
    student, teacher = masked_logit_pair()
    assert token_divergence(student, teacher, "fkl").isinf().nonzero().flatten().tolist() == [1]
    assert token_divergence(student, teacher, "rkl").isinf().nonzero().flatten().tolist() == [2]
    for kind in ("jsd", "tvd", "skl", "srkl"):  # mixtures keep every divergence finite
        assert token_divergence(student, teacher, kind).isfinite().all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_is_zero_between_equal_distributions(kind):
    logits, _ = masked_logit_pair()
    torch.testing.assert_close(
        token_divergence(logits, logits + 4.0, kind), torch.zeros(6, dtype=DTYPE), **TOL
    )


def test_jsd_endpoints_are_fkl_and_rkl():
    student, teacher = random_logits(5, 6, 2), random_logits(5, 6, 3)
    fkl, rkl = token_divergence(student, teacher, "fkl"), token_divergence(student, teacher, "rkl")
    torch.testing.assert_close(token_divergence(student, teacher, "jsd", beta=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(token_divergence(student, teacher, "jsd", beta=1.0), rkl, rtol=0, atol=0)
    # The interior formula vanishes at the endpoints: JSD_β ≈ β·FKL (β→0), ≈ (1-β)·RKL (β→1).
    eps = 1e-6
    torch.testing.assert_close(
        token_divergence(student, teacher, "jsd", beta=eps) / eps, fkl, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "jsd", beta=1 - eps) / eps, rkl, rtol=1e-4, atol=0
    )


def test_skew_divergences_reduce_to_kl_at_zero_skew():
    student, teacher = random_logits(5, 6, 4), random_logits(5, 6, 5)
    fkl, rkl = token_divergence(student, teacher, "fkl"), token_divergence(student, teacher, "rkl")
    torch.testing.assert_close(token_divergence(student, teacher, "skl", skew_alpha=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(
        token_divergence(student, teacher, "srkl", skew_alpha=0.0), rkl, rtol=0, atol=0
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "skl", skew_alpha=1e-9), fkl, rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        token_divergence(student, teacher, "srkl", skew_alpha=1e-9), rkl, rtol=1e-4, atol=0
    )


def test_temperature_divides_both_logits():
    student, teacher = random_logits(4, 6, 6), random_logits(4, 6, 7)
    for kind in DIVERGENCES:
        torch.testing.assert_close(
            token_divergence(student, teacher, kind, temperature=2.5),
            token_divergence(student / 2.5, teacher / 2.5, kind),
            **TOL,
        )


def test_vocab_slicing_with_different_widths():
    student, teacher = random_logits(4, 9, 8), random_logits(4, 7, 9)
    for kind in DIVERGENCES:
        torch.testing.assert_close(
            token_divergence(student, teacher, kind, vocab_size=6),
            token_divergence(student[:, :6], teacher[:, :6], kind),
            **TOL,
        )
    with pytest.raises(ValueError, match="vocab_size"):
        token_divergence(student, teacher, "fkl")
    with pytest.raises(ValueError, match="exceeds"):
        token_divergence(student, teacher, "fkl", vocab_size=8)


def test_teacher_gets_no_gradient_and_low_precision_is_upcast():
    student = random_logits(4, 6, 10).requires_grad_(True)
    teacher = random_logits(4, 6, 11).requires_grad_(True)
    token_divergence(student, teacher, "jsd").sum().backward()
    assert teacher.grad is None and student.grad is not None
    half = token_divergence(student.detach().bfloat16(), teacher.detach().bfloat16(), "rkl")
    assert half.dtype == torch.float32
    reference = token_divergence(
        student.detach().bfloat16().double(), teacher.detach().bfloat16().double(), "rkl"
    )
    torch.testing.assert_close(half.double(), reference, rtol=1e-5, atol=1e-6)


def test_divergence_argument_validation():
    s = random_logits(2, 3, 12)
    with pytest.raises(ValueError, match="unknown divergence"):
        token_divergence(s, s, "kl")
    with pytest.raises(ValueError, match="beta"):
        token_divergence(s, s, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="skew_alpha"):
        token_divergence(s, s, "skl", skew_alpha=-0.1)


# ------------------------------------------------------------------------------------------------
# Chunked token terms
# ------------------------------------------------------------------------------------------------

N, H, V = 11, 5, 8


def heads(student_width: int = V, teacher_width: int = V) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    torch.manual_seed(0)
    student = torch.nn.Linear(H, student_width).to(DTYPE)
    teacher = torch.nn.Linear(H + 1, teacher_width).to(DTYPE)
    with torch.no_grad():
        student.weight.mul_(3.0)
        teacher.weight.mul_(3.0)
    return student, teacher


def hidden_states(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(N, H, generator=gen, dtype=DTYPE),
        torch.randn(N, H + 1, generator=gen, dtype=DTYPE),
        torch.randint(0, 6, (N,), generator=gen),
    )


def reference_terms(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, kind: str, **kw):
    ls = torch.log_softmax(student_logits, -1)
    lt = torch.log_softmax(teacher_logits, -1)
    return (
        ls.gather(-1, targets[:, None]).squeeze(-1),
        token_divergence(student_logits, teacher_logits, kind, **kw),
        lt.gather(-1, targets[:, None]).squeeze(-1),
        -(ls.exp() * ls).sum(-1),
    )


def gradients(loss: Tensor, params: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("chunk_size", [1, 3, N, 100])
@pytest.mark.parametrize("kind", ["rkl", "jsd", "srkl"])
def test_chunked_matches_unchunked(chunk_size, kind):
    student_head, teacher_head = heads()
    s_hidden, t_hidden, targets = hidden_states()
    s_hidden.requires_grad_(True)
    params = [s_hidden, student_head.weight, student_head.bias]
    coef = torch.linspace(0.5, 1.5, N, dtype=DTYPE)

    terms = chunked_token_terms(
        s_hidden,
        student_head,
        targets=targets,
        teacher_hidden=t_hidden,
        teacher_head=teacher_head,
        divergence=kind,
        chunk_size=chunk_size,
    )
    expected = reference_terms(student_head(s_hidden), teacher_head(t_hidden).detach(), targets, kind)
    for got, want in zip(terms, expected):
        torch.testing.assert_close(got, want.detach(), **TOL)
    assert not terms.entropy.requires_grad and not terms.teacher_logprobs.requires_grad
    got_grads = gradients((coef * terms.divergence).sum() + (coef.flip(0) * terms.logprobs).sum(), params)
    want_grads = gradients((coef * expected[1]).sum() + (coef.flip(0) * expected[0]).sum(), params)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, **TOL)
    assert teacher_head.weight.grad is None


def test_chunked_precomputed_teacher_logits_slicing_and_temperature():
    student_head, teacher_head = heads(student_width=10, teacher_width=9)
    s_hidden, t_hidden, targets = hidden_states(1)
    s_hidden.requires_grad_(True)
    teacher_logits = teacher_head(t_hidden).detach()
    kw = {
        "targets": targets,
        "divergence": "jsd",
        "vocab_size": 7,
        "temperature": 1.7,
        "beta": 0.3,
        "chunk_size": 4,
    }
    from_head = chunked_token_terms(
        s_hidden, student_head, teacher_hidden=t_hidden, teacher_head=teacher_head, **kw
    )
    from_logits = chunked_token_terms(s_hidden, student_head, teacher_logits=teacher_logits, **kw)
    expected = reference_terms(
        student_head(s_hidden)[:, :7] / 1.7, teacher_logits[:, :7] / 1.7, targets, "jsd", beta=0.3
    )
    for a, b, want in zip(from_head, from_logits, expected):
        torch.testing.assert_close(a, want.detach(), **TOL)
        torch.testing.assert_close(b, want.detach(), **TOL)
    (grad,) = gradients(from_logits.divergence.sum(), [s_hidden])
    (want,) = gradients(expected[1].sum(), [s_hidden])
    torch.testing.assert_close(grad, want, **TOL)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_token_terms(s_hidden, student_head, teacher_logits=teacher_logits, divergence="fkl")


def test_chunked_memory_is_per_chunk_in_forward_and_backward():
    """Autograd keeps only chunk inputs, and backward recomputes logits one chunk at a time."""
    student_head, teacher_head = heads(student_width=64, teacher_width=64)
    s_hidden, t_hidden, targets = hidden_states()
    s_hidden.requires_grad_(True)
    rows_seen: list[int] = []

    def head(h: Tensor) -> Tensor:
        rows_seen.append(h.shape[0])
        return student_head(h)

    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        terms = chunked_token_terms(
            s_hidden,
            head,
            targets=targets,
            teacher_hidden=t_hidden,
            teacher_head=teacher_head,
            divergence="rkl",
            chunk_size=3,
        )
    forward_calls = len(rows_seen)
    (terms.divergence.sum() + terms.logprobs.sum()).backward()
    assert max(saved) <= 3 * (H + 1)  # hidden-state chunks, never [N, V] (or even [chunk, V]) logits
    assert max(rows_seen) <= 3 and forward_calls == math.ceil(N / 3)
    assert len(rows_seen) == 2 * forward_calls  # each chunk recomputed once in backward


def test_chunked_optional_outputs_no_grad_and_empty():
    student_head, teacher_head = heads()
    s_hidden, t_hidden, targets = hidden_states()
    only_entropy = chunked_token_terms(s_hidden, student_head)
    assert (
        only_entropy.logprobs is None
        and only_entropy.divergence is None
        and only_entropy.teacher_logprobs is None
    )
    with torch.no_grad():
        terms = chunked_token_terms(
            s_hidden,
            student_head,
            targets=targets,
            teacher_logits=teacher_head(t_hidden),
            divergence="fkl",
            chunk_size=4,
        )
    assert terms.divergence.shape == (N,) and not terms.divergence.requires_grad
    empty = chunked_token_terms(
        s_hidden[:0].requires_grad_(True),
        student_head,
        targets=targets[:0],
        teacher_logits=teacher_head(t_hidden[:0]),
        divergence="rkl",
    )
    assert empty.logprobs.shape == (0,) and empty.divergence.shape == (0,)
    with pytest.raises(ValueError, match="needs a teacher"):
        chunked_token_terms(s_hidden, student_head, divergence="rkl")
    with pytest.raises(ValueError, match="together"):
        chunked_token_terms(s_hidden, student_head, teacher_hidden=t_hidden)


# ------------------------------------------------------------------------------------------------
# Rewards and advantages
# ------------------------------------------------------------------------------------------------


def test_per_token_rewards():
    teacher = torch.tensor([[-1.0, -2.0, -INF], [-0.5, -300.0, 7.0]], dtype=DTYPE)
    old = torch.tensor([[-2.0, -1.0, -INF], [-1.5, -0.1, 1.0]], dtype=DTYPE)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=DTYPE)
    # r = (log p - log q_old) / 0.5, clipped to ±100; padding (with -inf/garbage) is 0.
    expected = torch.tensor([[2.0, -2.0, 0.0], [2.0, -100.0, 0.0]], dtype=DTYPE)
    got = per_token_rewards(teacher, old, mask, reward_scaling=0.5, reward_clip=100.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(per_token_rewards(teacher, old, mask)[1, 1], torch.tensor(-299.9, dtype=DTYPE))


# Two responses, right-padded to T = 4: row 0 has 3 tokens (the last is EOS), row 1 has 2. Padded
# rewards hold garbage (99) that must be ignored. γ = 0.5 keeps the arithmetic readable.
REWARDS = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 99.0, 99.0]], dtype=DTYPE)
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]], dtype=DTYPE)


def test_advantages_lmops_by_hand():
    # G_t = r_t + γ G_{t+1}:  row 0: G_2 = 3, G_1 = 2 + 0.5·3 = 3.5, G_0 = 1 + 0.5·3.5 = 2.75
    #                         row 1: G_1 = 5, G_0 = 4 + 0.5·5 = 6.5
    expected = torch.tensor([[2.75, 3.5, 3.0, 0.0], [6.5, 5.0, 0.0, 0.0]], dtype=DTYPE)
    got = advantages(REWARDS, MASK, gamma=0.5, length_norm=False, variant="lmops")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # Length norm: ÷ valid tokens from t to the end inclusive, n = [3, 2, 1] and [2, 1].
    expected = torch.tensor([[2.75 / 3, 3.5 / 2, 3.0, 0.0], [6.5 / 2, 5.0, 0.0, 0.0]], dtype=DTYPE)
    got = advantages(REWARDS, MASK, gamma=0.5, length_norm=True, variant="lmops")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_advantages_paper_by_hand():
    # R_{t+1} = Σ_{k>t} γ^{k-t-1} r_k:  row 0: t=0: 2 + 0.5·3 = 3.5, t=1: 3, t=2: 0 (nothing after EOS)
    #                                   row 1: t=0: 5, t=1: 0
    expected = torch.tensor([[3.5, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=DTYPE)
    got = advantages(REWARDS, MASK, gamma=0.5, length_norm=False, variant="paper")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # Length norm: ÷ valid tokens strictly after t, [2, 1, 0] and [1, 0], with 0/0 := 0.
    expected = torch.tensor([[3.5 / 2, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]], dtype=DTYPE)
    got = advantages(REWARDS, MASK, gamma=0.5, length_norm=True, variant="paper")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # γ = 1, no norm: plain future sums, row 0: [2 + 3, 3, 0].
    got = advantages(REWARDS, MASK, gamma=1.0, length_norm=False, variant="paper")
    torch.testing.assert_close(got[0], torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=DTYPE), rtol=0, atol=1e-12)


def test_advantages_per_decision_weights_by_hand():
    # w = [0.5, 2, 4] on row 0 (w_0 never enters: the ratio's W_t already holds it).
    # paper: A_t = Σ_{k>t} γ^{k-t-1} (Π_{t<j≤k} w_j) r_k
    #   t=0: w_1·r_1 + γ·w_1·w_2·r_2 = 2·2 + 0.5·2·4·3 = 16;  t=1: w_2·r_2 = 12;  t=2: 0
    # lmops: A_t = r_t + γ·(paper A_t):  t=0: 1 + 8 = 9;  t=1: 2 + 6 = 8;  t=2: 3
    weights = torch.tensor([[0.5, 2.0, 4.0, 77.0], [1.0, 1.0, 77.0, 77.0]], dtype=DTYPE)
    paper = advantages(
        REWARDS, MASK, gamma=0.5, length_norm=False, variant="paper", per_decision_weights=weights
    )
    lmops = advantages(
        REWARDS, MASK, gamma=0.5, length_norm=False, variant="lmops", per_decision_weights=weights
    )
    torch.testing.assert_close(
        paper[0], torch.tensor([16.0, 12.0, 0.0, 0.0], dtype=DTYPE), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(lmops[0], torch.tensor([9.0, 8.0, 3.0, 0.0], dtype=DTYPE), rtol=0, atol=1e-12)
    torch.testing.assert_close(paper[1], torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=DTYPE), rtol=0, atol=1e-12)


def test_advantages_match_brute_force_and_validate():
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 6, generator=gen, dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=DTYPE)
    gamma = 0.9
    for variant, first_future in (("lmops", 0), ("paper", 1)):
        got = advantages(rewards, mask, gamma=gamma, variant=variant)
        for b in range(3):
            length = int(mask[b].sum())
            for t in range(6):
                ks = range(t + first_future, length)
                value = sum(gamma ** (k - t - first_future) * rewards[b, k].item() for k in ks) / max(
                    len(ks), 1
                )
                assert got[b, t].item() == pytest.approx(value if t < length else 0.0, abs=1e-12)
    with pytest.raises(ValueError, match="variant"):
        advantages(rewards, mask, variant="trl")
    with pytest.raises(ValueError, match="gamma"):
        advantages(rewards, mask, gamma=1.5)


# ------------------------------------------------------------------------------------------------
# Whitening and importance weights
# ------------------------------------------------------------------------------------------------


def test_whiten_uses_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0, 4.0, 1e6], [3.0, 5.0, -1e6, 1e6]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=DTYPE)
    valid = [1.0, 2.0, 4.0, 3.0, 5.0]
    mean = sum(valid) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in valid) / 5 + 1e-8)  # population variance, as LMOps
    got = whiten(values, mask)
    expected = torch.tensor(
        [
            [(x - mean) / std for x in (1.0, 2.0, 4.0)] + [0.0],
            [(x - mean) / std for x in (3.0, 5.0)] + [0.0, 0.0],
        ],
        dtype=DTYPE,
    )
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(whiten(values, mask, shift_mean=False), (expected + mean) * mask, **TOL)


def test_whiten_all_reduce_gives_global_statistics():
    gen = torch.Generator().manual_seed(4)
    rank0, rank1 = (
        torch.randn(2, 5, generator=gen, dtype=DTYPE),
        torch.randn(3, 5, generator=gen, dtype=DTYPE),
    )
    mask0, mask1 = (
        (torch.rand(2, 5, generator=gen) > 0.3).to(DTYPE),
        (torch.rand(3, 5, generator=gen) > 0.3).to(DTYPE),
    )
    captured: list[Tensor] = []
    whiten(rank1, mask1, all_reduce=lambda stats: captured.append(stats.clone()))  # in place, returns None

    def sum_with_rank1(stats: Tensor) -> Tensor:
        return stats + captured[0]

    got = whiten(rank0, mask0, all_reduce=sum_with_rank1)
    expected = whiten(torch.cat([rank0, rank1]), torch.cat([mask0, mask1]))[:2]
    torch.testing.assert_close(got, expected, **TOL)
    assert captured[0].shape == (3,) and captured[0][2] == mask1.sum()


def test_prefix_importance_weights_by_brute_force():
    gen = torch.Generator().manual_seed(5)
    old = -torch.rand(2, 4, generator=gen, dtype=DTYPE) * 3
    mix = -torch.rand(2, 4, generator=gen, dtype=DTYPE) * 3
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=DTYPE)
    inclusive = prefix_importance_weights(old, mix, mask)
    exclusive = prefix_importance_weights(old, mix, mask, include_current=False)
    for b in range(2):
        for t in range(4):
            if mask[b, t] == 0:
                assert inclusive[b, t] == 0 and exclusive[b, t] == 0
                continue
            ratios = [math.exp(old[b, k].item()) / math.exp(mix[b, k].item()) for k in range(t + 1)]
            assert inclusive[b, t].item() == pytest.approx(math.prod(ratios), rel=1e-12)
            assert exclusive[b, t].item() == pytest.approx(math.prod(ratios[:-1]), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# PPO surrogate, single-step term, L_PT
# ------------------------------------------------------------------------------------------------


def bf_ppo(logprobs, old, adv, w, mask, eps):
    total, count = 0.0, 0.0
    for lp, lo, a, wt, m in zip(logprobs, old, adv, w, mask):
        if m.item() == 0:
            continue
        rho = torch.exp(lp - lo) * wt
        clipped = torch.clamp(rho, 1 - eps, 1 + eps) if eps is not None else rho
        total = total + torch.maximum(-a * rho, -a * clipped)
        count += 1
    return total / count


@pytest.mark.parametrize("clip_eps", [0.2, None])
def test_ppo_clipped_loss_matches_brute_force(clip_eps):
    gen = torch.Generator().manual_seed(6)
    old = -torch.rand(12, generator=gen, dtype=DTYPE) * 2
    logprobs = (old + 0.4 * torch.randn(12, generator=gen, dtype=DTYPE)).requires_grad_(True)
    adv = torch.randn(12, generator=gen, dtype=DTYPE)
    w = 0.5 + torch.rand(12, generator=gen, dtype=DTYPE)
    mask = torch.tensor([1.0] * 9 + [0.0] * 3, dtype=DTYPE)
    garbage = logprobs.detach().clone()
    garbage[9:] = INF  # masked positions may hold anything
    loss, stats = ppo_clipped_loss(
        logprobs + (garbage - logprobs.detach()), old, adv, w, mask, clip_eps=clip_eps
    )
    (grad,) = torch.autograd.grad(loss, logprobs)
    lp_bf = logprobs.detach().clone().requires_grad_(True)
    loss_bf = bf_ppo(lp_bf, old, adv, w, mask, clip_eps)
    (grad_bf,) = torch.autograd.grad(loss_bf, lp_bf)
    torch.testing.assert_close(loss, loss_bf, **TOL)
    torch.testing.assert_close(grad, grad_bf, **TOL)
    rho = (logprobs.detach() - old).exp() * w
    torch.testing.assert_close(stats["ratio_mean"], rho[:9].mean(), **TOL)
    torch.testing.assert_close(stats["ratio_max"], rho[:9].max(), **TOL)
    log_r = logprobs.detach()[:9] - old[:9]
    torch.testing.assert_close(stats["approx_kl"], (log_r.exp() - 1 - log_r).mean(), **TOL)
    if clip_eps is None:
        assert stats["clip_fraction"] == 0
    else:
        active = (-adv * rho.clamp(0.8, 1.2) > -adv * rho)[:9]
        assert stats["clip_fraction"].item() == pytest.approx(active.double().mean().item())
    loss_sum, _ = ppo_clipped_loss(logprobs, old, adv, w, mask, clip_eps=clip_eps, reduction="sum")
    torch.testing.assert_close(loss_sum, loss_bf * 9, **TOL)


def ppo_gradient(ratio: float, weight: float, advantage: float) -> float:
    logprobs = torch.tensor([math.log(ratio)], dtype=DTYPE, requires_grad=True)
    loss, _ = ppo_clipped_loss(
        logprobs,
        torch.zeros(1, dtype=DTYPE),
        torch.tensor([advantage], dtype=DTYPE),
        torch.tensor([weight], dtype=DTYPE),
        torch.ones(1, dtype=DTYPE),
        clip_eps=0.2,
    )
    return torch.autograd.grad(loss, logprobs)[0].item()


def test_ppo_clipping_behaviour_and_importance_weight_in_ratio():
    # A > 0: a ratio above 1+ε is clipped (no push further up); below 1-ε it still gets -A·ρ.
    assert ppo_gradient(1.5, 1.0, 2.0) == 0.0
    assert ppo_gradient(0.5, 1.0, 2.0) == pytest.approx(-2.0 * 0.5)
    # A < 0: a ratio below 1-ε is clipped; above 1+ε it still gets -A·ρ.
    assert ppo_gradient(0.5, 1.0, -2.0) == 0.0
    assert ppo_gradient(1.5, 1.0, -2.0) == pytest.approx(2.0 * 1.5)
    # ρ includes w: at q_θ = q_old, w = 0.5 already lies below 1-ε.
    assert ppo_gradient(1.0, 0.5, -2.0) == 0.0
    assert ppo_gradient(1.0, 0.5, 2.0) == pytest.approx(-2.0 * 0.5)
    assert ppo_gradient(1.0, 1.0, 2.0) == pytest.approx(-2.0)


def test_single_step_loss_and_masked_mean():
    div = torch.tensor([[1.0, 2.0, INF], [3.0, 4.0, 5.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=DTYPE)
    weights = torch.tensor([[0.5, 2.0, 9.0], [1.0, 9.0, 9.0]], dtype=DTYPE)
    assert single_step_loss(div, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    assert single_step_loss(div, mask, weights).item() == pytest.approx((0.5 + 4 + 3) / 3)
    assert single_step_loss(div, mask, weights, reduction="sum").item() == pytest.approx(0.5 + 4 + 3)
    assert masked_mean(div, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(div, mask, dim=-1), torch.tensor([1.5, 3.0], dtype=DTYPE))
    assert masked_mean(div, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        single_step_loss(div, mask, reduction="none")


def test_pt_loss():
    ce = torch.tensor([[2.0, 4.0], [6.0, 100.0]], dtype=DTYPE)
    kd = torch.tensor([[1.0, 1.0], [4.0, 100.0]], dtype=DTYPE)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=DTYPE)
    assert pt_loss(ce, kd, mask, kd_ratio=0.5).item() == pytest.approx(0.5 * 4.0 + 0.5 * 2.0)
    assert pt_loss(ce, None, mask, kd_ratio=0.0).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="kd_per_token"):
        pt_loss(ce, None, mask, kd_ratio=0.5)
