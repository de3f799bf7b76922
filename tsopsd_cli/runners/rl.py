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
their tokens over the whole optimisation mini-batch, across processes, from the rollout policy's log-probs; the
high-entropy tokens of `top_entropy_quantile` are chosen over the whole step, across processes, from the rollout
policy's entropies at the sampling temperature (the old-log-prob pass, which then runs even when one update per
rollout batch would let the training forward give the old log-probs); adaptive entropy control
(`entropy_target`) moves the bonus's coefficient after every GRPO step from the step's rollout entropy at the
sampling temperature, and the coefficient is part of the run's saved state.

The entropy thermostat (`thermostat`, off by default; training/thermostat.py decides): when the running mean of the
rollout entropy falls below its threshold, the run switches to TS-OPSD steps (training.distill, the step `tsopsd
reheat` takes) towards a frozen snapshot of the current policy / temp (`thermostat.teacher: ema`: a float32 average
that starts as that snapshot and follows the student after every optimiser step of the phase, as reheat's), until
the entropy recovers, then resumes GRPO. Every row of metrics.jsonl says which kind of step it was (`phase`: grpo |
reheat).

A GRPO step in this file: `rollout` (groups, rewards, advantages) -> `train_on`: `old_logprobs_pass` (the no-grad
pass: old and reference log-probs, the engine gap, the entropy at temperature 1 and at the sampling temperature)
-> `high_entropy_selection` (top_entropy_quantile < 1) -> `epoch_loop` (one `minibatch_update` per mini-batch: its
token selection, then `_micro_step` per micro-batch, whose loss terms each have a name: the clipped surrogate,
`tis_weighted`, `covariance_applied`, `high_entropy_only`, `kl_to_reference`, the entropy bonus) -> `step_metrics`.

Setup, signals, the non-finite guard and several processes come from training.trainer; checkpoints and resume
from training.checkpointing.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from tsopsd_cli.core import grpo
from tsopsd_cli.core.chunked import token_logps
from tsopsd_cli.engines import encode_prompts, sampling_params
from tsopsd_cli.errors import RecipeError, UserCodeError
from tsopsd_cli.modeling import PackedBatch
from tsopsd_cli.parallel import dcp, sharding
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import RLRecipe
from tsopsd_cli.training.distill import distill_step
from tsopsd_cli.training.thermostat import Thermostat
from tsopsd_cli.training.trainer import TrainingRun, row_seed
from tsopsd_cli.tasks.base import Problem
from tsopsd_cli.tasks.grading import Grader


def load_reward(spec: str):
    """The reward function: 'math' (grader) or 'module:function(completions, answers) -> list[float]'. A module
    or function that is not there is bad input (exit 2); a module that fails while it is imported is the user's
    code failing (exit 7)."""
    if spec == "math":
        return None
    mod, _, fn = spec.partition(":")
    bad = RecipeError(f"grpo.reward: cannot import {spec!r} (expected 'math' or 'module:function')")
    if not mod or mod.startswith(".") or not fn:
        raise bad
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod == e.name or mod.startswith(e.name + ".")):
            raise bad from None  # the module the recipe names is not there
        raise UserCodeError(f"grpo.reward ({spec}): importing {mod} failed: {e}") from None
    except Exception as e:  # noqa: BLE001 - the user's module raised while it was imported
        raise UserCodeError(f"grpo.reward ({spec}): importing {mod} raised {type(e).__name__}: "
                            f"{_first_line(e)}") from None
    reward = getattr(module, fn, None)
    if not callable(reward):
        raise RecipeError(f"grpo.reward: {mod} has no function {fn!r} (expected 'math' or 'module:function')")
    return reward


