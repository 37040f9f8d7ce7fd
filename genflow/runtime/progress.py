"""What the user watches: a progress bar per stage on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

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

NOTE_EVERY_S = 2.0
"""How often a stage's ``note`` (its batches, in batch mode) is looked at again."""


class StageProgress:
    """Rows done / total for one stage; rich bar on a TTY, a log line every 10% otherwise.

    Rows found finished on storage (``skip``) move the bar but not the rate, so a
    resumed job shows how fast it computes, not how fast it reads markers. While
    the bar is live, log lines (Prefect's task logs, Ray's worker output) print
    above it instead of through it. Two packs' task runs of a stage move it at once
    (from Prefect's task threads): it counts under a lock.
    """

    def __init__(self, stage: str, total: int, console: Console | None = None,
                 cost: Callable[[], float] | None = None, note: Callable[[], str] | None = None) -> None:
        """``cost``: what the job's requests have cost so far, shown beside the rate. ``note``: what
        else the stage is doing (its batches and their counts, in batch mode), looked at every
        :data:`NOTE_EVERY_S` seconds while rows do not move: beside the rate on a terminal, a log
        line when it changes otherwise."""
        self.stage, self.total, self.done, self.computed = stage, total, 0, 0
        self.cost = cost
        self.note = note
        self._noted = ""
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None
        self.started = time.perf_counter()
        self._next_log = 0.1
        self.tty = sys.stderr.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._swapped: list[tuple[Any, str, TextIO]] = []
        self._lock = threading.Lock()
        if self.tty:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console or Console(stderr=True), transient=False,
            )

    def __enter__(self) -> StageProgress:
        if self._progress is not None:
            real = sys.stderr
            self._progress.start()
            self._task = self._progress.add_task(self.stage, total=self.total, rate="")
            if sys.stderr is not real:  # rich redirects sys.stderr while live; send log handlers there too
                self._route_handlers(real, sys.stderr)
        if self.note is not None:
            self._refresher = threading.Thread(target=self._refreshing, name="progress-note", daemon=True)
            self._refresher.start()
        return self

    def _refreshing(self) -> None:
        while not self._stop.wait(NOTE_EVERY_S):
            self.refresh()

    def refresh(self) -> None:
        """Look at the ``note`` again and show it."""
        try:
            noted = self.note() if self.note is not None else ""
        except Exception as exc:  # a note is a nicety: it never stops a stage
            log.debug("%s: progress note: %s", self.stage, exc)
            return
        with self._lock:
            changed, self._noted = noted != self._noted, noted
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, rate=self._rate_text())
            elif changed and noted:
                log.info("%s: %d/%d rows, %s", self.stage, self.done, self.total, noted)

    def _route_handlers(self, real: TextIO, live: TextIO) -> None:
        loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                          if isinstance(lg, logging.Logger))]
        for logger in loggers:
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is real:
                    self._swapped.append((handler, "stream", real))
                    handler.stream = live
                    console = getattr(handler, "console", None)  # Prefect's handler prints through rich
                    if isinstance(console, Console) and console.file is real:
                        self._swapped.append((console, "file", real))
                        console.file = live

    def skip(self, rows: int) -> None:
        """Rows already on storage: counted as done, not in the rate."""
        self._move(rows, computed=False)

    def advance(self, rows: int) -> None:
        self._move(rows, computed=True)

    def _move(self, rows: int, computed: bool) -> None:
        with self._lock:
            self._count(rows, computed)

    def _count(self, rows: int, computed: bool) -> None:
        self.done += rows
        if computed:
            self.computed += rows
        if self.total and self.done >= self.total:
            self._noted = ""  # the note tells of work under way: none is left
        rate_text = self._rate_text()
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=rows, rate=rate_text)
        elif self.total and self.done / self.total >= self._next_log:
            self._next_log = (int(self.done / self.total * 10) + 1) / 10
            log.info("%s: %d/%d rows (%s)", self.stage, self.done, self.total, rate_text)

    def _rate_text(self) -> str:
        rate = self.computed / max(1e-9, time.perf_counter() - self.started)
        rate_text = f"{rate:,.1f} rows/s" if self.computed else ("from storage" if self.done else "")
        if self.cost is not None:
            rate_text += f"  cost {self.cost():,.4f}"
        if self._noted:
            rate_text += f"  {self._noted}"
        return rate_text

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        if self._progress is not None:
            self._progress.stop()
        for target, attribute, original in reversed(self._swapped):
            setattr(target, attribute, original)
        self._swapped.clear()
