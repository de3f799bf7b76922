"""`tsopsd rl`: continued GRPO (with the DAPO-family options) on a checkpoint.

Each step: draw `train.prompts_per_step` prompts, sample `num_generations` completions each from the current
policy at the rollout temperature, reward them with the grader, compute group advantages, then take
`ppo_epochs` x `mini_batches` optimiser steps on the clipped surrogate (core.grpo). Old log-probs are computed
teacher-forced at the sampling temperature with the same micro-batches as training, so the importance ratio is
exactly 1 on the first mini-batch. The loss is computed from hidden states in chunks over the vocabulary
(core.chunked): no [batch, length, vocab] logits.

Choices where the published variants differ (recipe options; core/grpo.py lists them): the entropy bonus is the
entropy of the sampling distribution softmax(logits / rollout.temperature) (as verl computes it), while the
logged `entropy` is always at temperature 1 (comparable across rollout temperatures); Clip-Cov/KL-Cov select
their tokens over the whole optimisation mini-batch, across processes, from the rollout policy's log-probs.

The entropy thermostat (`thermostat`, off by default; training/thermostat.py decides): when the running mean of the
rollout entropy falls below its threshold, the run switches to TS-OPSD steps (training.distill, the step `tsopsd
reheat` takes) towards a frozen snapshot of the current policy / temp, until the entropy recovers, then resumes
GRPO. Every row of metrics.jsonl says which kind of step it was (`phase`: grpo | reheat).

Setup, checkpoints, resume, signals, the non-finite guard and several processes come from training.trainer.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import torch

from tsopsd_cli.core import grpo
from tsopsd_cli.core.chunked import token_logps
from tsopsd_cli.engines import encode_prompts, sampling_params
from tsopsd_cli.errors import RecipeError
from tsopsd_cli.parallel import dcp, sharding
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import RLRecipe
from tsopsd_cli.training.distill import distill_step
from tsopsd_cli.training.thermostat import Thermostat
from tsopsd_cli.training.trainer import TrainingRun, row_seed
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
    engine_logps: list = field(default_factory=list)  # per row: the rollout engine's log-probs (vllm), or None
    stats: dict = field(default_factory=dict)


def to_padded(flat: torch.Tensor, batch, num_seqs: int, width: int) -> torch.Tensor:
    """Per-token values [N] -> [B, T] (zeros elsewhere)."""
    out = flat.new_zeros((num_seqs, width))
    out[batch.rows.to(flat.device), batch.completion_pos.to(flat.device)] = flat
    return out


# ---------------------------------------------------------------------------------------------------- runner
class RLRunner(TrainingRun):
    command = "rl"
    needs_answers = True
    plot_keys = [("entropy", "token entropy (nats)"), ("reward", "reward")]
    progress_info = ("reward", "entropy")
    snapshot = None  # the thermostat's teacher: the policy frozen at the start of a reheat phase

    def setup_method(self) -> None:
        self.reward_fn = load_reward(self.r.grpo.reward)
        self.ref = self.frozen(self.checkpoint) if self.r.grpo.beta > 0 else None
        self.thermostat = Thermostat(self.r.thermostat)
        self.grader = Grader(workers=self.r.grpo.grader_workers, timeout=self.r.grpo.grader_timeout)

    def close(self) -> None:
        if hasattr(self, "grader"):
            self.grader.close()

    def train_step(self) -> dict:
        if self.thermostat.reheating:
            return self.reheat_step()
        t0 = time.perf_counter()
        batch = self.rollout()
        t1 = time.perf_counter()
        metrics = self.train_on(batch) if self.dist.sum(len(batch.seqs)) else {}
        t2 = time.perf_counter()
        row = {"phase": "grpo", **batch.stats, **metrics, "rollout_seconds": t1 - t0, "train_seconds": t2 - t1,
               "tokens_per_s": batch.stats["tokens"] / max(t2 - t0, 1e-9)}
        if self.thermostat.after_grpo_step(self.step + 1, row.get("entropy")):
            self.take_snapshot()
            self.progress.log(f"thermostat: rollout entropy {self.thermostat.state['phases'][-1]['entropy_before']:.4f}"
                              f" below {self.thermostat.threshold():.4f}: reheating from step {self.step + 2}")
        return row

    # ---------------------------------------------------------------- the entropy thermostat
    def take_snapshot(self) -> None:
        """The reheat phase's teacher: the current policy, frozen (created once, refilled at every phase)."""
        if self.snapshot is None:
            self.snapshot = self.frozen(self.checkpoint)
        sharding.copy_weights(self.snapshot, self.model)

    def reheat_step(self) -> dict:
        """One TS-OPSD step of a thermostat phase: the step `tsopsd reheat` takes, towards the snapshot / temp."""
        t0 = time.perf_counter()
        seqs, comps, engine_lps = self.on_policy_rollout()
        t1 = time.perf_counter()
        row = {"phase": "reheat", **distill_step(self.policy, self.snapshot, self.snapshot, seqs, comps,
                                                 engine_lps, self.r.thermostat, t0, t1)}
        row["entropy"] = row["student_entropy"]  # the entropy curve goes on through the phase
        if self.thermostat.after_reheat_step(self.step + 1, row["student_entropy"], row["teacher_entropy"]):
            self.progress.log(f"thermostat: phase over after {self.thermostat.state['phases'][-1]['steps']} steps "
                              f"(student entropy {row['student_entropy']:.4f}); GRPO again")
        return row

    def method_state(self) -> dict:
        return {"thermostat": self.thermostat.state}

    def load_method_state(self, state: dict, checkpoint_dir) -> None:
        if "thermostat" in state:
            self.thermostat = Thermostat(self.r.thermostat, state["thermostat"])
        if self.thermostat.reheating:  # stopped inside a phase: its teacher comes back from the checkpoint
            self.snapshot = self.frozen(self.checkpoint)
            dcp.load_model(checkpoint_dir / "snapshot", self.snapshot)

    def extra_models(self) -> dict:
        return {"snapshot": self.snapshot} if self.thermostat.reheating else {}

    def phases(self) -> list[tuple[int, int]]:
        return self.thermostat.spans()

    def report_extra(self) -> dict:
        steps = [h for h in self.history if "reward" in h]
        first, last = (steps[0], steps[-1]) if steps else ({}, {})
        ratio = first["entropy"] / last["entropy"] if steps and first.get("entropy") and last.get("entropy") else None
        out = {"entropy": {"first": first.get("entropy"), "last": last.get("entropy"), "ratio": ratio},
               "reward": {"first": first.get("reward"), "last": last.get("reward")}}
        if self.r.thermostat.enabled:
            out["thermostat"] = self.thermostat.report()
        return out

    # ---------------------------------------------------------------- rollouts
    def rewards(self, comps, problems: list[Problem]) -> list[float]:
        if self.reward_fn is not None:
            return [float(x) for x in self.reward_fn([c.text for c in comps], [p.answer for p in problems])]
        grades = self.grader.grade_many([(c.text, p.answer or "") for c, p in zip(comps, problems)])
        return [1.0 if g.correct else 0.0 for g in grades]

    def sample_groups(self, step_seed: int, round_: int, taken: list[tuple[int, Problem]]) -> list[Group]:
        mine = taken[self.dist.rank::self.dist.world]
        if not mine:
            return []
        params = sampling_params(self.r.rollout,
                                 row_seeds=tuple(row_seed(step_seed * 31 + round_, pos) for pos, _ in mine))
        comps = self.generate(self.engine, encode_prompts(self.tok, [p.prompt for _, p in mine]), params)
        rewards = self.rewards(comps, [mine[c.prompt_index][1] for c in comps])
        n = self.r.rollout.num_generations
        return [Group(problem=p, position=pos, completions=comps[i * n:(i + 1) * n], rewards=rewards[i * n:(i + 1) * n])
                for i, (pos, p) in enumerate(mine)]

    def rollout(self) -> Batch:
        g = self.r.grpo
        step_seed = self.next_seed()
        need = self.r.train.prompts_per_step
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
        self.check_rollout([c for x in groups for c in x.completions])
        self.rollouts_done()
        if g.dynamic_sampling:
            groups = groups[:need // self.dist.world]
        batch = Batch(groups=groups)
        all_rewards = [x.rewards for x in groups]
        rewards = torch.tensor(all_rewards, dtype=torch.float64) if groups else torch.zeros((0, 1))
        batch_std = None
        if g.scale_rewards == "batch" and self.dist.world > 1:
            flat_all = [v for part in self.dist.gather_objects(all_rewards) for grp in part for v in grp]
            batch_std = float(torch.tensor(flat_all, dtype=torch.float64).std()) if len(flat_all) > 1 else 0.0
        adv = grpo.group_advantages(rewards, g.scale_rewards, batch_std=batch_std) if groups else rewards
        for gi, grp in enumerate(groups):
            own = self.engine_logps(grp.completions)  # None when the engine samples from the trainer's weights
            for ci, c in enumerate(grp.completions):
                batch.seqs.append((c.prompt_ids, c.token_ids))
                batch.advantages.append(float(adv[gi, ci]))
                batch.loss_mask.append(not (g.mask_truncated and c.finish_reason == "length"))
                batch.engine_logps.append(own[ci] if own is not None else None)
        comps = [c for grp in groups for c in grp.completions]
        # the engine's exact per-token entropies (hf); vLLM gives none: there the negative log-prob of the sampled
        # token, whose mean estimates the entropy without bias (noisier)
        ents = [e for c in comps for e in (c.entropies if c.entropies is not None else [-lp for lp in c.logprobs])]
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

    def covariance_selection(self, batch: Batch, part: list[int], old: list) -> dict[int, torch.Tensor]:
        """Clip-Cov / KL-Cov token selection over the whole mini-batch (every process's share of it): for each
        of this process's rows with a loss, a bool tensor over its tokens."""
        g = self.r.grpo
        rows = [i for i in part if batch.loss_mask[i]]
        adv = torch.cat([torch.full((len(batch.seqs[i][1]),), batch.advantages[i], dtype=torch.float64)
                         for i in rows]) if rows else torch.zeros(0, dtype=torch.float64)
        lp = torch.cat([old[i].detach().double().cpu() for i in rows]) if rows else torch.zeros(0, dtype=torch.float64)
        parts = self.dist.gather_objects((adv, lp))
        cov = grpo.token_covariance(torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]))
        if g.clip_cov.enabled:
            cg = torch.Generator().manual_seed(self.next_seed())
            sel = grpo.clip_cov_select(cov, g.clip_cov.ratio, g.clip_cov.lower, g.clip_cov.upper, cg)
        else:
            sel = grpo.kl_cov_select(cov, g.kl_cov.ratio)
        start = sum(len(a) for a, _ in parts[:self.dist.rank])
        mine = sel[start:start + len(adv)]
        return dict(zip(rows, mine.split([len(batch.seqs[i][1]) for i in rows]))) if rows else {}

    def train_on(self, batch: Batch) -> dict:
        r, g = self.r, self.r.grpo
        temp = r.rollout.temperature
        cov_on = g.clip_cov.enabled or g.kl_cov.enabled
        self.model.train()
        order_gen = torch.Generator().manual_seed(self.next_seed())
        plans = [self.plan(batch, 0, order_gen)]
        n_rows = len(batch.seqs)
        old: list = [None] * n_rows  # per-row old log-probs [len]; None: taken from the training forward
        ref: list = [None] * n_rows
        # One update per rollout batch and nothing else to look at: the old log-probs are the current ones, so the
        # training forward provides them (detached) and the separate no-grad pass is skipped.
        single = g.ppo_epochs == 1 and g.mini_batches == 1 and self.ref is None and temp == 1.0 and not cov_on
        # Token entropy at temperature 1 over every rollout token: at rollout temperature 1 it is the engine's
        # (exact, computed while sampling); otherwise the no-grad pass below provides it.
        ent_sum, ent_n = 0.0, 0
        diff_sum, diff_n = 0.0, 0  # |log p_engine - log p_trainer| over the trained tokens
        trained = {i for _, micro in plans[0] for ids in micro for i in ids}
        with torch.no_grad():
            passes = [] if single else [ids for _, micro in plans[0] for ids in micro]
            if temp != 1.0:
                rest = [i for i in range(n_rows) if i not in trained]
                passes += [rest[k:k + r.train.micro_batch_size] for k in range(0, len(rest), r.train.micro_batch_size)]
            for k in range(self.passes(len(passes))):
                ids = passes[k] if k < len(passes) else []
                seqs = [batch.seqs[i] for i in ids] or [self.dummy_seq()]
                hidden, weight, pb = self.hidden(self.model, seqs)  # one forward: old log-probs and entropy
                rf = self.forward_logps(self.ref, seqs, temp, False)[0] if self.ref is not None else None
                if not ids:
                    continue
                chunk = r.train.chunk_size
                if temp != 1.0:
                    e = token_logps(hidden, weight, pb.targets, 1.0, chunk, True)[1]
                    ent_sum, ent_n = ent_sum + float(e.double().sum()), ent_n + e.numel()
                if ids[0] in trained:
                    bounds = [len(batch.seqs[i][1]) for i in ids]
                    lp = token_logps(hidden, weight, pb.targets, temp, chunk)[0]
                    for i, piece in zip(ids, lp.split(bounds)):
                        old[i] = piece
                        if batch.engine_logps[i] is not None:
                            eng = torch.tensor(batch.engine_logps[i], dtype=torch.float64)
                            diff_sum += float((piece.detach().double().cpu() - eng).abs().sum())
                            diff_n += len(eng)
                    for i, piece in zip(ids, rf.split(bounds) if rf is not None else [None] * len(ids)):
                        ref[i] = piece
            if self.ref is not None:
                sharding.reshard(self.ref)
        acc = {k: 0.0 for k in ("loss", "tokens", "clip_low", "clip_high", "ratio_dev", "kl_ref", "kl_old",
                                "cov_selected", "engine_diff", "engine_tokens", "tis_capped")}
        first_ratio_dev = None
        grad_norms = []
        for epoch in range(g.ppo_epochs):
            plan = plans[0] if epoch == 0 else self.plan(batch, epoch, order_gen)
            for pi, (part, micro) in enumerate(plan):
                counts = {"tokens": self.dist.sum(sum(len(batch.seqs[i][1]) for i in part if batch.loss_mask[i])),
                          "seqs": self.dist.sum(sum(1 for i in part if batch.loss_mask[i])),
                          "rows": self.dist.sum(len(part))}
                selection = self.covariance_selection(batch, part, old) if cov_on else {}
                self.opt.zero_grad(set_to_none=True)
                for k in range(self.passes(len(micro))):
                    ids = micro[k] if k < len(micro) else []
                    olds = None if single or not ids else torch.cat([old[i] for i in ids])
                    refs = torch.cat([ref[i] for i in ids]) if self.ref is not None and ids else None
                    stats = self._micro_step(batch, ids, olds, refs, counts, selection)
                    for key in acc:
                        acc[key] += stats.get(key, 0.0)
                    if epoch == 0 and pi == 0:
                        first_ratio_dev = max(first_ratio_dev or 0.0, stats["max_ratio_dev"])
                grad_norms.append(self.optimizer_step())
        tokens = self.dist.sum(acc["tokens"]) or 1.0
        diff_sum, diff_n = self.dist.sum(diff_sum + acc["engine_diff"]), self.dist.sum(diff_n + acc["engine_tokens"])
        other_engine = not self.engine.samples_from_trainer_weights
        return {
            "engine_logprob_diff": diff_sum / diff_n if other_engine and diff_n else None,
            "tis_capped_fraction": self.dist.sum(acc["tis_capped"]) / tokens if g.tis_cap and other_engine else None,
            "loss": self.dist.sum(acc["loss"]) / g.ppo_epochs / max(1, g.mini_batches),
            "entropy": batch.stats["sampling_entropy"] if temp == 1.0
            else self.dist.sum(ent_sum) / max(1.0, self.dist.sum(ent_n)),
            "clip_frac_low": self.dist.sum(acc["clip_low"]) / tokens,
            "clip_frac_high": self.dist.sum(acc["clip_high"]) / tokens,
            "ratio_dev": self.dist.sum(acc["ratio_dev"]) / tokens,
            "first_minibatch_max_ratio_dev": self.dist.max(first_ratio_dev or 0.0),
            "kl_ref": self.dist.sum(acc["kl_ref"]) / tokens if self.ref is not None else None,
            "kl_old": self.dist.sum(acc["kl_old"]) / tokens,
            "cov_selected_tokens": self.dist.sum(acc["cov_selected"]),
            "trained_rows": self.dist.sum(len(trained)) / max(1.0, self.dist.sum(n_rows)),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.sched.get_last_lr()[0],
        }

    def _micro_step(self, batch: Batch, ids: list[int], old_flat, ref_flat, counts: dict, selection: dict) -> dict:
        """Forward, loss and backward of one micro-batch; `ids` empty: a padding pass (FSDP), loss x 0."""
        r, g = self.r, self.r.grpo
        seqs = [batch.seqs[i] for i in ids] or [self.dummy_seq()]
        want_ent = g.entropy_coef != 0
        logp_flat, ent_flat, pb = self.forward_logps(self.model, seqs, r.rollout.temperature, want_ent)
        if not ids:
            (logp_flat.sum() * 0.0).backward()
            return {"max_ratio_dev": 0.0}
        engine_diff = engine_tokens = 0.0
        engine = [batch.engine_logps[i] for i in ids]
        engine_flat = (torch.tensor([x for e in engine for x in e], dtype=logp_flat.dtype, device=logp_flat.device)
                       if engine[0] is not None else None)
        if old_flat is None:  # see train_on: the old log-probs come from this very forward
            old_flat = logp_flat.detach()
            if engine_flat is not None:
                engine_diff = float((old_flat - engine_flat).abs().sum())
                engine_tokens = float(engine_flat.numel())
        B, W = len(seqs), max(len(c) for _, c in seqs)
        logp = to_padded(logp_flat, pb, B, W)
        old = to_padded(old_flat, pb, B, W)
        mask = to_padded(torch.ones_like(logp_flat), pb, B, W)
        mask = mask * torch.tensor([float(batch.loss_mask[i]) for i in ids], device=mask.device).unsqueeze(-1)
        adv = torch.tensor([batch.advantages[i] for i in ids], dtype=torch.float32, device=logp.device)
        loss_tok, ratio, low, high = grpo.clipped_policy_loss(logp, old, adv, g.epsilon, g.epsilon_high)
        tis_capped = 0.0
        if g.tis_cap is not None and engine_flat is not None:
            w_flat = (old_flat - engine_flat).exp()  # pi_trainer(old) / pi_engine, per token
            w = to_padded(w_flat.clamp(max=g.tis_cap), pb, B, W)
            tis_capped = float((to_padded((w_flat > g.tis_cap).to(w.dtype), pb, B, W) * mask).sum())
            loss_tok = loss_tok * w
        selected = 0.0
        if selection:
            empty = torch.zeros(0, dtype=torch.bool)
            sel_flat = torch.cat([selection.get(i, torch.zeros(len(batch.seqs[i][1]), dtype=torch.bool))
                                  for i in ids]) if ids else empty
            sel = to_padded(sel_flat.to(logp.device, logp.dtype), pb, B, W) * mask
            if g.clip_cov.enabled:
                loss_tok = loss_tok * (1 - sel)
            else:
                plain = -(ratio * adv.unsqueeze(-1))  # KL-Cov replaces clipping by the penalty (Cui et al.)
                loss_tok = plain + sel * g.kl_cov.coef * (logp - old).abs()
            selected = float(sel.sum())
        kl_ref = None
        if ref_flat is not None:
            ref_lp = to_padded(ref_flat, pb, B, W)
            loss_tok = loss_tok + g.beta * grpo.kl_penalty(logp, ref_lp, g.kl_estimator)
            kl_ref = float((grpo.kl_penalty(logp.detach(), ref_lp, "k3") * mask).sum())
        if want_ent:
            loss_tok = loss_tok - g.entropy_coef * to_padded(ent_flat, pb, B, W)
        loss = grpo.aggregate(loss_tok, mask, g.loss_aggregation, counts["tokens"], counts["seqs"], counts["rows"],
                              r.rollout.max_new_tokens)
        loss = self.guard_loss(loss)  # decided on every process together, before the update
        loss.backward()
        with torch.no_grad():
            dev = ((ratio - 1).abs() * mask)
            kl_old = grpo.kl_penalty(logp.detach(), old, "k3") * mask
        return {"loss": float(loss.detach()), "tokens": float(mask.sum()),
                "clip_low": float((low * mask).sum()), "clip_high": float((high * mask).sum()),
                "ratio_dev": float(dev.sum()), "max_ratio_dev": float(dev.max()) if dev.numel() else 0.0,
                "kl_ref": kl_ref or 0.0, "kl_old": float(kl_old.sum()), "cov_selected": selected,
                "engine_diff": engine_diff, "engine_tokens": engine_tokens, "tis_capped": tis_capped}


def run_rl(recipe: RLRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
           restart: bool = False) -> dict:
    return RLRunner(recipe, checkpoint, progress, resume, restart).execute()
