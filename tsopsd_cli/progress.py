"""Progress of long work, on stderr: rich bars on a terminal, plain lines in a log file, or nothing.

- `rich`: bars (stderr is a terminal and no --json).
- `plain`: stderr is not a terminal (a cluster log, a CI file): one line when a task starts, then at most one every
  `every` seconds (TSOPSD_LOG_EVERY, default 30) as it advances, and one when it ends — the task, done/total,
  the latest metrics, elapsed time and an ETA. `--json` keeps stdout to its one object and does not silence these.
- `off`: `--quiet`, or a terminal with `--json`.
TSOPSD_PROGRESS=1 forces rich bars.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _log_every() -> float:
    """TSOPSD_LOG_EVERY, read when a plain progress log is made (never at import: a bad value must not break
    `--version`)."""
    import math

    from tsopsd_cli.errors import UsageError

    raw = os.environ.get("TSOPSD_LOG_EVERY", "30")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"TSOPSD_LOG_EVERY={raw!r}: expected a number of seconds >= 0")
    return value


class Progress:
    """`with progress.task("rl", total=n) as advance: advance(k, info="loss 0.1")`; `progress.log(msg)`."""

    def __init__(self, mode: str = "rich", every: float | None = None, stream=None):
        if mode not in ("rich", "plain", "off"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self.every = (_log_every() if mode == "plain" else 30.0) if every is None else every
        self.stream = stream or sys.stderr
        self._rich = None
        if mode == "rich":
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.console = Console(file=self.stream)
            self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, start: int = 0) -> Iterator[Callable[..., None]]:
        """`start`: work already done before this process (a resumed run); not counted in the ETA's rate."""
        if self.mode == "off":
            yield lambda n=1, info=None: None
            return
        if self.mode == "rich":
            with self._rich:
                tid = self._rich.add_task(description, total=total, info="", completed=start)

                def advance(n: int = 1, info: str | None = None) -> None:
                    self._rich.update(tid, advance=n, **({"info": info} if info is not None else {}))

                yield advance
            return
        state = {"done": start, "info": "", "last": 0.0, "start": time.monotonic(), "first": start}

        def line(final: bool = False) -> None:
            now = time.monotonic()
            elapsed = now - state["start"]
            done = state["done"]
            parts = [f"[{time.strftime('%H:%M:%S')}] {description}"]
            parts.append(f"{done}/{total}" if total else f"{done}")
            if state["info"]:
                parts.append(state["info"])
            parts.append(f"elapsed {_clock(elapsed)}")
            fresh = done - state["first"]
            if total and not final and 0 < fresh and done < total:
                parts.append(f"eta {_clock(elapsed / fresh * (total - done))}")
            if final:
                parts.append("done" if total is None or done >= total else "stopped")
            self._write("  ".join(parts))
            state["last"] = now

        def advance(n: int = 1, info: str | None = None) -> None:
            state["done"] += n
            if info is not None:
                state["info"] = info
            if time.monotonic() - state["last"] >= self.every:
                line()

        state["last"] = state["start"]
        todo = f", {start}/{total} done before" if start else (f", {total} to do" if total else "")
        self._write(f"[{time.strftime('%H:%M:%S')}] {description}: started{todo}")
        try:
            yield advance
        finally:
            line(final=True)

    def log(self, message: str) -> None:
        if self.mode == "rich":
            self.console.print(message, highlight=False)
        elif self.mode == "plain":
            self._write(f"[{time.strftime('%H:%M:%S')}] {message}")

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


NULL = Progress(mode="off")
