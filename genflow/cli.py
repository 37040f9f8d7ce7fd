"""The ``genflow`` command."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate labelled training data with generative models: Prefect + Ray + plugins.")
models_app = typer.Typer(no_args_is_help=True, help="Local models.")
app.add_typer(models_app, name="models")
console = Console(stderr=True, soft_wrap=True)
# Piped output is not cut at 80 columns: tables and paths stay whole.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

ConfigArg = Annotated[Path, typer.Argument(help="job config (YAML)", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.path=value")]


def _user_errors() -> tuple[type[BaseException], ...]:
    from genflow.job import USER_ERRORS

    return USER_ERRORS


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main_options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    _setup_logging(verbose)


@app.command()
def run(config: ConfigArg, resume: Annotated[bool, typer.Option("--resume/--no-resume",
        help="skip (stage, shard) outputs already on storage")] = True, set_: SetOpt = None) -> None:
    """Run one job."""
    from genflow.config import load_config
    from genflow.flows.job import JobFailed
    from genflow.job import run_job

    try:
        job = load_config(config, set_ or [])
        manifest = run_job(job, resume=resume)
    except _user_errors() as exc:
        fail(str(exc))
    except JobFailed as exc:
        fail(str(exc), code=1)
    _print_summary(manifest)


def _print_summary(manifest: dict) -> None:
    table = Table(title=f"genflow job {manifest['name']!r}: {manifest['status']}", show_header=True)
    table.add_column("folder")
    table.add_column("rows", justify="right")
    for folder, rows in manifest["rows"].items():
        table.add_row(folder, f"{rows:,}")
    out.print(table)
    errors = manifest["errors"]
    if errors["rows"]:
        console.print(f"[yellow]{errors['rows']} rows failed ({errors['fraction']:.2%}); see errors/[/]")
    for name, metrics in manifest.get("metrics", {}).items():
        out.print(f"{name}: {metrics}")
    out.print(f"output: {manifest['output']}  ({manifest['timings_s']['total']:.1f}s)")


@app.command()
def validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Check a config and read its whole input, loading no model."""
    from genflow.config import load_config
    from genflow.prompts import open_input, shard_tables

    try:
        job = load_config(config, set_ or [])
        source = open_input(job.input, job.storage.endpoint_url, job.storage.region)
        rows = shards = 0
        for table in shard_tables(source, job.shard_rows):
            rows += table.num_rows
            shards += 1
    except _user_errors() as exc:
        fail(str(exc))
    if rows == 0:
        fail(f"{job.input}: the input has no rows")
    out.print(f"[green]ok[/]: {config} — {rows:,} prompts in {len(source.files)} file(s), "
                    f"{shards} shard(s); columns: {', '.join(source.columns)}")


@app.command()
def plugins() -> None:
    """List installed plugins."""
    from genflow.registry import get_registry

    registry = get_registry()
    table = Table(show_header=True)
    for col in ("name", "kind", "modality", "source", "version", "description"):
        table.add_column(col)
    for p in registry.all():
        table.add_row(p.name, p.kind, p.modality or "-", p.source, p.version, p.description)
    out.print(table)
    for source, error in registry.broken.items():
        console.print(f"[red]plugin {source} failed to load:[/] {error}", highlight=False)


@models_app.command("init-tiny")
def init_tiny(directory: Annotated[Path, typer.Argument(help="where to write the models")]) -> None:
    """Write tiny randomly initialised models (text, code, reward, image, CLIP) for offline runs."""
    from genflow.registry import get_registry

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for result in get_registry().pm.hook.init_tiny_models(directory=directory):
        written.update(result or {})
    for name, path in sorted(written.items()):
        out.print(f"{name:<12} {path}")


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app(prog_name="genflow")


if __name__ == "__main__":
    main()