def checked_rewards(spec: str, call: Callable[[], object], n: int, step: int, kept: str) -> list[float]:
    """The user's reward function's values for `n` completions, or UserCodeError (exit 7) naming grpo.reward when
    it raises or returns anything but `n` finite numbers (a wrong length used to shift every reward silently)."""
    where = f"grpo.reward ({spec}) at step {step}"
    then = f"; {kept}: fix it, then run the same command with --resume"
    try:
        values = call()
    except Exception as e:  # noqa: BLE001 - the user's code: any exception
        raise UserCodeError(f"{where} raised {type(e).__name__}: {_first_line(e)}{then}") from None
    try:
        values = list(values)
    except TypeError:
        raise UserCodeError(f"{where} returned {type(values).__name__}, not a list of numbers{then}") from None
    if len(values) != n:
        raise UserCodeError(f"{where} returned {len(values)} values for {n} completions{then}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes)) or not hasattr(v, "__float__"):  # (a bool counts as 0 or 1)
            raise UserCodeError(f"{where}: value {i} ({v!r}) is not a number{then}")
        out.append(float(v))
        if not math.isfinite(out[-1]):
            raise UserCodeError(f"{where}: value {i} is non-finite ({out[-1]}){then}")
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "(no message)"


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


# ------------------------------------------------------------------------------------------------- the updates
@dataclass
class OldPass:
    """What the no-grad pass before a step's updates gives, for this process's rows (RLRunner.old_logprobs_pass)."""

    old: list  # per row: the old log-probs [len] at the rollout temperature; None: from the training forward
    ref: list  # per row: the reference model's log-probs [len]; None without a reference
    trained: set[int]  # the rows that take part in the updates (the others only count in the normalisers)
    # per row with a loss: its tokens' entropy at the rollout temperature [len] (top_entropy_quantile < 1), else None
    token_entropy: list = field(default_factory=list)
    entropy_sum: float = 0.0  # token entropy at temperature 1 over every rollout token (rollout temperature != 1)
    entropy_tokens: int = 0
    engine_diff: float = 0.0  # sum of |log p_engine - log p_trainer| over the trained tokens
    engine_tokens: int = 0

    def note_engine_gap(self, old: torch.Tensor, engine: list[float] | None) -> None:
        """Add one row's gap between the trainer's old log-probs [len] and the engine's (None: the engine samples
        from the trainer's weights)."""
        if engine is not None:
            eng = torch.tensor(engine, dtype=torch.float64)
            self.engine_diff += float((old.detach().double().cpu() - eng).abs().sum())
            self.engine_tokens += len(eng)


@dataclass
class HighEntropyTokens:
    """Which tokens of this process's rows the policy loss keeps (grpo.top_entropy_quantile < 1)."""

    keep: dict[int, torch.Tensor]  # per row with a loss: bool [len]
    fraction: float | None  # the share of the step's loss tokens kept (every process's); None: no loss tokens


MICRO_SUMS = ("loss", "tokens", "clip_low", "clip_high", "ratio_dev", "kl_ref", "kl_old", "cov_selected",
              "engine_diff", "engine_tokens", "tis_capped")  # what each micro-batch adds up (RLRunner._micro_step)


@dataclass
class UpdateSums:
    """Sums over the micro-batches of a step's updates (this process), for the step's metrics."""

    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(MICRO_SUMS, 0.0))
    first_max_ratio_dev: float | None = None  # the largest |ratio - 1| of the first mini-batch (exactly 0 expected)
    grad_norms: list[float] = field(default_factory=list)  # one per optimiser step

    def add(self, micro: dict, first: bool) -> None:
        """One micro-batch's sums (a padding pass has none); `first`: it belongs to the first mini-batch."""
        for key in self.sums:
            self.sums[key] += micro.get(key, 0.0)
        if first:
            self.first_max_ratio_dev = max(self.first_max_ratio_dev or 0.0, micro["max_ratio_dev"])


