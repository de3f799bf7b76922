"""Which process of how many this is, and where the job's processes meet, as the launcher (torchrun, srun) wrote
it into the environment: the only reader of WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.

`env_number` parses these and the process group's own settings (TSOPSD_PEER_TIMEOUT, TSOPSD_RENDEZVOUS_TIMEOUT)
alike.

Callers need different things from a bad value, so there is one reader per need:
- `world()`, `rank()`, `local_rank()`, `rendezvous()` (joining the process group): unset or blank is the default;
  anything else that is not an integer is bad input (UsageError, exit 2).
- `world_or_one()` (how a process ends, which must not fail in turn): blank or bad is one process.
- `rank_text()` (is this the main process; is this the rank a fault is aimed at): RANK as written, "0" when unset,
  compared as text.
- `several_processes()`, `launched_ranks()` (a one-process command; vLLM's launch mode): Python's int of the text,
  the default when unset; blank or bad raises ValueError.
"""

from __future__ import annotations

import math
import os
from typing import Callable

from tsopsd_cli.errors import UsageError

_BY_LAUNCHER = "(set by the launcher: torchrun, srun)"


def env_number(name: str, default, parse: Callable = int, expected: str = f"an integer {_BY_LAUNCHER}",
               valid: Callable[[float], bool] | None = None):
    """The environment variable `name` read by `parse` (int, float); `default` when unset or blank. A value that
    `parse` rejects or `valid` refuses is bad input (exit 2): "NAME='value': expected <expected>"."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or (valid is not None and not valid(value)):
        raise UsageError(f"{name}={raw!r}: expected {expected}")
    return value


def env_seconds(name: str, default: float) -> float:
    """A number of seconds > 0 from the environment (`env_number`)."""
    return env_number(name, default, float, "a number of seconds > 0", lambda s: 0 < s < math.inf)


def world() -> int:
    """How many processes the job has (WORLD_SIZE; 1 when unset)."""
    return env_number("WORLD_SIZE", 1)


def rank() -> int:
    """This process's place in the job (RANK; 0, the main process, when unset)."""
    return env_number("RANK", 0)


def local_rank() -> int:
    """This process's place on its machine (LOCAL_RANK: its GPU; 0 when unset)."""
    return env_number("LOCAL_RANK", 0)


def rendezvous() -> tuple[str, int]:
    """(host, port) of the job's store, served by rank 0 (MASTER_ADDR, MASTER_PORT; 127.0.0.1:29500 when unset)."""
    return os.environ.get("MASTER_ADDR", "127.0.0.1"), env_number("MASTER_PORT", 29500)


def world_or_one() -> int:
    """WORLD_SIZE where it is an integer, else 1: never fails (a bad value is reported by `world()`, if at all)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def rank_text() -> str:
    """RANK as the launcher wrote it ("0" when unset)."""
    return os.environ.get("RANK", "0")


def _python_int(name: str, default: str) -> int:
    return int(os.environ.get(name, default))


def several_processes() -> bool:
    """Whether WORLD_SIZE says more than one process (ValueError when it is blank or not an integer)."""
    return _python_int("WORLD_SIZE", "1") > 1


def launched_ranks() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) when this process is one of several that a launcher started; None for a
    single process (ValueError when a value is blank or not an integer)."""
    world_size = _python_int("WORLD_SIZE", "1")
    if world_size <= 1:
        return None
    return _python_int("RANK", "0"), _python_int("LOCAL_RANK", "0"), world_size
