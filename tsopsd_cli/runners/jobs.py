"""Independent pieces of work run side by side, one thread each: the study's many small runs on a CPU machine.

A `Job` is a top-level function (named by module and attribute, so that a fresh interpreter can find it), its
keyword arguments and the output it writes atomically; a job whose output exists is done and is skipped. With
one worker the jobs run here, in order. With several, each runs in a worker process (spawned, so nothing of this
process's state is shared) that uses one thread (`torch.set_num_threads(1)`): on a machine with W cores, W tiny
models trained side by side on one thread each finish sooner than one after another on W threads each, whose
matrices are too small to share (docs/demo.md measures it). Never more workers than cores.

Signals: workers ignore SIGINT (a terminal's Ctrl-C reaches the whole process group) and act on SIGTERM like a
command does (the flag, then a resumable stop at the next safe point). This process forwards its first signal to
every worker as one SIGTERM and waits for them: each interrupted run has saved a checkpoint, and the caller's
`--resume` continues from there. A second signal kills the workers at once (every output is written atomically,
so nothing half-written becomes visible). A job that fails stops the others the same way, and its error — with
its exit code — is raised here.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tsopsd_cli import signals
from tsopsd_cli.errors import EXIT_FAILURE, Interrupted, TsopsdError, exit_code_of, with_code


@dataclass(frozen=True)
class Job:
    name: str  # for the log: "continued RL: ts-opsd, seed 3"
    target: Path  # the output the job writes atomically; the job is done when it exists
    fn: str  # "module:function", called as function(**kwargs)
    kwargs: dict = field(default_factory=dict)  # picklable values only


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def _resolve(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _init_worker() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it forwards one SIGTERM
    # between jobs a forwarded SIGTERM finds nothing to stop (a job installs the command's handlers while it
    # runs); a worker killed while idle would break the pool for the others
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run_in_worker(spec: str, kwargs: dict) -> tuple[str, float, int, list[str]]:
    """(outcome, seconds, exit code, message lines); never raises (an exception that does not pickle would
    break the pool)."""
    t0 = time.time()
    try:
        with signals.installed():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            _resolve(spec)(**kwargs)
        return "ok", time.time() - t0, 0, []
    except BaseException as e:  # noqa: BLE001 - carried to the parent as its code and lines
        lines = e.lines if isinstance(e, TsopsdError) else [f"{type(e).__name__}: {e}"]
        return "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed", \
            time.time() - t0, exit_code_of(e), lines


def run_jobs(jobs: list[Job], workers: int, log: Callable[[str], None], advance: Callable[[int], None] = lambda n: None
             ) -> dict[str, float]:
    """Run every job whose target does not exist yet; returns {job name: seconds} of the jobs run now."""
    todo = [j for j in jobs if not Path(j.target).exists()]
    for j in jobs:
        if j not in todo:
            log(f"{j.name}: done before, kept ({j.target})")
            advance(1)
    if not todo:
        return {}
    if workers <= 1 or len(todo) == 1:
        return _run_here(todo, log, advance)
    return _run_side_by_side(todo, min(workers, len(todo), default_workers()), log, advance)


def _run_here(todo: list[Job], log, advance) -> dict[str, float]:
    seconds = {}
    for j in todo:
        signals.check(f"before {j.name}")
        log(f"{j.name} -> {j.target}")
        t0 = time.time()
        _resolve(j.fn)(**j.kwargs)
        seconds[j.name] = round(time.time() - t0, 2)
        advance(1)
    return seconds


def _run_side_by_side(todo: list[Job], workers: int, log, advance) -> dict[str, float]:
    import multiprocessing

    seconds: dict[str, float] = {}
    failure: tuple[int, list[str]] | None = None
    interrupted = broken = False
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker)
    running: dict[Future, Job] = {}
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers and failure is None and not interrupted:
                j = queue.pop(0)
                log(f"{j.name} -> {j.target}")
                running[pool.submit(_run_in_worker, j.fn, j.kwargs)] = j
            if not running:
                break
            done, _ = wait(list(running), timeout=0.5, return_when=FIRST_COMPLETED)
            if signals.requested() is not None and not interrupted:
                interrupted = True
                _signal_workers(pool, signal.SIGTERM)
            for fut in done:
                j = running.pop(fut)
                try:
                    outcome, secs, code, lines = fut.result()
                except BrokenProcessPool:  # a worker died: killed (a signal before its handlers were set)
                    broken = True
                    outcome, secs, code, lines = ("interrupted" if interrupted else "failed"), 0.0, EXIT_FAILURE, [
                        "its worker process died (killed, or out of memory?); the finished runs are kept: "
                        "continue with the same command and --resume"]
                if outcome == "ok":
                    seconds[j.name] = round(secs, 2)
                    log(f"{j.name}: done in {secs:.0f} s")
                    advance(1)
                elif outcome == "interrupted":
                    interrupted = True
                elif failure is None:
                    failure = (code, [f"{j.name}: {lines[0] if lines else 'failed'}", *lines[1:]])
                    _signal_workers(pool, signal.SIGTERM)  # the others stop at their next safe point
    except KeyboardInterrupt:  # a second signal: stop now
        broken = True
        _signal_workers(pool, signal.SIGKILL)
        raise
    finally:
        if broken:  # a pool that lost a worker cannot be shut down in order: end the rest
            _signal_workers(pool, signal.SIGKILL)
        pool.shutdown(wait=not broken, cancel_futures=True)
    if failure is not None:
        err = with_code(failure[1][0], failure[0])
        err.lines = failure[1]
        raise err
    if interrupted:
        raise Interrupted(f"{signals.requested() or 'a signal'} received; every unfinished run kept its last "
                          "checkpoint")
    return seconds


def _signal_workers(pool: ProcessPoolExecutor, sig: int) -> None:
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            os.kill(proc.pid, sig)
        except (ProcessLookupError, OSError):
            pass
