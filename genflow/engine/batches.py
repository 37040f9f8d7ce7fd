"""Batch mode: a stage's requests through a provider's Batch API (``requests.mode: batch``).

A scheduled job does not need its answers within seconds; a provider's Batch API answers
within a window (``completion_window``, 24 hours) at about half the price. In batch mode
the request worker sends each stream of requests it is given (a pack of shards) this way,
in OpenAI's documented protocol, which hosted providers and vLLM's batch runner share:

1. every request's body, as the plugin builds it (``batch_request``), is a line of a JSONL
   file ``{"custom_id", "method": "POST", "url", "body"}``; ``custom_id`` is the request's
   ``generation_id`` (it hashes the model, the prompt, the sample, its seed and the
   params). Over ``max_batch_requests`` lines or ``max_batch_bytes`` a file, the lines are
   split over several batches;
2. the file is uploaded (``POST /files``, purpose ``batch``) and a batch created
   (``POST /batches``: ``input_file_id``, ``endpoint``, ``completion_window``);
3. **its id is journaled at once** (:class:`BatchJournal`, one small JSON file per batch
   under the output's ``_state/batches/<label>/``, with the ``custom_id`` s it holds). A job
   killed while its batches run, run again, reattaches to the batch holding each request
   and never creates a second one for it: that would be paying twice. The records stay
   (a batch's output file is read again by a rerun that had not journaled its answers);
4. the batch is polled (``GET /batches/{id}``), the first time within about 2 s, then at
   waits growing to ``poll_s``; each change of status is logged with its
   ``request_counts``;
5. once it ends (``completed``, ``expired``, ``failed``, ``cancelled``), its output and
   error files are read and each line is mapped back by ``custom_id``: an answer with
   status 200 goes through the plugin's ``batch_result``, a failed or expired line (or one
   missing) is sent again in a new batch, up to ``max_resubmits`` times, then becomes an
   ``errors/`` row.

The job's response cache (:mod:`genflow.engine.cache`) is looked up before a request is
put in a batch, and every batch answer fills it. Costs use the stage's batch price
(:meth:`genflow.config.PriceSpec.rates`). Stopping a job leaves its batches running at the
provider: running it again collects their answers.

A request plugin offers batch mode with three methods: ``batch_request(item)`` (the
request's JSON body, or a :class:`~genflow.api.RowError`), ``batch_result(item, body)``
(the result of a response body; a :class:`~genflow.api.TransientError` for one that cannot
be read, sent again like a failed line) and ``batch_api()`` (an object with the Batch API's
calls: ``batch_upload``, ``batch_create``, ``batch_retrieve``, ``file_content``,
``batch_url``; an OpenAI-protocol client has them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from genflow.api import RowError, TransientError
from genflow.config import RequestsSpec
from genflow.data.names import path_component
from genflow.data.results import Failure, failure_of
from genflow.data.storage import Storage
from genflow.engine.cache import ResponseCache

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "expired", "failed", "cancelled"})
"""A batch's statuses once it has ended (``validating``, ``in_progress``, ``finalizing`` and
``cancelling`` are on the way)."""
FIRST_POLL_S = 1.0
"""The first look at a new batch: within about 2 s (a small batch may be done)."""
POLL_GROWTH = 1.5


def _say_on_stderr() -> None:
    """Batches take minutes to hours: what they do is told as it happens. A request worker's
    standard error reaches the job's terminal (Ray forwards it), its logging does not."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def supports_batches(plugin: Any) -> bool:
    return all(callable(getattr(plugin, name, None)) for name in ("batch_request", "batch_result", "batch_api"))


@dataclass
class BatchRecord:
    """A batch as journaled the moment it was created."""

    batch_id: str
    custom_ids: list[str]
    round: int = 0
    """0 for a request's first batch, n for its n-th sending again."""
    created: float = field(default_factory=time.time)


