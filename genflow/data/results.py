"""What one call of a plugin leaves for a row, and how it may be written.

A generator's call gives a :class:`genflow.api.Generation`, a scorer's a
:class:`genflow.api.Score`; a row the plugin could not do is a :class:`Failure` (its
``errors/`` row). The Ray workers make them (:mod:`genflow.engine.worker`), the request
journal keeps them (:mod:`genflow.data.journal`), and the stages write them, each first
through :func:`scrub_result`: no secret of the job a server sent back is written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from genflow.api import Generation, RowError, Score
from genflow.secrets import Scrubber, installed


@dataclass
class Failure:
    """A row that could not be processed: the error and where it came from."""

    error: str
    traceback: str
    transient: bool = False
    """It may pass if sent again: the request path's retries of a 429, a 5xx or a timeout ran
    out. Its ``errors/`` row says so, and the next run of the job sends it again."""
    prompt_tokens: int | None = None
    """Tokens paid for on the way to the failure (an answer that missed a schema, a verdict that
    could not be read): they count towards ``max_cost`` and the stage's cost."""
    completion_tokens: int | None = None


def failure_of(error: RowError) -> Failure:
    """A permanent failure, with the tokens the plugin says it paid for on the way (if it says):
    a local judge's unreadable verdicts cost as much as a served one's."""
    return Failure(str(error), "", prompt_tokens=_count(getattr(error, "prompt_tokens", None)),
                   completion_tokens=_count(getattr(error, "completion_tokens", None)))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def scrub_result(result: Any, scrubber: Scrubber | None = None) -> Any:
    """A plugin's result as it may be written: a candidate whose text holds a secret becomes a
    failure (its row goes to ``errors/``, not to training data); a failure's texts and a score's
    details and own columns are blanked. The same object when it holds no secret. ``scrubber``: the process's
    (:func:`genflow.secrets.installed`) unless given."""
    scrubber = installed() if scrubber is None else scrubber
    if not scrubber:
        return result
    if isinstance(result, Failure):
        error, trace = scrubber.scrub(result.error), scrubber.scrub(result.traceback)
        if error is result.error and trace is result.traceback:
            return result
        return dataclasses.replace(result, error=error, traceback=trace)  # keeps ``transient``
    if isinstance(result, Generation):
        for name in ("text", "raw", "finish_reason", "messages"):  # an episode's conversation too
            value = getattr(result, name)
            secret = scrubber.find(value if value is None or isinstance(value, str) else json.dumps(value))
            if secret is not None:
                failure = Failure(f"the server's answer held a secret of this job ({secret.where}): the answer "
                                  "was removed, and the candidate is not written to generations/", "")
                paid = (("prompt_tokens", result.prompt_tokens), ("completion_tokens", result.num_tokens))
                for field, tokens in paid:
                    if hasattr(failure, field):  # the answer was paid for: its cost stays counted on a rerun
                        setattr(failure, field, tokens)
                return failure
        return result
    if isinstance(result, Score):  # its details and its own columns' values
        details, columns = scrubber.scrub_data(result.details), scrubber.scrub_data(result.columns)
        if details is result.details and columns is result.columns:
            return result
        return dataclasses.replace(result, details=details, columns=columns)
    return result
