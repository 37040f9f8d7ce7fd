"""Prefect artifacts of a job run: what it made, readable in the Prefect UI without opening its output.

Every job run gets three artifacts under keys that depend only on the job's name, so
the UI's Artifacts page shows a job's history run after run:

- ``genflow-job-<name>-counts``: a table of rows per output folder and, per stage,
  work items, errors, tokens and cost;
- ``genflow-job-<name>-summary``: markdown: status, errors, scores per scorer, every
  number of each scorer's metrics (as its ``summarize`` names them), tokens and cost,
  and how the scorers agree;
- ``genflow-job-<name>-report``: where ``report.html`` is (:func:`report_pointer`). A browser
  opens no ``file://`` link from the Prefect UI, so for an output on S3 it is a link artifact
  to a presigned ``https`` URL of the page that opens it for :data:`REPORT_LINK_EXPIRES_S`
  (7 days, SigV4's longest), signed with the key storage uses; for a local output, or one
  on S3 that genflow holds no long-lived key of, a markdown artifact saying where the file
  is and how to open or rebuild it.

``genflow label pull`` publishes them again, with no flow run, where a Prefect server is set
and answers (:func:`prefect_server`): the summary then shows the agreement with people.

A sweep gets ``genflow-sweep-<name>-runs``: one row per run. Task runs carry
:func:`stage_tags`, so the UI filters a job's runs by stage or plugin. Everything here is read
from the manifest (whose config is redacted) and from the scores' two columns; no
plugin is named and no generated text is shown, only numbers, names and paths.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import urllib.parse
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from genflow.data import layout
from genflow.data.storage import Storage, is_remote

log = logging.getLogger(__name__)

_NOT_KEY = re.compile(r"[^a-z0-9]+")
MAX_SLUG = 48
COUNTS, SUMMARY, REPORT, RUNS = "counts", "summary", "report", "runs"


def slug(name: str) -> str:
    """A job's name as Prefect allows it in artifact keys (lowercase letters, digits, dashes).

    The same name always gives the same slug; a name that had to change (``My_Job``,
    ``sweep/run-1``) also gets a short hash of itself, so two names that read alike
    (``my_job`` and ``my-job``) keep separate histories."""
    text = _NOT_KEY.sub("-", name.lower()).strip("-")[:MAX_SLUG].strip("-")
    if text == name:
        return text
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{text}-{digest}" if text else digest


def artifact_key(name: str, what: str, kind: str = "job") -> str:
    """``genflow-<kind>-<slug of name>-<what>``: the same key for every run of one job."""
    return f"genflow-{kind}-{slug(name)}-{what}"


def stage_tags(stage: str, plugins: Iterable[str] = ()) -> list[str]:
    """The tags of a stage's task runs: ``stage:<stage>`` and ``plugin:<name>`` for each plugin it runs
    (a generator or scorer; the exporters, for ``rank``). Set once per stage with ``prefect.tags``."""
    return [f"stage:{stage}", *(f"plugin:{p}" for p in plugins)]


# -- where report.html is -------------------------------------------------------------------------

REPORT_LINK_EXPIRES_S = 7 * 24 * 3600
"""How long the report link of an output on S3 opens the page: 7 days, the longest a SigV4
presigned URL may be valid."""


@dataclass(frozen=True)
class ReportPointer:
    """``report.html`` as the Prefect UI shows it: a link a browser opens, or text saying where it is."""

    uri: str
    link: str | None = None
    """An ``https`` URL that opens the page (presigned for a private bucket); None when there is none."""
    expires: datetime | None = None
    """When a presigned ``link`` stops opening the page (None: never, a public bucket's)."""
    markdown: str = ""
    """Where the file is and how to open it, when there is no ``link``."""


def report_pointer(uri: str, options: dict[str, Any] | None = None, now: datetime | None = None) -> ReportPointer:
    """Where ``report.html`` (``uri``: a local path or an ``s3://`` URI) is, as the Prefect UI can use it.

    An ``s3://`` page gets a presigned ``https`` link (:func:`presigned_url`, ``options``: the
    storage's endpoint, region and anonymous setting); a local one, or one genflow cannot sign a
    link to, a few lines of markdown saying where it is and how to open it."""
    if uri.startswith("s3://"):
        signed = presigned_url(uri, options or {}, REPORT_LINK_EXPIRES_S, now)
        if signed is not None:
            link, expires = signed
            return ReportPointer(uri, link, expires)
        return ReportPointer(uri, markdown="\n".join([
            "# report.html", "", "The job's report is on S3:", "", "```", _one_line(uri), "```", "",
            "genflow holds no long-lived key to sign a link to it with (none in AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or a session token, which a link would carry). Open it with a "
            f"presigned URL, `aws s3 presign {_one_line(uri)} --expires-in {REPORT_LINK_EXPIRES_S}`, "
            f"or download it: `aws s3 cp {_one_line(uri)} report.html`.", ""]))
    if is_remote(uri):
        return ReportPointer(uri, markdown="\n".join(["# report.html", "", "The job's report is at:", "", "```",
                                                       _one_line(uri), "```", ""]))
    path = str(Path(uri).resolve())
    return ReportPointer(uri, markdown="\n".join([
        "# report.html", "", f"The job's report is a file on `{_one_line(socket.gethostname())}`; a browser opens "
        "no `file://` link from the Prefect UI, so here is where it is:", "", "```", _one_line(path), "```", "",
        "Open it in a browser on that machine. `genflow report` rebuilds it (and the dataset card):", "", "```",
        f"genflow report {_one_line(str(Path(path).parent))}", "```", ""]))


def _one_line(text: str) -> str:
    return " ".join(text.replace("`", "'").split())


def presigned_url(uri: str, options: dict[str, Any], expires_s: int = REPORT_LINK_EXPIRES_S,
                  now: datetime | None = None) -> tuple[str, datetime | None] | None:
    """An ``https`` (or the endpoint's scheme) URL that GETs the ``s3://`` object ``uri`` until the
    returned time (None: a public bucket's URL, which does not expire): AWS Signature Version 4
    in the query string, as ``aws s3 presign`` makes it, asking S3 to answer it as ``text/html``
    (pyarrow stores no content type: a browser would download the page rather than show it).

    The URL holds the access key's id and a signature, never the secret key; it is made only
    with the key storage reads (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``) and never
    with a session token (``AWS_SESSION_TOKEN``, a secret the URL would carry): then None, as
    with no key (a profile or an instance role: genflow cannot sign with those without boto3).
    ``options``: the storage's ``endpoint_url``, ``region`` and ``anonymous`` (a public
    bucket: the plain URL, unsigned, with no expiry)."""
    bucket, _, key = uri[len("s3://"):].partition("/")
    endpoint = (options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    region = options.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
        or "us-east-1"
    if endpoint:
        base = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        # a user and password in the endpoint: never in a link the Prefect UI shows (nor signed for)
        scheme, host, path = base.scheme, base.netloc.rpartition("@")[2], f"{base.path.rstrip('/')}/{bucket}/{key}"
    elif re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", bucket):  # a name that can be a host name
        scheme, host, path = "https", f"{bucket}.s3.{region}.amazonaws.com", f"/{key}"
    else:
        scheme, host, path = "https", f"s3.{region}.amazonaws.com", f"/{bucket}/{key}"
    host = re.sub(r":(80)$", "", host) if scheme == "http" else re.sub(r":(443)$", "", host)
    path = urllib.parse.quote(path, safe="/")
    if options.get("anonymous"):
        return f"{scheme}://{host}{path}", None
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID", ""), os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not key_id or not secret or os.environ.get("AWS_SESSION_TOKEN"):
        return None
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/{region}/s3/aws4_request"
    query = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256", "X-Amz-Credential": f"{key_id}/{scope}",
             "X-Amz-Date": stamp, "X-Amz-Expires": str(expires_s), "X-Amz-SignedHeaders": "host",
             "response-content-type": "text/html; charset=utf-8"}
    canonical_query = "&".join(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}"
                               for k, v in sorted(query.items()))
    request = "\n".join(["GET", path, canonical_query, f"host:{host}", "", "host", "UNSIGNED-PAYLOAD"])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(request.encode()).hexdigest()])
    signing = f"AWS4{secret}".encode()
    for part in (day, region, "s3", "aws4_request"):
        signing = hmac.new(signing, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(signing, to_sign.encode(), hashlib.sha256).hexdigest()
    return (f"{scheme}://{host}{path}?{canonical_query}&X-Amz-Signature={signature}",
            now + timedelta(seconds=expires_s))


def prefect_server(timeout: float = 3.0) -> str | None:
    """The Prefect API outside a flow run: ``PREFECT_API_URL`` (the environment's or the profile's)
    when it is set and answers its health check, as shown (a password in it hidden); None when
    none is set, and None with one warning when it does not answer. (With none set, Prefect
    would start a server of its own for the call: nobody would see what it was given.)"""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    from genflow.secrets import redact_url

    url = str(PREFECT_API_URL.value() or "")
    if not url.startswith("http"):
        return None
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            ok = response.status < 500
    except OSError as exc:
        ok, why = False, f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    else:
        why = "it answered its health check with an error"
    if not ok:
        log.warning("the Prefect API at %s does not answer (%s): its artifacts of this output are left as they "
                    "were", redact_url(url), why)
        return None
    return redact_url(url)


# -- the job's artifacts -------------------------------------------------------------------------

def counts_table(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows per output folder, then each stage's work items, errors, tokens and cost."""
    from genflow.outputs.report.read import folder_counts, stage_rows

    table: list[dict[str, Any]] = [{"kind": "folder", "name": folder, "rows": rows, "errors": None,
                                    "tokens": None, "cost": None} for folder, rows in folder_counts(manifest)]
    for s in stage_rows(manifest):
        tokens = None
        if s["prompt_tokens"] is not None or s["completion_tokens"] is not None:
            tokens = int(s["prompt_tokens"] or 0) + int(s["completion_tokens"] or 0)
        table.append({"kind": "stage", "name": s["stage"], "rows": s["work_items"], "errors": s["errors"],
                      "tokens": tokens, "cost": s["cost"]})
    return table


def score_stats(storage: Storage) -> dict[str, dict[str, float | int | None]]:
    """Each scorer's count, mean, min and max score, from ``scores/`` (two columns read)."""
    from genflow.outputs.report.read import read_table

    scores = read_table(storage, layout.SCORES, ["scorer", "score"])
    if scores is None or scores.num_rows == 0:
        return {}
    grouped = scores.group_by("scorer").aggregate([("score", "count"), ("score", "mean"), ("score", "min"),
                                                   ("score", "max")])
    out: dict[str, dict[str, float | int | None]] = {}
    for row in grouped.to_pylist():
        out[row["scorer"]] = {"scores": row["score_count"], "mean": row["score_mean"], "min": row["score_min"],
                              "max": row["score_max"]}
    return out


def metric_numbers(metrics: dict[str, Any]) -> dict[str, float | int]:
    """A scorer's metrics as flat numbers: top-level numbers, and one level of nested ones
    (``outcomes.passed``). Text and lists are left out: they may hold generated text."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if _is_number(value):
            out[str(key)] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if _is_number(v):
                    out[f"{key}.{sub}"] = v
    return out


def summary_markdown(manifest: dict[str, Any], scores: dict[str, dict[str, Any]] | None = None) -> str:
    """The run's summary page: status, counts, scores, metrics, tokens and cost, agreement."""
    rows = manifest.get("rows") or {}
    errors = manifest.get("errors") or {}
    lines = [f"# genflow job {_md(manifest.get('name'))}: {_md(manifest.get('status'))}", "",
             "| | |", "|---|---|",
             f"| output | {_md(manifest.get('output'))} |",
             f"| config hash | {_md(manifest.get('config_hash'))} |",
             f"| prompts | {_num(rows.get(layout.PROMPTS))} |",
             f"| candidates | {_num(rows.get(layout.GENERATIONS))} |",
             f"| errors | {_num(errors.get('rows'))} of {_num(errors.get('work_items'))} work items "
             f"({_pct(errors.get('fraction'))}; allowed {_pct(errors.get('max_error_fraction'))}) |",
             f"| cost | {_num(manifest.get('cost'))} |",
             f"| seconds | {_num((manifest.get('timings_s') or {}).get('total'))} |", ""]
    weights = {label: p.get("weight") for label, p in (manifest.get("plugins") or {}).items()
               if p.get("kind") == "scorer"}
    if scores:
        lines += ["## Scores per scorer", "", "| scorer | weight | scores | mean | min | max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in sorted(scores):
            s = scores[name]
            lines.append(f"| {_md(name)} | {_num(weights.get(name))} | {_num(s['scores'])} | {_num(s['mean'])} "
                         f"| {_num(s['min'])} | {_num(s['max'])} |")
        lines.append("")
    metrics = {name: metric_numbers(m) for name, m in (manifest.get("metrics") or {}).items() if isinstance(m, dict)}
    metrics = {name: m for name, m in metrics.items() if m}
    if metrics:
        lines += ["## Metrics", "", "| scorer | metric | value |", "|---|---|---:|"]
        for name in sorted(metrics):
            for key, value in metrics[name].items():
                lines.append(f"| {_md(name)} | {_md(key)} | {_num(value)} |")
        lines.append("")
    stages = {name: s for name, s in (manifest.get("stages") or {}).items() if s.get("tokens") or s.get("cost")}
    if stages:
        lines += ["## Tokens and cost", "", "| stage | prompt tokens | completion tokens | cost |",
                  "|---|---:|---:|---:|"]
        for name in sorted(stages):
            tokens = stages[name].get("tokens") or {}
            lines.append(f"| {_md(name)} | {_num(tokens.get('prompt'))} | {_num(tokens.get('completion'))} "
                         f"| {_num(stages[name].get('cost'))} |")
        lines.append("")
    human = manifest.get("human_agreement") or {}
    if human.get("scorers"):
        lines += ["## Agreement with people", "",
                  f"{_num(human.get('rankings'))} rankings of {_num(human.get('prompts'))} prompts by "
                  f"{_num(human.get('annotators'))} people.", "",
                  "| scorer | pairwise accuracy | pairs | Kendall's tau-b | prompts |", "|---|---:|---:|---:|---:|"]
        for r in human["scorers"]:
            lines.append(f"| {_md(r.get('scorer'))} | {_num(r.get('pairwise_accuracy'))} | {_num(r.get('pairs'))} "
                         f"| {_num(r.get('kendall_tau'))} | {_num(r.get('prompts'))} |")
        inter = human.get("inter_annotator")
        if isinstance(inter, dict):
            lines += ["", f"People with each other: Kendall's tau-b {_num(inter.get('kendall_tau'))}, pairwise "
                      f"agreement {_num(inter.get('agreement'))} over {_num(inter.get('prompts'))} prompts."]
        lines.append("")
    agreement = (manifest.get("agreement") or {}).get("pairs") or []
    if agreement:
        lines += ["## Scorer agreement", "", "| scorer | scorer | Kendall's tau-b | pairwise agreement | prompts |",
                  "|---|---|---:|---:|---:|"]
        for p in agreement:
            lines.append(f"| {_md(p.get('a'))} | {_md(p.get('b'))} | {_num(p.get('kendall_tau'))} "
                         f"| {_num(p.get('agreement'))} | {_num(p.get('prompts'))} |")
        lines.append("")
    return "\n".join(lines)


def publish_job_artifacts(storage: Storage, manifest: dict[str, Any], report_uri: str | None) -> list[UUID]:
    """Create the run's table, summary and report artifacts (:func:`report_pointer`); a failure is
    logged, never raised. Outside a flow run (``genflow label pull``) they belong to no run."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    name = str(manifest.get("name") or "job")
    made: list[UUID] = []
    try:
        with warnings.catch_warnings():  # outside a run Prefect 3 warns that it may stop allowing it
            warnings.filterwarnings("ignore", "Artifact creation outside of a flow", FutureWarning)
            made.append(cast(UUID, create_table_artifact(
                counts_table(manifest), key=artifact_key(name, COUNTS),
                description=f"genflow job {name}: rows per folder, errors per stage")))
            made.append(cast(UUID, create_markdown_artifact(
                summary_markdown(manifest, score_stats(storage)), key=artifact_key(name, SUMMARY),
                description=f"genflow job {name}: scores, metrics, cost")))
            if report_uri is not None:
                where = report_pointer(report_uri, storage.options)
                if where.link is not None:
                    until = "" if where.expires is None else \
                        f"; the link opens it until {where.expires:%Y-%m-%d %H:%M} UTC"
                    made.append(cast(UUID, create_link_artifact(
                        where.link, link_text=report_uri, key=artifact_key(name, REPORT),
                        description=f"genflow job {name}: report.html{until}")))
                else:
                    made.append(cast(UUID, create_markdown_artifact(
                        where.markdown, key=artifact_key(name, REPORT),
                        description=f"genflow job {name}: where report.html is")))
    except Exception as exc:  # the outputs are written; artifacts are a view of them
        log.warning("Prefect artifacts not all created (%s: %s)", type(exc).__name__, exc)
    return made


# -- sweeps --------------------------------------------------------------------------------------

SWEEP_FIGURES = ("prompts", "generations", "errors", "error_fraction", "score_mean", "seconds")


def sweep_row(run: str, values: dict[str, Any], figures: dict[str, Any],
              manifest: dict[str, Any] | None) -> dict[str, Any]:
    """One sweep run as a row of the sweep's table artifact."""
    from genflow.config import is_secret_key, redacted

    shown = {k: "***" if is_secret_key(k.rsplit(".", 1)[-1]) else redacted(v) for k, v in values.items()}
    row: dict[str, Any] = {"run": run, "status": figures.get("status"),
                           "values": ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in shown.items())}
    row.update({k: _finite(figures.get(k)) for k in SWEEP_FIGURES})
    row["cost"] = (manifest or {}).get("cost")
    row["folder"] = figures.get("folder")
    return row


def publish_sweep_artifact(name: str, rows: list[dict[str, Any]]) -> UUID | None:
    from prefect.artifacts import create_table_artifact

    try:
        return cast(UUID, create_table_artifact(rows, key=artifact_key(name, RUNS, kind="sweep"),
                                                description=f"genflow sweep {name}: one row per run"))
    except Exception as exc:
        log.warning("Prefect sweep artifact not created (%s: %s)", type(exc).__name__, exc)
        return None


# -- read back: `genflow runs` -------------------------------------------------------------------

def run_summaries(flow_run_ids: Iterable[UUID]) -> dict[UUID, dict[str, Any]]:
    """Per flow run, from its counts (job) or runs (sweep) table artifact: prompts,
    candidates, errors and cost. Runs without one are left out."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    ids = list(flow_run_ids)
    if not ids:
        return {}
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=ids), type=ArtifactFilterType(any_=["table"])))
    out: dict[UUID, dict[str, Any]] = {}
    for a in artifacts:
        if a.flow_run_id is None or not a.key or not a.key.startswith("genflow-"):
            continue
        table = json.loads(a.data) if isinstance(a.data, str) else a.data
        if not isinstance(table, list):
            continue
        if a.key.endswith(f"-{COUNTS}"):
            out[a.flow_run_id] = summary_of_counts(table)
        elif a.key.endswith(f"-{RUNS}"):
            out[a.flow_run_id] = _sum_rows([{k: r.get(k) for k in ("prompts", "generations", "errors", "cost")}
                                            for r in table])
    return out


def summary_of_counts(table: list[dict[str, Any]]) -> dict[str, Any]:
    """A job's counts table summed up: prompts, candidates, errors and cost."""
    folders = {r["name"]: r["rows"] for r in table if r.get("kind") == "folder"}
    stages = [r for r in table if r.get("kind") == "stage"]
    costs = [r["cost"] for r in stages if r.get("cost") is not None]
    return {"prompts": folders.get(layout.PROMPTS), "generations": folders.get(layout.GENERATIONS),
            "errors": folders.get(layout.ERRORS, sum(int(r.get("errors") or 0) for r in stages)),
            "cost": sum(costs) if costs else None}


def _sum_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("prompts", "generations", "errors", "cost"):
        values = [r[key] for r in rows if _is_number(r.get(key))]
        out[key] = sum(values) if values else None
    return out


# -- formatting ----------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def _md(value: Any) -> str:
    """A name or path as plain markdown text: one line, specials escaped, no HTML."""
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool) or not _is_number(value):
        return _md(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"


def _pct(value: Any) -> str:
    return "-" if not _is_number(value) else f"{value:.1%}"
