"""core.chunked: values against float64 references; chunked equals unchunked in values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from tsopsd_cli.core import chunked
from tsopsd_cli.core.chunked import divergence_from_logits, token_divergence, token_logps
from tsopsd_cli.core.divergences import DIVERGENCES

ROWS_PER_BLOCK = chunked.rows_per_block  # the real one, before any test replaces it

@pytest.fixture(autouse=True, params=["whole", 3])
def rows_per_block(request, monkeypatch):
    """Every test twice: with the row blocks the CPU takes at these toy vocabularies (the whole chunk at once) and
    with blocks of 3 rows, which split chunks of 4 into 3 + 1 (the path of a 151,936-token vocabulary, where a
    block is 4 rows)."""
    if request.param != "whole":
        monkeypatch.setattr(chunked, "rows_per_block", lambda logits: request.param)
    return request.param


def testrows_per_block_fits_a_cache_on_the_cpu_and_takes_the_chunk_elsewhere():
    rows = ROWS_PER_BLOCK(torch.empty(1024, 151_936, dtype=torch.bfloat16))
    assert rows == 4 and rows * 151_936 * 4 <= chunked._CPU_BLOCK_BYTES  # float32 work of a block within the budget
    assert ROWS_PER_BLOCK(torch.empty(1024, 99)) >= 1024  # the toy vocabulary: the chunk in one block
    assert ROWS_PER_BLOCK(torch.empty(1, 10**7)) == 1  # never less than a row
    assert ROWS_PER_BLOCK(torch.empty(7, 10**7, device="meta")) == 7  # not the CPU: the whole chunk


def probs(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def setup(seed=0, n=23, d=8, v=31):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(v, d, generator=g, dtype=torch.float64),
            torch.randint(0, v, (n,), generator=g))


def test_token_logps_and_entropy_against_reference():
    h, w, t = setup()
    lp, ent = token_logps(h, w, t, temperature=1.3, chunk_size=5, with_entropy=True)
    logits = (h @ w.T / 1.3).tolist()
    for i, row in enumerate(logits):
        p = probs(row)
        assert lp[i].item() == pytest.approx(math.log(p[t[i]]), abs=1e-5)
        assert ent[i].item() == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)


def test_token_logps_chunked_gradients_equal_unchunked():
    h, w, t = setup()
    grads = []
    for chunk in (4, 1000):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = token_logps(hh, ww, t, 1.0, chunk, with_entropy=True)
        (lp.sum() + 0.3 * ent.sum()).backward()
        grads.append((hh.grad, ww.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergences_against_reference(kind):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(7, 11, generator=g, dtype=torch.float64), torch.randn(7, 11, generator=g, dtype=torch.float64)
    d = divergence_from_logits(s, t, kind, beta=0.3)
    for i in range(7):
        ps, pt = probs(s[i].tolist()), probs(t[i].tolist())
        if kind == "forward_kl":
            want = kl(pt, ps)
        elif kind == "reverse_kl":
            want = kl(ps, pt)
        else:
            m = [0.3 * a + 0.7 * b for a, b in zip(pt, ps)]
            want = 0.3 * kl(pt, m) + 0.7 * kl(ps, m)
        assert d[i].item() == pytest.approx(want, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError):
        divergence_from_logits(s, t, "jsd", beta=0.0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_token_divergence_chunked_equals_unchunked_values_and_gradients(kind):
    h, w, _ = setup(seed=5)
    wt = w + 0.1
    teacher = lambda idx: h[idx] @ wt.T  # noqa: E731
    out = []
    for chunk in (3, 1000):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        d = token_divergence(hh, ww, teacher, kind, beta=0.5, temp=1.6, chunk_size=chunk)
        d.mean().backward()
        out.append((d.detach(), hh.grad, ww.grad))
    for a, b in zip(out[0], out[1], strict=True):
        torch.testing.assert_close(a, b)
    want = divergence_from_logits(h @ w.T, (h @ wt.T) / 1.6, kind, 0.5)
    torch.testing.assert_close(out[0][0], want.float() if out[0][0].dtype == torch.float32 else want)


def test_frozen_teacher_at_tau_one_gives_zero_loss_and_gradient():
    h, w, _ = setup(seed=7)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    teacher = lambda idx: (h[idx] @ w.T)  # noqa: E731 - the same model, frozen
    for kind in DIVERGENCES:
        hh.grad = ww.grad = None
        d = token_divergence(hh, ww, teacher, kind, temp=1.0, chunk_size=4)
        d.mean().backward()
        assert d.abs().max() < 1e-12
        assert hh.grad.abs().max() < 1e-12 and ww.grad.abs().max() < 1e-12


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_top_p_teacher_against_reference(kind):
    h, w, _ = setup(seed=3)
    g = torch.Generator().manual_seed(4)
    tw = w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    tau, top_p, beta = 1.6, 0.8, 0.4
    got = token_divergence(h, w, lambda idx: h[idx] @ tw.T, kind, beta=beta, temp=tau, chunk_size=4,
                           teacher_top_p=top_p)
    for i in range(h.shape[0]):
        s = probs((h[i] @ w.T).tolist())
        t = probs((h[i] @ tw.T / tau).tolist())
        order = sorted(range(len(t)), key=lambda j: -t[j])
        keep, mass = set(), 0.0
        for j in order:  # the smallest prefix whose mass reaches top_p
            keep.add(j)
            mass += t[j]
            if mass >= top_p:
                break
        tn = [t[j] / mass if j in keep else 0.0 for j in range(len(t))]
        if kind == "forward_kl":
            want = kl(tn, s)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(tn, s)]
            want = beta * kl(tn, m) + (1 - beta) * kl(s, m)
        assert got[i].item() == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="truncated"):
        token_divergence(h, w, lambda idx: h[idx] @ tw.T, "reverse_kl", temp=tau, teacher_top_p=top_p)


def _student_as_logits(z):
    """token_divergence on hidden = z and an identity head: the student's logits are z itself."""
    return z, torch.eye(z.shape[-1], dtype=z.dtype)


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_forward_kl_gradient_is_student_minus_teacher(top_p):
    torch.manual_seed(3)
    z = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(7, 11, dtype=torch.float64) * 2
    h, w = _student_as_logits(z)
    d = token_divergence(h, w, lambda idx: t_logits[idx], "forward_kl", temp=1.7, chunk_size=3, teacher_top_p=top_p)
    d.sum().backward()
    from tsopsd_cli.core.chunked import teacher_logits_at

    t = teacher_logits_at(t_logits, 1.7, top_p).softmax(-1)
    torch.testing.assert_close(z.grad, z.detach().softmax(-1) - t)  # d KL(t || softmax z) / dz = s - t


