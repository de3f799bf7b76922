"""Progress reporting for runners: rich bars on stderr, or nothing (--json, --quiet, no terminal)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


class Progress:
    """`with progress.task("sampling", total=n) as advance: advance(k)`; `progress.log(msg)` prints to stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._rich = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.console = Console(stderr=True)
            self._rich = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                      console=self.console, transient=False)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[..., None]]:
        if self._rich is None:
            yield lambda n=1, info=None: None
            return
        with self._rich:
            tid = self._rich.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str | None = None) -> None:
                self._rich.update(tid, advance=n, **({"info": info} if info is not None else {}))

            yield advance

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)


NULL = Progress(enabled=False)
