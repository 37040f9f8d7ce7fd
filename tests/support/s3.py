"""S3 for the tests: moto's server on 127.0.0.1 with an empty bucket, and a client of it whose
credentials are in the environment, where genflow finds them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from support.jobs import free_port


@contextlib.contextmanager
def moto_bucket(bucket: str, key_id: str = "k", secret: str = "s") -> Iterator[str]:
    """moto's S3 server (a real HTTP endpoint) holding one empty ``bucket``; yields its URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                     aws_secret_access_key=secret).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def s3_client(endpoint: str, key_id: str, secret: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 client of ``endpoint``, with the credentials put in the environment (and any
    other endpoint or profile taken out of it) for the test."""
    import boto3

    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return boto3.client("s3", endpoint_url=endpoint)
