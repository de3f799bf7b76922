"""Token-level statistics of a policy: entropy, sharpness, temperature sensitivity, agreement with a reference.

Pure torch, no I/O. Logits are only ever formed for `chunk_size` tokens at a time from hidden states, so peak extra
memory is O(chunk_size x vocab) whatever the batch and length: a 151,936-token vocabulary fits on a laptop.
All statistics are computed in float32 (or the input's dtype if wider), natural log (nats).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of a distribution given as log-probabilities over the last axis (-inf: probability 0, no
    contribution).  logp: [..., V] -> [...]"""
    # -inf -> the dtype's lowest finite value: exp gives 0 there, and 0 * lowest = 0 (NaN stays NaN). Three passes
    # over [..., V] (clamp, exp, multiply-sum) where a mask, a where and a zeros tensor took six.
    finite = logp.clamp(min=torch.finfo(logp.dtype).min)
    return -(finite.exp() * finite).sum(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits).  [..., V] -> [...]"""
    return entropy_from_logp(F.log_softmax(logits, dim=-1))


def kl_from_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) from log-probabilities; terms where p_v = 0 (log p = -inf) are 0.
    [..., V], [..., V] -> [...]"""
    # the log-ratio is zeroed in place where log p = -inf (p = 0: log q may be -inf there too, and 0 * inf is NaN);
    # where only log q is -inf the term is +inf, as it should be
    ratio = (logp - logq).masked_fill_(logp == float("-inf"), 0.0)
    return (logp.exp() * ratio).sum(-1)


def kl_from_logits(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)).  [..., V], [..., V] -> [...]"""
    return kl_from_logp(F.log_softmax(logits_p, dim=-1), F.log_softmax(logits_q, dim=-1))


def topk_jaccard(idx_a: torch.Tensor, idx_b: torch.Tensor) -> torch.Tensor:
    """Jaccard index of two top-k index sets per row.  [N, k], [N, k] -> [N]"""
    k = idx_a.shape[-1]
    inter = (idx_a.unsqueeze(-1) == idx_b.unsqueeze(-2)).any(-1).sum(-1).to(torch.float32)  # [N]
    return inter / (2 * k - inter)


@dataclass
class TokenStats:
    """Per-token statistics for N tokens, all tensors [N] on CPU (float32 unless noted)."""

    entropy: torch.Tensor
    top1_prob: torch.Tensor
    topk_mass: dict[int, torch.Tensor]
    entropy_at: dict[float, torch.Tensor]
    token_logprob: torch.Tensor | None = None  # log p(observed token) at temperature 1, when ids are given
    kl_forward: torch.Tensor | None = None  # KL(reference || model): mass-covering, as in distillation
    kl_reverse: torch.Tensor | None = None  # KL(model || reference)
    top1_agree: torch.Tensor | None = None  # float 0/1
    jaccard: dict[int, torch.Tensor] = field(default_factory=dict)
    # against the reference at `ref_temperature` (q = softmax(ref_logits / ref_temperature)):
    mass_overlap: torch.Tensor | None = None  # sum_v min(p_v, q_v) = 1 - total variation
    topk_overlap_mass: dict[int, torch.Tensor] = field(default_factory=dict)  # q's top-k mass also in p's top-k


def mass_overlaps(p: torch.Tensor, top_i: torch.Tensor, ref_logits: torch.Tensor, ref_temperature: float,
                  topk: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """How much of a hotter reference's mass the model's distribution covers, per token: (sum_v min(p_v, q_v),
    {k: the share of q's top-k mass that lies on tokens also in p's top-k}) with q = softmax(ref_logits /
    ref_temperature). Unlike Jaccard@k, tokens that carry no mass count for nothing.
    p: [N, V] probabilities; top_i: [N, kmax] p's top indices (descending); ref_logits: [N, V] -> [N], {k: [N]}"""
    q = F.softmax(ref_logits / ref_temperature, dim=-1)  # [N, V]
    overlap = torch.minimum(p, q).sum(-1)  # [N]
    q_top, q_i = q.topk(top_i.shape[-1], dim=-1)  # [N, kmax]
    shared = {}
    for k in topk:
        k = min(k, top_i.shape[-1])
        inside = (q_i[:, :k].unsqueeze(-1) == top_i[:, :k].unsqueeze(-2)).any(-1)  # [N, k]: q's i-th in p's top-k
        shared[k] = (q_top[:, :k] * inside).sum(-1) / q_top[:, :k].sum(-1)
    return overlap, shared