@dataclass
class MicroBatch:
    """One micro-batch of trained rows, its per-token values padded to [B, W] (zeros past each completion)."""

    ids: list[int]  # its rows in the Batch
    lengths: list[int]  # their completion lengths
    pb: PackedBatch  # the forward's packing (where each completion token sits)
    logp: torch.Tensor  # [B, W] the policy's log-probs at the rollout temperature (differentiable)
    old: torch.Tensor  # [B, W] the old log-probs
    mask: torch.Tensor  # [B, W] 1 on the completion tokens of rows with a loss, else 0
    adv: torch.Tensor  # [B] advantages (float32)

    @classmethod
    def padded(cls, batch: Batch, ids: list[int], pb, logp_flat: torch.Tensor,
               old_flat: torch.Tensor) -> MicroBatch:
        """From the forward's flat values [N] of rows `ids` of `batch`."""
        lengths = [len(batch.seqs[i][1]) for i in ids]
        B, W = len(ids), max(lengths)
        logp = to_padded(logp_flat, pb, B, W)
        rows_with_loss = torch.tensor([float(batch.loss_mask[i]) for i in ids], device=logp.device)
        mask = to_padded(torch.ones_like(logp_flat), pb, B, W) * rows_with_loss.unsqueeze(-1)
        adv = torch.tensor([batch.advantages[i] for i in ids], dtype=torch.float32, device=logp.device)
        return cls(ids, lengths, pb, logp, to_padded(old_flat, pb, B, W), mask, adv)

    def pad(self, flat: torch.Tensor) -> torch.Tensor:
        """Per-token values [N] -> [B, W]."""
        return to_padded(flat, self.pb, len(self.ids), max(self.lengths))


