"""The TS-OPSD step, shared by `tsopsd reheat` and the entropy thermostat of `tsopsd rl`: one optimiser step
distilling the student, on its own rollouts, towards the teacher's logits / temp over the full vocabulary.

The loss is token-mean over every completion token of the step (all processes), computed from hidden states in
chunks (core.chunked.token_divergence: no [batch, length, vocab] tensor), teacher logits chunk by chunk under
no_grad. The metrics of the step come from the loss's own logit blocks in its forward pass (before the backward
pass, which under FSDP frees the gathered LM-head weights): no LM-head projection of their own. The step sees the
trained policy through training.policy.StepPolicy alone (a TrainingRun hands its `policy`); the rollouts it
trains on come from the run (TrainingRun.on_policy_rollout).
"""

from __future__ import annotations

import time

import torch

from tsopsd_cli.core import stats as S
from tsopsd_cli.core.chunked import token_divergence
from tsopsd_cli.parallel import sharding
from tsopsd_cli.training.policy import StepPolicy


def distill_step(policy: StepPolicy, teacher, reference, seqs, comps, engine_lps, section, t0: float,
                 t1: float) -> dict:
    """One TS-OPSD optimiser step of `policy` on `seqs` [(prompt ids, completion ids)] sampled from it (`comps`:
    the completions; `engine_lps`: the rollout engine's log-probs per sequence, or None).

    `teacher`: a frozen model whose logits / `section.temp` are the target, or None for the live student under
    stop-gradient. `reference`: the frozen model that `top1_agreement` and `kl_input` compare the student with
    (reheat: the input checkpoint; the thermostat: the policy at the start of its phase). `section` has temp,
    divergence, beta, teacher_top_p. Returns the step's metrics."""
    chunk = policy.chunk_size
    policy.model.train()
    n_tok = policy.global_sum(sum(len(c) for _, c in seqs))
    policy.zero_grad()
    acc = {"loss": 0.0, "s_ent": 0.0, "t_ent": 0.0, "agree": 0.0, "kl_in": 0.0, "eng": 0.0}
    mbs = policy.micro_batch_size
    n_local = -(-len(seqs) // mbs)
    for k in range(policy.passes(n_local)):
        mb = seqs[k * mbs:(k + 1) * mbs]
        padding = not mb  # FSDP: every process runs the same number of passes
        mb = mb or [policy.padding_seq()]
        hidden, weight, pb = policy.hidden(policy.model, mb)
        with torch.no_grad():
            r_hidden, r_weight, _ = policy.hidden(reference, mb)
            if teacher is reference:
                t_hidden, t_weight = r_hidden, r_weight
            elif teacher is not None:
                t_hidden, t_weight, _ = policy.hidden(teacher, mb)
            else:
                t_hidden, t_weight = hidden.detach(), weight.detach()

        def teacher_logits(idx, h=t_hidden, w=t_weight):
            return h[idx] @ w.T  # [c, V]

        mine = None if engine_lps is None else engine_lps[k * mbs:(k + 1) * mbs]
        eng = None if mine is None else torch.tensor([x for e in mine for x in e], device=hidden.device)

        ref_chunk: dict = {}  # the reference's logits of the loss's current chunk, when it is not the teacher

        def reference_logits(idx, r_hidden=r_hidden, r_weight=r_weight, ref_chunk=ref_chunk):
            """The reference's logits at token indices idx [n] of one chunk, projected once per chunk of the loss
            (observe may see a chunk a few rows at a time: a projection per row block would read the whole head
            weight for each)."""
            start = int(idx[0]) // chunk * chunk
            if ref_chunk.get("start") != start:
                ref_chunk.clear()  # the previous chunk's block goes first
                ref_chunk.update(start=start, logits=r_hidden[start:start + chunk] @ r_weight.T)  # [c, V]
            return ref_chunk["logits"][idx - start]

        def observe(idx, s_logits, s_logp, t_raw, t_logp, pb=pb, eng=eng, reference_logits=reference_logits):
            """The step's metrics from the loss's own blocks (the reference's logits only when it is not the
            teacher): student and teacher entropy, top-1 agreement and KL(reference || student), the engine's
            log-prob gap."""
            ref = t_raw if teacher is reference else reference_logits(idx).to(s_logits.dtype)
            r_logp = ref.log_softmax(-1)
            acc["s_ent"] += float(S.entropy_from_logp(s_logp).sum())
            acc["t_ent"] += float(S.entropy_from_logp(t_logp).sum())
            # max's indices: the first maximum, as argmax's, from a kernel about 3x faster on the CPU
            acc["agree"] += float((s_logits.max(-1).indices == ref.max(-1).indices).sum())
            acc["kl_in"] += float(S.kl_from_logp(r_logp, s_logp).sum())
            if eng is not None:  # the rollout engine's log-probs against the student's own
                temp = policy.rollout_temperature
                lp = s_logp if temp == 1.0 else (s_logits / temp).log_softmax(-1)
                lp = lp.gather(-1, pb.targets[idx].unsqueeze(-1)).squeeze(-1)
                acc["eng"] += float((lp - eng[idx].to(lp.dtype)).abs().sum())

        # the metrics are taken in the loss's forward pass: before the backward pass, which under FSDP frees the
        # gathered head weight
        div = token_divergence(hidden, weight, teacher_logits, section.divergence, section.beta, section.temp,
                               chunk, teacher_top_p=section.teacher_top_p, observe=None if padding else observe)
        ref_chunk.clear()
        loss = div.sum() / max(n_tok, 1.0) * (0.0 if padding else 1.0)
        loss = policy.guard_loss(loss)  # decided on every process together, before the update
        loss.backward()
        if padding:
            continue
        acc["loss"] += float(div.detach().sum())
    for frozen in {id(m): m for m in (teacher, reference) if m is not None}.values():
        sharding.reshard(frozen)
    grad_norm = policy.optimizer_step()
    t2 = time.perf_counter()
    tot = {k: policy.global_sum(v) / max(n_tok, 1.0) for k, v in acc.items()}
    return {"loss": tot["loss"], "student_entropy": tot["s_ent"], "teacher_entropy": tot["t_ent"],
            "top1_agreement": tot["agree"], "kl_input": tot["kl_in"], "grad_norm": grad_norm,
            "engine_logprob_diff": tot["eng"] if engine_lps is not None else None,
            "response_length": policy.global_mean([len(c.token_ids) for c in comps]),
            "tokens": n_tok, "tokens_per_s": n_tok / max(t2 - t0, 1e-9), "rollout_seconds": t1 - t0,
            "train_seconds": t2 - t1, "lr": policy.lr()}
