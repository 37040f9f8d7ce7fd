"""``report.html``: one self-contained page to judge what a job made; ``sweep.html`` for a sweep.

Counts, throughput, the most common errors, a score histogram per scorer, the
scorers' own tables, how the scorers' rankings agree (``manifest["agreement"]``, see
:mod:`genflow.outputs.agreement`), the best and worst candidates of a sample of prompts (an
image grid for image jobs) and the config. Everything is in the one file:
charts are SVG and images are thumbnails, both as data URIs, so the page opens
from a bucket, an e-mail or a laptop with no network. Generated text is
untrusted: the template escapes every value and control characters are shown
as symbols.

The page reads what a job wrote (``manifest.json`` and its Parquet folders),
so ``genflow report OUTPUT`` rebuilds it at any time. Large jobs stay cheap:
the samples are read with a filter on a few prompt ids, and the histograms
read two columns.

The report knows no plugin. What it shows of a scorer beyond its scores comes
from the scorer, through two conventions of :mod:`genflow.api`:

- **Tables**: :meth:`genflow.api.Scorer.report_sections` turns the scorer's
  ``summarize`` metrics (``manifest["metrics"][name]``) into
  :class:`genflow.api.ReportSection` tables, each a section of the page. A scorer
  that is not installed where the report is built gets the generic default.
- **Verdicts**: a :class:`genflow.api.Score`'s ``details`` may hold ``"outcome"``,
  a short verdict (``passed``, ``timed out``); the page shows it beside the
  candidate, as ``<scorer>: <outcome>``.

The modules: :mod:`~genflow.outputs.report.read` (the job's folders read back, and
:func:`job_summary`, a sweep's row), :mod:`~genflow.outputs.report.samples` (sampled
prompts, candidates, thumbnails), :mod:`~genflow.outputs.report.sections` (the scorers'
tables), :mod:`~genflow.outputs.report.charts` (SVG histograms and bars),
:mod:`~genflow.outputs.report.page` (the job's page) and :mod:`~genflow.outputs.report.sweep`
(the sweep's page). This module writes them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from genflow.data import layout
from genflow.data.storage import Storage
from genflow.outputs.report.charts import PALETTE, bar_chart, histogram
from genflow.outputs.report.page import ReportError, build_report, report_context
from genflow.outputs.report.read import job_summary, metric_figures
from genflow.outputs.report.render import visible
from genflow.outputs.report.samples import SAMPLE_PROMPTS, SHOWN_PER_END, thumbnail
from genflow.outputs.report.sweep import (
    REPORT_FILE,
    SWEEP_FILE,
    SWEEP_TABLE,
    build_sweep_report,
    write_sweep_report,
)

if TYPE_CHECKING:
    from genflow.config import StorageSpec

__all__ = [
    "PALETTE", "REPORT_FILE", "SAMPLE_PROMPTS", "SHOWN_PER_END", "SWEEP_FILE", "ReportError", "bar_chart",
    "build_report", "build_sweep_report", "histogram", "job_summary", "metric_figures", "rebuild",
    "report_context", "thumbnail", "visible", "write_report", "write_report_safely", "write_sweep_report",
]

log = logging.getLogger(__name__)


def write_report(storage: Storage, manifest: dict[str, Any] | None = None) -> str:
    """Write ``report.html`` next to the job's outputs; returns its URI."""
    storage.write_bytes(REPORT_FILE, build_report(storage, manifest).encode())
    return storage.uri_of(REPORT_FILE)


def write_report_safely(storage: Storage, manifest: dict[str, Any]) -> str | None:
    """``write_report`` for the end of a job: a report that cannot be built never fails the job."""
    started = time.perf_counter()
    try:
        uri = write_report(storage, manifest)
    except Exception as exc:  # the data is written; the page is a convenience
        log.warning("report.html not written (%s: %s); rebuild it with `genflow report %s`",
                    type(exc).__name__, exc, storage.uri, exc_info=log.isEnabledFor(logging.DEBUG))
        return None
    log.info("report: %s (%.1fs)", uri, time.perf_counter() - started)
    return uri


def rebuild(uri: str, storage: StorageSpec | None = None) -> list[str]:
    """Rebuild the pages of a job folder (report.html) or a sweep folder (sweep.html and each run's).

    ``storage``: how ``s3://`` is reached (the job's ``storage:`` settings, as
    ``genflow report --endpoint-url/--region/--anonymous`` give them); the same for
    every run folder of a sweep."""
    import pyarrow.parquet as pq

    from genflow.config import StorageSpec

    settings = (storage or StorageSpec()).model_dump()
    root = Storage.open(uri, **settings)
    if root.exists(layout.MANIFEST):
        return [write_report(root)]
    if root.exists(SWEEP_TABLE):
        with root.fs.open_input_file(root.path(SWEEP_TABLE)) as f:
            table = pq.read_table(f)
        written = []
        for run in table["run"].to_pylist():
            run_storage = Storage.open(f"{uri.rstrip('/')}/{run}", **settings)
            if run_storage.exists(layout.MANIFEST):
                written.append(write_report(run_storage))
        return [write_sweep_report(root, table), *written]
    raise ReportError(f"{uri}: no {layout.MANIFEST} or {SWEEP_TABLE} here; give the output folder of a job or sweep")
