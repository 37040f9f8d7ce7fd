"""Job storage through ``pyarrow.fs``: local folders and ``s3://`` buckets alike.

Writes are all-or-nothing: a file is written under a temporary name and moved
into place (on S3 an object only appears once its upload completes), so a
killed job never leaves a half-written part that a rerun would trust.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TEMPORARY_PREFIX = ".tmp-"
"""Name prefix of files being written; hidden from readers (pyarrow, ``datasets``) and
removed when a job that was killed mid-write runs again."""


class StorageError(RuntimeError):
    pass


def disk_full(exc: BaseException) -> bool:
    """An ENOSPC, as Python raises it or as pyarrow words it (its OSError carries no errno)."""
    return isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left on device" in str(exc))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _s3_filesystem(endpoint_url: str | None = None, region: str | None = None,
                   anonymous: bool = False) -> pafs.S3FileSystem:
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "region": region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "anonymous": anonymous,
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if not anonymous and os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, endpoint_url: str | None = None, region: str | None = None,
                   anonymous: bool = False) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a local path or URI."""
    if uri.startswith("s3://"):
        return _s3_filesystem(endpoint_url, region, anonymous), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def file_check(info: pafs.FileInfo, data: bytes) -> dict[str, Any]:
    """What a marker records of a part it vouches for: its size and modification time (which
    a rerun reads from the listing it makes anyway) and its content hash (read only when the
    time differs: a copied folder, a part rewritten with the same size)."""
    return {"size": info.size, "mtime_ns": info.mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class Storage:
    """A root folder (or bucket prefix) with atomic writes below it."""

    uri: str
    fs: pafs.FileSystem
    root: str
    written: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)
    """``file_check`` of each file this process wrote, by relative path: what markers record."""
    options: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """``open``'s keywords (endpoint, region, anonymous): for a second client of the same storage."""

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None, region: str | None = None,
             anonymous: bool = False) -> Storage:
        fs, root = filesystem_for(uri, endpoint_url, region, anonymous)
        return cls(uri, fs, root, options={"endpoint_url": endpoint_url, "region": region, "anonymous": anonymous})

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def uri_of(self, *parts: str) -> str:
        if self.local:
            return self.path(*parts)
        return "s3://" + self.path(*parts)

    def check(self) -> None:
        """Fail at once, with one message, when the bucket cannot be reached or does not exist."""
        if self.local:
            return
        bucket = self.root.split("/")[0]
        try:
            info = self.fs.get_file_info(bucket)
        except OSError as exc:
            raise StorageError(f"cannot reach storage {self.uri}: {exc}") from None
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{self.uri}: bucket {bucket!r} does not exist")

    def probe_write(self) -> None:
        """Write and remove a small file where the job's markers go: a folder that cannot be
        written (permissions, a read-only disk, a bucket without write access) fails now, in
        one message, before Ray or any model starts."""
        rel = f"_state/{TEMPORARY_PREFIX}probe-{uuid.uuid4().hex}"
        try:
            self.makedirs("_state")
            self.write_bytes(rel, b"genflow write probe")
            self.delete(rel)
        except OSError as exc:
            raise StorageError(f"cannot write to the output {self.uri}: {exc}") from None

    def exists(self, rel: str) -> bool:
        try:
            return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound
        except OSError as exc:
            raise StorageError(f"cannot reach storage {self.uri}: {exc}") from None

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            self.fs.create_dir(self.path(rel), recursive=True)

    def list(self, rel: str, suffix: str = "") -> builtins.list[str]:
        """Relative paths of the files directly below ``rel``, sorted."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        return sorted(posixpath.join(rel, posixpath.basename(i.path)) for i in infos
                      if i.type == pafs.FileType.File and i.path.endswith(suffix)
                      and not posixpath.basename(i.path).startswith((".", "_")))

    def list_dirs(self, rel: str) -> builtins.list[str]:
        """Relative paths of the folders directly below ``rel``, sorted."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return sorted(posixpath.join(rel, posixpath.basename(i.path)) for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.Directory)

    def remove_temporaries(self, rel: str) -> None:
        """Delete the temporary files of writes that never finished, directly below ``rel``."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and posixpath.basename(info.path).startswith(TEMPORARY_PREFIX):
                try:
                    self.fs.delete_file(info.path)
                except FileNotFoundError:
                    pass

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def delete_dir(self, rel: str) -> None:
        try:
            self.fs.delete_dir(self.path(rel))
        except (FileNotFoundError, OSError):
            pass

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        parent = posixpath.dirname(final)
        if self.local:
            self.fs.create_dir(parent, recursive=True)
            tmp = posixpath.join(parent, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, final)
        else:
            with self.fs.open_output_stream(final) as out:
                out.write(data)

    def write_part_bytes(self, rel: str, data: bytes) -> None:
        """``write_bytes``, remembering the part's ``file_check`` for its marker."""
        self.write_bytes(rel, data)
        self.written[rel] = file_check(self.fs.get_file_info(self.path(rel)), data)

    def file_info(self, rel: str) -> pafs.FileInfo | None:
        info = self.fs.get_file_info(self.path(rel))
        return None if info.type == pafs.FileType.NotFound else info

    def list_infos(self, rel: str) -> dict[str, pafs.FileInfo]:
        """The files directly below ``rel`` by name, with their sizes and times: one listing."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True)
        return {posixpath.basename(i.path): i for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File}

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_table(self, rel: str, table: pa.Table, row_group_size: int = 8192) -> bool:
        """Write a Parquet part atomically; a table with no rows writes nothing."""
        if table.num_rows == 0:
            self.delete(rel)
            return False
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=row_group_size, compression="zstd")
        self.write_part_bytes(rel, buf.getvalue())
        return True

    def read_table(self, rel: str, columns: builtins.list[str] | None = None) -> pa.Table:
        return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

    def read_folder(self, rel: str, columns: builtins.list[str] | None = None,
                    schema: pa.Schema | None = None) -> pa.Table:
        parts = self.list(rel, ".parquet")
        if not parts:
            return schema.empty_table() if schema is not None else pa.table({})
        tables = [self.read_table(p, columns) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")


def read_bytes(uri: str) -> bytes:
    """Bytes of a local path or URI (``s3://`` included)."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {uri}") from None
