"""SIGTERM and SIGINT, handled the same way by every command at every moment.

The first signal only sets a flag. Work checks it at its safe points (`check()`: between generation batches,
eval chunks, validation batches and training steps), where it raises `Interrupted`; the command then leaves a
resumable state behind (a training run saves a checkpoint, an eval has its finished chunks on disk) and exits 130
with one line on stderr. A second signal interrupts at once (KeyboardInterrupt, also 130): nothing written
half-way becomes visible, because every output is written atomically.

With several processes a rank must not stop alone (the others would wait in a collective), so `collective(True)`
turns the local checks off and the training loop asks all ranks together at its step and validation boundaries.
A rollout's generation (hundreds of seconds at 8B) is the exception: inside `abortable()` each rank stops its
generation at the next decoding step and the ranks agree right after it, so that a SIGTERM is acted on within
seconds of the rollout phase instead of after a whole step.

Fault injection (tests): `TSOPSD_FAULT=<TERM|INT|KILL|STOP>@<point>[#<n>]` makes the process send itself that
signal the n-th time (default 1st) it reaches the named point (`fault_point(name)`); e.g. `TERM@validation#2`,
`KILL@step#3`. Points: setup, lock, validation, rollout, step, save, finish, eval-chunk. `NAN@step#<n>` makes the
loss of training step n non-finite (`poisoned`). With `TSOPSD_FAULT_RANK=<r>` only the process whose RANK is r
is affected (every process when unset).
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

from tsopsd_cli import launch
from tsopsd_cli.errors import Interrupted

_requested: str | None = None
_collective = False
_abortable = False
_fault_counts: dict[str, int] = {}


def _handle(signum, frame):
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt  # second signal: stop now
    _requested = signal.Signals(signum).name


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """SIGTERM/SIGINT set the flag for the duration of a command (main thread only; elsewhere a no-op)."""
    global _requested
    _requested = None
    old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old[sig] = signal.signal(sig, _handle)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def requested() -> str | None:
    """The name of the signal received ("SIGTERM"), or None."""
    return _requested


def collective(on: bool) -> None:
    """Several processes: local checks are off; the caller synchronises `requested()` across ranks."""
    global _collective
    _collective = on


@contextlib.contextmanager
def abortable() -> Iterator[None]:
    """Several processes: local checks are on for the duration, for work that no collective runs through (a
    rollout's generation on gathered or replicated weights); the caller agrees with the others right after."""
    global _abortable
    was, _abortable = _abortable, True
    try:
        yield
    finally:
        _abortable = was


def check(where: str = "") -> None:
    """Raise Interrupted if a signal arrived (single process, or inside `abortable`; see `collective`)."""
    if _requested is not None and (not _collective or _abortable):
        raise Interrupted(f"{_requested} received{' during ' + where if where else ''}")


def _fault(name: str) -> tuple[str, int] | None:
    """(signal or NAN, n) of TSOPSD_FAULT when it names this point and this process (read when needed, never at
    import: a bad value must not break `--version`)."""
    spec = os.environ.get("TSOPSD_FAULT")
    if not spec:
        return None
    rank = os.environ.get("TSOPSD_FAULT_RANK")
    if rank not in (None, "") and rank != launch.rank_text():
        return None
    sig, _, rest = spec.partition("@")
    point, _, nth = rest.partition("#")
    if point != name:
        return None
    try:
        return sig.upper(), int(nth or 1)
    except ValueError:
        return None


def fault_point(name: str) -> None:
    """Testing aid: send the signal named by TSOPSD_FAULT when this point is reached for the n-th time."""
    fault = _fault(name)
    if fault is None or fault[0] == "NAN":
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == fault[1]:
        os.kill(os.getpid(), getattr(signal, f"SIG{fault[0]}"))


def poisoned(name: str, n: int) -> bool:
    """Testing aid: True when TSOPSD_FAULT is `NAN@<name>#<n>` (this process): the caller makes a value NaN."""
    return _fault(name) == ("NAN", n)
