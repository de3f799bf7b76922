"""core.stats and core.representation against plain float64 references on random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from tsopsd_cli.core import stats as S
from tsopsd_cli.core.representation import LayerSimilarity, linear_cka, mean_cosine


def rand_logits(n=37, v=53, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


def ref_probs(row):  # float64, plain Python
    m = max(row)
    e = [math.exp(x - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def ref_entropy(row):
    return -sum(p * math.log(p) for p in ref_probs(row) if p > 0)


def ref_kl(a, b):
    p, q = ref_probs(a), ref_probs(b)
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q) if pi > 0)


def test_entropy_top1_topk_against_float64_reference():
    logits = rand_logits()
    st = S.logits_token_stats(logits, [1.0, 1.6], [1, 5, 10])
    for i, row in enumerate(logits.double().tolist()):
        p = sorted(ref_probs(row), reverse=True)
        assert st.entropy[i].item() == pytest.approx(ref_entropy(row), abs=1e-5)
        assert st.top1_prob[i].item() == pytest.approx(p[0], abs=1e-6)
        for k in (1, 5, 10):
            assert st.topk_mass[k][i].item() == pytest.approx(sum(p[:k]), abs=1e-5)
        assert st.entropy_at[1.6][i].item() == pytest.approx(ref_entropy([x / 1.6 for x in row]), abs=1e-5)


def test_kl_agreement_jaccard_against_reference():
    a, b = rand_logits(seed=1), rand_logits(seed=2)
    st = S.logits_token_stats(a, [1.0], [1, 5], ref_logits=b)
    for i, (ra, rb) in enumerate(zip(a.double().tolist(), b.double().tolist(), strict=True)):
        assert st.kl_reverse[i].item() == pytest.approx(ref_kl(ra, rb), rel=1e-4, abs=1e-5)  # KL(model || ref)
        assert st.kl_forward[i].item() == pytest.approx(ref_kl(rb, ra), rel=1e-4, abs=1e-5)  # KL(ref || model)
        top = lambda r, k: set(sorted(range(len(r)), key=lambda j: -r[j])[:k])  # noqa: E731
        assert st.top1_agree[i].item() == float(top(ra, 1) == top(rb, 1))
        sa, sb = top(ra, 5), top(rb, 5)
        assert st.jaccard[5][i].item() == pytest.approx(len(sa & sb) / len(sa | sb))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_and_kl_from_logp_with_zero_probabilities(dtype):
    """-inf log-probabilities (a truncated distribution) contribute nothing; a -inf under a positive probability
    makes the KL infinite; a NaN stays NaN. Against a plain float64 sum over the positive probabilities."""
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(5, 40, generator=g, dtype=torch.float64).log_softmax(-1)
    lq = torch.randn(5, 40, generator=g, dtype=torch.float64).log_softmax(-1)
    lp[:, :7] = float("-inf")  # p = 0 there
    lp = lp - lp.logsumexp(-1, keepdim=True)
    lq[1, :3] = float("-inf")  # q = 0 only where p = 0 too: finite
    lq = lq - lq.logsumexp(-1, keepdim=True)
    lq[2, 20] = float("-inf")  # q = 0 where p > 0: infinite (unnormalised row; what counts is the -inf)

    def ref_entropy(row):
        return -sum(math.exp(a) * a for a in row if a > float("-inf"))

    def ref_kl(rp, rq):
        return sum(math.exp(a) * (a - b) for a, b in zip(rp, rq) if a > float("-inf"))

    ent = S.entropy_from_logp(lp.to(dtype))
    kl = S.kl_from_logp(lp.to(dtype), lq.to(dtype))
    assert ent.dtype == kl.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ent, torch.tensor([ref_entropy(r) for r in lp.tolist()], dtype=dtype), **tol)
    want = [ref_kl(a, b) for a, b in zip(lp.tolist(), lq.tolist())]
    assert want[2] == float("inf") and kl[2] == float("inf")
    torch.testing.assert_close(kl, torch.tensor(want, dtype=dtype), **tol)
    nan = lp.clone()
    nan[0, 10] = float("nan")
    assert S.entropy_from_logp(nan)[0].isnan() and S.kl_from_logp(nan, lq)[0].isnan()
    assert not S.entropy_from_logp(nan)[1:].isnan().any()


def test_token_logprob_is_log_softmax_of_target():
    logits = rand_logits()
    target = torch.randint(0, logits.shape[1], (logits.shape[0],))
    st = S.logits_token_stats(logits, [1.0], [1], target=target)
    for i, row in enumerate(logits.double().tolist()):
        assert st.token_logprob[i].item() == pytest.approx(math.log(ref_probs(row)[target[i]]), abs=1e-5)


def test_chunked_equals_unchunked():
    torch.manual_seed(0)
    hidden, ref_hidden = torch.randn(50, 16), torch.randn(50, 16)
    w, w2 = torch.randn(70, 16), torch.randn(70, 16)
    head = lambda h: h @ w.T  # noqa: E731
    ref_head = lambda h: h @ w2.T  # noqa: E731
    target = torch.randint(0, 70, (50,))
    full = S.logits_token_stats(head(hidden), [1.0, 2.0], [1, 5], target, ref_head(ref_hidden))
    for chunk in (1, 7, 50, 64):
        ch = S.chunked_token_stats(hidden, head, [1.0, 2.0], [1, 5], chunk, target, ref_hidden, ref_head)
        for name in ("entropy", "top1_prob", "token_logprob", "kl_forward", "kl_reverse", "top1_agree"):
            torch.testing.assert_close(getattr(ch, name), getattr(full, name))
        torch.testing.assert_close(ch.jaccard[5], full.jaccard[5])
        torch.testing.assert_close(ch.entropy_at[2.0], full.entropy_at[2.0])


def test_invariants_entropy_rises_with_temperature_and_topk_sets_do_not_change():
    logits = rand_logits(n=64, v=40)
    temps = [1.0, 1.2, 1.4, 1.6, 2.0]
    st = S.logits_token_stats(logits, temps, [5])
    for lo, hi in zip(temps, temps[1:]):
        assert bool((st.entropy_at[hi] > st.entropy_at[lo]).all())
    for t in temps:
        assert torch.equal((logits / t).argmax(-1), logits.argmax(-1))
        same = S.logits_token_stats(logits / t, [1.0], [1, 5], ref_logits=logits)
        assert bool((same.jaccard[5] == 1).all()) and bool((same.top1_agree == 1).all())


def test_identical_models_give_zero_kl_and_full_agreement():
    logits = rand_logits()
    st = S.logits_token_stats(logits, [1.0], [1, 5, 10], ref_logits=logits.clone())
    assert st.kl_forward.abs().max() < 1e-6 and st.kl_reverse.abs().max() < 1e-6
    assert bool((st.top1_agree == 1).all())
    assert all(bool((v == 1).all()) for v in st.jaccard.values())


def ref_cka(x, y):
    """CKA through centred N x N Gram matrices (HSIC form), float64 — independent of the feature-space form."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l_).sum() / torch.sqrt((k * k).sum() * (l_ * l_).sum()))


