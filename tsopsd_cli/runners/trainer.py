"""The loop every training command shares (rl, reheat): setup -> [step -> log -> validate -> checkpoint]* ->
finish, with resume, signals and several processes from runners.training. A command subclasses `TrainingRun`
once and fills in three hooks: `setup_method` (extra models), `train_step` (one step's work and its metrics) and
`report_extra` (what its report adds). Nothing else is written twice.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch

from tsopsd_cli import lean
from tsopsd_cli.checkpoint import fingerprint, inspect_checkpoint, load_checkpoint, provenance
from tsopsd_cli.core.chunked import token_logps
from tsopsd_cli.errors import DataError, RecipeError
from tsopsd_cli.modeling import completion_hidden, decoder_and_head, pack
from tsopsd_cli.progress import NULL, Progress
from tsopsd_cli.recipe import recipe_to_yaml
from tsopsd_cli.runners import training as T
from tsopsd_cli.runners.validation import Validator
from tsopsd_cli.tasks import load_problems
from tsopsd_cli.tasks.base import Problem


class PromptStream:
    """An endless, reshuffled-every-epoch sequence of problems; its position is part of the resumable state."""

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise DataError("no training prompts")
        self.problems = problems
        self.seed = seed
        self.position = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.problems), generator=g).tolist()
            self._perm_epoch = epoch
        return self._perm

    def take(self, k: int) -> list[tuple[int, Problem]]:
        """The next k problems with their global stream positions."""
        out = []
        for pos in range(self.position, self.position + k):
            epoch, i = divmod(pos, len(self.problems))
            out.append((pos, self.problems[self._order(epoch)[i]]))
        self.position += k
        return out


def row_seed(step_seed: int, position: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{step_seed}:{position}".encode()).digest()[:7], "big")


class TrainingRun:
    command = "train"
    plot_keys: list[tuple[str, str]] = []
    progress_info: tuple[str, ...] = ()

    def __init__(self, recipe, checkpoint: str, progress: Progress = NULL, resume: bool = False,
                 restart: bool = False):
        self.r = recipe
        self.checkpoint = checkpoint
        self.progress = progress
        self.resume = resume
        self.restart = restart
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------------------------------------ hooks
    def setup_method(self) -> None:
        """Load what the method needs besides the policy (reference, teacher)."""

    def train_step(self) -> dict:
        """One step: sample, compute the loss, update. Returns the step's metrics."""
        raise NotImplementedError

    def report_extra(self) -> dict:
        return {}

    def close(self) -> None:
        """Release what setup_method opened (always called)."""

    def prompts_per_step(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.r
        self.started = time.time()
        self.dist = T.Dist()
        inspect_checkpoint(self.checkpoint, allow_pickle=r.model.allow_pickle)
        if self.prompts_per_step() % self.dist.world:
            raise RecipeError(f"prompts per step ({self.prompts_per_step()}) must be divisible by the number of "
                              f"processes ({self.dist.world})")
        self.source_fp = fingerprint(self.checkpoint)
        key_body = json.dumps([{k: v for k, v in r.model_dump(mode="json").items() if k != "output"},
                               self.source_fp], sort_keys=True)
        key = hashlib.sha256(key_body.encode()).hexdigest()[:16]
        self.run = T.RunDir(r.output.out, r.output.overwrite, self.resume, self.restart, key, self.dist,
                            r.train.keep_last)
        self.stream = PromptStream(load_problems(r.data), r.train.seed)
        start_from = self.run.resumed_from or self.checkpoint
        self.model, self.tok, self.device = self.load(start_from)
        if r.train.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.autocast = self.device.type == "cuda" and r.train.mixed_precision in ("auto", "bf16")
        self.opt = T.build_optimizer(self.model, r.optim)
        self.sched = T.build_scheduler(self.opt, r.optim, r.train.max_steps)
        self.gen = torch.Generator().manual_seed(r.train.seed)
        self.step = 0
        self.validator = None
        if r.validation.enabled and self.dist.main:
            self.validator = Validator(r.validation, self.tok, lean=r.model.lean)
        self.history: list[dict] = []
        if self.run.resumed_from is not None:
            st = self.run.load_trainer_state(self.run.resumed_from)
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            self.gen.set_state(st["generator"])
            T.set_rng_state(st["rng"])
            self.stream.position = st["data_position"]
            self.step = st["step"]
            self.run.truncate_log(self.step)
            self.history = self.run.read_log()
            self.progress.log(f"resumed from {self.run.resumed_from} (step {self.step})")
        self.sink = T.MetricsSink(r.logging, self.run.path, f"{self.command}-{key}", r.model_dump(mode="json"),
                                  self.dist)
        if self.dist.main:
            (self.run.path / "recipe.yaml").write_text(recipe_to_yaml(r))
        self.setup_method()

    def load(self, path, device: str | None = None):
        """(model, tokenizer, device) with float32 weights for training when model.dtype is auto."""
        m = self.r.model
        dtype = "float32" if m.dtype == "auto" else m.dtype
        ld = load_checkpoint(path, dtype=dtype, device=device or self.dist.device(m.device),
                             trust_remote_code=m.trust_remote_code, allow_pickle=m.allow_pickle,
                             attn_implementation=m.attn_implementation)
        return ld.model, ld.tokenizer, ld.device

    def frozen(self, path):
        model = self.load(path, device=str(self.device))[0]
        model.requires_grad_(False)
        model.eval()
        return model

    # ------------------------------------------------------------------------------------------ shared pieces
    def trainer_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "generator": self.gen.get_state(), "rng": T.rng_state(), "data_position": self.stream.position,
                "step": self.step}

    def save(self) -> None:
        prov = provenance(self.command, self.r, self.checkpoint, self.source_fp, {"step": self.step}, self.started)
        self.run.save(self.step, self.model, self.tok, self.trainer_state(), prov)

    def next_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.gen))

    def hidden(self, model, seqs):
        """(final hidden states at completion positions [N, D], LM-head weight [V, D], PackedBatch)."""
        pb = pack(seqs, self.tok.pad_token_id, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            if self.r.model.lean and lean.supports(model):
                ckpt = self.r.train.gradient_checkpointing and model is self.model
                hidden = lean.shared_prefix_hidden(model, seqs, checkpoint_layers=ckpt)
            else:
                hidden, _ = completion_hidden(model, pb)
        return hidden, decoder_and_head(model)[1].weight, pb

    def forward_logps(self, model, seqs, temperature: float, with_entropy: bool):
        hidden, weight, pb = self.hidden(model, seqs)
        logp, ent = token_logps(hidden, weight, pb.targets, temperature, self.r.train.chunk_size, with_entropy)
        return logp, ent, pb

    def global_mean(self, xs) -> float | None:
        total, n = self.dist.sum(float(sum(xs))), self.dist.sum(len(xs))
        return total / n if n else None

    def optimizer_step(self) -> float:
        """All-reduce gradients, clip, check, step; returns the gradient norm. A parameter without a gradient
        (nothing was back-propagated, e.g. every row of the mini-batch had advantage 0) gets an explicit zero one,
        so the optimiser's momentum moves it exactly as it would after a zero-valued backward pass."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self.dist.all_reduce_grads(self.model)
        norm = T.grad_norm_and_check(self.model, self.r.optim.max_grad_norm)
        self.opt.step()
        return norm

    def validate(self) -> dict | None:
        if self.validator is None:
            return None
        was = self.model.training
        self.model.eval()
        res = self.validator.run(self.model)
        self.model.train(was)
        return {"val_accuracy": res["accuracy"], "val_entropy": res["entropy"], "val_pass@k": res["pass@k"],
                "val_length": res["mean_length"]}

    def log_row(self, row: dict) -> None:
        self.history.append(row)
        self.run.log(row)
        self.sink.write(row)

    # -------------------------------------------------------------------------------------------------- loop
    def run_loop(self) -> dict:
        r = self.r
        if self.step == 0:
            v = self.validate()
            if v is not None:
                self.log_row({"step": 0, **v})
        with T.SignalGuard() as guard, self.progress.task(self.command, total=r.train.max_steps) as advance:
            advance(self.step)
            while self.step < r.train.max_steps and self.stop_reason is None:
                t0 = T.now()
                metrics = self.train_step()
                self.sched.step()
                self.step += 1
                row = {"step": self.step, **metrics, "step_seconds": T.now() - t0}
                if r.train.eval_every and self.step % r.train.eval_every == 0 and self.step < r.train.max_steps:
                    row.update(self.validate() or {})
                self.log_row(row)
                advance(1, info=" ".join(f"{k} {row[k]:.3f}" for k in self.progress_info
                                         if isinstance(row.get(k), float)))
                if guard.requested:
                    self.save()
                    raise T.interrupted(guard.requested, self.run.path, self.step)
                if r.train.save_every and self.step % r.train.save_every == 0 and self.step < r.train.max_steps:
                    self.save()
        final = self.validate()
        if final is not None:
            self.log_row({"step": self.step, **final})
        return self.finish()

    def finish(self) -> dict:
        vals = [h for h in self.history if "val_accuracy" in h]
        steps = [h for h in self.history if "step_seconds" in h]
        report = {
            "command": self.command, "checkpoint": str(self.checkpoint), "source_fingerprint": self.source_fp,
            "steps": self.step, "processes": self.dist.world, "stop_reason": self.stop_reason or "max_steps",
            "validation": {"first": vals[0] if vals else None, "last": vals[-1] if vals else None},
            "curves": {k: [h.get(k) for h in steps] for k in ["step", *[key for key, _ in self.plot_keys]]},
            "val_curves": {"step": [h["step"] for h in vals], "val_accuracy": [h["val_accuracy"] for h in vals],
                           "val_entropy": [h["val_entropy"] for h in vals]},
        }
        report.update(self.report_extra())
        report["seconds"] = round(time.time() - self.started, 3)
        report["recipe"] = self.r.model_dump(mode="json")
        metrics = {"steps": self.step, "val_accuracy_last": vals[-1]["val_accuracy"] if vals else None,
                   **{k: v for k, v in report.items() if k in ("entropy", "reward")}}
        prov = provenance(self.command, self.r, self.checkpoint, self.source_fp, metrics, self.started)
        extra = {}
        if self.dist.main and self.r.output.plots:
            with tempfile.TemporaryDirectory() as d:
                png = Path(d) / "curves.png"
                if T.plot_curves(self.history, [*self.plot_keys, ("val_accuracy", "validation accuracy")], png):
                    extra["curves.png"] = png.read_bytes()
        out = self.run.finish(self.model, self.tok, prov, report, extra)
        report["out"] = str(out)
        self.sink.close()
        return report

    def execute(self) -> dict:
        try:
            self.setup()
            return self.run_loop()
        finally:
            self.close()
            if hasattr(self, "dist"):
                self.dist.close()