class BatchJournal:
    """The batches of a stage, one JSON file each under ``folder`` (local or ``s3://``)."""

    def __init__(self, folder: str) -> None:
        self.storage = Storage.open(folder)
        self.storage.makedirs()

    def load(self) -> list[BatchRecord]:
        records = []
        for rel in self.storage.list("", ".json"):
            try:
                data = json.loads(self.storage.read_bytes(rel))
                records.append(BatchRecord(str(data["batch_id"]), [str(c) for c in data["custom_ids"]],
                                           int(data.get("round", 0)), float(data.get("created", 0.0))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("batch journal %s: skipping %s (%s)", self.storage.uri, rel, exc)
        return sorted(records, key=lambda r: (r.round, r.created))

    def record(self, record: BatchRecord) -> None:
        # The id is the provider's: a safe name is kept, any other is hashed, so two ids never share a file.
        self.storage.write_bytes(f"{path_component(record.batch_id)}.json", json.dumps(record.__dict__).encode())


@dataclass
class _Request:
    """One item of the stream: its lines (one, or one per question of a judge) and their answers."""

    index: int
    item: Any
    lines: dict[str, dict[str, Any]]
    """Each line's body by ``custom_id``, in the order the plugin gave them."""
    many: bool
    """The plugin gave a list of bodies: ``batch_result`` takes a list of answers."""
    started: float
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)
    """Lines answered from the response cache."""
    done: bool = False


def item_id(item: Any) -> str:
    """A stream item's id: its ``generation_id`` (a prompt's list of candidates: its first's)."""
    first = item[0] if isinstance(item, (list, tuple)) else item
    return str(first.generation_id)


class BatchRunner:
    """Sends streams of requests through a plugin's Batch API (see the module's docstring)."""

    def __init__(self, plugin: Any, spec: RequestsSpec, label: str = "", cache: ResponseCache | None = None,
                 sleep: Any = asyncio.sleep) -> None:
        if not supports_batches(plugin):
            raise ValueError(f"{type(plugin).__name__} does not support requests.mode: batch (a plugin offers it "
                             "with batch_request, batch_result and batch_api); use mode: live")
        if not spec.batch_journal:
            raise ValueError("requests.mode batch needs requests.batch_journal (genflow sets it from the output)")
        self.plugin, self.spec, self.label, self.cache = plugin, spec, label, cache
        self.api = plugin.batch_api()
        self.journal = BatchJournal(spec.batch_journal)
        self.sleep = sleep
        self.created = 0
        """Batches this worker created (a reattached one is not counted)."""
        self.reattached = 0
        self.resubmitted = 0
        """Lines sent again in a new batch after they failed or expired."""
        self.states: dict[str, dict[str, Any]] = {}
        """Each batch's last known status and request counts, by id: the progress."""
        _say_on_stderr()

    async def run(self, items: list[Any]) -> AsyncIterator[list[Any]]:
        """Every item's answer, in lists of those that arrived together: ``(index, result, seconds,
        batches it went through, requests paid)`` (the request worker's ``Answer`` fields)."""
        arrived: asyncio.Queue[Any] = asyncio.Queue()
        now = time.monotonic()
        ready: list[Any] = []
        requests: list[_Request] = []
        for index, item in enumerate(items):
            body = self.plugin.batch_request(item)
            if isinstance(body, RowError):
                ready.append((index, failure_of(body), 0.0, 1, 0))
                continue
            base = item_id(item)
            bodies = list(body) if isinstance(body, list) else [body]
            lines = {f"{base}-{k}" if isinstance(body, list) else base: b for k, b in enumerate(bodies)}
            request = _Request(index, item, lines, isinstance(body, list), now)
            if self.cache is not None:
                for custom_id, line in lines.items():
                    stored = await self.cache.aget(self.api.path, line)
                    if stored is not None:
                        request.answers[custom_id] = stored
                        request.cached.add(custom_id)
                if len(request.answers) == len(lines):
                    result = self._result(request)
                    if not isinstance(result, TransientError):
                        for one in result if isinstance(result, list) else [result]:
                            if hasattr(one, "cached"):
                                one.cached = True
                        ready.append((index, result, 0.0, 1, 0))
                        continue
                    request.answers.clear()  # a stored answer the plugin cannot read: sent again
                    request.cached.clear()
            requests.append(request)
        if ready:
            yield ready
        if not requests:
            return
        pending = {c: r for r in requests for c in r.lines if c not in r.answers}
        latest: dict[str, BatchRecord] = {}
        for record in self.journal.load():  # oldest first: each line's latest batch wins
            for custom_id in record.custom_ids:
                if custom_id in pending:
                    latest[custom_id] = record
        tasks = []
        for record in {r.batch_id: r for r in latest.values()}.values():
            mine = [c for c in record.custom_ids if latest.get(c) is record]
            log.info("%s: batch %s holds %d of these requests (created by an earlier run): waiting for it",
                     self.label, record.batch_id, len(mine))
            self.reattached += 1
            tasks.append(asyncio.ensure_future(self._follow(record, mine, pending, arrived)))
        fresh = [c for c in pending if c not in latest]
        if fresh:
            tasks.append(asyncio.ensure_future(self._submit(fresh, 0, pending, arrived)))
        waiting = len(requests)
        try:
            while waiting:
                batch = [await arrived.get()]
                while not arrived.empty():
                    batch.append(arrived.get_nowait())
                for answer in batch:
                    if isinstance(answer, BaseException):
                        raise answer
                waiting -= len(batch)
                yield batch
        finally:
            for task in tasks:
                task.cancel()  # the provider's batches run on: a rerun reattaches to them

    async def _submit(self, line_ids: list[str], round_: int, pending: dict[str, _Request],
                      arrived: asyncio.Queue[Any]) -> None:
        """Create the batches of these lines (split by the limits) and follow each."""
        try:
            follows = []
            for chunk in self._chunks(line_ids, pending):
                record = await self._create(chunk, round_)
                follows.append(self._follow(record, [c for c, _ in chunk], pending, arrived))
            await asyncio.gather(*follows)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            arrived.put_nowait(exc)

    def _chunks(self, line_ids: list[str], pending: dict[str, _Request]) -> list[list[tuple[str, bytes]]]:
        url = self.api.batch_url()
        chunks: list[list[tuple[str, bytes]]] = [[]]
        size = 0
        for custom_id in line_ids:
            line = (json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                                "body": pending[custom_id].lines[custom_id]}, ensure_ascii=False) + "\n").encode()
            if chunks[-1] and (len(chunks[-1]) >= self.spec.max_batch_requests
                               or size + len(line) > self.spec.max_batch_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append((custom_id, line))
            size += len(line)
        return [c for c in chunks if c]

    async def _create(self, chunk: list[tuple[str, bytes]], round_: int) -> BatchRecord:
        data = b"".join(line for _, line in chunk)
        file_id = await self._retrying(self.api.batch_upload, data, f"genflow-{self.label}-{round_}.jsonl")
        batch = await self._retrying(self.api.batch_create, file_id, self.api.batch_url(),
                                     self.spec.completion_window,
                                     {"genflow_stage": self.label[:500], "genflow_round": str(round_)})
        record = BatchRecord(str(batch["id"]), [c for c, _ in chunk], round_)
        self.journal.record(record)  # before anything else: a kill from here on reattaches to it
        self.created += 1
        self.states[record.batch_id] = {"status": batch.get("status"), "request_counts": batch.get("request_counts")}
        log.info("%s: batch %s created for %d requests (round %d); if the job stops, the batch runs on at the "
                 "provider and running the job again collects its answers", self.label, record.batch_id,
                 len(chunk), round_)
        return record

    async def _follow(self, record: BatchRecord, line_ids: list[str], pending: dict[str, _Request],
                      arrived: asyncio.Queue[Any]) -> None:
        """Poll a batch until it ends, then hand out the answers of the requests it completes and
        send its failed lines again (or fail their requests, past ``max_resubmits``)."""
        try:
            try:
                batch = await self._wait(record.batch_id)
            except RowError as exc:  # gone at the provider (another account, deleted): its lines are sent again
                log.warning("%s: batch %s cannot be read (%s): its requests are sent in a new batch", self.label,
                            record.batch_id, exc)
                batch = {"id": record.batch_id, "status": "failed", "errors": {"data": [{"message": str(exc)}]}}
            answered, failed = await self._lines(batch, set(line_ids))
            touched: dict[int, _Request] = {}
            for custom_id in line_ids:
                request = pending[custom_id]
                touched[id(request)] = request
                if custom_id in answered:
                    request.answers[custom_id] = answered[custom_id]
                else:
                    failed.setdefault(custom_id, f"no answer (the batch {batch.get('status')})")
            again: list[str] = []
            for request in touched.values():
                if request.done:
                    continue
                mine = [c for c in line_ids if pending[c] is request]
                if any(c in failed for c in mine) or len(request.answers) < len(request.lines):
                    retry = [c for c in mine if c in failed]
                    if not retry:
                        continue  # its other lines are in another batch, still running
                    if record.round < self.spec.max_resubmits:
                        again += retry
                        continue
                    why = failed[retry[0]]
                    self._deliver(request, Failure(f"the batch API did not answer after {record.round + 1} "
                                                   f"batches: {why} (batch {record.batch_id})", ""),
                                  record.round + 1, arrived)
                    continue
                result = self._result(request)
                if isinstance(result, TransientError):  # an answer that cannot be read: as a failed line
                    if record.round < self.spec.max_resubmits:
                        for c in mine:
                            request.answers.pop(c, None)
                        again += mine
                        continue
                    result = Failure(f"the batch API's answer could not be read after {record.round + 1} "
                                     f"batches: {result} (batch {record.batch_id})", "")
                elif self.cache is not None:
                    for c in mine:
                        await self.cache.aput(self.api.path, request.lines[c], request.answers[c])
                self._deliver(request, result, record.round + 1, arrived)
            if again:
                self.resubmitted += len(again)
                log.info("%s: %d requests of batch %s failed or expired: sending them again in a new batch",
                         self.label, len(again), record.batch_id)
                await self._submit(again, record.round + 1, pending, arrived)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            arrived.put_nowait(exc)

    def _deliver(self, request: _Request, result: Any, batches: int, arrived: asyncio.Queue[Any]) -> None:
        request.done = True
        if request.cached and request.cached == set(request.lines):  # nothing of it was paid for now
            for one in result if isinstance(result, list) else [result]:
                if hasattr(one, "cached"):
                    one.cached = True
        arrived.put_nowait((request.index, result, time.monotonic() - request.started, batches,
                            len(request.lines) - len(request.cached)))

    async def _retrying(self, call: Any, *args: Any) -> Any:
        """A Batch API call, sent again after a transient failure (up to ``max_retries``)."""
        attempt = 0
        while True:
            try:
                return await call(*args)
            except TransientError as exc:
                if attempt >= self.spec.max_retries:
                    raise
                attempt += 1
                delay = min(self.spec.max_backoff_s, self.spec.backoff_s * 2 ** attempt)
                if exc.retry_after is not None and exc.retry_after == exc.retry_after and exc.retry_after >= 0:
                    delay = max(delay, min(exc.retry_after, self.spec.max_backoff_s))
                await self.sleep(delay)

    async def _wait(self, batch_id: str) -> dict[str, Any]:
        delay = FIRST_POLL_S
        status = None
        while True:
            await self.sleep(min(delay, self.spec.poll_s))
            batch: dict[str, Any] = await self._retrying(self.api.batch_retrieve, batch_id)
            self.states[batch_id] = {"status": batch.get("status"), "request_counts": batch.get("request_counts")}
            if batch.get("status") != status:
                status = batch.get("status")
                counts = batch.get("request_counts") or {}
                log.info("%s: batch %s %s (%s of %s answered, %s failed)", self.label, batch_id, status,
                         counts.get("completed", 0), counts.get("total", "?"), counts.get("failed", 0))
            if status in TERMINAL:
                return batch
            delay *= POLL_GROWTH

    async def _lines(self, batch: dict[str, Any], wanted: set[str]) -> tuple[dict[str, Any], dict[str, str]]:
        """The answered lines' bodies and the failed lines' reasons, by ``custom_id``."""
        answered: dict[str, Any] = {}
        failed: dict[str, str] = {}
        for key in ("output_file_id", "error_file_id"):
            file_id = batch.get(key)
            if not file_id:
                continue
            try:
                data = await self._retrying(self.api.file_content, file_id)
            except RowError as exc:  # gone (a provider keeps files for a while): the lines are sent again
                log.warning("%s: the %s of batch %s cannot be read (%s)", self.label, key, batch.get("id"), exc)
                continue
            for raw in data.splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    continue
                custom_id = line.get("custom_id") if isinstance(line, dict) else None
                if custom_id not in wanted:
                    continue
                response = line.get("response") if isinstance(line.get("response"), dict) else None
                if response is not None and response.get("status_code") == 200 and isinstance(
                        response.get("body"), dict):
                    answered[custom_id] = response["body"]
                    failed.pop(custom_id, None)
                elif custom_id not in answered:
                    failed[custom_id] = _line_error(line)
        if batch.get("status") == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            reason = "; ".join(str(e.get("message")) for e in errors if isinstance(e, dict)) or "the batch failed"
            for custom_id in wanted - set(answered):
                failed.setdefault(custom_id, reason)
        return answered, failed

    def _result(self, request: _Request) -> Any:
        answers = [request.answers[c] for c in request.lines]
        try:
            result = self.plugin.batch_result(request.item, answers if request.many else answers[0])
        except TransientError as exc:
            return exc
        except RowError as exc:
            return failure_of(exc)
        return failure_of(result) if isinstance(result, RowError) else result

    def progress(self) -> str:
        """The batches and their counts, as the progress line shows them (empty: none yet)."""
        if not self.states:
            return ""
        running = [s for s in self.states.values() if s.get("status") not in TERMINAL]
        counts = [s.get("request_counts") or {} for s in self.states.values()]
        answered = sum(int(c.get("completed") or 0) for c in counts)
        total = sum(int(c.get("total") or 0) for c in counts)
        failed = sum(int(c.get("failed") or 0) for c in counts)
        return (f"batches: {len(running)} running, {len(self.states) - len(running)} ended; "
                f"{answered}/{total} answered" + (f", {failed} failed" if failed else ""))

    def stats(self) -> dict[str, Any]:
        return {"batches": self.created, "batches_reattached": self.reattached,
                "batch_lines_resubmitted": self.resubmitted}


async def cancel_batches(api: Any, journal: BatchJournal) -> list[tuple[str, str]]:
    """Cancel the journal's batches that have not ended (``POST /batches/{id}/cancel``): each
    batch's id and its status after. A rerun sends their unanswered requests in new batches."""
    out = []
    for record in journal.load():
        try:
            batch = await api.batch_retrieve(record.batch_id)
            if batch.get("status") not in TERMINAL and batch.get("status") != "cancelling":
                batch = await api.batch_cancel(record.batch_id)
            out.append((record.batch_id, str(batch.get("status"))))
        except (RowError, TransientError) as exc:
            out.append((record.batch_id, f"unknown ({exc})"))
    return out


def _line_error(line: dict[str, Any]) -> str:
    error = line.get("error")
    if isinstance(error, dict):
        return f"{error.get('code') or 'error'}: {error.get('message') or ''}".strip()
    response: dict[str, Any] = line["response"] if isinstance(line.get("response"), dict) else {}
    body: dict[str, Any] = response["body"] if isinstance(response.get("body"), dict) else {}
    message = body["error"].get("message") if isinstance(body.get("error"), dict) else None
    return f"status {response.get('status_code')}: {message or 'no answer'}"