def test_reverse_kl_gradient_against_its_closed_form():
    torch.manual_seed(4)
    z = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(5, 9, dtype=torch.float64)
    h, w = _student_as_logits(z)
    token_divergence(h, w, lambda idx: t_logits[idx], "reverse_kl", temp=1.3, chunk_size=2).sum().backward()
    ls = z.detach().log_softmax(-1)
    lt = (t_logits / 1.3).log_softmax(-1)
    kl = (ls.exp() * (ls - lt)).sum(-1, keepdim=True)
    torch.testing.assert_close(z.grad, ls.exp() * (ls - lt - kl))  # d KL(s || t) / dz = s (log s - log t - KL)


def test_jsd_gradient_against_central_differences():
    torch.manual_seed(5)
    z0 = torch.randn(3, 6, dtype=torch.float64)
    t_logits = torch.randn(3, 6, dtype=torch.float64)

    def value(z):
        h, w = _student_as_logits(z)
        with torch.no_grad():
            return float(token_divergence(h, w, lambda idx: t_logits[idx], "jsd", beta=0.3, temp=1.6).sum())

    z = z0.clone().requires_grad_(True)
    h, w = _student_as_logits(z)
    token_divergence(h, w, lambda idx: t_logits[idx], "jsd", beta=0.3, temp=1.6, chunk_size=2).sum().backward()
    numeric = torch.zeros_like(z0)
    eps = 1e-6
    for i in range(z0.shape[0]):
        for j in range(z0.shape[1]):
            e = torch.zeros_like(z0)
            e[i, j] = eps
            numeric[i, j] = (value(z0 + e) - value(z0 - e)) / (2 * eps)
    torch.testing.assert_close(z.grad, numeric, atol=1e-7, rtol=1e-6)


