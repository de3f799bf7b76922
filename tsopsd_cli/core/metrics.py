"""Evaluation metrics over n graded samples per problem. Pure Python, no I/O."""

from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k); 1 when n - c < k."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_correct(answers: list[str | None], correct: list[bool]) -> bool:
    """maj@n: the most frequent extracted answer (ties: the one seen first; missing answers do not vote)
    is correct. `answers` are normalised extracted answers, `correct` their grades."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == top)
    return any(ok for a, ok in zip(answers, correct) if a == winner)


def benchmark_metrics(groups: list[list[dict]]) -> dict:
    """Metrics of one benchmark. `groups`: per problem, its samples as dicts with `correct` (bool),
    `answer_key` (normalised extracted answer or None), `length` (tokens), `finish_reason`, `entropy` (mean token
    entropy of the sample or None) and optionally `right_plan` (whether it chose its problem's right plan; None
    where the problem has none)."""
    if not groups:
        raise ValueError("no problems")
    n = min(len(g) for g in groups)
    samples = [s for g in groups for s in g]
    out = {
        "problems": len(groups),
        "samples_per_problem": n,
        f"avg@{n}": sum(s["correct"] for s in samples) / len(samples),
        "pass@k": {str(k): sum(pass_at_k(len(g), sum(s["correct"] for s in g), k) for g in groups) / len(groups)
                   for k in ks_for(n)},
        f"maj@{n}": sum(majority_correct([s["answer_key"] for s in g], [s["correct"] for s in g])
                        for g in groups) / len(groups),
        "mean_length": sum(s["length"] for s in samples) / len(samples),
        "truncation_rate": sum(s["finish_reason"] == "length" for s in samples) / len(samples),
    }
    ents = [(s["entropy"], s["length"]) for s in samples if s.get("entropy") is not None and s["length"]]
    tokens = sum(length for _, length in ents)
    out["mean_token_entropy"] = sum(e * length for e, length in ents) / tokens if tokens else None
    out["accuracy"] = out[f"avg@{n}"]
    plans = [s["right_plan"] for s in samples if s.get("right_plan") is not None]
    if plans:  # tasks with a right plan per problem (the toy world): the share of samples that chose it
        out["right_plan"] = sum(plans) / len(plans)
    return out