# ---------------------------------------------------------------------------------------------------- runner
class RLRunner(TrainingRun):
    command = "rl"
    needs_answers = True
    plot_keys = [("entropy", "token entropy (nats)"), ("reward", "reward")]
    progress_info = ("reward", "entropy")

    def __init__(self, recipe: RLRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
                 restart: bool = False):
        super().__init__(recipe, checkpoint, progress, resume, restart)
        # made by setup_method (None before)
        self.reward_fn: Callable[[list[str], list], list[float]] | None = None  # None: the math grader
        self.ref: torch.nn.Module | None = None  # the frozen reference of the KL term (None: grpo.beta = 0)
        self.thermostat: Thermostat | None = None  # its state is saved with every checkpoint (method_state)
        self.grader: Grader | None = None
        # the thermostat's teacher: the policy frozen at the start of a reheat phase (made at the first phase)
        self.snapshot: torch.nn.Module | None = None
        # thermostat.teacher: ema, the phase's teacher: the snapshot, then following the student (made with it)
        self.ema: torch.nn.Module | None = None
        # the entropy bonus's coefficient now: grpo.entropy_coef, moved after every GRPO step by adaptive entropy
        # control (grpo.entropy_target); saved with every checkpoint (method_state)
        self.entropy_coef: float = recipe.grpo.entropy_coef

    def setup_method(self) -> None:
        self.reward_fn = load_reward(self.r.grpo.reward)
        self.ref = self.frozen(self.checkpoint) if self.r.grpo.beta > 0 else None
        self.thermostat = Thermostat(self.r.thermostat)
        self.grader = Grader(workers=self.r.grpo.grader_workers, timeout=self.r.grpo.grader_timeout)

    def close(self) -> None:
        if self.grader is not None:
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
        self.adapt_entropy_coef(row)
        if self.thermostat.after_grpo_step(self.state.step + 1, row.get("entropy")):
            self.take_snapshot()
            self.progress.log(f"thermostat: rollout entropy {self.thermostat.state['phases'][-1]['entropy_before']:.4f}"
                              f" below {self.thermostat.threshold():.4f}: reheating from step {self.state.step + 2}")
        return row

    def adapt_entropy_coef(self, row: dict) -> None:
        """Adaptive entropy control (grpo.entropy_target): log the coefficient this step applied, then move it for
        the next step by the step's mean rollout token entropy at the sampling temperature (core.grpo)."""
        g = self.r.grpo
        if g.entropy_target is None:
            return
        row["entropy_coef"] = self.entropy_coef
        self.entropy_coef = grpo.adaptive_entropy_coef(self.entropy_coef, row.get("sampling_entropy"),
                                                       g.entropy_target, g.entropy_coef_step, g.entropy_coef_max)

    # ---------------------------------------------------------------- the entropy thermostat
    def take_snapshot(self) -> None:
        """The reheat phase's teacher: the current policy, frozen (created once, refilled at every phase); with
        thermostat.teacher ema also the float32 average that starts as it."""
        if self.snapshot is None:
            self.snapshot = self.frozen(self.checkpoint)
        sharding.copy_weights(self.snapshot, self.model)
        if self.r.thermostat.teacher == "ema":
            if self.ema is None:
                self.ema = self.ema_teacher()
            sharding.copy_weights(self.ema, self.model)

    def reheat_step(self) -> dict:
        """One TS-OPSD step of a thermostat phase: the step `tsopsd reheat` takes, towards the snapshot / temp."""
        t0 = time.perf_counter()
        seqs, comps, engine_lps = self.on_policy_rollout()
        t1 = time.perf_counter()
        th = self.r.thermostat
        teacher = self.ema if th.teacher == "ema" else self.snapshot
        row = {"phase": "reheat", **distill_step(self.policy, teacher, self.snapshot, seqs, comps, engine_lps, th,
                                                 t0, t1)}
        if th.teacher == "ema":
            sharding.ema_update(self.ema, self.model, th.teacher_ema_decay)
        row["entropy"] = row["student_entropy"]  # the entropy curve goes on through the phase
        if self.thermostat.after_reheat_step(self.state.step + 1, row["student_entropy"], row["teacher_entropy"]):
            self.progress.log(f"thermostat: phase over after {self.thermostat.state['phases'][-1]['steps']} steps "
                              f"(student entropy {row['student_entropy']:.4f}); GRPO again")
        return row

    def method_state(self) -> dict:
        return {"thermostat": self.thermostat.state, "entropy_coef": self.entropy_coef}

    def load_method_state(self, state: dict, checkpoint_dir) -> None:
        if "thermostat" in state:
            self.thermostat = Thermostat(self.r.thermostat, state["thermostat"])
        self.entropy_coef = state.get("entropy_coef", self.entropy_coef)
        if self.thermostat.reheating:  # stopped inside a phase: its teacher comes back from the checkpoint
            self.snapshot = self.frozen(self.checkpoint)
            dcp.load_model(checkpoint_dir / "snapshot", self.snapshot)
            if self.r.thermostat.teacher == "ema":
                self.ema = self.ema_teacher()
                dcp.load_model(checkpoint_dir / "ema_teacher", self.ema)

    def extra_models(self) -> dict:
        if not self.thermostat.reheating:
            return {}
        return {"snapshot": self.snapshot, **({"ema_teacher": self.ema} if self.r.thermostat.teacher == "ema" else {})}

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
            texts, answers = [c.text for c in comps], [p.answer for p in problems]
            return checked_rewards(self.r.grpo.reward, lambda: self.reward_fn(texts, answers), len(comps),
                                   self.state.step + 1, self.kept())
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
        return g.beta == 0 and self.entropy_coef == 0 and not g.clip_cov.enabled and not g.kl_cov.enabled

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

    def old_logprobs_from_training_forward(self) -> bool:
        """One update per rollout batch and nothing else to look at: the old log-probs are the current ones, so the
        training forward provides them (detached) and the separate no-grad pass (old_logprobs_pass) is skipped.
        Not with top_entropy_quantile < 1: its selection needs every token's entropy before the first update."""
        g = self.r.grpo
        return (g.ppo_epochs == 1 and g.mini_batches == 1 and self.ref is None and self.r.rollout.temperature == 1.0
                and not (g.clip_cov.enabled or g.kl_cov.enabled) and g.top_entropy_quantile == 1.0)

    def train_on(self, batch: Batch) -> dict:
        """The step's updates on one rollout batch: the old log-prob pass, then `ppo_epochs` x `mini_batches`
        optimiser steps; returns the step's metrics."""
        self.model.train()
        order_gen = torch.Generator().manual_seed(self.next_seed())
        first_plan = self.plan(batch, 0, order_gen)
        old = self.old_logprobs_pass(batch, first_plan)
        high = self.high_entropy_selection(batch, old) if self.r.grpo.top_entropy_quantile < 1.0 else None
        totals = self.epoch_loop(batch, first_plan, order_gen, old, high)
        return self.step_metrics(batch, old, totals, high)

    def old_logprobs_pass(self, batch: Batch, plan: list) -> OldPass:
        """The no-grad pass before the updates, over the first epoch's micro-batches (the same as training, so that
        the first mini-batch's importance ratio is exactly 1): old log-probs at the rollout temperature, the
        reference's log-probs, the engine's gap on the trained rows; at a rollout temperature other than 1 also the
        token entropy at temperature 1 over every rollout token, and with top_entropy_quantile < 1 the entropy at
        the rollout temperature of every token of the rows with a loss (rows left out of training get passes of
        their own for these). At rollout temperature 1 the logged entropy is the engine's (exact, computed while
        sampling)."""
        temp, mbs = self.r.rollout.temperature, self.r.train.micro_batch_size
        high = self.r.grpo.top_entropy_quantile < 1.0
        n_rows = len(batch.seqs)
        trained = {i for _, micro in plan for ids in micro for i in ids}
        out = OldPass(old=[None] * n_rows, ref=[None] * n_rows, trained=trained, token_entropy=[None] * n_rows)
        with torch.no_grad():
            passes = [] if self.old_logprobs_from_training_forward() else [ids for _, micro in plan for ids in micro]
            rest = [i for i in range(n_rows) if i not in trained and (temp != 1.0 or (high and batch.loss_mask[i]))]
            passes += [rest[k:k + mbs] for k in range(0, len(rest), mbs)]
            for k in range(self.passes(len(passes))):
                ids = passes[k] if k < len(passes) else []
                seqs = [batch.seqs[i] for i in ids] or [self.dummy_seq()]
                hidden, weight, pb = self.hidden(self.model, seqs)  # one forward: old log-probs and entropies
                rf = self.forward_logps(self.ref, seqs, temp, False)[0] if self.ref is not None else None
                if ids:
                    self._old_pass_rows(batch, ids, hidden, weight, pb, rf, out)
            if self.ref is not None:
                sharding.reshard(self.ref)
        return out

    def _old_pass_rows(self, batch: Batch, ids: list[int], hidden, weight, pb, rf, out: OldPass) -> None:
        """What one micro-batch of the old-log-prob pass (rows `ids`, all trained or none) gives, into `out`."""
        temp, chunk = self.r.rollout.temperature, self.r.train.chunk_size
        high = self.r.grpo.top_entropy_quantile < 1.0
        bounds = [len(batch.seqs[i][1]) for i in ids]
        if temp != 1.0:
            e = token_logps(hidden, weight, pb.targets, 1.0, chunk, True)[1]
            out.entropy_sum += float(e.double().sum())
            out.entropy_tokens += e.numel()
        if ids[0] not in out.trained and not high:
            return
        lp, ent = token_logps(hidden, weight, pb.targets, temp, chunk, high)
        if high:
            for i, piece in zip(ids, ent.split(bounds)):
                out.token_entropy[i] = piece if batch.loss_mask[i] else None
        if ids[0] in out.trained:
            for i, piece in zip(ids, lp.split(bounds)):
                out.old[i] = piece
                out.note_engine_gap(piece, batch.engine_logps[i])
            for i, piece in zip(ids, rf.split(bounds) if rf is not None else [None] * len(ids)):
                out.ref[i] = piece

    def high_entropy_selection(self, batch: Batch, old: OldPass) -> HighEntropyTokens:
        """grpo.top_entropy_quantile: which tokens of this process's rows with a loss the policy loss keeps, chosen
        among every loss token of the step, every process's, by their entropy at the rollout temperature, equal
        contexts given equal entropies (core.grpo.shared_context_entropy, high_entropy_mask)."""
        rows = [i for i in range(len(batch.seqs)) if batch.loss_mask[i]]
        mine = [(list(batch.seqs[i][0]), list(batch.seqs[i][1]), old.token_entropy[i].detach().double().cpu())
                for i in rows]
        parts = self.dist.gather_objects(mine)  # every process sees every row, in rank order
        entropy = grpo.shared_context_entropy([row for part in parts for row in part])
        keep = grpo.high_entropy_mask(torch.cat(entropy) if entropy else torch.zeros(0, dtype=torch.float64),
                                      self.r.grpo.top_entropy_quantile)
        start = sum(len(c) for part in parts[:self.dist.rank] for _, c, _ in part)
        own = keep[start:start + sum(len(c) for _, c, _ in mine)].split([len(c) for _, c, _ in mine])
        return HighEntropyTokens(keep=dict(zip(rows, own)),
                                 fraction=float(keep.sum()) / keep.numel() if keep.numel() else None)

    def epoch_loop(self, batch: Batch, first_plan: list, order_gen: torch.Generator, old: OldPass,
                   high: HighEntropyTokens | None) -> UpdateSums:
        """`ppo_epochs` passes over the batch, one optimiser step per mini-batch (the first epoch in `first_plan`,
        the later ones reshuffled by `order_gen`)."""
        totals = UpdateSums()
        for epoch in range(self.r.grpo.ppo_epochs):
            plan = first_plan if epoch == 0 else self.plan(batch, epoch, order_gen)
            for pi, (part, micro) in enumerate(plan):
                self.minibatch_update(batch, part, micro, old, high, totals, first=epoch == 0 and pi == 0)
        return totals

    def minibatch_update(self, batch: Batch, part: list[int], micro: list[list[int]], old: OldPass,
                         high: HighEntropyTokens | None, totals: UpdateSums, first: bool) -> None:
        """One optimiser step on one mini-batch (`part`: all its rows; `micro`: its micro-batches of trained rows),
        its loss normalised by the whole mini-batch's counts (every process's share); `high`: the step's
        high-entropy tokens (None: every token)."""
        g = self.r.grpo
        counts = {"tokens": self.dist.sum(sum(len(batch.seqs[i][1]) for i in part if batch.loss_mask[i])),
                  "seqs": self.dist.sum(sum(1 for i in part if batch.loss_mask[i])),
                  "rows": self.dist.sum(len(part))}
        selection = self.covariance_selection(batch, part, old.old) if g.clip_cov.enabled or g.kl_cov.enabled \
            else {}
        single = self.old_logprobs_from_training_forward()
        self.opt.zero_grad(set_to_none=True)
        for k in range(self.passes(len(micro))):
            ids = micro[k] if k < len(micro) else []
            olds = None if single or not ids else torch.cat([old.old[i] for i in ids])
            refs = torch.cat([old.ref[i] for i in ids]) if self.ref is not None and ids else None
            keep = torch.cat([high.keep[i] for i in ids]) if high is not None and ids else None
            totals.add(self._micro_step(batch, ids, olds, refs, counts, selection, keep), first)
        totals.grad_norms.append(self.optimizer_step())

    def step_metrics(self, batch: Batch, old: OldPass, totals: UpdateSums, high: HighEntropyTokens | None = None
                     ) -> dict:
        """The step's metrics: every process's sums together, per token of the trained rows where not said."""
        g, acc, temp = self.r.grpo, totals.sums, self.r.rollout.temperature
        tokens = self.dist.sum(acc["tokens"]) or 1.0
        diff_sum = self.dist.sum(old.engine_diff + acc["engine_diff"])
        diff_n = self.dist.sum(old.engine_tokens + acc["engine_tokens"])
        other_engine = not self.engine.samples_from_trainer_weights
        return {
            "engine_logprob_diff": diff_sum / diff_n if other_engine and diff_n else None,
            "tis_capped_fraction": self.dist.sum(acc["tis_capped"]) / tokens if g.tis_cap and other_engine else None,
            "loss": self.dist.sum(acc["loss"]) / g.ppo_epochs / max(1, g.mini_batches),
            "entropy": batch.stats["sampling_entropy"] if temp == 1.0
            else self.dist.sum(old.entropy_sum) / max(1.0, self.dist.sum(old.entropy_tokens)),
            "clip_frac_low": self.dist.sum(acc["clip_low"]) / tokens,
            "clip_frac_high": self.dist.sum(acc["clip_high"]) / tokens,
            "ratio_dev": self.dist.sum(acc["ratio_dev"]) / tokens,
            "first_minibatch_max_ratio_dev": self.dist.max(totals.first_max_ratio_dev or 0.0),
            "kl_ref": self.dist.sum(acc["kl_ref"]) / tokens if self.ref is not None else None,
            "kl_old": self.dist.sum(acc["kl_old"]) / tokens,
            "cov_selected_tokens": self.dist.sum(acc["cov_selected"]),
            "trained_rows": self.dist.sum(len(old.trained)) / max(1.0, self.dist.sum(len(batch.seqs))),
            "grad_norm": sum(totals.grad_norms) / len(totals.grad_norms),
            "lr": self.sched.get_last_lr()[0],
            **({"loss_token_fraction": high.fraction} if high is not None else {}),
        }

    def _micro_step(self, batch: Batch, ids: list[int], old_flat, ref_flat, counts: dict, selection: dict,
                    keep_flat: torch.Tensor | None = None) -> dict:
        """Forward, loss and backward of one micro-batch; `ids` empty: a padding pass (FSDP), loss x 0. `old_flat`
        None: the old log-probs are this forward's own (old_logprobs_from_training_forward). `keep_flat`: the
        tokens the policy loss keeps (high_entropy_selection; None: all). Returns its sums."""
        r, g, coef = self.r, self.r.grpo, self.entropy_coef
        seqs = [batch.seqs[i] for i in ids] or [self.dummy_seq()]
        logp_flat, ent_flat, pb = self.forward_logps(self.model, seqs, r.rollout.temperature, coef != 0)
        if not ids:
            (logp_flat.sum() * 0.0).backward()
            return {"max_ratio_dev": 0.0}
        engine = [batch.engine_logps[i] for i in ids]
        engine_flat = (torch.tensor([x for e in engine for x in e], dtype=logp_flat.dtype, device=logp_flat.device)
                       if engine[0] is not None else None)
        sums = {"engine_diff": 0.0, "engine_tokens": 0.0}
        if old_flat is None:
            old_flat = logp_flat.detach()
            if engine_flat is not None:
                sums.update(engine_diff=float((old_flat - engine_flat).abs().sum()),
                            engine_tokens=float(engine_flat.numel()))
        m = MicroBatch.padded(batch, ids, pb, logp_flat, old_flat)
        loss_tok, ratio, low, high = grpo.clipped_policy_loss(m.logp, m.old, m.adv, g.epsilon, g.epsilon_high)
        loss_tok, sums["tis_capped"] = self.tis_weighted(loss_tok, m, old_flat, engine_flat)
        loss_tok, sums["cov_selected"] = self.covariance_applied(loss_tok, m, ratio, selection)
        loss_tok = self.high_entropy_only(loss_tok, m, keep_flat)
        loss_tok, sums["kl_ref"] = self.kl_to_reference(loss_tok, m, ref_flat)
        if coef != 0:  # the entropy bonus, at the sampling temperature
            loss_tok = loss_tok - coef * m.pad(ent_flat)
        loss = grpo.aggregate(loss_tok, m.mask, g.loss_aggregation, counts["tokens"], counts["seqs"], counts["rows"],
                              r.rollout.max_new_tokens)
        loss = self.guard_loss(loss)  # decided on every process together, before the update
        loss.backward()
        with torch.no_grad():
            dev = ((ratio - 1).abs() * m.mask)
            kl_old = grpo.kl_penalty(m.logp.detach(), m.old, "k3") * m.mask
        return {**sums, "loss": float(loss.detach()), "tokens": float(m.mask.sum()),
                "clip_low": float((low * m.mask).sum()), "clip_high": float((high * m.mask).sum()),
                "ratio_dev": float(dev.sum()), "max_ratio_dev": float(dev.max()) if dev.numel() else 0.0,
                "kl_old": float(kl_old.sum())}

    def tis_weighted(self, loss_tok: torch.Tensor, m: MicroBatch, old_flat: torch.Tensor,
                     engine_flat: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Truncated importance sampling (grpo.tis_cap, another engine only): each token's loss x
        min(pi_trainer(old) / pi_engine, cap); also the number of capped tokens."""
        cap = self.r.grpo.tis_cap
        if cap is None or engine_flat is None:
            return loss_tok, 0.0
        w_flat = (old_flat - engine_flat).exp()  # pi_trainer(old) / pi_engine, per token
        w = m.pad(w_flat.clamp(max=cap))
        capped = float((m.pad((w_flat > cap).to(w.dtype)) * m.mask).sum())
        return loss_tok * w, capped

    def covariance_applied(self, loss_tok: torch.Tensor, m: MicroBatch, ratio: torch.Tensor,
                           selection: dict) -> tuple[torch.Tensor, float]:
        """Clip-Cov (the selected tokens leave the loss) or KL-Cov (the surrogate without clipping, plus a KL
        penalty on the selected tokens, Cui et al.) from the mini-batch's token `selection`; also the number of
        selected tokens."""
        g = self.r.grpo
        if not selection:
            return loss_tok, 0.0
        sel_flat = torch.cat([selection.get(i, torch.zeros(n, dtype=torch.bool)) for i, n in zip(m.ids, m.lengths)])
        sel = m.pad(sel_flat.to(m.logp.device, m.logp.dtype)) * m.mask
        if g.clip_cov.enabled:
            loss_tok = loss_tok * (1 - sel)
        else:
            plain = -(ratio * m.adv.unsqueeze(-1))
            loss_tok = plain + sel * g.kl_cov.coef * (m.logp - m.old).abs()
        return loss_tok, float(sel.sum())

    def high_entropy_only(self, loss_tok: torch.Tensor, m: MicroBatch,
                          keep_flat: torch.Tensor | None) -> torch.Tensor:
        """grpo.top_entropy_quantile < 1: the policy loss (as the terms before shaped it) on the step's high-entropy
        tokens alone (`keep_flat` [N]); the terms added after it, the KL to the reference and the entropy bonus,
        keep every token, and the normaliser still counts every loss token (as TRL)."""
        if keep_flat is None:
            return loss_tok
        return loss_tok * m.pad(keep_flat.to(loss_tok.device, loss_tok.dtype))

    def kl_to_reference(self, loss_tok: torch.Tensor, m: MicroBatch,
                        ref_flat: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """The KL penalty towards the frozen reference (grpo.beta x grpo.kl_estimator); also the sum of its k3
        estimate (the logged kl_ref), 0 without a reference."""
        g = self.r.grpo
        if ref_flat is None:
            return loss_tok, 0.0
        ref_lp = m.pad(ref_flat)
        loss_tok = loss_tok + g.beta * grpo.kl_penalty(m.logp, ref_lp, g.kl_estimator)
        return loss_tok, float((grpo.kl_penalty(m.logp.detach(), ref_lp, "k3") * m.mask).sum())


def run_rl(recipe: RLRecipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
           restart: bool = False) -> dict:
    return RLRunner(recipe, checkpoint, progress, resume, restart).execute()
