"""The output lease (genflow.data.lease): one job at a time on an output folder, on local disk and
on S3 (moto), with its heartbeat, its takeovers and its races. The jobs themselves, as the
``genflow`` command runs them, are in test_reliability.py (concurrent jobs)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.s3 import moto_bucket, s3_client

from genflow.data import lease as leases
from genflow.data.lease import Holder, OutputInUse, OutputLease, output_lease, read_lease
from genflow.data.storage import Storage

STORAGE_KINDS = ["local", "s3", "s3-read-back"]
BUCKET = "genflow-lease"


@pytest.fixture(autouse=True)
def no_renewal_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """No heartbeat renews a lease while a test reads it (a renewal every 5 s would change what a
    slow test reads); the heartbeat's own tests set ``HEARTBEAT_S`` again."""
    monkeypatch.setattr(leases, "HEARTBEAT_S", 3600.0)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one empty bucket."""
    with moto_bucket(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client of the moto server; the credentials in the environment, where genflow finds them."""
    return s3_client(moto_endpoint, "GENFLOWLEASETESTKEY1", "lease-test-secret", monkeypatch)


def _objects(s3: Any, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def _ended_pid() -> int:
    """The pid of a process of this machine that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _renewed_ago(message: str, renewed_at: float, before: float, after: float) -> None:
    """The message's "last renewed N s ago" is the age of ``renewed_at`` at some moment between
    ``before`` and ``after`` (as the clock read around the call that made it): no claim on how
    long that call took."""
    match = re.search(r"last renewed (\d+) s ago\)", message)
    assert match is not None and "\n" not in message, message
    assert round(before - renewed_at) <= int(match[1]) <= round(after - renewed_at), (message, after - before)


def _plant(storage: Storage, **changes: Any) -> Holder:
    """Write a lease as another job would have: by default one of this process, just renewed."""
    holder = replace(Holder.of_this_process("other"), **changes)
    storage.write_bytes("_state/lease.json", holder.encode())
    return holder


@pytest.fixture(params=STORAGE_KINDS)
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    """An output folder: local, on S3 with conditional writes (boto3), or on S3 written and read back."""
    if request.param == "local":
        yield Storage.open(str(tmp_path / "out"))
        return
    s3 = request.getfixturevalue("s3")
    if request.param == "s3-read-back":  # no boto3: the lease is written, then read back
        monkeypatch.setattr(leases, "SETTLE_S", 0.3)
        monkeypatch.setitem(sys.modules, "boto3", None)
    prefix = f"lease-{tmp_path.name}"
    yield Storage.open(f"s3://{BUCKET}/{prefix}/out", endpoint_url=request.getfixturevalue("moto_endpoint"))
    for key in _objects(s3, prefix):
        s3.delete_object(Bucket=BUCKET, Key=key)


def test_a_lease_names_its_job_and_refuses_a_second_one(storage: Storage) -> None:
    with output_lease(storage, "first") as lease:
        held = read_lease(storage)
        assert held is not None and held.owner == lease.holder.owner and held.job == "first"
        assert held.pid == lease.holder.pid and held.host == lease.holder.host
        before = time.time()
        with pytest.raises(OutputInUse) as refused:
            OutputLease(storage, "second").acquire()
        message = str(refused.value)
        assert message.startswith(f"the output {storage.uri} is in use by another job (host {held.host}, "
                                  f"pid {held.pid}, started ")
        _renewed_ago(message, held.renewed_at, before, time.time())
        with pytest.raises(OutputInUse, match="still running on this machine"):  # --force or not
            OutputLease(storage, "second", force=True).acquire()
        assert read_lease(storage) == held
    assert read_lease(storage) is None  # released
    with output_lease(storage, "third"):  # and free for the next job
        pass


def test_the_flow_inside_genflow_run_works_under_the_sessions_lease(storage: Storage,
                                                                    test_plugins: dict[str, str]) -> None:
    """``genflow run`` takes the lease in its job's session; the flow holds the same session: one lease,
    taken once. A second session on the output (another run) is refused while the first holds it."""
    from genflow.config import build_config
    from genflow.runtime.session import JobSession

    config = build_config({"name": "run", "input": "in.parquet", "output": storage.uri,
                           "storage": storage.options, "generators": [{"label": "echo", "plugin": "echo"}]})
    session = JobSession(config, storage)
    with session.held():
        lease = session.lease
        assert lease is not None and read_lease(storage).owner == lease.holder.owner  # type: ignore[union-attr]
        with session.held():  # the flow, inside the run
            assert session.lease is lease and read_lease(storage).owner == lease.holder.owner  # type: ignore[union-attr]
        assert read_lease(storage).owner == lease.holder.owner  # type: ignore[union-attr]  # the flow's end leaves it
        with pytest.raises(OutputInUse, match="still running on this machine"), JobSession(config, storage).held():
            pass
    assert read_lease(storage) is None and session.lease is None


def test_the_lease_is_released_when_the_job_raises(storage: Storage) -> None:
    with pytest.raises(KeyboardInterrupt), output_lease(storage):
        raise KeyboardInterrupt
    assert read_lease(storage) is None


def test_the_heartbeat_renews_the_lease(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits for the heartbeat's renewals to happen (counted as they return), not for a time."""
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.01)
    renewals = threading.Semaphore(0)
    renew = OutputLease.renew

    def counted(self: OutputLease) -> None:
        renew(self)
        renewals.release()

    with output_lease(storage) as lease:
        assert lease is not None
        with lease._lock:  # no renewal writes while the test reads (on S3 a read is several requests)
            first = read_lease(storage)
        assert first is not None
        # Counted from here: a renewal begun before ``first`` was read may end after, not one begun after.
        monkeypatch.setattr(OutputLease, "renew", counted)
        for _ in range(2):
            assert renewals.acquire(timeout=600), "the heartbeat never renewed the lease (600 s)"
        with lease._lock:
            later = read_lease(storage)
        assert later is not None and later.owner == first.owner and later.started_at == first.started_at
        assert later.renewed_at > first.renewed_at and lease.lost_to is None
    assert read_lease(storage) is None


