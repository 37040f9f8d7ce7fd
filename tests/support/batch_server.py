"""A stand-in of OpenAI's Batch API on 127.0.0.1, for the batch-mode tests.

It is the chat-completions stand-in (:class:`~support.servers.StandinServer`: live requests
answered and counted as before) with the documented Batch API beside it:

- ``POST /v1/files`` (multipart, ``purpose`` and ``file``), ``GET /v1/files/{id}`` and
  ``GET /v1/files/{id}/content``;
- ``POST /v1/batches`` (``input_file_id``, ``endpoint``, ``completion_window``,
  ``metadata``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

A batch goes through the documented lifecycle, one step each time it is retrieved, so a
test depends on no timing: ``validating`` (the input file's lines are checked: a bad one
fails the batch, ``errors.data``), ``in_progress`` (held there while :attr:`hold` is set),
``finalizing``, then ``completed`` with an output file (one line per answered request,
``response.status_code`` 200 and the completion's body, the same answer the live endpoint
gives) and an error file (the lines :attr:`fail_line` fails, status 500); or ``expired``
when :attr:`expire_after` says so (the lines past that many answered, ``batch_expired`` in
the error file); ``cancelling`` then ``cancelled`` after a cancel. ``request_counts``
says ``total``, ``completed`` and ``failed`` as a provider does.

``batches_created`` and ``lines`` (a Counter of ``custom_id`` over every batch created)
count what a client asked for: what it would have paid.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from support import servers  # puts benchmarks/ on the path
from support.servers import StandinServer

completion = sys.modules["benchmarks.standin_server"].completion

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
WINDOWS = ("24h",)


@dataclass
class _Batch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any]
    ordinal: int
    """1 for the first batch created, 2 for the second..."""
    status: str = "validating"
    lines: list[dict[str, Any]] = field(default_factory=list)
    created_at: int = field(default_factory=lambda: int(time.time()))
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    completed: int = 0
    failed: int = 0

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "batch", "endpoint": self.endpoint, "input_file_id": self.input_file_id,
                "completion_window": self.completion_window, "status": self.status,
                "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
                "created_at": self.created_at, "metadata": self.metadata,
                "errors": {"object": "list", "data": self.errors} if self.errors else None,
                "request_counts": {"total": len(self.lines), "completed": self.completed, "failed": self.failed}}


class BatchServer(StandinServer):
    """The stand-in with a Batch API (see the module's docstring).

    ``fail_line(custom_id, batch_ordinal)``: True fails that line in that batch (status 500
    in the error file). ``expire_after``: by batch ordinal, how many lines the batch answers
    before it expires. ``hold``: batches stay ``in_progress`` while it is set."""

    def __init__(self, answer: Callable[[str, dict[str, Any]], str] = servers.echo_answer) -> None:
        super().__init__(0.0, answer)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.batches: dict[str, _Batch] = {}
        self.batches_created = 0
        self.lines: Counter[str] = Counter()
        self.fail_line: Callable[[str, int], bool] = lambda custom_id, ordinal: False
        self.expire_after: dict[int, int] = {}
        self.hold = False
        self.uploads_purposes: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 2**20)  # a batch's input file is large
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files/{id}", self._file)
        app.router.add_get("/v1/files/{id}/content", self._content)
        app.router.add_post("/v1/batches", self._create)
        app.router.add_get("/v1/batches/{id}", self._retrieve)
        app.router.add_post("/v1/batches/{id}/cancel", self._cancel)
        return app

    # -- files -------------------------------------------------------------------

    def _store(self, data: bytes, purpose: str) -> str:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = (data, purpose)
        return file_id

    async def _upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch" or not isinstance(upload, web.FileField):
            return _error(400, "expected multipart purpose=batch and a file")
        data = upload.file.read()
        file_id = self._store(data, "batch")
        self.uploads_purposes.append(str(purpose))
        return web.json_response({"id": file_id, "object": "file", "bytes": len(data), "purpose": "batch",
                                  "filename": upload.filename, "created_at": int(time.time())})

    async def _file(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, "no such file")
        return web.json_response({"id": request.match_info["id"], "object": "file", "bytes": len(found[0]),
                                  "purpose": found[1]})

    async def _content(self, request: web.Request) -> web.Response:
        found = self.files.get(request.match_info["id"])
        if found is None:
            return _error(404, "no such file")
        return web.Response(body=found[0], content_type="application/jsonl")

    # -- batches -----------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        if body.get("input_file_id") not in self.files:
            return _error(400, f"input_file_id {body.get('input_file_id')!r} not found")
        if body.get("endpoint") not in ENDPOINTS:
            return _error(400, f"endpoint must be one of {ENDPOINTS}")
        if body.get("completion_window") not in WINDOWS:
            return _error(400, f"completion_window must be one of {WINDOWS}")
        self.batches_created += 1
        batch = _Batch(f"batch_{uuid.uuid4().hex[:16]}", body["input_file_id"], body["endpoint"],
                       body["completion_window"], body.get("metadata") or {}, self.batches_created)
        for raw in self.files[batch.input_file_id][0].splitlines():
            try:
                batch.lines.append(json.loads(raw))
            except ValueError:
                batch.lines.append({})
        self.lines.update(str(line.get("custom_id")) for line in batch.lines)
        self.batches[batch.id] = batch
        return web.json_response(batch.view())

    async def _retrieve(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        self._advance(batch)
        return web.json_response(batch.view())

    async def _cancel(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "no such batch")
        if batch.status in ("validating", "in_progress", "finalizing"):
            batch.status = "cancelling"
        return web.json_response(batch.view())

    def _advance(self, batch: _Batch) -> None:
        """One step of the lifecycle."""
        if batch.status == "validating":
            batch.errors = self._invalid(batch)
            batch.status = "failed" if batch.errors else "in_progress"
        elif batch.status == "in_progress" and not self.hold:
            batch.status = "finalizing"
        elif batch.status == "finalizing":
            limit = self.expire_after.get(batch.ordinal)
            self._answer(batch, limit)
            batch.status = "expired" if limit is not None and limit < len(batch.lines) else "completed"
        elif batch.status == "cancelling":
            self._answer(batch, 0)
            batch.status = "cancelled"

    def _invalid(self, batch: _Batch) -> list[dict[str, Any]]:
        errors, seen = [], set()
        for i, line in enumerate(batch.lines, 1):
            problem = None
            if not line.get("custom_id"):
                problem = "missing custom_id"
            elif line["custom_id"] in seen:
                problem = f"duplicate custom_id {line['custom_id']}"
            elif line.get("method") != "POST" or line.get("url") != batch.endpoint:
                problem = f"method must be POST and url {batch.endpoint}"
            elif not isinstance(line.get("body"), dict):
                problem = "body must be an object"
            seen.add(line.get("custom_id"))
            if problem:
                errors.append({"code": "invalid_request", "message": problem, "line": i})
        return errors

    def _answer(self, batch: _Batch, limit: int | None) -> None:
        """Write the output and error files: the first ``limit`` lines are processed (all: None)."""
        output, errors = [], []
        for i, line in enumerate(batch.lines):
            custom_id = line["custom_id"]
            request_id = f"req_{uuid.uuid4().hex[:12]}"
            if limit is not None and i >= limit:
                errors.append({"id": f"batch_req_{i}", "custom_id": custom_id, "response": None,
                               "error": {"code": "batch_expired",
                                         "message": "This request could not be executed before the completion "
                                                    "window expired."}})
            elif self.fail_line(custom_id, batch.ordinal):
                errors.append({"id": f"batch_req_{i}", "custom_id": custom_id, "error": None,
                               "response": {"status_code": 500, "request_id": request_id,
                                            "body": {"error": {"message": "The server had an error",
                                                               "type": "server_error"}}}})
            else:
                path, body = line["url"], line["body"]
                output.append({"id": f"batch_req_{i}", "custom_id": custom_id, "error": None,
                               "response": {"status_code": 200, "request_id": request_id,
                                            "body": completion(path, body, self.answer(path, body))}})
        batch.completed, batch.failed = len(output), len(errors)
        if output:
            batch.output_file_id = self._store(_jsonl(output), "batch_output")
        if errors:
            batch.error_file_id = self._store(_jsonl(errors), "batch_output")


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)
