"""GRPO and its DAPO-family options as pure torch functions. Shapes: G groups of n completions; token tensors are
[B, T] with a 0/1 `mask` of completion tokens.

How this departs from, or picks among, the published variants (each a recipe option; defaults in brackets):
1. Advantages: r - mean(group), divided by the group std [group] (GRPO), the batch std (`batch`), or not at all
   (`none`, Dr.GRPO). A group whose rewards are all equal gets advantage 0.
2. Clipping: PPO clip with separate epsilon [0.2] and epsilon_high [0.28] (DAPO clip-higher).
3. Aggregation [token-mean] (DAPO); `seq-mean-token-mean` (original GRPO); `seq-mean-token-sum-norm` (Dr.GRPO:
   token sums divided by a constant, rows x max_new_tokens, where rows counts every row of the optimisation batch,
   masked or not). Aggregation takes the *global* token/sequence counts of the optimisation batch, so gradient
   accumulation over micro-batches (or processes) gives the same gradient as one big batch.
4. KL to a reference [beta 0: off], named by the gradient it gives [k3]: k3 = exp(d) - d - 1, d = log ref -
   log pi, has expected gradient grad KL(ref || pi) (what GRPO's k3 penalty optimises); k2 = (log pi -
   log ref)^2 / 2 has expected gradient grad KL(pi || ref). (k1 = log pi - log ref is an unbiased estimate of the
   value of KL(pi || ref) but its expected gradient is 0, E_pi[grad log pi] = 0, so it is not offered as a penalty.)
   The logged kl_ref is k3's value, an unbiased estimate of KL(pi || ref). Entropy bonus [0: off].
5. Clip-Cov / KL-Cov (Cui et al., 2025, "The Entropy Mechanism of RL for Reasoning LMs"): per-token
   cov = (A - mean A) * (log pi_old - mean log pi_old) over all tokens of the optimisation (mini-)batch (the
   rollout policy's log-probs, equal to pi's on the first mini-batch; computed before its first micro-batch, so the
   selection does not depend on micro_batch_size). Clip-Cov drops the gradient of a random fraction [2e-4] of
   tokens whose cov lies in (1, 5); KL-Cov adds kl_cov_coef [1] * |log pi - log pi_old| to the top fraction
   [2e-4] of tokens by cov and drops the clip. At least one token is selected whenever any qualifies. KL-Cov's
   term is 0 with gradient 0 on-policy (pi = pi_old), so it needs several mini-batches or epochs (the recipe
   refuses it otherwise) and acts from the second update of a rollout batch on.
6. High-entropy tokens (Wang et al., 2025, "Beyond the 80/20 Rule"; TRL's top_entropy_quantile) [rho 1: off]: the
   policy loss only on the tokens whose entropy at the sampling temperature is at least the k-th largest of the
   step's loss tokens, k = ceil(rho * N) (rho at its decimal value; every token tied with the k-th is kept, so at
   least k). TRL takes torch.quantile(1 - rho) (interpolated) over each micro-batch's tokens, gathered across
   processes, from the entropies of the training forward; here the threshold is an order statistic over the whole
   step (every micro-batch, mini-batch and process) of the rollout policy's entropies (the old-log-prob pass),
   so neither micro_batch_size, mini_batches nor the number of processes changes which tokens learn, and every
   update of a step trains the same tokens. Tokens with the same context (the same prompt and completion prefix:
   completions of one prompt share their first tokens, a collapsed policy often whole completions) have the same
   distribution, but computed in different micro-batches or processes their entropies differ in the last bits,
   which would split such a tie at the threshold one way or the other; each takes the entropy of its context's
   first occurrence in the step (`shared_context_entropy`), so mathematical ties are exact ties. As in TRL, the KL
   to the reference and the entropy bonus keep every token and the loss keeps its normaliser (all loss tokens).
7. Adaptive entropy control (the Skywork-OR1 report, arXiv 2505.22312; TRL's use_adaptive_entropy) [entropy_target
   None: off]: after each step the coefficient moves up by one step when the step's mean rollout token entropy is
   below the target and down by one step when above, clamped to [0, max]. Skywork-OR1 and TRL also apply the bonus
   only while the last entropy is at or below the target; here the coefficient is applied as it stands (above the
   target it falls back to 0 one step at a time), so that the logged coefficient is the applied one and the
   controller's state is that one number. TRL measures the entropy of the training forward over the policy loss's
   tokens (the high-entropy subset with rho < 1); here it is the rollouts' own entropy at the sampling temperature
   over every rollout token: the distribution the bonus differentiates and the one that samples, known from the
   rollout engine before the update.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-6,
                     batch_std: float | None = None) -> torch.Tensor:
    """rewards: [G, n] -> advantages [G, n]. `batch_std`: the std of every reward of the step when this holds only
    a share of them (several processes); else that of `rewards`."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centered / (rewards.std(dim=1, keepdim=True, unbiased=True).nan_to_num(0.0) + eps)
    if scale == "batch":
        std = batch_std if batch_std is not None else float(rewards.std(unbiased=True).nan_to_num(0.0))
        return centered / (std + eps)
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


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL penalty on tokens sampled from pi (see 4. above).  [B, T], [B, T] -> [B, T]
    k3: expected gradient grad KL(ref || pi); its value is an unbiased estimate of KL(pi || ref).
    k2: expected gradient grad KL(pi || ref)."""
    if estimator == "k3":
        d = ref_logp - logp
        return torch.exp(d) - d - 1.0
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    raise ValueError(f"unknown KL estimator {estimator!r} (k2 or k3)")


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str, num_tokens: float, num_seqs: float,
              num_rows: float, max_len: int) -> torch.Tensor:
    """This micro-batch's share of the optimisation batch's loss.  loss, mask: [B, T] -> scalar

    Counts are over the *whole* optimisation batch (all micro-batches and processes), so that summing the shares
    over micro-batches equals aggregating the whole batch at once: num_tokens = its loss tokens, num_seqs = its
    rows with a loss (token-mean, seq-mean-token-mean), num_rows = all its rows, masked ones included (Dr.GRPO's
    constant normaliser num_rows x max_len)."""
    masked = loss * mask
    if mode == "token-mean":
        return masked.sum() / max(num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        return masked.sum() / (max(num_rows, 1.0) * max_len)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def token_covariance(adv: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Centred product of advantage and log-prob per token (Cui et al., 2025), over all tokens given.
    adv, logp: [N] (the loss tokens of one optimisation batch) -> [N] float64"""
    adv, logp = adv.double(), logp.detach().double()
    return (adv - adv.mean()) * (logp - logp.mean())