def test_linear_cka_against_gram_form_and_invariances():
    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randn(40, 6)
    assert linear_cka(x, y) == pytest.approx(ref_cka(x, y), abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-9)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert mean_cosine(x, x) == pytest.approx(1.0)


def test_layer_similarity_caps_tokens_but_counts_all():
    torch.manual_seed(0)
    sim = LayerSimilarity(max_tokens=10)
    for _ in range(3):
        a = [torch.randn(6, 4), torch.randn(6, 4)]
        sim.add(a, [t.clone() for t in a])
    res = sim.result()
    assert res["cka_tokens"] == 10 and sim.count == 18
    assert res["cka"] == pytest.approx([1.0, 1.0]) and res["cosine"] == pytest.approx([1.0, 1.0])


def test_summaries():
    ent = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    assert S.top_fraction_share(ent, 0.2) == pytest.approx(4 / 10)
    assert S.quantiles(ent)["q50"] == pytest.approx(2.0)
    h = S.histogram(ent, 4)
    assert sum(h["counts"]) == 5 and len(h["edges"]) == 5
    means, counts = S.per_position_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]))
    assert means == [2.0, 0.0, 5.0] and counts == [2, 0, 1]


def test_mass_overlaps_against_float64_reference():
    a, b = rand_logits(seed=3), rand_logits(seed=4, scale=5.0)
    st = S.logits_token_stats(a, [1.0], [1, 5], ref_logits=b, ref_temperature=1.6)
    top = lambda r, k: sorted(range(len(r)), key=lambda j: -r[j])[:k]  # noqa: E731
    for i, (ra, rb) in enumerate(zip(a.double().tolist(), b.double().tolist(), strict=True)):
        p, q = ref_probs(ra), ref_probs([x / 1.6 for x in rb])
        assert st.mass_overlap[i].item() == pytest.approx(sum(min(x, y) for x, y in zip(p, q)), abs=1e-5)
        for k in (1, 5):
            mine, theirs = set(top(ra, k)), top(rb, k)
            want = sum(q[j] for j in theirs if j in mine) / sum(q[j] for j in theirs)
            assert st.topk_overlap_mass[k][i].item() == pytest.approx(want, abs=1e-5)
    same = S.logits_token_stats(b / 1.6, [1.0], [5], ref_logits=b, ref_temperature=1.6)
    torch.testing.assert_close(same.mass_overlap, torch.ones(len(b)))  # the fold's distribution: overlap 1
    torch.testing.assert_close(same.topk_overlap_mass[5], torch.ones(len(b)))
    hidden, w = torch.randn(30, 8), torch.randn(40, 8)
    chunked = S.chunked_token_stats(hidden, lambda h: h @ w.T, [1.0], [5], 7, None, hidden * 2, lambda h: h @ w.T,
                                    ref_temperature=1.3)
    whole = S.logits_token_stats(hidden @ w.T, [1.0], [5], None, (hidden * 2) @ w.T, 1.3)
    torch.testing.assert_close(chunked.mass_overlap, whole.mass_overlap)
    torch.testing.assert_close(chunked.topk_overlap_mass[5], whole.topk_overlap_mass[5])
