"""Paired comparisons of two arms over the same seeds: the statistics the study's verdict is computed from.

Every function takes per-seed values in the same seed order for both arms (a seed fixes the prompt stream, the
sampling and the reheat of every arm, so the differences are paired). Pure Python and scipy.stats (a well-kept
library for the distributions); no torch, no I/O.

- `diff_mean`, `ci`: the mean paired difference a - b and its two-sided (1 - alpha) t interval.
- `p`: the exact two-sided paired sign-flip (permutation) test: under H0 each difference is as likely +d as -d,
  so p is the fraction of the 2^n sign vectors whose |mean| is >= the observed |mean| (the observed one included,
  with a relative tolerance for float ties). Exact, no normality assumption; n <= 20 enumerates (1,048,576 vectors).
- `p_holm`: Holm's step-down adjustment of a family of p-values (one family: one arm against every other).
- `p_tost`: equivalence within +-margin by two one-sided paired t-tests (H0: mean diff <= -margin, H0: mean
  diff >= +margin); the larger of the two p-values. Small p: the arms are equivalent within the margin.
- `mcnemar_p`: the exact McNemar test of a binary outcome per seed (escaped or not): a two-sided binomial test of
  the discordant pairs (b01 vs b10) at 1/2; 1.0 when there are none.
- `smallest_p`: the smallest p-value n seeds can give (2 * 2^-n, times a Holm family's size): whether a design can
  reach a verdict at all, known before it runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

MAX_EXACT_SEEDS = 20  # 2^20 sign vectors: the sign-flip test enumerates them all


@dataclass(frozen=True)
class Comparison:
    arm: str
    vs: str
    diff_mean: float
    ci: tuple[float, float]
    p: float
    p_holm: float
    p_tost: float
    mcnemar_p: float


def _diffs(a: list[float], b: list[float]) -> list[float]:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need the same, non-zero number of seeds ({len(a)} vs {len(b)})")
    return [x - y for x, y in zip(a, b)]


def diff_mean(a: list[float], b: list[float]) -> float:
    d = _diffs(a, b)
    return sum(d) / len(d)


def _sd(d: list[float]) -> float:
    m = sum(d) / len(d)
    return math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) if len(d) > 1 else float("nan")


def ci(a: list[float], b: list[float], alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) t interval of the mean paired difference (a point when every difference is equal)."""
    from scipy import stats

    d = _diffs(a, b)
    m, sd, n = sum(d) / len(d), _sd(d), len(d)
    if n < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    return (m - half, m + half)


def sign_flip_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided paired sign-flip test (see the module docstring)."""
    d = _diffs(a, b)
    if len(d) > MAX_EXACT_SEEDS:
        raise ValueError(f"the exact sign-flip test enumerates 2^n vectors; n = {len(d)} > {MAX_EXACT_SEEDS}")
    observed = abs(sum(d))
    tol = 1e-12 * max(1.0, sum(abs(x) for x in d))
    hits = sum(1 for signs in itertools.product((1, -1), repeat=len(d))
               if abs(sum(s * x for s, x in zip(signs, d))) >= observed - tol)
    return hits / 2 ** len(d)


def holm(ps: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given (monotone, capped at 1)."""
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def tost_p(a: list[float], b: list[float], margin: float) -> float:
    """Paired TOST p-value for |mean(a - b)| < margin (the larger of the two one-sided t-tests' p)."""
    from scipy import stats

    d = _diffs(a, b)
    n, m, sd = len(d), sum(d) / len(d), _sd(d)
    if n < 2:
        return 1.0
    if sd == 0:  # every difference equal: equivalent exactly when it lies inside the margin
        return 0.0 if -margin < m < margin else 1.0
    se = sd / math.sqrt(n)
    lower = stats.t.sf((m + margin) / se, n - 1)  # H0: mean <= -margin
    upper = stats.t.cdf((m - margin) / se, n - 1)  # H0: mean >= +margin
    return float(max(lower, upper))


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact McNemar test of paired binary outcomes (two-sided binomial test of the discordant pairs)."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError("paired outcomes need the same number of seeds")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare(arm: str, values: dict[str, list[float]], escaped: dict[str, list[bool]], margin: float,
            alpha: float = 0.05) -> list[Comparison]:
    """`arm` against every other arm of `values` (per-seed primary metric, same seed order in every list), with
    Holm's adjustment over this family of comparisons."""
    others = [k for k in values if k != arm]
    raw = [sign_flip_p(values[arm], values[o]) for o in others]
    adjusted = holm(raw)
    return [Comparison(arm=arm, vs=o, diff_mean=diff_mean(values[arm], values[o]),
                       ci=ci(values[arm], values[o], alpha), p=p, p_holm=ph,
                       p_tost=tost_p(values[arm], values[o], margin),
                       mcnemar_p=mcnemar_p(escaped[arm], escaped[o]))
            for o, p, ph in zip(others, raw, adjusted)]


def smallest_p(n: int, comparisons: int = 1) -> float:
    """The smallest p-value n paired seeds can give, before any run: the exact McNemar test's and the exact sign-flip
    test's (every seed discordant the same way, or every difference of one sign: 2 * 2^-n), times the size of a
    Holm family of `comparisons` (its first step multiplies the smallest p by the family size); capped at 1. Below
    the level a test needs, no outcome of the runs can reach it."""
    if n < 1 or comparisons < 1:
        raise ValueError(f"needs at least one seed and one comparison, not n={n}, comparisons={comparisons}")
    return min(1.0, comparisons * 2.0 * 0.5 ** n)


def verdict(controls_separated: bool, comparisons: list[Comparison], decisive: tuple[str, ...],
            alpha: float = 0.05) -> str:
    """The study's verdict from the numbers: `untestable` when the controls do not separate; `supported` when the
    arm is better (p_holm < alpha, diff > 0) than every decisive comparator; `refuted` when it is worse (p_holm <
    alpha, diff < 0) than any of them or equivalent to any (p_tost < alpha); otherwise `not separated`."""
    if not controls_separated:
        return "untestable"
    rows = [c for c in comparisons if c.vs in decisive]
    missing = set(decisive) - {c.vs for c in rows}
    if missing:
        raise ValueError(f"no comparison with {sorted(missing)}")
    if all(c.p_holm < alpha and c.diff_mean > 0 for c in rows):
        return "supported"
    if any((c.p_holm < alpha and c.diff_mean < 0) or c.p_tost < alpha for c in rows):
        return "refuted"
    return "not separated"
