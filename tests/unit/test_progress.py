"""Stage progress: log lines on a pipe, a bar on a terminal that log lines print above."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from genflow.runtime.progress import StageProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_it_logs_every_tenth_and_rates_only_computed_rows(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="genflow"), StageProgress("generate tiny", 100) as bar:
        bar.skip(50)  # a resumed job: half the shards were on storage
        bar.advance(50)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "generate tiny: 50/100 rows (from storage)"
    assert re.fullmatch(r"generate tiny: 100/100 rows \([\d,.]+ rows/s\)", lines[1])
    assert bar.computed == 50 and bar.done == 100


def test_on_a_terminal_log_lines_print_above_the_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    handler = logging.StreamHandler(terminal)
    logger = logging.getLogger("genflow.test-progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with StageProgress("score reward", 10) as bar:
            assert handler.stream is not terminal  # routed through the live display while the bar shows
            logger.warning("shard 0: 10 scores")
            bar.advance(10)
        assert handler.stream is terminal
    finally:
        logger.removeHandler(handler)
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue()).replace("\r", "\n")
    assert "shard 0: 10 scores" in screen.splitlines()  # a whole line, not glued to a bar frame
    assert "10/10" in screen
