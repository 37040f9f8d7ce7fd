"""Where the Prefect UI sends a reader of ``report.html``: a presigned ``https`` link for an output
on S3 (checked against moto's S3 server and against botocore's own signer), and for a local
output the path and the command that rebuilds it, never a ``file://`` link a browser refuses."""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from support.s3 import moto_bucket, s3_client

from genflow.data.storage import Storage
from genflow.outputs.artifacts import REPORT_LINK_EXPIRES_S, presigned_url, report_pointer

BUCKET = "genflow-reports"
KEY_ID = "GENFLOWREPORTKEYID01"
SECRET = "report-s3cr3t-Kx93-never-shown"
PAGE = b"<!doctype html><title>report</title><h1>genflow job</h1>"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_bucket(BUCKET, KEY_ID, SECRET) as url:
        yield url


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    return s3_client(endpoint, KEY_ID, SECRET, monkeypatch)


def test_a_local_report_is_said_where_it_is_with_the_command_that_rebuilds_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    pointer = report_pointer("out/report.html")  # as a job written relative to the directory gives it
    assert pointer.link is None and pointer.expires is None
    text = pointer.markdown
    assert f"```\n{tmp_path / 'out' / 'report.html'}\n```" in text
    assert f"```\ngenflow report {tmp_path / 'out'}\n```" in text
    assert f"a file on `{socket.gethostname()}`" in text and "file://" not in text.replace("`file://`", "")


def test_an_s3_report_gets_a_presigned_link_that_opens_the_page_for_seven_days(
        s3: Any, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage.open(f"s3://{BUCKET}/runs/nightly one", endpoint_url=endpoint)
    storage.write_bytes("report.html", PAGE)
    uri = storage.uri_of("report.html")
    now = datetime(2026, 12, 6, 11, 30, tzinfo=timezone.utc)
    pointer = report_pointer(uri, storage.options, now=now)
    assert pointer.link is not None and pointer.markdown == ""
    assert pointer.expires == now + timedelta(days=7) and REPORT_LINK_EXPIRES_S == 7 * 24 * 3600
    link = urllib.parse.urlsplit(pointer.link)
    assert f"{link.scheme}://{link.netloc}{link.path}" == f"{endpoint}/{BUCKET}/runs/nightly%20one/report.html"
    query = dict(urllib.parse.parse_qsl(link.query))
    assert query["X-Amz-Credential"] == f"{KEY_ID}/20261206/us-east-1/s3/aws4_request"
    assert query["X-Amz-Expires"] == "604800" and query["response-content-type"] == "text/html; charset=utf-8"
    assert SECRET not in pointer.link and "X-Amz-Security-Token" not in query

    # botocore, signing the same request at the same time, makes the same signature
    import boto3
    import botocore.auth
    from botocore.config import Config

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda *a, **k: now.replace(tzinfo=None))
    signer = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET, config=Config(signature_version="s3v4"))
    theirs = signer.generate_presigned_url("get_object", ExpiresIn=REPORT_LINK_EXPIRES_S, Params={
        "Bucket": BUCKET, "Key": "runs/nightly one/report.html", "ResponseContentType": "text/html; charset=utf-8"})
    assert dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(theirs).query)) == query

    # and the link, made now, opens the page as a page
    fresh = report_pointer(uri, storage.options).link
    assert fresh is not None
    with urllib.request.urlopen(fresh, timeout=30) as response:
        assert response.read() == PAGE
        assert response.headers["Content-Type"].startswith("text/html")


def test_an_s3_report_without_a_long_lived_key_is_said_where_it_is(s3: Any, endpoint: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"s3://{BUCKET}/runs/report.html"
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEBsession-token-secret")  # a link would carry it
    pointer = report_pointer(uri, {"endpoint_url": endpoint})
    assert pointer.link is None
    assert f"```\n{uri}\n```" in pointer.markdown
    assert f"`aws s3 presign {uri} --expires-in 604800`" in pointer.markdown
    assert "session-token-secret" not in pointer.markdown and SECRET not in pointer.markdown
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")  # a profile or an instance role: nothing to sign with here
    assert report_pointer(uri, {"endpoint_url": endpoint}).link is None


def test_a_public_buckets_report_is_its_plain_url(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    assert presigned_url("s3://open-data/job/report.html", {"anonymous": True, "region": "eu-west-1"}) == (
        "https://open-data.s3.eu-west-1.amazonaws.com/job/report.html", None)
    assert presigned_url("s3://open.data/job/report.html", {"anonymous": True}) == (
        "https://s3.us-east-1.amazonaws.com/open.data/job/report.html", None)  # a dotted name: path style


def test_a_password_in_the_endpoint_never_reaches_the_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    with_user = presigned_url("s3://b/r.html", {"endpoint_url": "http://minio:endpoint-pw-1234@s3.local:9000"},
                              now=now)
    plain = presigned_url("s3://b/r.html", {"endpoint_url": "http://s3.local:9000"}, now=now)
    assert with_user is not None and plain is not None
    assert "endpoint-pw-1234" not in with_user[0] and "minio" not in with_user[0]
    assert with_user == plain  # signed for the host the request goes to, as without the user
    assert plain[0].startswith("http://s3.local:9000/b/r.html?")
