"""Phase meters for the benchmarks: wrap a run's methods so that each phase (load, rollout, training, optimiser
step, weight sync, report rollouts, report, save) records its wall time and the peak of a memory counter while it
ran. The counter is either the CUDA allocator's (`torch.cuda.max_memory_allocated`, reset per phase) or the
process's resident set (VmHWM from /proc/self/status, reset per phase by writing 5 to /proc/self/clear_refs)."""

from __future__ import annotations

import time

# (outer, inner): an inner phase that stays part of the outer one (the report's rollouts sample through generate)
NESTED_IN_PLACE = {("report_rollout", "rollout")}


class PhaseMeter:
    """Peak and seconds per phase; phases nest (a report inside setup): entering one closes the enclosing phase's
    segment, leaving it opens a new one."""

    def __init__(self, reset, read, sync=lambda: None):
        self.reset, self.read, self.sync = reset, read, sync
        self.peak: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.stack: list[tuple[str, float]] = []

    def _close(self) -> None:
        name, t0 = self.stack[-1]
        self.sync()
        self.peak[name] = max(self.peak.get(name, 0), self.read())
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def _open(self) -> None:
        self.reset()
        name, _ = self.stack[-1]
        self.stack[-1] = (name, time.perf_counter())

    def wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        meter = self

        def wrapped(*a, **k):
            if meter.stack and (meter.stack[-1][0] == name or (meter.stack[-1][0], name) in NESTED_IN_PLACE):
                return fn(*a, **k)  # already inside this phase
            if meter.stack:
                meter._close()
            meter.stack.append((name, 0.0))
            meter._open()
            try:
                return fn(*a, **k)
            finally:
                meter._close()
                meter.stack.pop()
                if meter.stack:
                    meter._open()

        setattr(owner, attr, wrapped)


def training_patches(command: str, engine: str = "hf") -> list[tuple[object, str, str]]:
    """(owner, method, phase) of the rl/reheat runners' phases (the weight sync only with the vllm engine)."""
    from tsopsd_cli.runners import reheat as reheat_mod
    from tsopsd_cli.runners.reheat import ReheatRunner
    from tsopsd_cli.runners.rl import RLRunner
    from tsopsd_cli.training.trainer import TrainingRun

    runner = RLRunner if command == "rl" else ReheatRunner
    out = [(TrainingRun, "setup", "load"), (TrainingRun, "generate", "rollout"), (runner, "train_step", "training"),
           (TrainingRun, "optimizer_step", "optimizer_step"), (TrainingRun, "finish", "save")]
    if engine == "vllm":
        out.append((TrainingRun, "sync_engine", "weight_sync"))
    if command == "reheat":
        out += [(reheat_mod, "report_rollouts", "report_rollout"), (ReheatRunner, "summary_pass", "report")]
    return out


def rss_counter():
    """(reset, read) of this process's peak resident set size, in bytes."""

    def reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def read():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    return reset, read


class Split:
    """Seconds spent in named calls of a training run, outermost call only (a call inside another timed one counts
    for the outer): the rollout, the student's (policy's) and the frozen model's forwards, the chunked loss, the
    metrics, the backward pass, the optimiser step and the engine sync. `restore()` undoes the patches of modules
    and of torch.Tensor.backward (the run's own methods are patched on the instance)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.depth = 0
        self._patched: list[tuple[object, str, object]] = []

    def wrap(self, fn, name):
        def timed(*a, **kw):
            if self.depth:
                return fn(*a, **kw)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.depth -= 1
        return timed

    def _patch(self, owner, attr: str, name: str, fn=None) -> None:
        self._patched.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, self.wrap(fn or getattr(owner, attr), name))

    def instrument(self, run) -> None:
        import torch

        from tsopsd_cli.core import chunked, stats
        from tsopsd_cli.runners import rl
        from tsopsd_cli.training import distill, trainer

        run.rollout = self.wrap(run.rollout, "rollout")
        hidden = run.hidden
        student = self.wrap(hidden, "student forward")
        frozen = self.wrap(hidden, "teacher forward")
        run.hidden = lambda model, seqs: (student if model is run.model else frozen)(model, seqs)
        run.optimizer_step = self.wrap(run.optimizer_step, "optimiser")
        run.sync_engine = self.wrap(run.sync_engine, "sync")
        for mod in (distill, rl, trainer):
            for name in ("token_divergence", "token_logps"):
                if hasattr(mod, name):
                    self._patch(mod, name, "loss", getattr(chunked, name))
        self._patch(stats, "chunked_token_stats", "metrics")
        self._patch(torch.Tensor, "backward", "backward")

    def restore(self) -> None:
        for owner, attr, fn in reversed(self._patched):
            setattr(owner, attr, fn)
        self._patched.clear()
