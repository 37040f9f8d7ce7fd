"""Bad input: each problem is one clear message (naming the file, column, row or key) or an
errors/ row, found before any work where possible, and never at the cost of finished output."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from genflow.cli import app
from genflow.data.prompts import InputError, open_input, shard_tables


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, " ".join((result.stdout + result.stderr).split())


def _config_file(tmp_path: Path, **values: Any) -> Path:
    config = {"name": "bad-input", "input": str(tmp_path / "prompts"), "output": str(tmp_path / "out"),
              "shard_rows": 4, "generators": [{"label": "echo", "plugin": "echo", "samples": 2}],
              "scorers": [{"plugin": "length", "params": {"fail_on": ["refuse"]}}]}
    config.update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_mixed_files_work_and_a_corrupt_one_stops_the_rerun_without_touching_the_output(
        tmp_path: Path, job_runner: Any, test_plugins: dict[str, str]) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ["one", "two", "please refuse", "four", "five"]}), folder / "a.parquet")
    # An extra column in one file is carried through (null for the other file's rows).
    pq.write_table(pa.table({"prompt": ["six", "seven"], "lang": ["en", "fr"]}), folder / "b.parquet")
    config = yaml.safe_load(_config_file(tmp_path).read_text())
    manifest = job_runner(config)
    out = tmp_path / "out"
    gens = ds.dataset(out / "generations").to_table()
    assert sorted(gens["prompt"].to_pylist()) == sorted(["one", "two", "please refuse", "four", "five",
                                                         "six", "seven"] * 2)
    assert {(r["prompt"], r["lang"]) for r in gens.select(["prompt", "lang"]).to_pylist()} == {
        ("one", None), ("two", None), ("please refuse", None), ("four", None), ("five", None),
        ("six", "en"), ("seven", "fr")}
    # The scorer raising on one prompt's candidates: two errors/ rows, and the job completes.
    errors = ds.dataset(out / "errors").to_table().to_pylist()
    assert [(e["stage"], e["plugin"]) for e in errors] == [("score", "length")] * 2
    assert all("ValueError: refusing prompt 'please refuse'" in e["error"] and e["traceback"] for e in errors)
    assert manifest["status"] == "completed" and manifest["errors"]["rows"] == 2

    # A corrupt file joins the folder: the rerun stops before any work, naming the file.
    before = _snapshot(out)
    (folder / "c.parquet").write_bytes((folder / "a.parquet").read_bytes()[:200])
    with pytest.raises(InputError, match=r"c\.parquet: not a readable Parquet file"):
        job_runner(config)
    assert _snapshot(out) == before


def test_a_file_with_corrupt_data_is_named_when_its_rows_are_read(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [f"good {i}" for i in range(10)]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": [f"prompt {i} " * 20 for i in range(2000)]}), tmp_path / "b.parquet",
                   compression="zstd")
    data = bytearray((tmp_path / "b.parquet").read_bytes())
    data[200:1200] = bytes(b ^ 0x5A for b in data[200:1200])  # the footer is intact, the pages are not
    (tmp_path / "b.parquet").write_bytes(bytes(data))
    source = open_input(str(tmp_path))
    with pytest.raises(InputError, match=r"b\.parquet: reading failed after row 0: .*"):
        list(shard_tables(source, 4))


def test_input_problems_name_the_file_and_the_column_or_row(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    folder = tmp_path / "prompts"
    folder.mkdir()
    config = _config_file(tmp_path)
    pq.write_table(pa.table({"prompt": ["fine", "also fine"], "n": [1, 2]}), folder / "a.parquet")

    pq.write_table(pa.table({"prompt": ["ok", "ok", None, "ok"]}), folder / "b.parquet")
    code, out = _cli("validate", str(config))
    assert code == 2 and f"{folder / 'b.parquet'}: row 2: the prompt is null or empty" in out

    pq.write_table(pa.table({"prompt": ["ok", "  \n"]}), folder / "b.parquet")
    code, out = _cli("validate", str(config))
    assert code == 2 and f"{folder / 'b.parquet'}: row 1: the prompt is null or empty" in out

    pq.write_table(pa.table({"prompt": [1, 2]}), folder / "b.parquet")
    code, out = _cli("validate", str(config))
    assert code == 2 and f"{folder / 'b.parquet'}: column 'prompt' must be strings, it is int64" in out

    pq.write_table(pa.table({"text": ["no prompt here"]}), folder / "b.parquet")
    code, out = _cli("validate", str(config))
    assert code == 2 and f"{folder / 'b.parquet'}: no 'prompt' column (columns: text)" in out

    pq.write_table(pa.table({"prompt": ["x"], "n": [[1, 2]]}), folder / "b.parquet")
    code, out = _cli("validate", str(config))
    assert code == 2 and f"{folder / 'b.parquet'}: column 'n' is list<" in out
    assert "but it is int64 in the files before it" in out

    (folder / "b.parquet").unlink()
    code, out = _cli("validate", str(config))
    assert code == 0 and "2 prompts in 1 file(s)" in out


def test_config_mistakes_name_every_key_before_any_work(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    config = _config_file(tmp_path, shard_rows="many", ray={"wokers": 2},
                          scorers=[{"plugin": "length", "params": {"scael": 2}}])
    code, out = _cli("run", str(config))
    assert code == 2
    assert "shard_rows: Input should be a valid integer" in out and "ray.wokers: unknown key" in out
    assert not (tmp_path / "out").exists()
    code, out = _cli("run", str(_config_file(tmp_path)), "--set", "scorers.0.params.scael=2")
    assert code == 2 and "scorers.0.params.scael: unknown key" in out


class _HangingUp:
    """A port that accepts each connection and closes it unanswered, counting them: an S3 endpoint
    that cannot be reached, whose attempts are counted where they arrive (not timed)."""

    def __init__(self) -> None:
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            connection.close()


def test_unreachable_s3_fails_fast_with_one_message(tmp_path: Path, test_plugins: dict[str, str]) -> None:
    (tmp_path / "prompts").mkdir()
    pq.write_table(pa.table({"prompt": ["hello"]}), tmp_path / "prompts" / "a.parquet")
    endpoint = _HangingUp()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{endpoint.port}", "AWS_ACCESS_KEY_ID": "genflow-test",
           "AWS_SECRET_ACCESS_KEY": "not-a-real-secret-4242", "AWS_REGION": "us-east-1"}
    try:
        code, out = _cli("run", str(_config_file(tmp_path, input="s3://prompts-bucket/prompts/")), env=env)
        # (a Ray that an earlier test started in this process may log its own lines before it)
        assert code == 2 and "error: cannot reach the input s3://prompts-bucket/prompts/" in out
        assert "Traceback" not in out and "not-a-real-secret-4242" not in out
        # Fast: the 3 attempts genflow allows a request, not the SDK's default of 10 with backoff.
        assert 1 <= endpoint.connections <= 3, endpoint.connections

        before = endpoint.connections
        code, out = _cli("run", str(_config_file(tmp_path, output="s3://results-bucket/job")), env=env)
        assert code == 2 and out.startswith("error: cannot reach storage s3://results-bucket/job")
        assert 1 <= endpoint.connections - before <= 3, endpoint.connections - before
    finally:
        endpoint.server.close()
    assert not (tmp_path / "out").exists()

