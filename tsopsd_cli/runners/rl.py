"""`tsopsd rl`: continued GRPO (with the DAPO-family options) on a checkpoint.

Each step: draw `prompts_per_step` prompts, sample `num_generations` completions each from the current policy at
the rollout temperature (the hf engine), reward them with the grader, compute group advantages, then take
`ppo_epochs` x `mini_batches` optimiser steps on the clipped surrogate (core.grpo). Old log-probs are computed
teacher-forced at the sampling temperature with the same micro-batches as training, so the importance ratio is
exactly 1 on the first mini-batch. The loss is computed from hidden states in chunks over the vocabulary
(core.chunked): no [batch, length, vocab] logits.

Setup, checkpoints, resume, signals, the non-finite guard and several processes come from runners.trainer.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from tsopsd_cli.core import grpo
from tsopsd_cli.core.chunked import token_logps
from tsopsd_cli.engines import SamplingParams, encode_prompts
from tsopsd_cli.engines.hf import HFEngine
from tsopsd_cli.errors import RecipeError
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import RLRecipe
from tsopsd_cli.runners import training as T
from tsopsd_cli.runners.trainer import TrainingRun, row_seed
from tsopsd_cli.tasks.base import Problem
from tsopsd_cli.tasks.grading import Grader


def load_reward(spec: str):
    """The reward function: 'math' (grader) or 'module:function(completions, answers) -> list[float]'."""
    if spec == "math":
        return None
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError):
        raise RecipeError(f"grpo.reward: cannot import {spec!r} (expected 'math' or 'module:function')") from None


# -------------------------------------------------------------------------------------------------- rollouts
@dataclass
class Group:
    problem: Problem
    position: int
    completions: list  # engine Completions
    rewards: list[float]


@dataclass
class Batch:
    groups: list[Group]
    seqs: list[tuple[list[int], list[int]]] = field(default_factory=list)
    advantages: list[float] = field(default_factory=list)
    loss_mask: list[bool] = field(default_factory=list)  # False: completion excluded (truncated, masked)
    stats: dict = field(default_factory=dict)


def to_padded(flat: torch.Tensor, batch, num_seqs: int, width: int) -> torch.Tensor:
    """Per-token values [N] -> [B, T] (zeros elsewhere)."""
    out = flat.new_zeros((num_seqs, width))
    out[batch.seq_index.to(flat.device), batch.completion_pos.to(flat.device)] = flat
    return out


# ---------------------------------------------------------------------------------------------------- runner
class RLRunner(TrainingRun):
    command = "rl"
    plot_keys = [("entropy", "token entropy (nats)"), ("reward", "reward")]
    progress_info = ("reward", "entropy")

    def prompts_per_step(self) -> int:
        return self.r.grpo.prompts_per_step

    def setup_method(self) -> None:
        self.reward_fn = load_reward(self.r.grpo.reward)
        self.ref = self.frozen(self.checkpoint) if self.r.grpo.beta > 0 else None
        self.engine = HFEngine(self.model, self.tok, batch_size=self.r.rollout.batch_size, lean=self.r.model.lean)
        self.grader = Grader(workers=self.r.grpo.grader_workers, timeout=self.r.grpo.grader_timeout)

    def close(self) -> None:
        if hasattr(self, "grader"):
            self.grader.close()

    def train_step(self) -> dict:
        t0 = T.now()
        batch = self.rollout()
        t1 = T.now()
        metrics = self.train_on(batch) if self.dist.sum(len(batch.seqs)) else {}
        t2 = T.now()
        return {**batch.stats, **metrics, "rollout_seconds": t1 - t0, "train_seconds": t2 - t1,
                "tokens_per_s": batch.stats["tokens"] / max(t2 - t0, 1e-9)}

    def report_extra(self) -> dict:
        steps = [h for h in self.history if "reward" in h]
        first, last = (steps[0], steps[-1]) if steps else ({}, {})
        ratio = first["entropy"] / last["entropy"] if steps and first.get("entropy") and last.get("entropy") else None
        return {"entropy": {"first": first.get("entropy"), "last": last.get("entropy"), "ratio": ratio},
                "reward": {"first": first.get("reward"), "last": last.get("reward")}}

    # ---------------------------------------------------------------- rollouts
    def rewards(self, comps, problems: list[Problem]) -> list[float]:
        if self.reward_fn is not None:
            return [float(x) for x in self.reward_fn([c.text for c in comps], [p.answer for p in problems])]
        grades = self.grader.grade_many([(c.text, p.answer or "") for c, p in zip(comps, problems)])
        return [1.0 if g.correct else 0.0 for g in grades]

    def sample_groups(self, step_seed: int, round_: int, taken: list[tuple[int, Problem]]) -> list[Group]:
        r = self.r
        mine = T.shard(taken, self.dist)
        if not mine:
            return []
        params = SamplingParams(num_generations=r.rollout.num_generations, temperature=r.rollout.temperature,
                                top_p=r.rollout.top_p, top_k=r.rollout.top_k, max_new_tokens=r.rollout.max_new_tokens,
                                stop=tuple(r.rollout.stop),
                                row_seeds=tuple(row_seed(step_seed * 31 + round_, pos) for pos, _ in mine))
        comps = self.engine.generate(encode_prompts(self.tok, [p.prompt for _, p in mine]), params)
        rewards = self.rewards(comps, [mine[c.prompt_index][1] for c in comps])
        n = r.rollout.num_generations
        return [Group(problem=p, position=pos, completions=comps[i * n:(i + 1) * n], rewards=rewards[i * n:(i + 1) * n])
                for i, (pos, p) in enumerate(mine)]

    def rollout(self) -> Batch:
        g = self.r.grpo
        step_seed = self.next_seed()
        need = g.prompts_per_step
        groups: list[Group] = []
        sampled = zero_var = 0
        rounds = g.max_sampling_rounds if g.dynamic_sampling else 1
        for round_ in range(rounds):
            # every process takes the same global prompts and samples its share
            taken = self.stream.take(need)
            new = self.sample_groups(step_seed, round_, taken)
            sampled += len(new)
            flat = [len(set(x.rewards)) <= 1 for x in new]
            zero_var += sum(flat)
            groups += [x for x, z in zip(new, flat) if not (g.dynamic_sampling and z)]
            have = self.dist.sum(len(groups))
            if not g.dynamic_sampling or have >= need:
                break
        if g.dynamic_sampling:
            groups = groups[:need // self.dist.world]
        batch = Batch(groups=groups)
        all_rewards = [x.rewards for x in groups]
        rewards = torch.tensor(all_rewards, dtype=torch.float64) if groups else torch.zeros((0, 1))
        if g.scale_rewards == "batch" and self.dist.world > 1:
            flat_all = [v for part in self.dist.gather_objects(all_rewards) for grp in part for v in grp]
            std = torch.tensor(flat_all, dtype=torch.float64).std() if len(flat_all) > 1 else torch.tensor(0.0)
            adv = (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-6)
        else:
            adv = grpo.group_advantages(rewards, g.scale_rewards) if groups else rewards
        for gi, grp in enumerate(groups):
            for ci, c in enumerate(grp.completions):
                batch.seqs.append((c.prompt_ids, c.token_ids))
                batch.advantages.append(float(adv[gi, ci]))
                batch.loss_mask.append(not (g.mask_truncated and c.finish_reason == "length"))
        comps = [c for grp in groups for c in grp.completions]
        ents = [e for c in comps for e in (c.entropies or [])]
        batch.stats = {
            "reward": self.global_mean([v for grp in groups for v in grp.rewards]),
            "sampling_entropy": self.global_mean(ents),
            "response_length": self.global_mean([len(c.token_ids) for c in comps]),
            "truncated": self.global_mean([c.finish_reason == "length" for c in comps]),
            "zero_variance_groups": self.dist.sum(zero_var) / max(1.0, self.dist.sum(sampled)),
            "groups_sampled": self.dist.sum(sampled),
            "groups_used": self.dist.sum(len(groups)),
            "tokens": self.dist.sum(sum(len(c.token_ids) for c in comps)),
        }
        return batch

    def skips_zero_advantage(self) -> bool:
        """Rows with advantage 0 add exactly nothing to the gradient of the clipped surrogate (r * 0 = 0, clipped
        or not), so they are left out of the forward/backward while still counting in the loss normaliser. Not so
        when a KL term, an entropy bonus or a covariance-based token selection looks at every token."""
        g = self.r.grpo
        return g.beta == 0 and g.entropy_coef == 0 and not g.clip_cov.enabled and not g.kl_cov.enabled

    def plan(self, batch: Batch, epoch: int, gen: torch.Generator) -> list[tuple[list[int], list[list[int]]]]:
        """One epoch: [(all rows of a mini-batch, its micro-batches of trained rows)]. Rows are split into
        `mini_batches` contiguous parts (groups stay together; shuffled after the first epoch); inside a part the
        trained rows are sorted by length so that micro-batches carry little padding."""
        g, mb = self.r.grpo, self.r.train.micro_batch_size
        rows = list(range(len(batch.seqs)))
        if epoch:
            rows = [rows[i] for i in torch.randperm(len(rows), generator=gen).tolist()]
        size = -(-len(rows) // g.mini_batches) if rows else 1
        skip0 = self.skips_zero_advantage()
        out = []
        for s in range(0, len(rows), size):
            part = rows[s:s + size]
            active = [i for i in part if batch.loss_mask[i] and not (skip0 and batch.advantages[i] == 0.0)]
            active.sort(key=lambda i: len(batch.seqs[i][0]) + len(batch.seqs[i][1]))
            out.append((part, [active[k:k + mb] for k in range(0, len(active), mb)]))
        while len(out) < g.mini_batches:  # every process takes the same number of optimiser steps
            out.append(([], []))
        return out

    def train_on(self, batch: Batch) -> dict:
        r, g = self.r, self.r.grpo
        temp = r.rollout.temperature
        self.model.train()
        order_gen = torch.Generator().manual_seed(self.next_seed())
        plans = [self.plan(batch, 0, order_gen)]
        n_rows = len(batch.seqs)
        old: list = [None] * n_rows  # per-row old log-probs [len]; None: taken from the training forward
        ref: list = [None] * n_rows
        # One update per rollout batch and no reference: the old log-probs are the current ones, so the training
        # forward provides them (detached) and the separate no-grad pass is skipped.
        single = g.ppo_epochs == 1 and g.mini_batches == 1 and self.ref is None and temp == 1.0
        # Token entropy at temperature 1 over every rollout token: at rollout temperature 1 it is the engine's
        # (exact, computed while sampling); otherwise the no-grad pass below provides it.
        ent_sum, ent_n = 0.0, 0
        with torch.no_grad():
            trained = {i for _, micro in plans[0] for ids in micro for i in ids}
            passes = [] if single else [ids for _, micro in plans[0] for ids in micro]
            if temp != 1.0:
                rest = [i for i in range(n_rows) if i not in trained]
                passes += [rest[k:k + r.train.micro_batch_size] for k in range(0, len(rest), r.train.micro_batch_size)]
            for ids in passes:
                seqs = [batch.seqs[i] for i in ids]
                hidden, weight, pb = self.hidden(self.model, seqs)  # one forward: old log-probs and entropy
                chunk = r.train.chunk_size
                if temp != 1.0:
                    e = token_logps(hidden, weight, pb.targets, 1.0, chunk, True)[1]
                    ent_sum, ent_n = ent_sum + float(e.double().sum()), ent_n + e.numel()
                if ids[0] in trained:
                    lp = token_logps(hidden, weight, pb.targets, temp, chunk)[0]
                    rf = self.forward_logps(self.ref, seqs, temp, False)[0] if self.ref is not None else None
                    bounds = [len(batch.seqs[i][1]) for i in ids]
                    for i, piece in zip(ids, lp.split(bounds)):
                        old[i] = piece
                    for i, piece in zip(ids, rf.split(bounds) if rf is not None else [None] * len(ids)):
                        ref[i] = piece
        acc = {k: 0.0 for k in ("loss", "tokens", "clip_low", "clip_high", "ratio_dev", "kl_ref", "kl_old",
                                "cov_selected")}
        first_ratio_dev = None
        grad_norms = []
        for epoch in range(g.ppo_epochs):
            plan = plans[0] if epoch == 0 else self.plan(batch, epoch, order_gen)
            for pi, (part, micro) in enumerate(plan):
                n_tok = self.dist.sum(sum(len(batch.seqs[i][1]) for i in part if batch.loss_mask[i]))
                n_seq = self.dist.sum(sum(1 for i in part if batch.loss_mask[i]))
                self.opt.zero_grad(set_to_none=True)
                for ids in micro:
                    olds = None if single else torch.cat([old[i] for i in ids])
                    refs = torch.cat([ref[i] for i in ids]) if self.ref is not None else None
                    stats = self._micro_step(batch, ids, olds, refs, n_tok, n_seq)
                    for k in acc:
                        acc[k] += stats.get(k, 0.0)
                    if epoch == 0 and pi == 0:
                        first_ratio_dev = max(first_ratio_dev or 0.0, stats["max_ratio_dev"])
                grad_norms.append(self.optimizer_step())
        tokens = self.dist.sum(acc["tokens"]) or 1.0
        passes = g.ppo_epochs
        return {
            "loss": self.dist.sum(acc["loss"]) / passes / max(1, g.mini_batches),
            "entropy": batch.stats["sampling_entropy"] if temp == 1.0
            else self.dist.sum(ent_sum) / max(1.0, self.dist.sum(ent_n)),
            "clip_frac_low": self.dist.sum(acc["clip_low"]) / tokens,
            "clip_frac_high": self.dist.sum(acc["clip_high"]) / tokens,
            "ratio_dev": self.dist.sum(acc["ratio_dev"]) / tokens,
            "first_minibatch_max_ratio_dev": first_ratio_dev,
            "kl_ref": self.dist.sum(acc["kl_ref"]) / tokens if self.ref is not None else None,
            "kl_old": self.dist.sum(acc["kl_old"]) / tokens,
            "cov_selected_tokens": self.dist.sum(acc["cov_selected"]),
            "trained_rows": self.dist.sum(len(trained)) / max(1.0, self.dist.sum(n_rows)),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.sched.get_last_lr()[0],
        }

    def _micro_step(self, batch: Batch, ids: list[int], old_flat, ref_flat, n_tok: float, n_seq: float) -> dict:
        r, g = self.r, self.r.grpo
        seqs = [batch.seqs[i] for i in ids]
        want_ent = g.entropy_coef != 0
        logp_flat, ent_flat, pb = self.forward_logps(self.model, seqs, r.rollout.temperature, want_ent)
        if old_flat is None:  # see train_on: the old log-probs come from this very forward
            old_flat = logp_flat.detach()
        B, W = len(seqs), max(len(c) for _, c in seqs)
        logp = to_padded(logp_flat, pb, B, W)
        old = to_padded(old_flat, pb, B, W)
        mask = to_padded(torch.ones_like(logp_flat), pb, B, W)
        mask = mask * torch.tensor([float(batch.loss_mask[i]) for i in ids], device=mask.device).unsqueeze(-1)
        adv = torch.tensor([batch.advantages[i] for i in ids], dtype=torch.float32, device=logp.device)
        loss_tok, ratio, low, high = grpo.clipped_policy_loss(logp, old, adv, g.epsilon, g.epsilon_high)
        selected = 0.0
        if g.clip_cov.enabled or g.kl_cov.enabled:
            cov = grpo.token_covariance(adv, logp, mask)
            if g.clip_cov.enabled:
                cg = torch.Generator().manual_seed(self.next_seed())
                keep = grpo.clip_cov_mask(cov, mask, g.clip_cov.ratio, g.clip_cov.lower, g.clip_cov.upper, cg)
                loss_tok = loss_tok * keep
                selected = float(((1 - keep) * mask).sum())
            else:
                sel = grpo.kl_cov_mask(cov, mask, g.kl_cov.ratio)
                plain = -(ratio * adv.unsqueeze(-1))  # KL-Cov replaces clipping by the penalty (Cui et al.)
                loss_tok = plain + sel * g.kl_cov.coef * (logp - old).abs()
                selected = float(sel.sum())
        kl_ref = None
        if ref_flat is not None:
            kl = grpo.kl_estimate(logp, to_padded(ref_flat, pb, B, W), g.kl_estimator)
            loss_tok = loss_tok + g.beta * kl
            kl_ref = float((kl.detach() * mask).sum())
        if want_ent:
            loss_tok = loss_tok - g.entropy_coef * to_padded(ent_flat, pb, B, W)
        loss = grpo.aggregate(loss_tok, mask, g.loss_aggregation, n_tok, n_seq, r.rollout.max_new_tokens)
        T.check_finite_loss(float(loss.detach()), self.step)
        loss.backward()
        with torch.no_grad():
            dev = ((ratio - 1).abs() * mask)
            kl_old = grpo.kl_estimate(logp.detach(), old, "k3") * mask
        return {"loss": float(loss.detach()), "tokens": float(mask.sum()),
                "clip_low": float((low * mask).sum()), "clip_high": float((high * mask).sum()),
                "ratio_dev": float(dev.sum()), "max_ratio_dev": float(dev.max()) if dev.numel() else 0.0,
                "kl_ref": kl_ref or 0.0, "kl_old": float(kl_old.sum()), "cov_selected": selected}



def run_rl(recipe: RLRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
           restart: bool = False) -> dict:
    return RLRunner(recipe, checkpoint, progress, resume, restart).execute()
