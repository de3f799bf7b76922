"""core.grpo against plain float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from tsopsd_cli.core import grpo


def test_group_advantages_against_reference():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    for scale in ("group", "batch", "none"):
        a = grpo.group_advantages(r, scale)
        for g, row in enumerate(r.tolist()):
            mean = sum(row) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / 3)
            flat = [x for rr in r.tolist() for x in rr]
            fm = sum(flat) / len(flat)
            bstd = math.sqrt(sum((x - fm) ** 2 for x in flat) / (len(flat) - 1))
            div = {"group": std + 1e-6, "batch": bstd + 1e-6, "none": 1.0}[scale]
            for j, x in enumerate(row):
                assert a[g, j].item() == pytest.approx((x - mean) / div, abs=1e-9)
    assert grpo.group_advantages(r, "group")[1].abs().max() == 0  # equal rewards: no signal


def test_asymmetric_clipping_against_reference():
    torch.manual_seed(0)
    old = torch.randn(4, 6, dtype=torch.float64)
    logp = old + torch.randn(4, 6, dtype=torch.float64) * 0.5
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    loss, ratio, low, high = grpo.clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    for b in range(4):
        for t in range(6):
            rt = math.exp(logp[b, t].item() - old[b, t].item())
            a = adv[b].item()
            want = -min(rt * a, min(max(rt, 0.8), 1.28) * a)
            assert loss[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-12)
            assert bool(low[b, t]) == (rt < 0.8 and a < 0)
            assert bool(high[b, t]) == (rt > 1.28 and a > 0)


def test_clipping_removes_the_gradient_exactly_where_flagged():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]])).requires_grad_()
    for sign in (1.0, -1.0):
        logp.grad = None
        loss, _, low, high = grpo.clipped_policy_loss(logp, old, torch.tensor([sign]), 0.2, 0.28)
        loss.sum().backward()
        zero = logp.grad[0] == 0
        assert zero.tolist() == (low | high)[0].tolist()


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    k1 = grpo.kl_estimate(logp, ref, "k1")
    k3 = grpo.kl_estimate(logp, ref, "k3")
    for i in range(3):
        d = ref[i].item() - logp[i].item()
        assert k1[i].item() == pytest.approx(-d)
        assert k3[i].item() == pytest.approx(math.exp(d) - d - 1)
    assert bool((k3 >= 0).all()) and k3[2] == 0


def test_aggregation_modes_against_reference_and_split_invariance():
    torch.manual_seed(1)
    loss = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    n_tok, n_seq = float(mask.sum()), 6.0
    lens = mask.sum(-1)
    ref = {
        "token-mean": float((loss * mask).sum() / mask.sum()),
        "seq-mean-token-mean": float(((loss * mask).sum(-1) / lens).mean()),
        "seq-mean-token-sum-norm": float((loss * mask).sum() / (6 * 7)),
    }
    for mode, want in ref.items():
        whole = grpo.aggregate(loss, mask, mode, n_tok, n_seq, 7)
        parts = sum(grpo.aggregate(loss[i:i + 1], mask[i:i + 1], mode, n_tok, n_seq, 7) for i in range(6))
        assert float(whole) == pytest.approx(want) and float(parts) == pytest.approx(want)


def test_covariance_and_token_selection():
    adv = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    logp = torch.tensor([[-0.1, -3.0], [-2.0, -0.2], [-1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 1], [1, 0]], dtype=torch.float64)
    cov = grpo.token_covariance(adv, logp, mask)
    a = [2.0, 2.0, -1.0, -1.0, 0.5]
    lp = [-0.1, -3.0, -2.0, -0.2, -1.0]
    am, lm = sum(a) / 5, sum(lp) / 5
    want = [(x - am) * (y - lm) for x, y in zip(a, lp)]
    got = [cov[0, 0], cov[0, 1], cov[1, 0], cov[1, 1], cov[2, 0]]
    assert [float(g) for g in got] == pytest.approx(want)
    assert cov[2, 1] == float("-inf")
    sel = grpo.kl_cov_mask(cov, mask, 0.4)  # 40 % of 5 tokens = 2: the two largest covariances
    top2 = sorted(range(5), key=lambda i: -want[i])[:2]
    flat_pos = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert {flat_pos[i] for i in top2} == {tuple(x) for x in torch.nonzero(sel).tolist()}
    keep = grpo.clip_cov_mask(cov, mask, 1.0, -10.0, 10.0, torch.Generator().manual_seed(0))
    assert float(((1 - keep) * mask).sum()) == 5  # ratio 1: every eligible token detached
    keep = grpo.clip_cov_mask(cov, mask, 0.2, 0.5, 10.0, torch.Generator().manual_seed(0))
    dropped = torch.nonzero(1 - keep).tolist()
    assert len(dropped) == 1 and 0.5 < float(cov[tuple(dropped[0])]) < 10.0
