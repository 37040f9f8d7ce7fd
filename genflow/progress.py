"""What the user watches: a progress bar per stage on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("genflow")


class StageProgress:
    """Rows done / total for one stage; rich bar on a TTY, a log line every 10% otherwise."""

    def __init__(self, stage: str, total: int, console: Console | None = None) -> None:
        self.stage, self.total, self.done = stage, total, 0
        self.started = time.perf_counter()
        self._next_log = 0.1
        self.tty = sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console or Console(stderr=True), transient=False,
            )

    def __enter__(self) -> StageProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.stage, total=self.total, rate="")
        return self

    def advance(self, rows: int) -> None:
        self.done += rows
        rate = self.done / max(1e-9, time.perf_counter() - self.started)
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=rows, rate=f"{rate:,.1f} rows/s")
        elif self.total and self.done / self.total >= self._next_log:
            self._next_log = (int(self.done / self.total * 10) + 1) / 10
            log.info("%s: %d/%d rows (%.1f rows/s)", self.stage, self.done, self.total, rate)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
