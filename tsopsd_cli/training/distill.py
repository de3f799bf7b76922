"""The TS-OPSD step, shared by `tsopsd reheat` and the entropy thermostat of `tsopsd rl`: one optimiser step
distilling the student, on its own rollouts, towards the teacher's logits / temp over the full vocabulary.

The loss is token-mean over every completion token of the step (all processes), computed from hidden states in
chunks (core.chunked.token_divergence: no [batch, length, vocab] tensor), teacher logits chunk by chunk under
no_grad. The metrics of the step come from the loss's own logit blocks in its forward pass (before the backward
pass, which under FSDP frees the gathered LM-head weights): no LM-head projection of their own. The step sees the
trained policy through training.policy.StepPolicy alone (a TrainingRun hands its `policy`); the rollouts it
trains on come from the run (TrainingRun.on_policy_rollout).

`distill_step` runs `micro_batch_backward` on each micro-batch (the student's forward, the teacher's and the
reference's under no_grad, the loss and its backward; `metrics_observer` sums the metrics), then the optimiser step.
The teacher and the reference are frozen models the caller owns (reheat: the input checkpoint; the thermostat: its
snapshot) and may change between steps.
"""

from __future__ import annotations

import time

import torch

from tsopsd_cli.core import stats as S
from tsopsd_cli.core.chunked import token_divergence
from tsopsd_cli.parallel import sharding
from tsopsd_cli.training.policy import StepPolicy


SUMS = ("loss", "s_ent", "t_ent", "agree", "kl_in", "eng")  # the step's metric sums, per completion token


