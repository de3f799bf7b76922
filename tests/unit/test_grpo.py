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


def test_kl_penalties_values():
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    k2 = grpo.kl_penalty(logp, ref, "k2")
    k3 = grpo.kl_penalty(logp, ref, "k3")
    for i in range(3):
        d = ref[i].item() - logp[i].item()
        assert k2[i].item() == pytest.approx(0.5 * d * d)
        assert k3[i].item() == pytest.approx(math.exp(d) - d - 1)
    assert bool((k3 >= 0).all()) and k3[2] == 0
    with pytest.raises(ValueError, match="k2 or k3"):
        grpo.kl_penalty(logp, ref, "k1")


def _expected_penalty_gradient(estimator: str, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """E_{x ~ pi}[grad_logits penalty(x)], exactly: a sum over the vocabulary weighted by pi (float64)."""
    total = torch.zeros_like(logits)
    pi = logits.softmax(-1).detach()
    for x in range(logits.numel()):
        lg = logits.clone().requires_grad_(True)
        logp = lg.log_softmax(-1)[x]
        grpo.kl_penalty(logp, ref_logp[x], estimator).backward()
        total += pi[x] * lg.grad
    return total


def test_each_kl_penalty_has_the_gradient_its_docs_name():
    torch.manual_seed(0)
    logits = torch.randn(6, dtype=torch.float64)
    ref_logits = torch.randn(6, dtype=torch.float64)
    ref_logp = ref_logits.log_softmax(-1)

    def grad_of(kl_fn):
        lg = logits.clone().requires_grad_(True)
        kl_fn(lg.log_softmax(-1)).backward()
        return lg.grad

    reverse = grad_of(lambda lp: (lp.exp() * (lp - ref_logp)).sum())  # grad KL(pi || ref)
    forward = grad_of(lambda lp: (ref_logp.exp() * (ref_logp - lp)).sum())  # grad KL(ref || pi)
    torch.testing.assert_close(_expected_penalty_gradient("k2", logits, ref_logp), reverse)
    torch.testing.assert_close(_expected_penalty_gradient("k3", logits, ref_logp), forward)
    # and k1 (log pi - log ref), which the recipe refuses, would have expected gradient exactly 0
    pi = logits.softmax(-1)
    k1 = torch.zeros_like(logits)
    for x in range(6):
        lg = logits.clone().requires_grad_(True)
        (lg.log_softmax(-1)[x] - ref_logp[x]).backward()
        k1 += pi[x] * lg.grad
    torch.testing.assert_close(k1, torch.zeros_like(k1))


def test_recipe_refuses_k1_with_the_reason():
    from tsopsd_cli.errors import RecipeError
    from tsopsd_cli.recipe_loading import build_recipe

    with pytest.raises(RecipeError) as e:
        build_recipe("rl", None, [("grpo.kl_estimator", "k1")])
    assert "expected gradient 0" in " ".join(e.value.lines)


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
        whole = grpo.aggregate(loss, mask, mode, n_tok, n_seq, 6, 7)
        parts = sum(grpo.aggregate(loss[i:i + 1], mask[i:i + 1], mode, n_tok, n_seq, 6, 7) for i in range(6))
        assert float(whole) == pytest.approx(want) and float(parts) == pytest.approx(want)


def test_dr_grpo_normaliser_counts_every_row_even_masked_ones():
    """Dr.GRPO divides by a constant (rows x max_new_tokens): masking a row (overlong filtering) must not
    raise the weight of the others."""
    loss = torch.ones(4, 3, dtype=torch.float64)
    mask = torch.ones(4, 3, dtype=torch.float64)
    mask[3] = 0  # one truncated row without a loss
    got = grpo.aggregate(loss, mask, "seq-mean-token-sum-norm", num_tokens=9, num_seqs=3, num_rows=4, max_len=3)
    assert float(got) == pytest.approx(9 / (4 * 3))


def test_covariance_and_token_selection():
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 0.5], dtype=torch.float64)
    lp = torch.tensor([-0.1, -3.0, -2.0, -0.2, -1.0], dtype=torch.float64)
    cov = grpo.token_covariance(adv, lp)
    am, lm = float(adv.mean()), float(lp.mean())
    want = [(float(x) - am) * (float(y) - lm) for x, y in zip(adv, lp)]
    assert cov.tolist() == pytest.approx(want)
    sel = grpo.kl_cov_select(cov, 0.4)  # 40 % of 5 tokens = 2: the two largest covariances
    assert set(torch.nonzero(sel).squeeze(-1).tolist()) == set(sorted(range(5), key=lambda i: -want[i])[:2])
    assert int(grpo.kl_cov_select(cov, 1e-9).sum()) == 1  # at least one
    sel = grpo.clip_cov_select(cov, 1.0, -10.0, 10.0, torch.Generator().manual_seed(0))
    assert int(sel.sum()) == 5  # ratio 1: every eligible token detached
    sel = grpo.clip_cov_select(cov, 0.2, 0.5, 10.0, torch.Generator().manual_seed(0))
    picked = torch.nonzero(sel).squeeze(-1).tolist()
    assert len(picked) == 1 and 0.5 < want[picked[0]] < 10.0
    assert not grpo.clip_cov_select(cov, 0.5, 100.0, 200.0).any()  # nothing eligible


