"""What every training command (rl, reheat) shares: run directory and resumable checkpoints, optimiser and
schedule, signal handling, the non-finite guard, metrics logging, and several processes.

Layout of a run with `--out DIR`: work happens in the hidden sibling `.DIR.partial/`:

    .DIR.partial/state.json                  key of the recipe + input checkpoint (what --resume must match)
    .DIR.partial/metrics.jsonl               one JSON line per step (and per validation)
    .DIR.partial/checkpoints/step-000020/    HF checkpoint + trainer_state.pt (optimiser, scheduler, RNG, data
                                             position); each written atomically; the last `keep_last` kept

When the run finishes, the final model, report.json and plots are written into it and it is renamed to DIR in one
step, so DIR is an ordinary checkpoint directory that only ever appears complete. `--resume` continues from the
newest checkpoint; SIGTERM/SIGINT save one first and exit 130.

Several processes: launched by `accelerate launch` or `torchrun`, each process samples and trains on its share of
the prompts; losses are normalised by global token counts and gradients are summed across processes, so the update
equals the single-process update with the same global batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
import torch

from tsopsd_cli.checkpoint import atomic_dir, check_out, move_into_place, write_checkpoint
from tsopsd_cli.errors import Interrupted, NonFiniteError, OutputExistsError, UsageError
from tsopsd_cli.report import json_safe, pyplot

STATE_FILE = "state.json"
TRAINER_STATE = "trainer_state.pt"


# ------------------------------------------------------------------------------------------------ processes
class Dist:
    """This process's place among several (torch.distributed, gloo on CPU / nccl on GPU), or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str):
        if self.world > 1 and torch.cuda.is_available() and requested in ("auto", "cuda"):
            return f"cuda:{self.local_rank}"
        return requested

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t[0])

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            buf = t.detach().to(torch.float64).cpu()
            torch.distributed.all_reduce(buf)
            return buf.to(t.dtype)
        return t

    def all_reduce_grads(self, model) -> None:
        """Sum gradients over processes (one flat buffer). Every trainable parameter must have a gradient (the
        trainer gives zeros to those a process did not reach), so all processes send buffers of one layout."""
        if self.world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def shard(items: list, dist: Dist) -> list:
    """This process's share of a list (every world-th item)."""
    return items[dist.rank::dist.world]


# ------------------------------------------------------------------------------------------------ optimiser
def build_optimizer(model, optim) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, optim, total_steps: int):
    import math

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps else 1.0
        if optim.schedule == "constant":
            return warm
        progress = min(1.0, step / max(1, total_steps))
        if optim.schedule == "cosine":
            return warm * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return warm * (1 - (1 - optim.min_lr_ratio) * progress)  # linear

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def grad_norm_and_check(model, max_norm: float | None) -> float:
    """Clip (when max_norm) and return the global gradient norm; non-finite raises NonFiniteError."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
    value = float(norm)
    if not torch.isfinite(norm):
        raise NonFiniteError(f"non-finite gradient norm ({value}); stopped before the update, the last saved "
                             "checkpoint is kept (lower the learning rate, or check the data)")
    return value


def check_finite_loss(loss: float, step: int) -> None:
    if not torch.isfinite(torch.tensor(loss)):
        raise NonFiniteError(f"non-finite loss ({loss}) at step {step}; stopped before the update, the last saved "
                             "checkpoint is kept")


# ------------------------------------------------------------------------------------------------- RNG state
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------- signals
class SignalGuard:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (a second signal exits at once)."""

    def __init__(self):
        self.requested: str | None = None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------- run dirs