def distill_step(policy: StepPolicy, teacher, reference, seqs, comps, engine_lps, section, t0: float,
                 t1: float) -> dict:
    """One TS-OPSD optimiser step of `policy` on `seqs` [(prompt ids, completion ids)] sampled from it (`comps`:
    the completions; `engine_lps`: the rollout engine's log-probs per sequence, or None).

    `teacher`: a frozen model whose logits / `section.temp` are the target, or None for the live student under
    stop-gradient. `reference`: the frozen model that `top1_agreement` and `kl_input` compare the student with
    (reheat: the input checkpoint; the thermostat: the policy at the start of its phase). `section` has temp,
    divergence, beta, teacher_top_p. Returns the step's metrics."""
    policy.model.train()
    n_tok = policy.global_sum(sum(len(c) for _, c in seqs))
    policy.zero_grad()
    sums = dict.fromkeys(SUMS, 0.0)
    mbs = policy.micro_batch_size
    for k in range(policy.passes(-(-len(seqs) // mbs))):  # FSDP: every process runs the same number of passes
        mine = None if engine_lps is None else engine_lps[k * mbs:(k + 1) * mbs]
        micro_batch_backward(policy, teacher, reference, seqs[k * mbs:(k + 1) * mbs], mine, section, n_tok, sums)
    for frozen in {id(m): m for m in (teacher, reference) if m is not None}.values():
        sharding.reshard(frozen)
    grad_norm = policy.optimizer_step()
    t2 = time.perf_counter()
    tot = {k: policy.global_sum(v) / max(n_tok, 1.0) for k, v in sums.items()}
    return {"loss": tot["loss"], "student_entropy": tot["s_ent"], "teacher_entropy": tot["t_ent"],
            "top1_agreement": tot["agree"], "kl_input": tot["kl_in"], "grad_norm": grad_norm,
            "engine_logprob_diff": tot["eng"] if engine_lps is not None else None,
            "response_length": policy.global_mean([len(c.token_ids) for c in comps]),
            "tokens": n_tok, "tokens_per_s": n_tok / max(t2 - t0, 1e-9), "rollout_seconds": t1 - t0,
            "train_seconds": t2 - t1, "lr": policy.lr()}


def micro_batch_backward(policy: StepPolicy, teacher, reference, mb: list, engine_lps: list | None, section,
                         n_tok: float, sums: dict) -> None:
    """Forward, loss (its part of the step's token mean over `n_tok` tokens) and backward of one micro-batch; its
    metrics are added to `sums`. An empty `mb` is a padding pass: its loss is multiplied by 0."""
    padding = not mb
    mb = mb or [policy.padding_seq()]
    hidden, weight, pb = policy.hidden(policy.model, mb)
    with torch.no_grad():
        r_hidden, r_weight, _ = policy.hidden(reference, mb)
        if teacher is reference:
            t_hidden, t_weight = r_hidden, r_weight
        elif teacher is not None:
            t_hidden, t_weight, _ = policy.hidden(teacher, mb)
        else:  # the live student under stop-gradient
            t_hidden, t_weight = hidden.detach(), weight.detach()

    def teacher_logits(idx):
        return t_hidden[idx] @ t_weight.T  # [c, V]

    eng = None if engine_lps is None else torch.tensor([x for e in engine_lps for x in e], device=hidden.device)
    reference_logits = ChunkLogits(r_hidden, r_weight, policy.chunk_size)
    observe = None if padding else metrics_observer(sums, policy.rollout_temperature, pb, eng,
                                                    None if teacher is reference else reference_logits)
    # the metrics are taken in the loss's forward pass: before the backward pass, which under FSDP frees the
    # gathered head weight
    div = token_divergence(hidden, weight, teacher_logits, section.divergence, section.beta, section.temp,
                           policy.chunk_size, teacher_top_p=section.teacher_top_p, observe=observe)
    reference_logits.clear()
    loss = div.sum() / max(n_tok, 1.0) * (0.0 if padding else 1.0)
    loss = policy.guard_loss(loss)  # decided on every process together, before the update
    loss.backward()
    if not padding:
        sums["loss"] += float(div.detach().sum())


class ChunkLogits:
    """A frozen model's logits at token indices idx [n] of one chunk of the loss, projected once per chunk (observe
    may see a chunk a few rows at a time: a projection per row block would read the whole head weight for each)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, chunk: int):
        self.hidden, self.weight, self.chunk = hidden, weight, chunk  # [N, D], [V, D]
        self.start: int | None = None
        self.logits: torch.Tensor | None = None  # [c, V] of the chunk at `start`

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        start = int(idx[0]) // self.chunk * self.chunk
        if self.start != start:
            self.clear()  # the previous chunk's block goes first
            self.start, self.logits = start, self.hidden[start:start + self.chunk] @ self.weight.T
        return self.logits[idx - start]

    def clear(self) -> None:
        self.start, self.logits = None, None


def metrics_observer(sums: dict, rollout_temperature: float, pb, eng: torch.Tensor | None, reference_logits):
    """token_divergence's `observe`: the step's metrics from the loss's own blocks, added to `sums`: student and
    teacher entropy, top-1 agreement and KL(reference || student), the engine's log-prob gap (`eng` [N]: the
    engine's log-probs, or None). `reference_logits`: a ChunkLogits, or None when the reference is the teacher
    (its raw logits are the loss's own)."""

    def observe(idx, s_logits, s_logp, t_raw, t_logp):
        ref = t_raw if reference_logits is None else reference_logits(idx).to(s_logits.dtype)
        r_logp = ref.log_softmax(-1)
        sums["s_ent"] += float(S.entropy_from_logp(s_logp).sum())
        sums["t_ent"] += float(S.entropy_from_logp(t_logp).sum())
        # max's indices: the first maximum, as argmax's, from a kernel about 3x faster on the CPU
        sums["agree"] += float((s_logits.max(-1).indices == ref.max(-1).indices).sum())
        sums["kl_in"] += float(S.kl_from_logp(r_logp, s_logp).sum())
        if eng is not None:  # the rollout engine's log-probs against the student's own
            temp = rollout_temperature
            lp = s_logp if temp == 1.0 else (s_logits / temp).log_softmax(-1)
            lp = lp.gather(-1, pb.targets[idx].unsqueeze(-1)).squeeze(-1)
            sums["eng"] += float((lp - eng[idx].to(lp.dtype)).abs().sum())

    return observe
