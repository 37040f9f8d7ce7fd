"""One job at a time on an output folder: a lease with an owner and a heartbeat.

``<output>/_state/lease.json`` names the job writing the folder (host, pid, a random
owner id, when it started and when it last renewed). A background thread renews it
every ``HEARTBEAT_S`` seconds; it is removed when the job ends, however it ends
(finished, failed, Ctrl-C). A second job on the folder reads it at start, before Ray or
any model starts, and:

- refuses while the lease is **live** (renewed within ``STALE_AFTER_S``, or held by a
  process of this machine that is still running), even with ``--force``: a heartbeat is
  proof that a job is writing, and two writers are what the lease is there to prevent;
- takes it over at once when the holder is a process of **this machine that has ended**
  (a job killed with SIGKILL, or by the second Ctrl-C): the pid is gone, or is another
  process now (its start time differs);
- refuses a **stale** lease of another machine (no renewal for ``STALE_AFTER_S``) unless
  run with ``force``: that machine may only be cut off from the storage, and hold the
  lease again when it comes back. ``genflow run --force`` takes it over. So is a lease of
  this machine whose pid runs a process whose start time cannot be read (another user's,
  under a ``/proc`` mounted with ``hidepid``): whether it is still the job, only the
  heartbeat tells, and no message tells the user to kill a process that may be another's;
- refuses a **corrupt** lease (a pid that is no process's, a renewal in the future, a
  time that is no number) unless run with ``force``, as one it cannot read.

Taking a lease is atomic where the storage allows it. On a local (or NFS) folder the
lease is written under a name of its own and hard-linked into place, which fails if one
is there; an existing one is changed (renewed, taken over, removed) only under a guard
file created with ``O_EXCL``, after checking it is still the lease that was judged, so
of two jobs taking over a stale lease one wins. On S3, with boto3 installed, writes are
conditional (``If-None-Match: *`` to create, ``If-Match: <ETag>`` to renew, take over
and release), as AWS S3 and moto implement them. Without boto3, or against a server
that answers a conditional write with 501, a job writes the lease, waits ``SETTLE_S``
and reads it back: the job whose owner id is there holds it. Two jobs that start within
``SETTLE_S`` of each other sort it out that way; one whose check and write are further
apart than ``SETTLE_S`` (a stall of the process or the storage between the two) can
still overwrite the other's lease, and both go on. The next renewal of the one that
lost it notices, and says so in the log. Every way, a job reads the lease back before
it starts work.

Ages are judged by the renewing host's clock against the reading host's: the hosts of
jobs sharing a bucket must agree on the time to well within ``STALE_AFTER_S``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

from genflow.data import layout
from genflow.data.storage import Storage, StorageError

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
"""How often the holder renews its lease."""
STALE_AFTER_S = 30.0
"""A lease not renewed for this long (six heartbeats) is stale."""
SETTLE_S = 1.0
"""Without conditional writes: how long a job waits between writing the lease and reading it back."""


class OutputInUse(StorageError):
    """Another job holds the output's lease (a user error: exit code 2)."""


