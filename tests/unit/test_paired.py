"""core.paired against references written out by hand (float64, brute force, the textbook formulas)."""

from __future__ import annotations

import math
import random

import pytest

from tsopsd_cli.core import paired as P

scipy_stats = pytest.importorskip("scipy.stats")


def _seeds(n, shift=0.0, seed=0):
    rng = random.Random(seed)
    a = [rng.gauss(0.5, 0.1) for _ in range(n)]
    return a, [x - shift + rng.gauss(0, 0.02) for x in a]


def test_sign_flip_matches_a_brute_force_over_random_draws():
    rng = random.Random(1)
    for n in (1, 2, 5, 8):
        for _ in range(5):
            d = [rng.choice([-1, 1]) * rng.random() for _ in range(n)]
            zeros = [0.0] * n
            count = 0
            for mask in range(2 ** n):
                s = sum(x if mask >> i & 1 else -x for i, x in enumerate(d))
                count += abs(s) >= abs(sum(d)) - 1e-12
            assert P.sign_flip_p(d, zeros) == count / 2 ** n


def test_sign_flip_known_values():
    # every difference positive: only the all-plus and all-minus vectors reach the observed |mean|
    assert P.sign_flip_p([1.0] * 10, [0.0] * 10) == pytest.approx(2 / 1024)
    assert P.sign_flip_p([0.0] * 4, [0.0] * 4) == 1.0  # no difference at all: nothing is extreme-er
    with pytest.raises(ValueError):
        P.sign_flip_p([1.0] * 21, [0.0] * 21)


def test_holm_by_hand():
    assert P.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert P.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_ci_and_tost_against_the_t_formulas():
    a, b = _seeds(10, shift=0.05)
    d = [x - y for x, y in zip(a, b)]
    n, m = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    t = scipy_stats.t.ppf(0.975, n - 1)
    lo, hi = P.ci(a, b)
    assert lo == pytest.approx(m - t * sd / math.sqrt(n)) and hi == pytest.approx(m + t * sd / math.sqrt(n))
    # TOST = the larger of scipy's two one-sided paired t-tests against the shifted nulls
    for margin in (0.01, 0.03, 0.2):
        up = scipy_stats.ttest_1samp(d, -margin, alternative="greater").pvalue
        down = scipy_stats.ttest_1samp(d, margin, alternative="less").pvalue
        assert P.tost_p(a, b, margin) == pytest.approx(max(up, down))
    assert P.tost_p(a, b, 0.2) < 0.05 < P.tost_p(a, b, 0.01)
    assert P.tost_p([1.0, 1.0], [1.0, 1.0], 0.03) == 0.0 and P.tost_p([1.0, 1.0], [0.5, 0.5], 0.03) == 1.0


def test_mcnemar_exact_by_hand():
    a = [True] * 8 + [False, False]
    b = [False] * 8 + [True, False]
    # 8 discordant pairs one way, 1 the other: two-sided binomial p of 1 in 9 at 1/2
    expect = 2 * sum(math.comb(9, k) for k in range(0, 2)) / 2 ** 9
    assert P.mcnemar_p(a, b) == pytest.approx(expect)
    assert P.mcnemar_p([True, False], [True, False]) == 1.0


def test_compare_and_verdict():
    base, _ = _seeds(10, seed=3)
    better = [x + 0.1 for x in base]
    same = [x + 0.001 * ((-1) ** i) for i, x in enumerate(base)]
    esc = {k: [True] * 10 for k in ("t", "m", "r")}
    rows = P.compare("t", {"t": better, "m": base, "r": base}, esc, margin=0.03)
    assert [c.vs for c in rows] == ["m", "r"]
    assert all(c.diff_mean == pytest.approx(0.1) and c.p_holm < 0.05 for c in rows)
    assert P.verdict(True, rows, ("m", "r")) == "supported"
    assert P.verdict(False, rows, ("m", "r")) == "untestable"
    tied = P.compare("t", {"t": same, "m": base, "r": better}, esc, margin=0.03)
    assert P.verdict(True, tied, ("m", "r")) == "refuted"  # equivalent to m (and worse than r)
    noisy = P.compare("t", {"t": [x + (0.2 if i % 2 else -0.19) for i, x in enumerate(base)], "m": base,
                            "r": base}, esc, margin=0.03)
    assert P.verdict(True, noisy, ("m", "r")) == "not separated"
    with pytest.raises(ValueError):
        P.verdict(True, rows, ("m", "x"))


@pytest.mark.parametrize("n", range(1, 11))
def test_smallest_p_is_what_the_most_extreme_outcome_gives(n):
    """smallest_p(n, k) equals the exact tests run on the most extreme outcome n seeds can have: every seed
    discordant one way (McNemar), every difference of one sign (sign-flip), Holm's first step over k."""
    assert P.smallest_p(n) == pytest.approx(P.mcnemar_p([True] * n, [False] * n))
    diffs_up = [0.1 + 0.01 * i for i in range(n)]
    assert P.smallest_p(n) == pytest.approx(P.sign_flip_p(diffs_up, [0.0] * n))
    for k in (1, 2, 7):
        raw = [P.sign_flip_p(diffs_up, [0.0] * n)] + [1.0] * (k - 1)
        assert P.smallest_p(n, k) == pytest.approx(min(P.holm(raw)))
    # the levels the study's design rests on: controls separable from 6 seeds, seven Holm comparisons from 9
    assert (P.smallest_p(n) < 0.05) == (n >= 6) and (P.smallest_p(n, 7) < 0.05) == (n >= 9)
    with pytest.raises(ValueError):
        P.smallest_p(0)