# ---------------------------------------------------------------------------------- high-entropy tokens (rho)
def brute_force_keep(values: list[float], rho: float) -> list[bool]:
    """The mask written out in float64 Python: k = ceil(rho * N) in exact decimal arithmetic; a token is kept when
    fewer than k tokens have a strictly larger entropy (so every token tied with the k-th largest is kept)."""
    from decimal import ROUND_CEILING, Decimal

    k = int((Decimal(str(rho)) * len(values)).to_integral_value(rounding=ROUND_CEILING))
    return [sum(1 for y in values if y > x) < k for x in values]


@pytest.mark.parametrize("rho", [1e-6, 0.05, 0.2, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_high_entropy_mask_against_a_brute_force_reference_with_ties(rho):
    g = torch.Generator().manual_seed(3)
    # entropies on a coarse grid: many exact ties, some of them at the threshold
    ent = (torch.randint(0, 12, (200,), generator=g).double() / 7.0).float()
    got = grpo.high_entropy_mask(ent, rho)
    want = brute_force_keep([float(x) for x in ent.double()], rho)
    assert got.tolist() == want
    k = math.ceil(round(rho * 200, 9))
    assert int(got.sum()) >= k  # at least k, more when the k-th largest is tied
    if got.sum() < 200:
        assert ent[~got].max() < ent[got].min()  # every dropped token has less entropy than every kept one


def test_high_entropy_count_takes_rho_at_its_decimal_value():
    assert 0.28 * 25 > 7 and grpo.top_entropy_count(25, 0.28) == 7  # float arithmetic would keep 8
    assert grpo.top_entropy_count(3, 0.2) == 1 and grpo.top_entropy_count(10, 0.2) == 2
    assert grpo.top_entropy_count(7, 1.0) == 7 and grpo.top_entropy_count(1, 1e-9) == 1
    ent = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.6, 0.4, 0.0])
    assert grpo.high_entropy_mask(ent, 0.7).sum() == 7  # the 7 largest, no ties
    assert grpo.high_entropy_mask(torch.zeros(0), 0.2).numel() == 0


# ------------------------------------------------------------------------------- adaptive entropy coefficient
def test_the_adaptive_coefficient_follows_the_rule_written_out():
    """Skywork-OR1's rule: + step below the target, - step above, unchanged at it, clamped to [0, max]."""
    target, step, cmax = 0.5, 0.1, 0.25
    entropies = [0.4, 0.4, 0.4, 0.4, 0.6, 0.5, 0.6, 0.6, 0.6, None, 0.1]
    coef, got = 0.0, [0.0]
    for e in entropies:
        coef = grpo.adaptive_entropy_coef(coef, e, target, step, cmax)
        got.append(coef)
    #          start  up   up   up->max  max  down  equal  down  down  ->0  no tokens  up
    want = [0.0, 0.1, 0.2, 0.25, 0.25, 0.15, 0.15, 0.05, 0.0, 0.0, 0.0, 0.1]
    assert got == pytest.approx(want, abs=1e-12)
    assert grpo.adaptive_entropy_coef(0.3, 1.0, 2.0, 0.0, 1.0) == 0.3  # a step of 0 holds the coefficient


def test_equal_contexts_get_the_entropy_of_their_first_occurrence():
    """Completions of one prompt share their first tokens: their entropies, equal in exact arithmetic, are made
    exactly equal, so that a tie at the threshold does not depend on where they were computed."""
    t = lambda *x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    rows = [([1, 2], [5, 6, 7], t(1.0, 2.0, 3.0)),
            ([1, 2], [5, 6, 8], t(1.0000001, 2.0000002, 3.5)),  # same context for 3 tokens (the 3rd's is [5, 6])
            ([1, 2], [5, 9, 7], t(1.0000003, 2.5, 3.7)),  # shares the contexts [] and [5], not [5, 9]
            ([1, 3], [5, 6, 7], t(1.5, 2.6, 3.8))]  # another prompt: nothing shared
    got = [x.tolist() for x in grpo.shared_context_entropy(rows)]
    f = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    assert got == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, f(3.7)], [1.5, f(2.6), f(3.8)]]
    assert grpo.shared_context_entropy([]) == []