def test_a_lease_of_a_process_that_ended_here_is_taken_over_without_force(
        storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    dead = _plant(storage, pid=_ended_pid())
    with caplog.at_level(logging.WARNING, "genflow.data.lease"), output_lease(storage) as lease:
        assert lease.taken_from == dead
        assert read_lease(storage) == lease.holder
    assert f"took over the lease of {storage.uri} from a job that has ended (pid {dead.pid} on this machine" \
           in caplog.text


def test_a_pid_used_again_by_another_process_is_no_holder(storage: Storage) -> None:
    # This very pid, but a process that started at another time: the holder's pid was reused.
    _plant(storage, process_start=Holder.of_this_process("").process_start - 1000)
    with output_lease(storage) as lease:
        assert lease.taken_from is not None


def test_a_pid_of_another_users_process_is_judged_by_its_start_time(
        storage: Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its status hidden (as macOS hides another user's), its start time still tells it is no holder."""
    import psutil

    def hidden(self: Any) -> str:
        raise psutil.AccessDenied(self.pid)

    reused = _plant(storage, process_start=Holder.of_this_process("").process_start - 1000)
    monkeypatch.setattr(psutil.Process, "status", hidden)
    with caplog.at_level(logging.WARNING, "genflow.data.lease"), output_lease(storage) as lease:
        assert lease.taken_from == reused and read_lease(storage) == lease.holder
    assert f"from a job that has ended (pid {reused.pid} on this machine" in caplog.text and "kill" not in caplog.text


def test_a_pid_whose_start_time_cannot_be_read_is_judged_by_its_heartbeat(
        storage: Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A process runs under the lease's pid, but ``/proc`` hides whose (``hidepid``): maybe the job,
    maybe another user's. No message says to kill it; a stale lease is --force's to take."""
    import psutil

    def hidden(self: Any) -> Any:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "status", hidden)
    monkeypatch.setattr(psutil.Process, "create_time", hidden)
    monkeypatch.setattr(leases, "STALE_AFTER_S", 3600.0)  # the live lease stays live however slow this test
    live = _plant(storage, process_start=1.0)
    for force in (False, True):
        with pytest.raises(OutputInUse) as refused:
            OutputLease(storage, force=force).acquire()
        message = str(refused.value)
        assert message.startswith(f"the output {storage.uri} is in use by another job (host {live.host}, "
                                  f"pid {live.pid}, "), message
        assert f"pid {live.pid} runs on this machine, but whether it is still that job cannot be told" in message
        assert "kill" not in message and ("--force takes over only a stale lease" in message) == force
    a_day_ago = time.time() - 86400
    stale = _plant(storage, process_start=1.0, started_at=a_day_ago, renewed_at=a_day_ago)
    with pytest.raises(OutputInUse) as refused:
        OutputLease(storage).acquire()
    message = str(refused.value)
    assert message.startswith(f"the output {storage.uri} has a stale lease of another job (host {stale.host}, "
                              f"pid {stale.pid}, "), message
    assert message.endswith("cannot be told (its start time cannot be read)): if that job is gone, run again "
                            "with --force to take it over") and "kill" not in message
    with caplog.at_level(logging.WARNING, "genflow.data.lease"), output_lease(storage, force=True) as lease:
        assert lease.taken_from == stale and read_lease(storage) == lease.holder
    assert "took over the stale lease" in caplog.text and "kill" not in caplog.text


@pytest.mark.parametrize("corruption", ["renewed in the future", "negative pid", "not a number"])
def test_a_corrupt_lease_is_named_and_force_takes_it(
        storage: Storage, corruption: str, caplog: pytest.LogCaptureFixture) -> None:
    now = time.time()
    changes: dict[str, dict[str, Any]] = {"renewed in the future": {"host": "gpu-box-7", "renewed_at": now + 3 * 3600},
                                          "negative pid": {"pid": -4242}, "not a number": {"host": "gpu-box-7"}}
    planted = _plant(storage, **changes[corruption])
    if corruption == "not a number":  # as a hand or a broken writer leaves it (JSON's NaN)
        storage.write_bytes("_state/lease.json", json.dumps({**json.loads(planted.encode()),
                                                             "renewed_at": float("nan")}).encode())
    why = {"renewed in the future": f"its last renewal, {leases._when(planted.renewed_at)}, is 3 h in the future",
           "negative pid": "its pid -4242 is no process's",
           "not a number": "a time in it is not a number"}[corruption]
    for _ in range(2):  # as often as it is tried: the lease is left as it was
        with pytest.raises(OutputInUse) as refused:
            OutputLease(storage).acquire()
        assert str(refused.value) == (f"the output {storage.uri} has a corrupt lease (_state/lease.json: {why}): "
                                      f"if no other job writes to it, run again with --force to take it over")
    with caplog.at_level(logging.WARNING, "genflow.data.lease"), output_lease(storage, force=True) as lease:
        assert read_lease(storage) == lease.holder and lease.taken_from is not None
    assert f"took over the corrupt lease of {storage.uri} (--force): {why}" in caplog.text


def test_a_stale_lease_of_another_host_needs_force(storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    two_days_ago = time.time() - 2 * 86400  # "2 days" for half a day: no claim on this test's speed
    stale = _plant(storage, host="gpu-box-7", pid=4242, started_at=two_days_ago - 60, renewed_at=two_days_ago)
    with pytest.raises(OutputInUse) as refused:
        OutputLease(storage).acquire()
    assert str(refused.value) == (
        f"the output {storage.uri} has a stale lease of another job (host gpu-box-7, pid 4242, started "
        f"{leases._when(stale.started_at)}, last renewed 2 days ago, over the 30 s limit): if that job is gone, "
        f"run again with --force to take it over")
    assert read_lease(storage) == stale
    with caplog.at_level(logging.WARNING, "genflow.data.lease"), output_lease(storage, force=True) as lease:
        assert lease.taken_from == stale and read_lease(storage) == lease.holder
    assert "took over the stale lease" in caplog.text and "host gpu-box-7, pid 4242" in caplog.text
    assert read_lease(storage) is None


def test_force_never_takes_a_live_lease_of_another_host(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leases, "STALE_AFTER_S", 3600.0)  # live however slowly this test runs
    live = _plant(storage, host="gpu-box-7", pid=4242, renewed_at=time.time() - 10)
    for force in (False, True):
        before = time.time()
        with pytest.raises(OutputInUse) as refused:
            OutputLease(storage, force=force).acquire()
        message = str(refused.value)
        assert "is in use by another job (host gpu-box-7, pid 4242" in message
        _renewed_ago(message, live.renewed_at, before, time.time())
        assert ("--force takes over only a stale lease" in message) == force
        assert "kill" not in message
    assert read_lease(storage) == live


def test_an_unreadable_lease_needs_force(storage: Storage) -> None:
    storage.write_bytes("_state/lease.json", b"{not json")
    with pytest.raises(OutputInUse, match=r"has a lease .* that cannot be read: if no other job writes to it, "
                                          "run again with --force"):
        OutputLease(storage).acquire()
    with output_lease(storage, force=True) as lease:
        assert lease.taken_from is None and read_lease(storage) == lease.holder


@pytest.mark.parametrize("stale", [False, True], ids=["no-lease", "stale-lease"])
def test_of_jobs_starting_together_exactly_one_takes_the_lease(storage: Storage, stale: bool) -> None:
    if stale:
        _plant(storage, host="gone", renewed_at=time.time() - 3600)
    contenders = [OutputLease(storage, f"job-{i}", force=True) for i in range(6)]
    start = threading.Barrier(len(contenders))
    outcomes: dict[int, str] = {}

    def contend(i: int) -> None:
        start.wait()
        try:
            contenders[i].acquire()
            outcomes[i] = "won"
        except OutputInUse:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(contenders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    try:
        holder = read_lease(storage)
        assert holder is not None and holder in [contenders[i].holder for i in winners], outcomes
        file = contenders[0].file
        if storage.local or (isinstance(file, leases._ConditionalS3Lease) and not file.unconditional):
            assert len(winners) == 1, outcomes  # atomic: exactly one, however the threads were scheduled
        else:  # written and read back: a contender whose check and write lay further apart than
            for i in winners:  # SETTLE_S (a busy machine) also started; its next renewal says it lost
                contenders[i].renew()
                assert (contenders[i].lost_to is None) == (contenders[i].holder.owner == holder.owner)
    finally:
        for lease in contenders:
            lease.release()
    assert read_lease(storage) is None


def test_a_job_whose_lease_was_taken_says_so_and_leaves_the_new_one(
        storage: Storage, caplog: pytest.LogCaptureFixture) -> None:
    lease = OutputLease(storage, "slow")
    lease.acquire()
    try:
        newcomer = _plant(storage, host="gpu-box-7", pid=4242)  # took it while this one stalled
        with caplog.at_level(logging.ERROR, "genflow.data.lease"):
            lease.renew()
        assert lease.lost_to == newcomer
        assert f"the lease of {storage.uri} was taken over by host gpu-box-7, pid 4242" in caplog.text
    finally:
        lease.release()
    assert read_lease(storage) == newcomer  # not removed by the job that lost it


def test_a_lease_file_holds_what_a_person_needs(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path / "out"))
    with output_lease(storage, "nightly"):
        value = json.loads((tmp_path / "out/_state/lease.json").read_text())
    assert {"owner", "host", "pid", "started_at", "renewed_at", "renewed", "heartbeat_s", "job"} <= set(value)
    assert value["job"] == "nightly" and value["renewed"].endswith(" UTC")
    assert not (tmp_path / "out/_state/lease.json").exists()
    assert [p.name for p in (tmp_path / "out/_state").iterdir()] == []  # no scratch files left


# -- S3 (moto) -------------------------------------------------------------------------------------

def test_s3_leases_are_conditional_writes_when_boto3_is_there(s3: Any, moto_endpoint: str) -> None:
    storage = Storage.open(f"s3://{BUCKET}/conditional/out", endpoint_url=moto_endpoint)
    lease = OutputLease(storage)
    assert isinstance(lease.file, leases._ConditionalS3Lease)
    with output_lease(storage):
        assert "conditional/out/_state/lease.json" in _objects(s3, "conditional/")
    assert "conditional/out/_state/lease.json" not in _objects(s3, "conditional/")


def test_an_s3_server_without_conditional_writes_falls_back_to_reading_back(
        s3: Any, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError

    monkeypatch.setattr(leases, "SETTLE_S", 0.05)
    storage = Storage.open(f"s3://{BUCKET}/no-conditions/out", endpoint_url=moto_endpoint)
    lease = OutputLease(storage)
    assert isinstance(lease.file, leases._ConditionalS3Lease)
    put = lease.file.client.put_object

    def without_conditions(**kwargs: Any) -> Any:
        if "IfNoneMatch" in kwargs or "IfMatch" in kwargs:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies "
                                         "functionality that is not implemented"},
                               "ResponseMetadata": {"HTTPStatusCode": 501}}, "PutObject")
        return put(**kwargs)

    monkeypatch.setattr(lease.file.client, "put_object", without_conditions)
    lease.acquire()
    try:
        assert lease.file.unconditional and read_lease(storage) == lease.holder
        lease.renew()
        assert lease.lost_to is None
        with pytest.raises(OutputInUse, match="still running on this machine"):
            OutputLease(storage).acquire()
    finally:
        lease.release()
    assert read_lease(storage) is None


@pytest.mark.slow
def test_a_job_on_s3_refuses_a_live_lease_and_leaves_none_when_done(
        s3: Any, moto_endpoint: str, tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["one", "two", "three"]}), tmp_path / "prompts.parquet")
    config = {"name": "leased", "input": str(tmp_path / "prompts.parquet"), "output": f"s3://{BUCKET}/job/out",
              "storage": {"endpoint_url": moto_endpoint}, "shard_rows": 2,
              "generators": [{"label": "echo", "plugin": "echo"}], "scorers": [{"plugin": "length"}]}
    storage = Storage.open(config["output"], endpoint_url=moto_endpoint)
    _plant(storage, host="gpu-box-7", pid=4242)  # a job on another machine, renewing
    with pytest.raises(OutputInUse, match=rf"^the output s3://{BUCKET}/job/out is in use by another job "
                                          r"\(host gpu-box-7, pid 4242, "):
        job_runner(config)
    assert not [k for k in _objects(s3, "job/out/") if "/generations/" in k]  # no work done
    storage.delete("_state/lease.json")  # that job ended
    assert job_runner(config)["status"] == "completed"
    assert "job/out/_state/lease.json" not in _objects(s3, "job/out/")


def test_a_sweep_holds_the_lease_of_its_folder(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    from genflow.flows.run import run_sweep

    root = Storage.open(str(tmp_path / "sweep"))
    _plant(root, host="gpu-box-7", pid=4242)  # another sweep on this folder, renewing
    config = {"name": "grid", "input": str(tmp_path / "prompts.parquet"), "output": str(tmp_path / "sweep"),
              "generators": [{"label": "echo", "plugin": "echo"}], "sweep": {"seed": [1, 2]}}
    with pytest.raises(OutputInUse, match=rf"^the output {tmp_path / 'sweep'} is in use by another job "
                                          r"\(host gpu-box-7, pid 4242, "):
        run_sweep(config)
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["_state"]  # no run started
