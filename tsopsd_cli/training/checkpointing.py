"""A training run's step checkpoints: what one holds, writing it, and choosing and reading the one to resume from.

`checkpoints/step-N/` in the run directory (tsopsd_cli.rundir stages, publishes and prunes them) holds:
- `state/`: the trained model's weights and the optimiser's state, sharded per process
  (torch.distributed.checkpoint, through dcp.save_state / load_state);
- one folder per frozen model whose weights are part of the run's state (TrainingRun.extra_models: the
  thermostat's snapshot during a reheat phase), written with dcp.save_model;
- `trainer_state.pt` (written by the main process; plain values, read with torch.load(weights_only=True)):
  `scheduler` (the learning-rate schedule's state dict), the cursor (`generator`: the run's seed generator,
  `python_rng`, `torch_rng`: the global random states, `data_position`: the prompt stream's position), `step`,
  `pending_row` (a step's row whose validation a signal interrupted: validated first on resume), `stop_reason`
  (a method's stop criterion met) and `method` (the method's own state: TrainingRun.method_state).

The state saved is that of the last completed step; a run stopped inside a step saves the cursor taken before
the step, so that the resumed run draws the same prompts and seeds again. A write that fails removes its staging
folder and keeps the previous checkpoint: a filesystem that refused it (full, over quota, read-only) is exit 8
(EnvironmentFailure, the line says which), any other failure CheckpointWriteError (exit 1). A resume takes the
newest intact checkpoint; a damaged one is passed over with one line saying so.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from tsopsd_cli.checkpoint import warn
from tsopsd_cli.errors import CheckpointError, EnvironmentFailure, Interrupted, TsopsdError, storage_refusal
from tsopsd_cli.parallel import dcp, group

if TYPE_CHECKING:
    from tsopsd_cli.rundir import RunDir
    from tsopsd_cli.training.prompts import PromptStream

TRAINER_STATE = "trainer_state.pt"
MODEL_STATE = "state"  # the DCP folder inside a checkpoint


class CheckpointWriteError(TsopsdError):
    """A step checkpoint could not be written for a reason other than the filesystem's refusal (that is
    EnvironmentFailure, exit 8): exit 1, the previous one is kept."""


@dataclass
class RunState:
    """A run's counters: where it is, what is on disk, what is left to do (a checkpoint saves all but saved_step,
    which a resume sets to the checkpoint's step)."""

    step: int = 0  # training steps completed
    saved_step: int = -1  # the step of the newest checkpoint on disk (-1: none yet)
    pending_row: dict | None = None  # a step's row while its validation runs: a signal saves it, a resume redoes it
    stop_reason: str | None = None  # set when a method's stop criterion is met (reheat's target entropy)


def cursor(gen: torch.Generator, stream: PromptStream) -> dict:
    """The random states and data position: what a resumed run needs besides the weights and the schedule."""
    return {"generator": gen.get_state(), "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
            "data_position": stream.position}


def trainer_state(sched, cursor: dict, state: RunState, pending_row: dict | None, method: dict) -> dict:
    """The content of `trainer_state.pt`."""
    return {"scheduler": sched.state_dict(), **cursor, "step": state.step, "pending_row": pending_row,
            "stop_reason": state.stop_reason, "method": method}


def restore(st: dict, state: RunState, sched, gen: torch.Generator, stream: PromptStream) -> dict:
    """Put a checkpoint's trainer state back (schedule, generator, random states, data position, counters);
    returns the method's own state."""
    sched.load_state_dict(st["scheduler"])
    gen.set_state(st["generator"])
    random.setstate(_tupled(st["python_rng"]))
    torch.set_rng_state(st["torch_rng"])
    stream.position = st["data_position"]
    state.step = state.saved_step = st["step"]
    state.pending_row = st.get("pending_row")
    state.stop_reason = st.get("stop_reason")
    return st.get("method", {})


def save(run: RunDir, dist: group.Dist, state: RunState, model, opt, extra_models: dict,
         trainer_state: Callable[[], dict], keep_last: int) -> None:
    """Write the checkpoint of `state.step` into a staging folder (every process its shards, the main process
    `trainer_state()`), publish it (the newest `keep_last` are kept) and note it in `state.saved_step`."""
    tmp = run.prepare_staging(state.step)
    try:
        dcp.save_state(tmp / MODEL_STATE, model, opt)
        for name, frozen in extra_models.items():
            dcp.save_model(tmp / name, frozen)
        if dist.main:
            with open(tmp / TRAINER_STATE, "wb") as fh:  # (through Python's file: a failed write keeps its errno)
                torch.save(trainer_state(), fh)
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit, Interrupted)):
            raise
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)  # the half-written staging folder (and the space it took)
        refused = storage_refusal(e)
        error = EnvironmentFailure if refused is not None else CheckpointWriteError
        raise error(write_failure(refused or _first_failure(e), state, run.path)) from None
    run.publish(state.step, keep_last)
    state.saved_step = state.step


def _first_failure(e: BaseException) -> str:
    """What went wrong, in a few words: the first line of the (first rank's) exception, never a traceback (a
    CheckpointException's text is one per rank)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def write_failure(cause: str, state: RunState, path: Path) -> str:
    """The one line a failed checkpoint write ends the run with."""
    kept = (f"the checkpoint of step {state.saved_step} is kept" if state.saved_step >= 0
            else "no earlier checkpoint: a resume starts from step 0")
    return (f"writing the checkpoint of step {state.step} in {path} failed ({cause}); {kept}: free "
            "space if needed, then run the same command with --resume")


def resume_point(run: RunDir, dist: group.Dist, model, opt) -> tuple[Path | None, dict | None]:
    """The checkpoint to continue from, chosen once (rank 0) for every process: the newest intact one, its model
    and optimiser state loaded into `model` and `opt`, and its trainer state. A damaged newest checkpoint (a
    truncated trainer state, a missing or corrupt shard: a full disk or a kill during a copy) is passed over with
    one line saying so, and the previous intact one is used."""
    if not run.resumed:
        return None, None
    candidates = [str(p) for p in run.checkpoints()] if dist.main else None
    candidates = dist.broadcast_object(candidates)
    for path in reversed([Path(c) for c in candidates]):
        error = None
        st = None
        try:
            st = torch.load(path / TRAINER_STATE, weights_only=True, map_location="cpu")
            dcp.load_state(path / MODEL_STATE, model, opt)
        except BaseException as e:  # noqa: BLE001 - torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            error = e
        failed = dist.gather_objects(None if error is None else f"{type(error).__name__}: "
                                     f"{str(error).splitlines()[0] if str(error) else ''}")
        bad = [f for f in failed if f is not None]
        if not bad:
            return path, st
        if dist.main:
            warn(f"checkpoint {path.name} in {run.path} is damaged ({bad[0][:200]}); falling back to the "
                 "previous one")
    if candidates:
        raise CheckpointError(f"{run.path}: no intact checkpoint to resume from (all {len(candidates)} "
                              "are damaged); pass --restart to start again")
    return None, None


def _tupled(x):
    """random.setstate needs tuples where torch.load returns lists."""
    return tuple(_tupled(v) for v in x) if isinstance(x, (list, tuple)) else x