@dataclass(frozen=True)
class Holder:
    """What a lease says about the job that holds it."""

    owner: str
    host: str
    pid: int
    boot_id: str
    pid_namespace: str
    process_start: float
    started_at: float
    renewed_at: float
    job: str = ""

    @classmethod
    def of_this_process(cls, job: str) -> Holder:
        now = time.time()
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _boot_id(), _pid_namespace(),
                   _process_start(os.getpid()) or 0.0, now, now, job)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            value = json.loads(data)
            return cls(str(value["owner"]), str(value["host"]), int(value["pid"]), str(value.get("boot_id", "")),
                       str(value.get("pid_namespace", "")), float(value.get("process_start", 0.0)),
                       float(value["started_at"]), float(value["renewed_at"]), str(value.get("job", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def encode(self) -> bytes:
        value: dict[str, Any] = asdict(self)
        value["renewed"] = _when(self.renewed_at)  # for people reading the file
        value["heartbeat_s"] = HEARTBEAT_S
        return json.dumps(value, indent=2, sort_keys=True).encode()

    def on_this_machine(self) -> bool:
        """Whether this process can see the holder's process table: same host, boot and pid namespace."""
        return (self.host == socket.gethostname() and bool(self.boot_id) and self.boot_id == _boot_id()
                and self.pid_namespace == _pid_namespace())

    def running(self) -> bool:
        """On this machine: whether the holder's process still runs (its pid, with its start time)."""
        return self.process_here() == RUNNING

    def process_here(self) -> str:
        """On this machine: ``ENDED`` (the pid is gone, or another process's: its start time
        differs), ``RUNNING`` (the same pid and start time), or ``UNKNOWN`` (the pid runs, but a
        start time, its own or the lease's, cannot be read)."""
        start = _process_start(self.pid)
        if start is None:
            return ENDED
        if not start or not self.process_start:
            return UNKNOWN
        return RUNNING if abs(start - self.process_start) < 0.5 else ENDED

    def corrupt(self, now: float) -> str | None:
        """What makes this lease one no job wrote, or None. A renewal up to ``STALE_AFTER_S``
        ahead is a clock of another host a little ahead; further is no renewal at all."""
        if not all(math.isfinite(t) for t in (self.started_at, self.renewed_at, self.process_start)):
            return "a time in it is not a number"
        if self.pid <= 0:
            return f"its pid {self.pid} is no process's"
        if self.renewed_at - now > STALE_AFTER_S:
            return f"its last renewal, {_when(self.renewed_at)}, is {_age(self.renewed_at - now)} in the future"
        return None

    def describe(self, now: float) -> str:
        return (f"host {self.host}, pid {self.pid}, started {_when(self.started_at)}, "
                f"last renewed {_age(now - self.renewed_at)} ago")


# -- this machine ----------------------------------------------------------------------------------

def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import psutil

        return f"boot-{psutil.boot_time():.0f}"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


ENDED, RUNNING, UNKNOWN = "ended", "running", "unknown"
"""What :meth:`Holder.process_here` finds of the holder's process."""


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch; 0.0 if it runs but its start time
    cannot be read), or None if it is not running."""
    import psutil

    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        try:
            if process.status() == psutil.STATUS_ZOMBIE:  # ended; only its exit status is left
                return None
        except psutil.AccessDenied:  # (another user's, on macOS): its start time still tells whose pid it is
            pass
        return float(process.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return 0.0 if psutil.pid_exists(pid) else None


def _when(seconds: float) -> str:
    try:
        return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (ValueError, OverflowError, OSError):  # a corrupt lease's: no date at all
        return f"{seconds!r} s after 1970"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


# -- the lease file, as each storage can write it ---------------------------------------------------

class _LeaseFile:
    """``read`` gives the lease's bytes and a token; the writes succeed only if the lease is as
    the token says (``create``: there is none), and return the new token, or None."""

    def read(self) -> tuple[bytes, Any] | None:
        raise NotImplementedError

    def create(self, data: bytes) -> Any | None:
        raise NotImplementedError

    def replace(self, data: bytes, token: Any, renewal: bool = False) -> Any | None:
        raise NotImplementedError

    def delete(self, token: Any) -> bool:
        raise NotImplementedError


class _LocalLease(_LeaseFile):
    """A lease file on a local or NFS folder: created with a hard link (which fails if there is
    one), and changed (renewed, taken over, removed) under a guard file created with
    ``O_EXCL``, one job at a time. The lease is replaced whole with a rename: it is never
    missing or half-written while it changes hands."""

    GUARD_STALE_S = 10.0
    """A guard this old was left by a job killed while it changed the lease (it takes microseconds)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.folder = os.path.dirname(path)
        self.guard = os.path.join(self.folder, ".lease-guard")

    def _scratch(self, data: bytes) -> str:
        name = os.path.join(self.folder, f".lease-{uuid.uuid4().hex}")
        try:
            with open(name, "wb") as f:
                f.write(data)
        except OSError:  # a full disk: leave nothing behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        return name

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        deadline = time.monotonic() + 2 * self.GUARD_STALE_S
        while True:
            try:
                os.close(os.open(self.guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                break
            except FileExistsError:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.stat(self.guard).st_mtime > self.GUARD_STALE_S:
                        os.unlink(self.guard)
                        continue
                if time.monotonic() > deadline:
                    raise OSError(f"{self.guard} is held by another job for too long") from None
                time.sleep(0.005)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.guard)

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, data

    def create(self, data: bytes) -> Any | None:
        os.makedirs(self.folder, exist_ok=True)
        scratch = self._scratch(data)
        try:
            os.link(scratch, self.path)  # atomic, and fails if a lease is there (NFS included)
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(scratch)

    def replace(self, data: bytes, token: Any, renewal: bool = False) -> Any | None:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != token:
                return None
            os.replace(self._scratch(data), self.path)
            return data

    def delete(self, token: Any) -> bool:
        with self._guarded():
            current = self.read()
            if current is None or current[1] != token:
                return False
            os.unlink(self.path)
            return True


class _ReadBackLease(_LeaseFile):
    """Any storage (S3 without conditional writes): write, wait ``SETTLE_S``, read back."""

    def __init__(self, storage: Storage, rel: str) -> None:
        self.storage = storage
        self.rel = rel

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.storage.read_bytes(self.rel)
        except FileNotFoundError:
            return None
        return data, data

    def _write_and_check(self, data: bytes, settle: bool) -> Any | None:
        self.storage.write_bytes(self.rel, data)
        if settle:
            time.sleep(SETTLE_S)
        current = self.read()
        return data if current is not None and current[0] == data else None

    def create(self, data: bytes) -> Any | None:
        if self.read() is not None:
            return None
        return self._write_and_check(data, settle=True)

    def replace(self, data: bytes, token: Any, renewal: bool = False) -> Any | None:
        current = self.read()
        if current is None or current[1] != token:
            return None
        return self._write_and_check(data, settle=not renewal)

    def delete(self, token: Any) -> bool:
        current = self.read()
        if current is None or current[1] != token:
            return False
        self.storage.delete(self.rel)
        return True


class _ConditionalS3Lease(_LeaseFile):
    """An S3 object written with ``If-None-Match``/``If-Match`` (boto3); the token is its ETag.

    A server that answers a conditional write with 501 (not implemented) makes this fall
    back to ``_ReadBackLease``."""

    def __init__(self, client: Any, bucket: str, key: str, fallback: _ReadBackLease) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        self.fallback = fallback
        self.unconditional = False

    @staticmethod
    def _code(exc: Exception) -> tuple[str, int]:
        response = getattr(exc, "response", None) or {}
        return (str(response.get("Error", {}).get("Code", "")),
                int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)))

    def _refused(self, exc: Exception) -> bool:
        """Whether a write failed its condition (False: the server cannot do conditions; raise otherwise)."""
        code, status = self._code(exc)
        if status in (412, 409) or code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
            return True
        if status == 501 or code == "NotImplemented":
            log.info("%s does not take conditional writes: the lease is written and read back instead",
                     self.fallback.storage.uri)
            self.unconditional = True
            return False
        raise exc

    def read(self) -> tuple[bytes, Any] | None:
        if self.unconditional:
            return self.fallback.read()
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        data = response["Body"].read()
        return data, response["ETag"]

    def _put(self, data: bytes, **condition: str) -> Any | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as exc:
            if self._refused(exc):
                return None
            raise _Unconditional() from None

    def create(self, data: bytes) -> Any | None:
        if not self.unconditional:
            with contextlib.suppress(_Unconditional):
                return self._put(data, IfNoneMatch="*")
        return self.fallback.create(data)

    def replace(self, data: bytes, token: Any, renewal: bool = False) -> Any | None:
        if not self.unconditional:
            with contextlib.suppress(_Unconditional):
                return self._put(data, IfMatch=token)
            return None  # ``token`` is an ETag, no token of the fallback's: the caller reads again
        return self.fallback.replace(data, token, renewal)

    def delete(self, token: Any) -> bool:
        from botocore.exceptions import ClientError

        if not self.unconditional:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
                return True
            except ClientError as exc:
                code, status = self._code(exc)
                if status in (412, 404) or code in ("PreconditionFailed", "NoSuchKey"):
                    return False
                # A server without conditional deletes: check the owner, then delete.
            current = self.read()
            if current is None or current[1] != token:
                return False
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
            return True
        return self.fallback.delete(token)


class _Unconditional(Exception):
    """The server does not implement conditional writes."""


def _lease_file(storage: Storage) -> _LeaseFile:
    rel = layout.LEASE
    endpoint_url, region, anonymous = (storage.options.get(k) for k in ("endpoint_url", "region", "anonymous"))
    if storage.local:
        return _LocalLease(storage.path(rel))
    fallback = _ReadBackLease(storage, rel)
    if not storage.uri.startswith("s3://") or anonymous:
        return fallback
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        return fallback
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    timeouts = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=timeouts)  # as storage's
    bucket, _, prefix = storage.root.partition("/")
    return _ConditionalS3Lease(client, bucket, posixpath.join(prefix, rel) if prefix else rel, fallback)