def clip_cov_select(cov: torch.Tensor, ratio: float, lower: float, upper: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Clip-Cov: True for the tokens whose gradient is detached, a random `ratio` fraction of all tokens (at
    least one) drawn among those with lower < cov < upper.  cov: [N] -> bool [N]"""
    sel = torch.zeros_like(cov, dtype=torch.bool)
    eligible = torch.nonzero((cov > lower) & (cov < upper)).squeeze(-1)
    if len(eligible):
        k = min(len(eligible), max(int(ratio * cov.numel()), 1))
        pick = eligible[torch.randperm(len(eligible), generator=generator)[:k]]
        sel[pick] = True
    return sel


def kl_cov_select(cov: torch.Tensor, ratio: float) -> torch.Tensor:
    """KL-Cov: True for the top `ratio` fraction of tokens by covariance (at least one).  cov: [N] -> bool [N]"""
    sel = torch.zeros_like(cov, dtype=torch.bool)
    if cov.numel():
        sel[cov.topk(max(int(ratio * cov.numel()), 1)).indices] = True
    return sel


def top_entropy_count(num_tokens: int, rho: float) -> int:
    """k = ceil(rho * N), the fewest tokens the high-entropy mask keeps, with rho at its decimal value (0.28 x 25 =
    7, where float arithmetic gives 7.000000000000001 and would keep 8)."""
    return math.ceil(Fraction(repr(float(rho))) * num_tokens)


def high_entropy_mask(entropy: torch.Tensor, rho: float) -> torch.Tensor:
    """True for the tokens the policy loss keeps (6. above): entropy >= the k-th largest value, k =
    top_entropy_count(N, rho); ties at that value are all kept.  entropy: [N] (every loss token of the step)
    -> bool [N]"""
    n = entropy.numel()
    if n == 0 or rho >= 1.0:
        return torch.ones_like(entropy, dtype=torch.bool)
    values = entropy.double()
    threshold = values.kthvalue(n - top_entropy_count(n, rho) + 1).values  # the k-th largest
    return values >= threshold


def shared_context_entropy(rows: list[tuple[list[int], list[int], torch.Tensor]]) -> list[torch.Tensor]:
    """Each token's entropy replaced by that of the first token in `rows` with the same context: the same prompt and
    the same completion tokens before it (6. above). rows: [(prompt ids, completion ids [L], entropy [L])] ->
    [entropy [L] float64] in the same order."""
    node_of: dict[tuple, int] = {}  # (prompt ids,) or (parent node, token) -> node: a trie of the contexts
    first: dict[int, float] = {}  # node -> the entropy of its first occurrence
    out = []
    for prompt, completion, entropy in rows:
        node = node_of.setdefault((tuple(prompt),), len(node_of))
        values = entropy.double().tolist()
        for j, token in enumerate(completion):
            values[j] = first.setdefault(node, values[j])
            node = node_of.setdefault((node, token), len(node_of))
        out.append(torch.tensor(values, dtype=torch.float64))
    return out


def adaptive_entropy_coef(coef: float, entropy: float | None, target: float, step: float, max_coef: float) -> float:
    """The entropy bonus's coefficient for the next step (7. above): `coef` + `step` when the step's mean rollout
    token `entropy` is below `target`, - `step` when above, clamped to [0, max_coef]; unchanged when equal or when
    the step had no rollout tokens (None)."""
    if entropy is None or entropy == target:
        return coef
    moved = coef + step if entropy < target else coef - step
    return min(max(moved, 0.0), max_coef)
