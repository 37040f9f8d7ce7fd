"""A whole job against a real (local) S3 server: prompts in, results and images out, resume,
and credentials that never reach the outputs or the logs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from support.s3 import moto_bucket, s3_client

BUCKET = "genflow-test"
KEY_ID = "GENFLOWTESTKEYID0001"
SECRET = "s3cr3t-Zq8fW2-never-print-me"
TEST_TOOLS = ("botocore", "boto3", "s3transfer", "moto", "werkzeug", "urllib3")


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint), with one empty bucket."""
    with moto_bucket(BUCKET, KEY_ID, SECRET) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client; the AWS credentials are in the environment, where a user keeps them."""
    return s3_client(s3_server, KEY_ID, SECRET, monkeypatch)


@pytest.fixture
def job_logs(monkeypatch: pytest.MonkeyPatch) -> list[logging.LogRecord]:
    """Every log record any logger handles while the test runs (Prefect reconfigures logging
    when a flow starts, so a handler added beforehand would not see its records)."""
    records: list[logging.LogRecord] = []
    handle = logging.Logger.handle

    def keep(self: logging.Logger, record: logging.LogRecord) -> None:
        records.append(record)
        handle(self, record)

    monkeypatch.setattr(logging.Logger, "handle", keep)
    return records


def _put_parquet(s3: Any, key: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    s3.put_object(Bucket=BUCKET, Key=key, Body=buf.getvalue())


def _objects(s3: Any, prefix: str) -> dict[str, Any]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_a_job_reads_and_writes_s3_and_keeps_the_credentials_out(
        s3: Any, s3_server: str, job_runner: Any, test_plugins: dict[str, str], job_logs: list[logging.LogRecord],
) -> None:
    import pyarrow.fs as pafs

    _put_parquet(s3, "prompts/a.parquet", pa.table({"prompt": [f"a red bicycle, take {i}" for i in range(6)]}))
    _put_parquet(s3, "prompts/b.parquet", pa.table({"prompt": [f"a quiet room, take {i}" for i in range(5)]}))
    config = {
        "name": "s3-job",
        "input": f"s3://{BUCKET}/prompts/",
        "output": f"s3://{BUCKET}/jobs/run1",
        "shard_rows": 4,
        "generators": [{"label": "echo", "plugin": "echo", "samples": 2},
                       {"label": "png", "plugin": "tiny-png", "samples": 1}],
        "scorers": [{"plugin": "length"}],
        "storage": {"endpoint_url": s3_server},
        "ray": {"workers": 2, "batch_size": 4},
    }
    manifest = job_runner(config)
    assert manifest["status"] == "completed" and manifest["output"] == f"s3://{BUCKET}/jobs/run1"

    fs = pafs.S3FileSystem(endpoint_override=s3_server.split("://")[1], scheme="http", access_key=KEY_ID,
                           secret_key=SECRET, region="us-east-1")
    gens = ds.dataset(f"{BUCKET}/jobs/run1/generations", filesystem=fs).to_table().to_pylist()
    assert len(gens) == 11 * 3 == len({g["generation_id"] for g in gens})
    images = [g for g in gens if g["generator"] == "png"]
    assert len(images) == 11 and all(g["text"] is None for g in images)
    objects = _objects(s3, "jobs/run1/")
    for g in images:
        assert g["image_path"] == f"images/{g['prompt_id']}/{g['generation_id']}.png"
        body = s3.get_object(Bucket=BUCKET, Key=f"jobs/run1/{g['image_path']}")["Body"].read()
        assert body.startswith(b"\x89PNG\r\n\x1a\n")
    scores = ds.dataset(f"{BUCKET}/jobs/run1/scores", filesystem=fs).to_table()
    assert scores.num_rows == 33  # images scored from the bytes read back from the bucket
    for folder in ("prompts", "rankings", "preferences", "sft"):
        assert any(k.startswith(f"jobs/run1/{folder}/part-") for k in objects), folder
    assert "jobs/run1/_state/generate/png/00002.json" in objects

    # Resume on S3: the rerun finds every shard done and rewrites no part.
    parts = {k: o["LastModified"] for k, o in objects.items() if "/part-" in k}
    manifest = job_runner(config)
    assert all(s["skipped"] == s["shards"] == 3 for s in manifest["stages"].values())
    assert {k: o["LastModified"] for k, o in _objects(s3, "jobs/run1/").items() if "/part-" in k} == parts

    # The credentials are nowhere: not in any object written (manifest, report, parts), not in
    # any log record of the job (genflow, Prefect, Ray, pyarrow; the test's own S3 tools aside).
    written = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in _objects(s3, "jobs/run1/")}
    assert "jobs/run1/manifest.json" in written
    assert json.loads(written["jobs/run1/manifest.json"])["config"]["storage"]["endpoint_url"] == s3_server
    for key, body in written.items():
        assert SECRET.encode() not in body and KEY_ID.encode() not in body, key
    records = [r for r in job_logs if not r.name.startswith(TEST_TOOLS)]
    assert any(r.name.startswith("prefect") for r in records)
    for record in records:
        text = record.getMessage() + str(record.exc_info or "")
        assert SECRET not in text and KEY_ID not in text, record.name