# -- taking, renewing and releasing -----------------------------------------------------------------

class OutputLease:
    """The lease of one job on its output, held from ``acquire`` to ``release``."""

    def __init__(self, storage: Storage, job: str = "", force: bool = False) -> None:
        self.storage = storage
        self.force = force
        self.file = _lease_file(storage)
        self.holder = Holder.of_this_process(job)
        self.token: Any = None
        self.taken_from: Holder | None = None
        self.lost_to: Holder | None = None
        self._judged = ""  # how the lease taken over was judged: ENDED, what made it corrupt, or ""
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a renewal and the release never overlap
        self._thread: threading.Thread | None = None

    @property
    def where(self) -> str:
        return self.storage.uri

    def acquire(self) -> None:
        """Take the lease, or raise ``OutputInUse`` saying who holds it."""
        try:
            for _ in range(8):
                current = self.file.read()
                other = Holder.parse(current[0]) if current is not None else None
                took = False
                if current is None:
                    self.token = self.file.create(self.holder.encode())
                elif other is not None and other.owner == self.holder.owner:
                    self.token = current[1]  # ours: a write that landed though its answer was lost
                else:
                    self._judge(other)
                    self.token = self.file.replace(self.holder.encode(), current[1])
                    took = True
                if self.token is not None and self._still_ours():
                    if took:
                        self.taken_from = other
                        self._say_taken_over(other)
                    self._start_heartbeat()
                    return
        except OutputInUse:
            raise
        except Exception as exc:  # the storage failed: one message, as for the write probe
            raise StorageError(f"cannot take the lease of the output {self.where}: {exc}") from None
        raise OutputInUse(f"the output {self.where} is being taken by other jobs at the same time (its lease "
                          f"changed 8 times while this job tried to take it); run one job on it at a time")

    def _still_ours(self) -> bool:
        """Read the lease back: a server that ignored a write's condition shows another owner."""
        current = self.file.read()
        other = Holder.parse(current[0]) if current else None
        if current is None or other is None or other.owner != self.holder.owner:
            self.token = None
            return False
        self.token = current[1]
        return True

    def _judge(self, other: Holder | None) -> None:
        """Raise unless ``other``'s lease may be taken over (its job has ended, or it is stale,
        corrupt or unreadable and forced)."""
        now = time.time()
        where = f"the output {self.where}"
        self._judged = ""
        if other is None:
            if self.force:
                return
            raise OutputInUse(f"{where} has a lease ({layout.LEASE}) that cannot be read: if no other job "
                              f"writes to it, run again with --force to take it over")
        problem = other.corrupt(now)
        if problem is not None:
            self._judged = problem
            if self.force:
                return
            raise OutputInUse(f"{where} has a corrupt lease ({layout.LEASE}: {problem}): if no other job "
                              f"writes to it, run again with --force to take it over")
        unsure = ""
        if other.on_this_machine():
            found = other.process_here()
            if found == ENDED:
                self._judged = ENDED
                return  # its process has ended: the lease is over, --force or not
            if found == RUNNING:
                raise OutputInUse(f"{where} is in use by another job ({other.describe(now)}), which is still "
                                  f"running on this machine: wait for it to end, or stop it (kill {other.pid})")
            # A process runs under its pid whose start time cannot be read: maybe the job, maybe
            # another's. Its heartbeat tells, as for a job of another machine.
            unsure = (f"; pid {other.pid} runs on this machine, but whether it is still that job cannot be "
                      f"told (its start time cannot be read)")
        if now - other.renewed_at <= STALE_AFTER_S:
            forced = "; --force takes over only a stale lease" if self.force else ""
            raise OutputInUse(f"{where} is in use by another job ({other.describe(now)}): wait for it to end, "
                              f"or stop it{unsure}{forced}")
        if not self.force:
            raise OutputInUse(f"{where} has a stale lease of another job ({other.describe(now)}, over the "
                              f"{STALE_AFTER_S:g} s limit{unsure}): if that job is gone, run again with --force "
                              f"to take it over")

    def _say_taken_over(self, other: Holder | None) -> None:
        now = time.time()
        if other is None:
            log.warning("took over the unreadable lease of %s (--force)", self.where)
        elif self._judged not in ("", ENDED):
            log.warning("took over the corrupt lease of %s (--force): %s", self.where, self._judged)
        elif self._judged == ENDED:
            log.warning("took over the lease of %s from a job that has ended (pid %d on this machine, last "
                        "renewed %s ago)", self.where, other.pid, _age(now - other.renewed_at))
        else:
            log.warning("took over the stale lease of %s (--force) from %s", self.where, other.describe(now))

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="genflow-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Renew every ``HEARTBEAT_S``; a storage that keeps failing is said once, when the lease is
        half-way to stale (a blip is not worth a line; a full disk is the job's own message)."""
        failing_since: float | None = None
        said = False
        while not self._stop.wait(HEARTBEAT_S) and self.lost_to is None:
            try:
                self.renew()
                failing_since, said = None, False
            except Exception as exc:
                failing_since = failing_since or time.monotonic()
                if not said and time.monotonic() - failing_since >= STALE_AFTER_S / 2:
                    log.warning("could not renew the lease of %s for %.0f s: %s (still trying; a job on "
                                "another host may take it over with --force once it is %g s old)",
                                self.where, time.monotonic() - failing_since, exc, STALE_AFTER_S)
                    said = True

    def renew(self) -> None:
        """Write a new heartbeat; if another job has taken the lease meanwhile, say so and stop."""
        with self._lock:
            if self._stop.is_set() or self.token is None:
                return
            renewed = replace(self.holder, renewed_at=time.time())
            token = self.file.replace(renewed.encode(), self.token, renewal=True)
            if token is not None:
                self.holder, self.token = renewed, token
                return
            current = self.file.read()
            other = Holder.parse(current[0]) if current else None
            if current is not None and other is not None and other.owner == self.holder.owner:
                self.token = current[1]  # our own lease, under a token of the storage's fallback
                return
            self.lost_to = other or self.holder
        log.error("the lease of %s was taken over by %s: another job now writes to this output as well",
                  self.where, other.describe(time.time()) if other else "another job (and removed since)")

    def release(self) -> None:
        """Stop renewing and remove the lease, if it is still this job's; never raises."""
        self._stop.set()
        with self._lock:  # waits for a renewal under way (one storage request)
            token, self.token = self.token, None
            if token is None or self.lost_to is not None:
                return
            try:
                self.file.delete(token)
            except Exception as exc:
                log.warning("could not remove the lease of %s: %s (it goes stale in %g s)", self.where, exc,
                            STALE_AFTER_S)


@contextlib.contextmanager
def output_lease(storage: Storage, job: str = "", force: bool = False) -> Iterator[OutputLease]:
    """Hold the output's lease for the ``with`` block; released on every way out (Ctrl-C included)."""
    lease = OutputLease(storage, job, force)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


def read_lease(storage: Storage) -> Holder | None:
    """The holder the output's lease names, if there is one."""
    try:
        return Holder.parse(storage.read_bytes(layout.LEASE))
    except FileNotFoundError:
        return None
