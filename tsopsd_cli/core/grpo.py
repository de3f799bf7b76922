"""GRPO and its DAPO-family options as pure torch functions. Shapes: G groups of n completions; token tensors are
[B, T] with a 0/1 `mask` of completion tokens.

How this departs from, or picks among, the published variants (each a recipe option; defaults in brackets):
1. Advantages: r - mean(group), divided by the group std [group] (GRPO), the batch std (`batch`), or not at all
   (`none`, Dr.GRPO). A group whose rewards are all equal gets advantage 0.
2. Clipping: PPO clip with separate epsilon [0.2] and epsilon_high [0.28] (DAPO clip-higher).
3. Aggregation [token-mean] (DAPO); `seq-mean-token-mean` (original GRPO); `seq-mean-token-sum-norm` (Dr.GRPO:
   token sums divided by a constant, max_new_tokens). Aggregation takes the *global* token/sequence counts of the
   optimisation batch, so gradient accumulation over micro-batches (or processes) gives the same gradient as one
   big batch.
4. KL to a reference [beta 0: off] with the k1 or k3 [k3] estimator; entropy bonus [0: off].
5. Clip-Cov / KL-Cov (Cui et al., 2025, "The Entropy Mechanism of RL for Reasoning LMs"): per-token
   cov = (A - mean A) * (log pi - mean log pi) over the batch's tokens. Clip-Cov drops the gradient of a random
   fraction [2e-4] of tokens whose cov lies in [1, 5]; KL-Cov adds kl_cov_coef [1] * |log pi - log pi_old| to the
   top fraction [2e-4] of tokens by cov. At least one token is selected whenever any qualifies.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """rewards: [G, n] -> advantages [G, n]."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)
    if scale == "batch":
        return centered / (rewards.std(unbiased=True).nan_to_num(0.0) + eps)
    if scale == "none":
        return centered
    raise ValueError(f"unknown scale_rewards {scale!r}")


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, epsilon: float,
                        epsilon_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO surrogate with asymmetric clipping, per token.
    logp, old_logp: [B, T]; adv: [B] or [B, T] -> (loss [B, T], ratio [B, T], clipped_low [B, T], clipped_high [B, T])
    where clipped_low/high mark tokens whose gradient the clip removes (ratio < 1-eps with A < 0, ratio > 1+eps_high
    with A > 0)."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    low = (ratio < 1.0 - epsilon) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    return loss, ratio, low, high


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k3).  [B, T], [B, T] -> [B, T]"""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float, num_seqs: float,
              max_len: int) -> torch.Tensor:
    """This micro-batch's share of the optimisation batch's loss.  loss, mask: [B, T] -> scalar

    num_tokens / num_seqs are the counts over the *whole* optimisation batch (all micro-batches and processes), so
    that summing the shares over micro-batches equals aggregating the whole batch at once."""
    masked = loss * mask
    if mode == "token-mean":
        return masked.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (max(num_seqs, 1.0) * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def token_covariance(adv: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Centred product of advantage and log-prob per token (Cui et al., 2025).  [B, T] each -> [B, T]
    (masked-out tokens get -inf)."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(logp)
    m = mask.bool()
    n = m.sum().clamp(min=1)
    a_mean = (adv * m).sum() / n
    lp = logp.detach()
    lp_mean = (lp * m).sum() / n
    cov = (adv - a_mean) * (lp - lp_mean)
    return cov.masked_fill(~m, float("-inf"))


def clip_cov_mask(cov: torch.Tensor, mask: torch.Tensor, ratio: float, lower: float, upper: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip-Cov: 1 where the token's gradient is kept, 0 for a random `ratio` fraction of tokens with
    lower < cov < upper.  [B, T] -> [B, T] float"""
    keep = torch.ones_like(mask, dtype=torch.float32)
    eligible = torch.nonzero((cov > lower) & (cov < upper) & mask.bool())
    if len(eligible):
        k = min(len(eligible), max(int(ratio * float(mask.sum())), 1))
        pick = eligible[torch.randperm(len(eligible), generator=generator, device="cpu")[:k].to(eligible.device)]
        keep[pick[:, 0], pick[:, 1]] = 0.0
    return keep


def kl_cov_mask(cov: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """KL-Cov: 1 for the top `ratio` fraction of tokens by covariance (at least one).  [B, T] -> [B, T] float"""
    sel = torch.zeros_like(mask, dtype=torch.float32)
    n = int(mask.sum())
    if n == 0:
        return sel
    k = max(int(ratio * n), 1)
    flat = cov.flatten()
    top = flat.topk(k).indices
    sel.view(-1)[top] = 1.0
    return sel * mask
