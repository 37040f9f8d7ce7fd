"""How a job (or a sweep of jobs) stops short of its end: the errors raised for it as a whole.

They sit low, beside the engine, so that the stages that raise them, the outputs that report
them (``genflow.outputs.events``) and the flows and the CLI that catch them all import them
from below."""

from __future__ import annotations

from typing import Any


class JobFailed(RuntimeError):
    """The job ran but produced more errors than ``max_error_fraction`` allows.

    Its outputs are written all the same; ``manifest`` says what they are."""

    def __init__(self, message: str, manifest: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.manifest = manifest


class BudgetSpent(JobFailed):
    """The job's requests have cost ``max_cost``: it stopped, keeping every answer it had."""


class PoolStopped(RuntimeError):
    """A stage's pool was stopped (the job failed, or was interrupted) before it answered: what still
    waits for its answers ends with this, so no thread is left waiting on the workers."""


class SweepFailed(RuntimeError):
    """One or more runs of a sweep failed (the others finished and are in sweep.parquet)."""
