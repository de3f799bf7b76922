"""The loop every training command shares (rl, reheat): setup -> [step -> log -> validate -> checkpoint]* ->
finish. A command subclasses `TrainingRun` once and fills in `setup_method` (its extra models and engines),
`train_step` (one step's work and metrics) and `report_extra`; everything else exists here once.

Layout of a run (tsopsd_cli.rundir): `.OUT.partial/` with `metrics.jsonl`, `recipe.yaml` and
`checkpoints/step-N/` (what one holds, how it is written and read back: tsopsd_cli.training.checkpointing). The
finished run is one ordinary Hugging Face directory, streamed from the (sharded) float32 master weights in
`output.dtype`.

Resuming reproduces the uninterrupted run: a checkpoint stores the data position and every random state, and the
log is cut back to the checkpoint's step. A signal (tsopsd_cli.signals) is acted on at the next safe point:
between steps, between generation batches (one process), during validation. The state saved then is that of the
last completed step; an interrupted validation of step N is redone first on resume.

The non-finite guard: a non-finite rollout log-prob, loss or gradient norm stops the run before the update; an
update that makes weights non-finite or changes their global norm by more than `optim.max_weight_norm_change`
stops it before anything is saved. The exit code is 3 and the last good checkpoint stays in the partial
directory. Every check is decided by all processes together (a loss is noted, then agreed on before the update),
so no process stops alone while the others wait in a collective.

Several processes also agree at start-up (the setup checks, a fingerprint of recipe, input and --out, the run
directory, the checkpoint to resume from); any other failure is posted to the others by `Dist.failing` and they
stop within seconds with the same exit code (tsopsd_cli.parallel.group).

Everything a run holds is declared once, in `TrainingRun.__init__` (what setup makes starts as None); its counters
are one `RunState` (training.checkpointing), saved with every checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tsopsd_cli import lean, signals
from tsopsd_cli.checkpoint import (Source, check_out, checkpoint_dtype, fingerprint, inspect_checkpoint,
                                   load_checkpoint, load_tokenizer, provenance, read_source, write_checkpoint)
from tsopsd_cli.core.chunked import token_logps
from tsopsd_cli.devices import release_host_memory
from tsopsd_cli.engines import check_context, context_length, encode_prompts, open_engine, sampling_params
from tsopsd_cli.engines import require as require_engine
from tsopsd_cli.errors import (CheckpointError, EnvironmentFailure, Interrupted, RecipeError,
                               TsopsdError, UsageError, WeightSyncError, storage)
from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack
from tsopsd_cli.parallel import group, reductions, sharding
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe_loading import recipe_to_yaml
from tsopsd_cli.report import json_safe, plot_curves
from tsopsd_cli.rundir import RunDir, run_key
from tsopsd_cli.training import checkpointing
from tsopsd_cli.training import optim as O
from tsopsd_cli.training.checkpointing import RunState
from tsopsd_cli.training.policy import RunPolicy
from tsopsd_cli.training.prompts import PromptStream
from tsopsd_cli.training.sink import MetricsSink
from tsopsd_cli.training.validation import Validator
from tsopsd_cli.tasks import load_problems
from tsopsd_cli.tasks.base import Problem

if TYPE_CHECKING:
    from tsopsd_cli.engines.base import Engine


class Finished(Interrupted):
    """A signal after every output was written: only the rename into place is left for --resume."""


def row_seed(step_seed: int, position: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{step_seed}:{position}".encode()).digest()[:7], "big")


def is_training_row(row: dict) -> bool:
    return "step_seconds" in row


class TrainingRun:
    command = "train"
    needs_answers = False  # every training prompt must have a gold answer (rl's rewards grade against it)
    plot_keys: list[tuple[str, str]] = []
    progress_info: tuple[str, ...] = ()

    def __init__(self, recipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
                 restart: bool = False):
        self.r = recipe
        self.checkpoint = checkpoint
        self.progress = progress
        self.resume = resume
        self.restart = restart
        self.state = RunState()  # step, saved_step, pending_row, stop_reason: restored from a checkpoint
        self.history: list[dict] = []  # the rows of metrics.jsonl (on resume: those up to the checkpoint's step)
        # made by setup, in this order (None before; setup stops early for a run that is already complete)
        self.started = 0.0  # time.time() when setup began
        self.dist: group.Dist | None = None
        self.source_fp: str | None = None  # the input checkpoint's fingerprint
        self.source: Source | None = None  # what the output copies from the input, read at start-up
        self.run: RunDir | None = None
        self.stream: PromptStream | None = None
        self.pl: sharding.Placement | None = None
        self.model: torch.nn.Module | None = None  # the trained policy, placed (master dtype, FSDP shards)
        self.tok = None  # its tokenizer
        self.device: torch.device | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.sched: torch.optim.lr_scheduler.LRScheduler | None = None
        self.gen: torch.Generator | None = None  # the run's seeds (next_seed): part of the checkpoint's cursor
        self.validator: Validator | None = None  # None: validation is off
        self.sink: MetricsSink | None = None
        self.engine: Engine | None = None  # the policy's rollout engine
        # carried from one part of a step to the next
        self.wnorm = 0.0  # the weights' global norm after the last update (the weight-change guard)
        self.bad_loss: float | None = None  # a non-finite loss noted by guard_loss, decided on at optimizer_step
        self.grad_bytes = 0  # gradient memory the last update held (the report's per-process bytes)

    # ------------------------------------------------------------------------------------------------ hooks
    def input_paths(self) -> list:
        """Every file or folder the run reads (an output must not be, contain or lie inside one of them)."""
        r = self.r
        paths = [self.checkpoint, getattr(r.data, "path", None), r.validation.data_dir]
        return [p for p in paths if p is not None]

    def setup_method(self) -> None:
        """Load what the method needs besides the policy and its rollout engine (reference, teacher)."""

    def train_step(self) -> dict:
        """One step: sample, compute the loss, update. Returns the step's metrics."""
        raise NotImplementedError

    def report_extra(self) -> dict:
        return {}

    def method_state(self) -> dict:
        """Resumable state of the method itself (saved with every checkpoint)."""
        return {}

    def load_method_state(self, state: dict, checkpoint_dir: Path) -> None:
        pass

    def extra_models(self) -> dict:
        """Frozen models whose weights are part of the resumable state ({name: model}; saved beside the policy)."""
        return {}

    def close(self) -> None:
        """Release what setup_method opened (always called)."""

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.r
        self.started = time.time()
        self.dist = group.Dist(r.train.dist_timeout_minutes)
        signals.collective(self.dist.world > 1)
        signals.fault_point("setup")
        problems, error = None, None
        try:  # every check before anything is created; with several processes the verdict is collective
            if r.output.out is None:
                raise UsageError("a training run needs an output directory (--out)")
            inspect_checkpoint(self.checkpoint, allow_pickle=r.model.allow_pickle)
            check_out(r.output.out, r.output.overwrite, tuple(self.input_paths()))
            require_engine(r.rollout.engine)
            if r.train.prompts_per_step % self.dist.world:
                raise RecipeError(f"train.prompts_per_step ({r.train.prompts_per_step}) must be divisible by the "
                                  f"number of processes ({self.dist.world})")
            chat_tok = load_tokenizer(Path(self.checkpoint), r.model.trust_remote_code) \
                if getattr(r.data, "chat_template", False) else None  # prompts in the checkpoint's chat template
            problems = load_problems(r.data, chat_tok, require_answers=self.needs_answers)  # before anything is made
            self.source_fp = fingerprint(self.checkpoint)
            self.source = read_source(self.checkpoint)
        except (Interrupted, KeyboardInterrupt):
            raise
        except TsopsdError as e:
            error = e
        self.dist.agree(error)
        key = run_key(r, self.source_fp)
        self.agree_on_inputs(problems)
        self.run = RunDir(r.output.out, key=key, log_name="metrics.jsonl", resume=self.resume, restart=self.restart,
                          dist=self.dist, overwrite=r.output.overwrite)
        if self.run.complete:
            return  # every output is written: execute() only moves it into place
        try:
            self._setup_in_run(problems, key)
        except (Interrupted, KeyboardInterrupt):
            raise
        except BaseException:
            self.run.close(discard=True)  # a refused or failed setup leaves nothing behind
            raise
        self.run.keep = True  # from here on a failure keeps the partial directory (its checkpoints)

    def agree_on_inputs(self, problems: list[Problem]) -> None:
        """Several processes: refuse (exit 2, on every rank) unless all run the same recipe on the same input
        checkpoint, data and output; a rank given another lr would train silently wrong weights, another max_steps
        would deadlock the job."""
        if self.dist.world == 1:
            return
        digest = lambda obj: hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()  # noqa: E731
        body = self.r.model_dump(mode="json")
        parts = {"the recipe": digest({k: v for k, v in body.items() if k != "output"}),
                 "the output settings": digest(body.get("output")),
                 "the input checkpoint": self.source_fp,
                 "the training data": digest([(p.prompt, p.answer) for p in problems]),
                 "--out": str(Path(self.r.output.out).resolve())}
        every = self.dist.gather_objects(parts)
        bad = sorted({name for other in every for name in parts if other[name] != every[0][name]})
        if bad:
            ranks = [i for i, other in enumerate(every) if other != every[0]]
            raise UsageError(f"the processes of this job disagree on {', '.join(bad)} (ranks {ranks} differ from "
                             "rank 0): every process must run the same command")

    def _setup_in_run(self, problems: list[Problem], key: str) -> None:
        r = self.r
        signals.fault_point("setup-run")
        self.stream = PromptStream(problems, r.train.seed)
        self.pl = sharding.placement(r.model, r.train, self.dist)
        self.model, self.tok = self.load(self.checkpoint, trainable=True)
        self.check_prompt_lengths(problems)
        self.device = self.pl.device
        if r.train.gradient_checkpointing and not (r.model.lean and lean.supports(self.model)
                                                   and lean.always_shared_prefix(self.pl.device)):
            self.model.gradient_checkpointing_enable()
        self.opt = O.build_optimizer(self.model, r.optim)
        self.sched = O.build_scheduler(self.opt, r.optim, r.train.max_steps)
        self.gen = torch.Generator().manual_seed(r.train.seed)
        self.validator = Validator(r.validation, self.tok, r.data) if r.validation.enabled else None
        for name, probs in (self.validator.sets.items() if self.validator is not None else ()):
            self.check_prompt_lengths(probs, f"prompts of the validation set {name}")
        ckpt, st = checkpointing.resume_point(self.run, self.dist, self.model, self.opt)
        method_state: dict = {}
        if ckpt is not None:
            method_state = checkpointing.restore(st, self.state, self.sched, self.gen, self.stream)
            self.progress.log(f"resumed from {ckpt} (step {self.state.step})")
        if self.run.resumed and self.dist.main:  # cut the log back to what the checkpoint contains
            s = self.state.step
            self.history = self.run.log.keep(
                lambda row: ckpt is not None and (row.get("step", 0) < s
                                                  or (row["step"] == s and is_training_row(row))))
        self.history = self.dist.broadcast_object(self.history)
        self.sink = MetricsSink(r.logging, self.run.path, f"{self.command}-{key}", r.model_dump(mode="json"),
                                self.dist.main)
        if self.dist.main:
            with storage(f"writing {self.run.path / 'recipe.yaml'}", "nothing was kept"):
                (self.run.path / "recipe.yaml").write_text(recipe_to_yaml(r))
        self.engine = self.rollout_engine()
        self.setup_method()
        if ckpt is not None:
            self.load_method_state(method_state, ckpt)
        self.wnorm = reductions.weight_norm(self.model, self.pl, self.dist)

    def check_prompt_lengths(self, problems: list[Problem], what: str = "training prompts") -> None:
        """Refuse (exit 2) prompts that leave no room for a completion in the model's context (the check every
        command makes: engines.check_context)."""
        lengths = [len(ids) for ids in encode_prompts(self.tok, [p.prompt for p in problems])]
        check_context(lengths, context_length(self.model.config), what)

    def load(self, path, trainable: bool, average: bool = False):
        """(model, tokenizer): read on the CPU in the checkpoint's own dtype, then placed (master dtype and FSDP
        shards for the trained model, model.dtype for frozen ones; `average`: a frozen float32 model placed like
        the trained one, whose weights follow it). A model sharded over several processes is read by the main
        process alone; the others build it empty and receive their shards (sharding.prepare)."""
        from_rank0 = sharding.shards_from_rank0(self.pl, trainable or average)
        failed: BaseException | None = None
        try:
            ld = load_checkpoint(path, self.r.model, dtype=checkpoint_dtype(path), device="cpu",
                                 weights=self.dist.main or not from_rank0)
        except Exception as e:  # noqa: BLE001 - decided collectively below, then raised
            failed = e
        if failed is not None and self.run is not None and self.run.keep and not Path(path).is_dir():
            failed = EnvironmentFailure(f"{path}: the input checkpoint is gone (removed or moved during the run, "
                                        f"and needed again now); {self.kept()}: put it back, then run the same "
                                        "command with --resume")
        if from_rank0 and self.dist.any(failed is not None):  # no process may wait for shards that never come
            raise failed or CheckpointError(f"{path}: the main process could not load the checkpoint")
        if failed is not None:
            raise failed
        return sharding.prepare(ld.model, self.pl, trainable, average), ld.tokenizer

    def frozen(self, path):
        return self.load(path, trainable=False)[0]

    def ema_teacher(self):
        """An EMA teacher: the input checkpoint in float32, placed like the trained policy and frozen; its weights
        follow the policy's through sharding.ema_update after every optimiser step."""
        return self.load(self.checkpoint, trainable=False, average=True)[0]

    # ------------------------------------------------------------------------------------------ rollout engine
    def rollout_engine(self):
        """The policy's rollout engine, created once per run by the engine factory: one that samples from the
        trained model itself (hf: under FSDP with the parameters gathered, in the compute dtype), or one that
        loads the checkpoint and whose weights `sync_engine` replaces in place after every step."""
        ro = self.r.rollout
        engine = open_engine(ro.engine, self.tok, model=self.model, checkpoint=self.checkpoint,
                             model_section=self.r.model, rollout=ro, sample_context=self._sampling_context,
                             log=self.progress.log)
        if self.state.step > 0:  # resumed: the engine loaded the input weights, the trainer holds step N's
            engine.sync_weights(sharding.full_tensors(self.model))
        return engine

    @contextlib.contextmanager
    def _sampling_context(self):
        """Around each generate: FSDP's units gathered (in model.dtype). No autocast: the hf engine decodes float32
        masters from a model.dtype copy it makes per generate call (engines/hf.py)."""
        try:
            with sharding.gathered(self.model):
                yield
        finally:
            release_host_memory(self.device)  # the gathered weights (FSDP) and the decoding caches are gone

    def generate(self, engine, prompts, params, agree: bool = True):
        """Sample with `engine` (it gathers, casts or wakes what it needs). With `agree` (every process calls it the
        same number of times: rollouts) a signal stops the generation at its next decoding step on each process and
        all of them agree on it right after (raising Interrupted together); the step's state is then that of the
        last completed step."""
        aborted = False
        try:
            with signals.abortable() if agree else contextlib.nullcontext():
                comps = engine.generate(prompts, params)  # it gathers, casts or wakes what it needs
        except Interrupted:
            if not agree:
                raise
            aborted, comps = True, None
        if agree and self.dist.world > 1 and self.dist.any(aborted):
            raise Interrupted(f"{signals.requested() or 'a signal'} received during the rollout of step "
                              f"{self.state.step + 1}")
        if aborted:
            raise Interrupted(f"{signals.requested() or 'a signal'} received during generation")
        return comps

    def on_policy_rollout(self):
        """TS-OPSD's rollouts (reheat, the thermostat's phases): `train.prompts_per_step` prompts x
        `num_generations` from the current policy; returns (non-empty sequences, all completions, the engine's
        log-probs of the sequences or None)."""
        step_seed = self.next_seed()
        taken = self.stream.take(self.r.train.prompts_per_step)
        mine = taken[self.dist.rank::self.dist.world]
        params = sampling_params(self.r.rollout, row_seeds=tuple(row_seed(step_seed, pos) for pos, _ in mine))
        comps = self.generate(self.engine, encode_prompts(self.tok, [p.prompt for _, p in mine]), params)
        self.check_rollout(comps)
        self.rollouts_done()
        kept = [c for c in comps if c.token_ids]
        return [(c.prompt_ids, c.token_ids) for c in kept], comps, self.engine_logps(kept)

    def rollouts_done(self) -> None:
        """Between sampling and training: the engine gives its memory to the trainer."""
        self.engine.release()

    def sync_engine(self) -> float | None:
        """After the step's updates: stream the new weights into the engine (one gathered tensor at a time); the
        seconds it took, or None for an engine that samples from the trained weights themselves."""
        t0 = time.perf_counter()
        if self.engine.sync_weights(sharding.full_tensors(self.model)) is None:
            return None
        return time.perf_counter() - t0

    def engine_logps(self, comps) -> list[list[float]] | None:
        """The engine's log-probs of the sampled tokens (at the rollout temperature), kept when they come from
        another engine than the trainer's own forward, to measure and correct the mismatch."""
        return self.engine.own_logprobs(comps)

    def check_weight_sync(self, logprob_diff: float | None) -> None:
        """The weight-sync guard (the engine decides; every process sees the same global mean): stop the run,
        exit 5, keeping the last good checkpoint."""
        try:
            self.engine.check_sync(logprob_diff, self.state.step + 1)
        except WeightSyncError as e:
            kept = (f"the last good checkpoint (step {self.state.saved_step}) stays in {self.run.path}"
                    if self.state.saved_step >= 0 else f"no checkpoint was saved yet ({self.run.path})")
            raise WeightSyncError(f"{e}; {kept}") from None

    # ------------------------------------------------------------------------------------------ shared pieces

    @property
    def policy(self) -> RunPolicy:
        """The trained policy as one optimiser step sees it (training.policy.StepPolicy)."""
        return RunPolicy(self)

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.gen))

    def hidden(self, model, seqs):
        """(final hidden states at completion positions [N, D], LM-head weight [V, D], PackedBatch); under FSDP the
        head weight is the gathered one, valid until the backward pass (or `sharding.reshard` of a frozen model).
        Every loss of the caller goes through that head weight (a tied embedding's gradient may then be sparse)."""
        pb = pack(seqs, self.tok.pad_token_id, self.device)

        def body():
            if self.r.model.lean and lean.supports(model) and lean.shared_prefix_pays(seqs, self.device):
                ckpt = self.r.train.gradient_checkpointing and model is self.model
                return lean.shared_prefix_hidden(model, seqs, checkpoint_layers=ckpt,
                                                 layer_hook=sharding.layer_hook(model), head_in_loss=True)
            return completion_hidden(model, pb)[0]

        with self.pl.autocast():
            hidden = sharding.call(model, body)
        return hidden, decoder_and_head(model)[1].weight, pb

    def forward_logps(self, model, seqs, temperature: float, with_entropy: bool):
        hidden, weight, pb = self.hidden(model, seqs)
        logp, ent = token_logps(hidden, weight, pb.targets, temperature, self.r.train.chunk_size, with_entropy)
        return logp, ent, pb

    def passes(self, n_local: int) -> int:
        """How many forward passes this process must run when it has `n_local` of its own: under FSDP every
        process runs the same number (each pass gathers parameters collectively), padding with empty ones."""
        return int(self.dist.max(n_local)) if self.pl.fsdp else n_local

    def dummy_seq(self) -> tuple[list[int], list[int]]:
        """The sequence of a padding pass (its loss is multiplied by 0)."""
        return [self.tok.pad_token_id], [self.tok.pad_token_id]

    def global_mean(self, xs) -> float | None:
        total, n = self.dist.sum(float(sum(xs))), self.dist.sum(len(xs))
        return total / n if n else None

    def check_rollout(self, comps) -> None:
        bad = any(not math.isfinite(lp) for c in comps for lp in c.logprobs)
        if self.dist.any(bad):
            O.check_finite("rollout log-prob (the policy's logits)", float("nan"), self.state.step + 1)

    def guard_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Note (not raise: the other processes would wait in the next collective) a non-finite loss of this
        process; `optimizer_step` decides on every process together. Testing aid: TSOPSD_FAULT=NAN@step#N makes
        the loss of step N non-finite (in the process whose RANK is TSOPSD_FAULT_RANK, or every one)."""
        if signals.poisoned("step", self.state.step + 1):
            loss = loss * float("nan")
        value = float(loss.detach())
        if not math.isfinite(value) and self.bad_loss is None:
            self.bad_loss = value
        return loss

    def optimizer_step(self) -> float:
        """Check the losses (every process together), sum gradients (ddp), clip, check, step, check the weights;
        returns the gradient norm. A parameter without a gradient (nothing was back-propagated, e.g. every row of
        the mini-batch had advantage 0) gets an explicit zero one, so the optimiser's momentum moves it exactly as
        after a zero-valued backward."""
        bad, self.bad_loss = self.bad_loss, None
        if bad is None and signals.poisoned("step", self.state.step + 1):
            bad = float("nan")  # (the testing aid, on a process that had no row to train in this step)
        if self.dist.any(bad is not None):
            where = "" if bad is not None else f" on another process (rank {self.dist.rank} had a finite one)"
            O.check_finite(f"loss{where}", bad if bad is not None else float("nan"), self.state.step + 1)
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        reductions.sync_gradients(self.model, self.pl)
        norm = reductions.clip_grad_norm(self.model, self.r.optim.max_grad_norm, self.pl, self.dist)
        O.check_finite("gradient norm", norm, self.state.step + 1)
        self.opt.step()
        # Free the gradients now rather than at the next zero_grad: otherwise they stay allocated through the
        # weight sync and the next rollout, where a waking vLLM engine needs the memory back. Their size is kept
        # for the report (what a step holds).
        self.grad_bytes = sharding.local_bytes(self.model)["gradient_bytes"]
        self.opt.zero_grad(set_to_none=True)
        release_host_memory(self.device)
        before, self.wnorm = self.wnorm, reductions.weight_norm(self.model, self.pl, self.dist)
        O.check_weights(before, self.wnorm, self.r.optim.max_weight_norm_change, self.state.step + 1)
        return norm

    def validate(self) -> dict | None:
        if self.validator is None:
            return None
        signals.fault_point("validation")
        engine = self.engine.with_batch_size(self.r.validation.batch_size)
        was = self.model.training
        self.model.eval()
        res = self.validator.run(lambda prompts, params: self.generate(engine, prompts, params, agree=False),
                                 self.dist)
        self.model.train(was)
        row = {"val_accuracy": res["accuracy"], "val_entropy": res["entropy"], "val_pass@k": res["pass@k"],
               "val_length": res["mean_length"]}
        if res["right_plan"] is not None:  # the toy world: the share of samples that chose the right plan
            row["val_right_plan"] = res["right_plan"]
        if len(res["benchmarks"]) > 1:  # several sets: each one's accuracy (and right-plan share) as well
            row["val_by_set"] = {name: {k: b[k] for k in ("accuracy", "right_plan") if k in b}
                                 for name, b in res["benchmarks"].items()}
        return row

    def log_row(self, row: dict) -> None:
        self.history.append(row)
        if self.dist.main:
            with storage(f"writing the metrics of step {row['step']} to {self.run.log.path}",
                         f"{self.kept()}: free space, then run the same command with --resume"):
                self.run.log.append([json_safe(row)])
                self.sink.write(row)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, cursor: dict | None = None, pending_row: dict | None = None) -> None:
        """Checkpoint the current step (training.checkpointing), unless it is saved already; `cursor`: the one
        taken before an interrupted step, `pending_row`: a row whose validation is to be redone on resume."""
        st = self.state
        if st.saved_step == st.step and pending_row is None:
            return
        signals.fault_point("save")
        t0 = time.perf_counter()
        checkpointing.save(self.run, self.dist, st, self.model, self.opt, self.extra_models(),
                           lambda: checkpointing.trainer_state(self.sched, cursor or self.cursor(), st, pending_row,
                                                               self.method_state()),
                           self.r.train.keep_last)
        # (the save's duration is one term of the SIGTERM lead time a cluster job needs: docs/cluster.md)
        self.progress.log(f"checkpoint of step {st.step} saved in {time.perf_counter() - t0:.1f} s")

    def cursor(self) -> dict:
        """The random states and data position as they are now (training.checkpointing.cursor)."""
        return checkpointing.cursor(self.gen, self.stream)

    def safe_point(self, where: str) -> None:
        """Stop here if any process received a signal (all processes agree)."""
        if self.dist.any(signals.requested() is not None):
            raise Interrupted(f"{signals.requested() or 'a signal'} received during {where}")

    def kept(self) -> str:
        """What a failed run leaves to resume from, in words."""
        if self.state.saved_step < 0:
            return f"no checkpoint was saved yet (a resume starts again from step 0 in {self.run.path})"
        return f"the checkpoint of step {self.state.saved_step} is kept in {self.run.path}"

    def interrupted(self, e: Interrupted) -> Interrupted:
        if self.state.saved_step < 0:
            return Interrupted(f"{e}, before the first checkpoint: the same command with --resume starts again "
                               f"from step 0 in {self.run.path}")
        return Interrupted(f"{e}: checkpoint of step {self.state.saved_step} in {self.run.path}; continue with the "
                           "same command and --resume")

    # -------------------------------------------------------------------------------------------------- loop
    def run_loop(self) -> dict:
        r, st = self.r, self.state
        cursor = None
        try:
            if st.step == 0 and st.saved_step < 0:
                v = self.validate()
                if v is not None:
                    self.log_row({"step": 0, **v})
            if st.pending_row is not None:  # a validation interrupted at this step: redo it first
                row, st.pending_row = st.pending_row, None
                row.update(self.validate() or {})
                self.log_row(row)
            with self.progress.task(self.command, total=r.train.max_steps, start=st.step) as advance:
                while st.step < r.train.max_steps and st.stop_reason is None:
                    self.safe_point(f"step {st.step + 1}")
                    cursor = self.cursor()
                    signals.fault_point("rollout")
                    t0 = time.perf_counter()
                    metrics = self.train_step()
                    self.check_weight_sync(metrics.get("engine_logprob_diff"))
                    signals.fault_point("step")
                    cursor = None  # the update is done: the current state is the consistent one
                    synced = self.sync_engine()
                    if synced is not None:
                        metrics["weight_sync_seconds"] = synced
                    self.sched.step()
                    st.step += 1
                    row = {"step": st.step, **metrics, "step_seconds": time.perf_counter() - t0}
                    if r.train.eval_every and st.step % r.train.eval_every == 0 and st.step < r.train.max_steps:
                        st.pending_row = row
                        row.update(self.validate() or {})
                        st.pending_row = None
                    self.log_row(row)
                    advance(1, info=" ".join(f"{k} {row[k]:.3f}" for k in self.progress_info
                                             if isinstance(row.get(k), float)))
                    if r.train.save_every and st.step % r.train.save_every == 0 and st.step < r.train.max_steps:
                        self.save()
            final = self.validate()
            if final is not None:
                self.log_row({"step": st.step, **final})
            return self.finish()
        except Finished:
            raise
        except Interrupted as e:
            if st.step == 0:
                pass  # nothing to save: a resume from step 0 redoes exactly this
            elif cursor is not None:  # stopped inside a step: the model is still that of the last completed one
                self.save(cursor=cursor)
            else:
                pending, st.pending_row = st.pending_row, None
                if pending is not None:
                    pending = {k: v for k, v in pending.items() if not k.startswith("val_")}
                self.save(pending_row=pending)
            raise self.interrupted(e) from None

    def report(self) -> dict:
        vals = [h for h in self.history if "val_accuracy" in h]
        steps = [h for h in self.history if is_training_row(h)]
        report = {
            "command": self.command, "checkpoint": str(self.checkpoint), "source_fingerprint": self.source_fp,
            "first_prompt": self.stream.problems[0].prompt if self.stream.problems else None,
            "steps": self.state.step, "processes": self.dist.world,
            "stop_reason": self.state.stop_reason or "max_steps",
            "validation": {"first": vals[0] if vals else None, "last": vals[-1] if vals else None},
            "curves": {k: [h.get(k) for h in steps] for k in ["step", *[key for key, _ in self.plot_keys]]},
            "val_curves": {"step": [h["step"] for h in vals], "val_accuracy": [h["val_accuracy"] for h in vals],
                           "val_entropy": [h["val_entropy"] for h in vals]},
            "parallel": {**self.pl.describe(), "per_rank": self.dist.gather_objects(
                {**sharding.local_bytes(self.model, self.opt), "gradient_bytes": self.grad_bytes})},
        }
        report.update(self.report_extra())
        report["seconds"] = round(time.time() - self.started, 3)
        report["recipe"] = self.r.model_dump(mode="json")
        return report

    def phases(self) -> list[tuple[int, int]]:
        """Step spans shaded in the curves (the thermostat's reheat phases)."""
        return []

    def finish(self) -> dict:
        signals.fault_point("finish")
        report = self.report()
        self.engine.release()  # the final write gathers the whole model: the engine sleeps first
        metrics = {"steps": self.state.step,
                   "val_accuracy_last": (report["validation"]["last"] or {}).get("val_accuracy"),
                   **{k: v for k, v in report.items() if k in ("entropy", "reward")}}
        prov = provenance(self.command, self.r, self.checkpoint, self.source_fp, metrics, self.started)
        dtype = self.r.output.dtype if self.r.output.dtype != "auto" else self.source.dtype
        with storage(f"writing the final model into {self.run.path}",
                     f"{self.kept()}: free space (or fix the permissions), then run the same command with --resume"):
            if self.dist.main or self.pl.fsdp:  # under FSDP every process takes part in gathering the weights
                write_checkpoint(self.model, self.tok, self.run.path, prov, dtype=dtype,
                                 generation_config=self.source.generation_config,
                                 tensors=sharding.full_tensors(self.model) if self.pl.fsdp else None,
                                 write=self.dist.main)
            if self.dist.main:
                self.write_report(report)
        out = self.run.finish(before_rename=self._before_rename)
        report["out"] = str(out)
        return report

    def write_report(self, report: dict) -> None:
        """report.json and, with output.plots, curves.png into the run directory."""
        if self.r.output.plots:
            with tempfile.TemporaryDirectory() as d:
                png = Path(d) / "curves.png"
                keys = [*self.plot_keys, ("val_accuracy", "validation accuracy")]
                if plot_curves(self.history, keys, png, self.phases()):
                    (self.run.path / "curves.png").write_bytes(png.read_bytes())
        (self.run.path / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")

    def _before_rename(self) -> None:
        if self.dist.any(signals.requested() is not None):
            raise Finished(f"{signals.requested() or 'a signal'} received while finishing: the finished run is "
                              f"complete in {self.run.path}; the same command with --resume moves it into place")

    def finish_complete(self) -> dict:
        """--resume of a run stopped after it was complete: move it into place and return its report."""
        report = {}
        if self.dist.main:
            try:
                report = json.loads((self.run.path / "report.json").read_text())
            except (OSError, ValueError):
                raise CheckpointError(f"{self.run.path}: the finished run's report.json is missing or damaged; pass "
                                      "--restart to run it again") from None
        report["out"] = str(self.run.finish())
        return report

    def execute(self) -> dict:
        try:
            self.setup()
            return self.finish_complete() if self.run.complete else self.run_loop()
        except BaseException as e:
            if self.dist is None:
                raise
            why = self.dist.explain(e)  # a collective that lost its peer: what happened to the peer
            self.dist.failing(why)  # the other processes stop within seconds, with the same exit code
            if why is e:
                raise
            raise why from None
        finally:
            try:
                self.close()
                if self.engine is not None:
                    self.engine.close()
                if self.sink is not None:
                    self.sink.close()
            finally:
                if self.run is not None:
                    self.run.close()
                signals.collective(False)
                if self.dist is not None:
                    self.dist.close()