def test_no_gradient_reaches_a_live_teacher():
    """teacher: live uses the student's own logits as the target: the target must act as a constant (stop
    gradient), so the gradient equals the one against a detached copy."""
    torch.manual_seed(6)
    h = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    token_divergence(h, w, lambda idx: h[idx] @ w.T, "forward_kl", temp=1.6, chunk_size=4).sum().backward()
    live = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    hd, wd = h.detach().clone(), w.detach().clone()
    token_divergence(h, w, lambda idx: hd[idx] @ wd.T, "forward_kl", temp=1.6, chunk_size=4).sum().backward()
    torch.testing.assert_close(live[0], h.grad)
    torch.testing.assert_close(live[1], w.grad)


def test_observer_sees_each_chunk_once_with_the_loss_blocks(rows_per_block):
    """token_divergence's `observe` gets, once per block of rows of each chunk's forward pass (not again when the
    backward pass recomputes it), the student logits, the teacher's raw logits and the teacher as distilled; the
    loss and its gradients are those of a run without an observer."""
    from tsopsd_cli.core.chunked import teacher_logits_at

    g = torch.Generator().manual_seed(5)
    n, d, v, temp, top_p = 11, 6, 17, 1.6, 0.9
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n, d, generator=g, dtype=torch.float64)
    tw = torch.randn(v, d, generator=g, dtype=torch.float64)
    seen = []

    def observe(idx, s_logits, s_logp, t_raw, t_logp):
        assert not s_logits.requires_grad and not s_logp.requires_grad and not torch.is_grad_enabled()
        seen.append(idx.tolist())
        torch.testing.assert_close(s_logits, h.detach()[idx] @ w.detach().T)
        torch.testing.assert_close(s_logp, (h.detach()[idx] @ w.detach().T).log_softmax(-1))
        torch.testing.assert_close(t_raw, th[idx] @ tw.T)
        torch.testing.assert_close(t_logp, teacher_logits_at(th[idx] @ tw.T, temp, top_p).log_softmax(-1))

    fn = lambda idx: th[idx] @ tw.T  # noqa: E731
    got = token_divergence(h, w, fn, "forward_kl", temp=temp, chunk_size=4, teacher_top_p=top_p, observe=observe)
    got.sum().backward()
    rows = 4 if rows_per_block == "whole" else rows_per_block
    chunks = [list(range(s, min(s + 4, n))) for s in range(0, n, 4)]
    assert seen == [c[r:r + rows] for c in chunks for r in range(0, len(c), rows)]  # each row once, in order
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = token_divergence(h, w, fn, "forward_kl", temp=temp, chunk_size=4, teacher_top_p=top_p)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(gh, h.grad, atol=0, rtol=0)
    torch.testing.assert_close(gw, w.grad, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_gradients_taken_in_the_forward_pass(kind):
    """With a sum/mean upstream (the same gradient for every token) each chunk's student and teacher logits are
    formed once (no recomputation in the backward pass); any other upstream gradient recomputes the chunks; both
    give the gradients of a plain float64 autograd reference."""
    g = torch.Generator().manual_seed(9)
    n, d, v = 10, 5, 13
    h = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64)
    calls = []

    def teacher(idx):
        calls.append(idx.numel())
        return t[idx]

    for upstream in (torch.full((n,), 0.25, dtype=torch.float64), weights):
        want_h, want_w = torch.autograd.grad(
            (divergence_from_logits(h @ w.T, t / 1.6, kind, 0.3) * upstream).sum(), (h, w))
        calls.clear()
        out = token_divergence(h, w, teacher, kind, beta=0.3, temp=1.6, chunk_size=4)
        assert calls == [4, 4, 2]  # the forward pass
        got_h, got_w = torch.autograd.grad((out * upstream).sum(), (h, w))
        assert calls == ([4, 4, 2] if upstream is not weights else [4, 4, 2, 4, 4, 2])
        torch.testing.assert_close(got_h, want_h, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(got_w, want_w, atol=1e-12, rtol=1e-10)