def logits_token_stats(logits: torch.Tensor, temperatures: list[float], topk: list[int],
                       target: torch.Tensor | None = None, ref_logits: torch.Tensor | None = None,
                       ref_temperature: float | None = None) -> TokenStats:
    """Statistics of a chunk of logits.  logits: [N, V]; target: [N] token ids; ref_logits: [N, V];
    ref_temperature: also the mass overlaps with softmax(ref_logits / ref_temperature) (`mass_overlaps`)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    vocab = logits.shape[-1]
    logp = F.log_softmax(logits, dim=-1)  # [N, V]
    p = logp.exp()
    entropy = entropy_from_logp(logp)  # [N]
    kmax = min(max(topk), vocab)
    top_p, top_i = p.topk(kmax, dim=-1)  # [N, kmax], sorted descending
    csum = top_p.cumsum(-1)
    topk_mass = {k: csum[:, min(k, vocab) - 1] for k in topk}
    entropy_at = {t: (entropy if t == 1.0 else entropy_from_logits(logits / t)) for t in temperatures}
    stats = TokenStats(entropy=entropy, top1_prob=top_p[:, 0], topk_mass=topk_mass, entropy_at=entropy_at)
    if target is not None:
        stats.token_logprob = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if ref_logits is not None:
        ref_logits = ref_logits.to(logits.dtype)
        logq = F.log_softmax(ref_logits, dim=-1)
        stats.kl_forward = kl_from_logp(logq, logp)
        stats.kl_reverse = kl_from_logp(logp, logq)
        ref_i = logq.topk(kmax, dim=-1).indices  # [N, kmax]
        stats.top1_agree = (top_i[:, 0] == ref_i[:, 0]).float()
        stats.jaccard = {k: topk_jaccard(top_i[:, :min(k, vocab)], ref_i[:, :min(k, vocab)]) for k in topk}
        if ref_temperature is not None:
            stats.mass_overlap, stats.topk_overlap_mass = mass_overlaps(p, top_i, ref_logits, ref_temperature, topk)
    return stats


def _cat(parts: list[TokenStats]) -> TokenStats:
    def cat(xs):
        return torch.cat(xs) if xs and xs[0] is not None else None

    first = parts[0]
    return TokenStats(
        entropy=cat([s.entropy for s in parts]),
        top1_prob=cat([s.top1_prob for s in parts]),
        topk_mass={k: cat([s.topk_mass[k] for s in parts]) for k in first.topk_mass},
        entropy_at={t: cat([s.entropy_at[t] for s in parts]) for t in first.entropy_at},
        token_logprob=cat([s.token_logprob for s in parts]),
        kl_forward=cat([s.kl_forward for s in parts]),
        kl_reverse=cat([s.kl_reverse for s in parts]),
        top1_agree=cat([s.top1_agree for s in parts]),
        jaccard={k: cat([s.jaccard[k] for s in parts]) for k in first.jaccard},
        mass_overlap=cat([s.mass_overlap for s in parts]),
        topk_overlap_mass={k: cat([s.topk_overlap_mass[k] for s in parts]) for k in first.topk_overlap_mass},
    )


def chunked_token_stats(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                        temperatures: list[float], topk: list[int], chunk_size: int = 256,
                        target: torch.Tensor | None = None, ref_hidden: torch.Tensor | None = None,
                        ref_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        ref_temperature: float | None = None) -> TokenStats:
    """Token statistics from final hidden states, projecting `chunk_size` tokens to the vocabulary at a time.

    hidden: [N, D] (after the final norm); head: [n, D] -> [n, V] (the LM head); target: [N];
    ref_hidden: [N, D'] with ref_head: [n, D'] -> [n, V] for the reference model.
    Per-token results go to CPU as they are produced, so memory does not grow with N x V.
    """
    n = hidden.shape[0]
    if n == 0:
        raise ValueError("no tokens to compute statistics on")
    parts = []
    for s in range(0, n, chunk_size):
        e = min(n, s + chunk_size)
        with torch.no_grad():
            logits = head(hidden[s:e])  # [c, V]
            ref_logits = ref_head(ref_hidden[s:e]) if ref_hidden is not None else None
            st = logits_token_stats(logits, temperatures, topk,
                                    target[s:e] if target is not None else None, ref_logits, ref_temperature)
        del logits, ref_logits
        parts.append(_to_cpu(st))
    return _cat(parts)


def _to_cpu(st: TokenStats) -> TokenStats:
    """Every tensor of `st` (the dict-valued fields' too) as float32 on the CPU."""
    def c(x):
        if isinstance(x, dict):
            return {k: c(v) for k, v in x.items()}
        return None if x is None else x.detach().float().cpu()

    return TokenStats(**{f.name: c(getattr(st, f.name)) for f in fields(st)})


def quantiles(x: torch.Tensor, qs=(0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    x = x.double()
    return {f"q{int(round(q * 100)):02d}": float(torch.quantile(x, q)) for q in qs}


def top_fraction_share(entropy: torch.Tensor, fraction: float) -> float:
    """Share of the total entropy carried by the `fraction` highest-entropy tokens.  entropy: [N]"""
    total = float(entropy.double().sum())
    if total <= 0:
        return 0.0
    k = max(1, int(round(fraction * entropy.numel())))
    return float(entropy.double().topk(k).values.sum()) / total


def histogram(x: torch.Tensor, bins: int, hi: float | None = None) -> dict[str, list[float]]:
    hi = float(x.max()) if hi is None else hi
    hi = hi if hi > 0 else 1.0
    counts = torch.histc(x.double(), bins=bins, min=0.0, max=hi)
    edges = torch.linspace(0.0, hi, bins + 1)
    return {"edges": [round(float(v), 6) for v in edges], "counts": [int(c) for c in counts]}


def per_position_mean(values: torch.Tensor, positions: torch.Tensor) -> tuple[list[float], list[int]]:
    """Mean of `values` [N] at each completion position `positions` [N] (0-based); returns (means, counts)."""
    length = int(positions.max()) + 1
    sums = torch.zeros(length, dtype=torch.float64).index_add_(0, positions, values.double())
    counts = torch.bincount(positions, minlength=length)
    means = (sums / counts.clamp(min=1)).tolist()
    return means, counts.tolist()