def hold_lock(out: Path):
    """An exclusive advisory lock on `out` (the file `.NAME.lock` beside it) for the lifetime of this process: two
    runs writing the same --out (a job submitted twice) would corrupt each other's checkpoints and logs, so the
    second one stops at once. Returns the open lock file."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise UsageError(f"{out}: another tsopsd run is writing it ({holder})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}")
    fh.flush()
    return fh


class RunDir:
    """The `.DIR.partial` working directory of a training run (or a temporary one without --out)."""

    def __init__(self, out: Path | None, overwrite: bool, resume: bool, restart: bool, key: str, dist: Dist,
                 keep_last: int):
        self.out = Path(out) if out is not None else None
        self.dist = dist
        self.keep_last = keep_last
        self.resumed_from: Path | None = None
        if self.out is None:
            import tempfile

            self.path = Path(tempfile.mkdtemp(prefix="tsopsd-run-")) if dist.main else None
            self.path = Path(dist.broadcast_object(str(self.path) if self.path else None))
            self.ephemeral = True
            return
        self.ephemeral = False
        check_out(self.out, overwrite)
        self.path = self.out.parent / f".{self.out.name}.partial"
        if dist.main:
            self.lock = hold_lock(self.out)
            self._prepare(resume, restart, key)
        dist.barrier()
        if resume:
            self.resumed_from = self.latest()

    def _prepare(self, resume: bool, restart: bool, key: str) -> None:
        if self.path.exists():
            state = _read_json(self.path / STATE_FILE)
            if restart:
                shutil.rmtree(self.path)
            elif not resume:
                raise OutputExistsError(f"{self.path}: an unfinished run is there (pass --resume to continue it, "
                                        "or --restart to discard it)")
            elif state.get("key") != key:
                raise UsageError(f"{self.path}: the unfinished run there used a different recipe or input "
                                 "checkpoint; --resume needs the same ones (or pass --restart)")
        elif resume:
            raise UsageError(f"--resume: no unfinished run at {self.path}")
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.path / STATE_FILE).write_text(json.dumps({"key": key}))

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def checkpoints(self) -> list[Path]:
        d = self.path / "checkpoints"
        return sorted(p for p in d.glob("step-*") if (p / TRAINER_STATE).is_file()) if d.is_dir() else []

    def latest(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, model, tokenizer, trainer_state: dict, prov: dict) -> None:
        """Atomic checkpoint of everything needed to resume (main process writes; all wait)."""
        if self.dist.main:
            target = self.path / "checkpoints" / f"step-{step:06d}"
            with atomic_dir(target, overwrite=True) as tmp:
                write_checkpoint(model, tokenizer, tmp, prov)
                torch.save(trainer_state, tmp / TRAINER_STATE)
            for old in self.checkpoints()[:-self.keep_last] if self.keep_last else []:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    def load_trainer_state(self, ckpt: Path) -> dict:
        return torch.load(ckpt / TRAINER_STATE, weights_only=False, map_location="cpu")

    def log(self, row: dict) -> None:
        if self.dist.main:
            with open(self.metrics_file, "a") as fh:
                fh.write(json.dumps(json_safe(row)) + "\n")

    def read_log(self) -> list[dict]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def truncate_log(self, step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be redone)."""
        if self.dist.main and self.metrics_file.is_file():
            keep = [r for r in self.read_log() if r.get("step", 0) <= step]
            self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def finish(self, model, tokenizer, prov: dict, report: dict, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write the final checkpoint and report into the run directory and rename it to --out."""
        if self.dist.main:
            write_checkpoint(model, tokenizer, self.path, prov)
            (self.path / "report.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
            for name, data in (extra_files or {}).items():
                (self.path / name).write_bytes(data)
            (self.path / STATE_FILE).unlink(missing_ok=True)
            if not self.ephemeral:
                move_into_place(self.path, self.out)
                Path(self.lock.name).unlink(missing_ok=True)
        self.dist.barrier()
        return self.out if self.out is not None else self.path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------------- metrics
class MetricsSink:
    """Optional TensorBoard / Weights & Biases mirrors of the JSONL log (main process only)."""

    def __init__(self, logging_section, run_path: Path, run_name: str, config: dict, dist: Dist):
        self.tb = None
        self.wandb = None
        if not dist.main:
            return
        if logging_section.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from tsopsd_cli.errors import MissingDependencyError

                raise MissingDependencyError("logging.tensorboard needs the tensorboard package") from None
            self.tb = SummaryWriter(str(run_path / "tensorboard"))
        if logging_section.wandb_project:
            try:
                import wandb
            except ImportError:
                from tsopsd_cli.errors import MissingDependencyError

                raise MissingDependencyError("logging.wandb_project needs the wandb package") from None
            self.wandb = wandb.init(project=logging_section.wandb_project, name=run_name, config=config)

    def write(self, row: dict) -> None:
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def interrupted(signal_name: str, path: Path, step: int) -> Interrupted:
    return Interrupted(f"{signal_name} received: checkpoint saved at step {step} in {path}; continue with the "
                       "same command and --resume")


def now() -> float:
    return time.perf_counter()


def plot_curves(rows: list[dict], keys: list[tuple[str, str]], path: Path) -> bool:
    """One PNG with a panel per (key, label) over steps; False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    axes = axes if len(keys) > 1 else [axes]
    for ax, (key, label) in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
