"""The TS-OPSD step, shared by `tsopsd reheat` and the entropy thermostat of `tsopsd rl`: one optimiser step
distilling the student, on its own rollouts, towards the teacher's logits / temp over the full vocabulary.

The loss is token-mean over every completion token of the step (all processes), computed from hidden states in
chunks (core.chunked.token_divergence: no [batch, length, vocab] tensor), teacher logits chunk by chunk under
no_grad. The metrics of the step are taken before its backward pass (under FSDP the backward frees the gathered
LM-head weights).
"""

from __future__ import annotations

import time

import torch

from tsopsd_cli import parallel
from tsopsd_cli.core import stats as S
from tsopsd_cli.core.chunked import token_divergence
from tsopsd_cli.engines import encode_prompts, sampling_params
from tsopsd_cli.training.trainer import row_seed


def on_policy_rollout(run):
    """TS-OPSD's rollouts: `train.prompts_per_step` prompts x `num_generations` from the current policy; returns
    (non-empty sequences, all completions, the engine's log-probs of the sequences or None)."""
    step_seed = run.next_seed()
    taken = run.stream.take(run.r.train.prompts_per_step)
    mine = taken[run.dist.rank::run.dist.world]
    params = sampling_params(run.r.rollout, row_seeds=tuple(row_seed(step_seed, pos) for pos, _ in mine))
    comps = run.generate(run.engine, encode_prompts(run.tok, [p.prompt for _, p in mine]), params)
    run.check_rollout(comps)
    run.rollouts_done()
    kept = [c for c in comps if c.token_ids]
    return [(c.prompt_ids, c.token_ids) for c in kept], comps, run.engine_logps(kept)


def distill_step(run, teacher, reference, seqs, comps, engine_lps, section, t0: float, t1: float) -> dict:
    """One TS-OPSD optimiser step of `run` (a TrainingRun) on `seqs` [(prompt ids, completion ids)] sampled from
    its policy (`comps`: the completions; `engine_lps`: the rollout engine's log-probs per sequence, or None).

    `teacher`: a frozen model whose logits / `section.temp` are the target, or None for the live student under
    stop-gradient. `reference`: the frozen model that `top1_agreement` and `kl_input` compare the student with
    (reheat: the input checkpoint; the thermostat: the policy at the start of its phase). `section` has temp,
    divergence, beta, teacher_top_p. Returns the step's metrics."""
    tr = run.r.train
    run.model.train()
    n_tok = run.dist.sum(sum(len(c) for _, c in seqs))
    run.opt.zero_grad(set_to_none=True)
    acc = {"loss": 0.0, "s_ent": 0.0, "t_ent": 0.0, "agree": 0.0, "kl_in": 0.0, "eng": 0.0}
    mbs = tr.micro_batch_size
    n_local = -(-len(seqs) // mbs)
    for k in range(run.passes(n_local)):
        mb = seqs[k * mbs:(k + 1) * mbs]
        padding = not mb  # FSDP: every process runs the same number of passes
        mb = mb or [run.dummy_seq()]
        hidden, weight, pb = run.hidden(run.model, mb)
        with torch.no_grad():
            r_hidden, r_weight, _ = run.hidden(reference, mb)
            if teacher is reference:
                t_hidden, t_weight = r_hidden, r_weight
            elif teacher is not None:
                t_hidden, t_weight, _ = run.hidden(teacher, mb)
            else:
                t_hidden, t_weight = hidden.detach(), weight.detach()

        def teacher_logits(idx, h=t_hidden, w=t_weight):
            return h[idx] @ w.T  # [c, V]

        mine = None if engine_lps is None else engine_lps[k * mbs:(k + 1) * mbs]
        eng = None if mine is None else torch.tensor([x for e in mine for x in e], device=hidden.device)

        def observe(idx, s_logits, t_raw, t_logits, r_hidden=r_hidden, r_weight=r_weight, pb=pb, eng=eng):
            """The step's metrics from the loss's own logit blocks (the reference's only when it is not the
            teacher): student and teacher entropy, top-1 agreement and KL to the reference, the engine's
            log-prob gap."""
            ref = t_raw if teacher is reference else r_hidden[idx] @ r_weight.T
            st = S.logits_token_stats(s_logits, [1.0], [1], ref_logits=ref)
            acc["s_ent"] += float(st.entropy.sum())
            acc["agree"] += float(st.top1_agree.sum())
            acc["kl_in"] += float(st.kl_forward.sum())
            acc["t_ent"] += float(S.entropy_from_logits(t_logits).sum())
            if eng is not None:  # the rollout engine's log-probs against the student's own
                lp = (s_logits / run.r.rollout.temperature).log_softmax(-1)
                lp = lp.gather(-1, pb.targets[idx].unsqueeze(-1)).squeeze(-1)
                acc["eng"] += float((lp - eng[idx].to(lp.dtype)).abs().sum())

        # the metrics are taken in the loss's forward pass: before the backward pass, which under FSDP frees the
        # gathered head weight
        div = token_divergence(hidden, weight, teacher_logits, section.divergence, section.beta, section.temp,
                               tr.chunk_size, teacher_top_p=section.teacher_top_p,
                               observe=None if padding else observe)
        loss = div.sum() / max(n_tok, 1.0) * (0.0 if padding else 1.0)
        loss = run.guard_loss(loss)  # decided on every process together, before the update
        loss.backward()
        if padding:
            continue
        acc["loss"] += float(div.detach().sum())
    for frozen in {id(m): m for m in (teacher, reference) if m is not None}.values():
        parallel.reshard(frozen)
    grad_norm = run.optimizer_step()
    t2 = time.perf_counter()
    tot = {k: run.dist.sum(v) / max(n_tok, 1.0) for k, v in acc.items()}
    return {"loss": tot["loss"], "student_entropy": tot["s_ent"], "teacher_entropy": tot["t_ent"],
            "top1_agreement": tot["agree"], "kl_input": tot["kl_in"], "grad_norm": grad_norm,
            "engine_logprob_diff": tot["eng"] if engine_lps is not None else None,
            "response_length": run.global_mean([len(c.token_ids) for c in comps]),
            "tokens": n_tok, "tokens_per_s": n_tok / max(t2 - t0, 1e-9), "rollout_seconds": t1 - t0,
            "train_seconds": t2 - t1, "lr": run.sched.get_last_lr()[0]}
