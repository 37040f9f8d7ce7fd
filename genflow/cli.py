"""The ``genflow`` command."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from genflow.config import JobConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Generate labelled training data with generative models: Prefect + Ray + plugins.")
models_app = typer.Typer(no_args_is_help=True, help="Local models.")
app.add_typer(models_app, name="models")
label_app = typer.Typer(no_args_is_help=True, help="People in the loop: send a job's prompts to a labelling tool "
                        "(Label Studio), read back their rankings and demonstrations.")
app.add_typer(label_app, name="label")
console = Console(stderr=True, soft_wrap=True)
# Piped output is not cut at 80 columns: tables and paths stay whole.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)

ConfigArg = Annotated[Path, typer.Argument(help="job config (YAML)", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: key.path=value")]


def _user_errors() -> tuple[type[BaseException], ...]:
    from genflow.runtime.session import USER_ERRORS

    return USER_ERRORS


def fail(message: str, code: int = 2) -> None:
    from rich.markup import escape  # the message is text: "genflow[hf]" is no style tag

    from genflow.secrets import scrub  # a server's error text, quoting a key the job holds

    console.print(f"[bold red]error:[/] {escape(scrub(message))}", highlight=False, markup=True)
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
        help="skip (stage, shard) outputs already on storage")] = True, set_: SetOpt = None,
        force: Annotated[bool, typer.Option("--force", help="take over the output's lease from a job that "
                         "stopped renewing it (stale); a live job's lease is never taken")] = False) -> None:
    """Run one job."""
    from genflow.runtime.local_prefect import local_prefect_api
    from genflow.runtime.shutdown import command_ending

    # Ctrl-C: exit 130 with the line below; Ray stopped now, not at exit (Ray's own hook pauses first).
    hint = shlex.join(["genflow", "run", str(config), *[a for s in set_ or [] for a in ("--set", s)]])
    notes: list[str] = []
    with command_ending(hint, lambda line: console.print(line, highlight=False, markup=False), _shutdown_ray,
                        notes), \
            local_prefect_api() as prefect_ready:  # boots while the job's modules load and its config is checked
        from genflow.config import load_config
        from genflow.engine.errors import JobFailed
        from genflow.flows.run import run_job
        from genflow.runtime.shutdown import PrefectAPILost

        try:
            job = load_config(config, set_ or [])
            notes += batches_left_running(job, hint.replace("genflow run", "genflow cancel-batches", 1))
            _import_in_background("genflow.flows.job")  # Prefect's flow machinery, while Ray starts
            if job.rounds is not None:  # the job, its reward model, then rounds of training (docs/rounds.md)
                from genflow.flows.rounds import run_rounds

                _print_rounds(run_rounds(job, resume=resume, force=force, api_ready=prefect_ready))
                return
            manifest = run_job(job, resume=resume, api_ready=prefect_ready, force=force)
        except _user_errors() as exc:
            fail(str(exc))
        except JobFailed as exc:
            if exc.manifest is not None:
                _print_summary(exc.manifest)
            fail(str(exc), code=1)
        except PrefectAPILost as exc:
            fail(str(exc), code=1)
        except OSError as exc:
            from genflow.data.storage import disk_full

            if not disk_full(exc):
                raise
            fail(f"no space left on the output's disk ({exc}): the shards finished so far are kept; "
                 "free some space and run the job again to resume", code=1)
        _print_summary(manifest)


def _print_rounds(summary: dict[str, Any]) -> None:
    """The rounds' figures: the reward model's held-out accuracy, then a row per round."""
    reward = summary["reward_model"]
    accuracy = reward.get("heldout_pairwise_accuracy")
    console.print(f"reward model: {reward['path']}  held-out pairwise accuracy "
                  f"{'-' if accuracy is None else f'{accuracy:.3f}'} on {reward.get('heldout_pairs')} pairs",
                  highlight=False, markup=False)
    table = Table(show_header=True)
    for column in ("round", "method", "held-out reward", "tokens", "repetition", "trained rows"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in summary["rounds"]:
        cells = [row["heldout_reward_mean"], row["heldout_mean_tokens"], row["heldout_repetition"]]
        table.add_row(str(row["round"]), row["method"], *("-" if v is None else f"{v:.4f}" for v in cells),
                      "-" if row["trained_rows"] is None else str(row["trained_rows"]))
    console.print(table)
    console.print(f"output: {summary['output']}  (rounds.parquet, report.html)", highlight=False, markup=False)
    if summary.get("note"):  # rounds.per_run: what this run left to the next, or that none is left
        console.print(summary["note"], highlight=False, markup=False)


_IMPORTING: list[Any] = []
"""Threads of :func:`_import_in_background` (joined before the command ends)."""


def batches_left_running(job: JobConfig, cancel_command: str) -> list[str]:
    """What Ctrl-C says of a job with stages in batch mode: its batches run on at the provider."""
    batched = [s.label for s in job.generators if s.requests.mode == "batch"]
    batched += [s.name for s in job.scorers if s.requests.mode == "batch"]
    if not batched:
        return []
    return [f"batches of {', '.join(batched)} keep running at the provider (their ids are journaled): the "
            f"command above reattaches to them and pays for nothing twice; to cancel them: {cancel_command}"]


def _shutdown_ray() -> None:
    """Stop the Ray this command started (importing Ray only to find none would cost a second);
    first let a background import finish, which an exit must not cut short."""
    for thread in _IMPORTING:
        thread.join(timeout=30)
    if "genflow.engine.ray_cluster" in sys.modules:
        from genflow.engine.ray_cluster import shutdown_ray

        shutdown_ray()


def _import_in_background(module: str) -> None:
    """Import ``module`` in a thread: the job's main thread spends seconds waiting in ``ray.init``
    meanwhile (on 2 cores, Prefect's flow machinery took 1-2 s after it). A failure is left for
    the real import to raise, in the main thread, with its message."""
    import importlib
    import threading

    # Both Ray (its pydantic compatibility, in the main thread) and Prefect import pydantic.v1,
    # whose package imports itself: a job once died of KeyError: 'pydantic.v1' with the two
    # imports racing. Imported here first (17 ms), it is whole before either thread needs it.
    importlib.import_module("pydantic.v1")

    def load() -> None:
        try:
            importlib.import_module(module)
        except BaseException:  # raised again where it is imported for use
            pass

    thread = threading.Thread(target=load, name=f"import {module}", daemon=True)
    _IMPORTING.append(thread)
    thread.start()


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
    from genflow.config import load_config, resolve_output
    from genflow.data.checks import check_job
    from genflow.data.prompts import shard_tables

    try:
        job = load_config(config, set_ or [])
        job = job.model_copy(update={"output": resolve_output(job.output)})  # the folder a run would write
        source = check_job(job, read_rows=False)  # read below, shard by shard
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
def plugins(params: Annotated[str | None, typer.Option(
        "--params", metavar="NAME", help="print this plugin's options (its params) instead")] = None) -> None:
    """List installed plugins, and the pip command that enables those whose requirements are missing."""
    from genflow.registry import get_registry

    registry = get_registry()
    if params is not None:
        _print_options(params)
        return
    table = Table(show_header=True)
    for col in ("name", "kind", "modality", "source", "version", "status", "description"):
        table.add_column(col)
    for p in registry.all():
        table.add_row(p.name, p.kind, p.modality or "-", p.source, p.version,
                      "ok" if p.available else "unavailable", p.description)
    out.print(table)
    for p in registry.all():
        if not p.available:
            out.print(f"unavailable: {p.unavailable_reason()}", highlight=False, markup=False)
    for source, error in registry.broken.items():
        console.print(f"[red]plugin {source} failed to load:[/] {error}", highlight=False)


def _print_options(name: str) -> None:
    """A plugin's options from its Params' JSON schema, as ``llm models --options`` prints them."""
    from genflow.registry import PluginError, get_registry, plugin_options

    registry = get_registry()
    found = registry.named(name)
    if not found:
        known = ", ".join(sorted({p.name for p in registry.all()}))
        fail(str(PluginError(f"no plugin called {name!r} (installed: {known})")))
    for info in found:
        out.print(f"{info.name} ({info.kind}): {info.description}", highlight=False, markup=False)
        if not info.available:
            out.print(f"unavailable here: {info.unavailable_reason()}", highlight=False, markup=False)
        _print_option_table(plugin_options(info.factory.Params), "option", "no options")
        if info.kind == "tool":  # and what the model sends it, from its Arguments' JSON schema
            out.print("arguments (what the model sends each call):")
            _print_option_table(plugin_options(info.factory.Arguments), "argument", "no arguments")


def _print_option_table(options: list[Any], first: str, none: str) -> None:
    if not options:
        out.print(none)
        return
    table = Table(show_header=True)
    for col in (first, "type", "default", "description"):
        table.add_column(col)
    for option in options:
        table.add_row(option.name, option.type, option.default, option.description)
    out.print(table, markup=False)


def _raw_config(config: Path, overrides: list[str] | None) -> dict:
    """The config file's mapping with ``--set`` overrides applied (validated later, as a whole)."""
    from genflow.config import load_raw, parse_override, set_dotted

    raw = load_raw(config)
    for text in overrides or []:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def _needs_prefect_server(command: str) -> None:
    from genflow.runtime.local_prefect import quiet_prefect_defaults

    quiet_prefect_defaults()
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        fail(f"`genflow {command}` needs a running Prefect server: start one with `prefect server start` and "
             "set PREFECT_API_URL (e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api)")


NameOpt = Annotated[str | None, typer.Option("--name", help="deployment name (default: the config's name)")]


@app.command()
def sweep(config: ConfigArg, resume: Annotated[bool, typer.Option("--resume/--no-resume",
          help="skip work already on storage (in a run's folder or an earlier run's)")] = True,
          set_: SetOpt = None,
          force: Annotated[bool, typer.Option("--force", help="take over the output's lease from a sweep that "
                           "stopped renewing it (stale); a live one's lease is never taken")] = False) -> None:
    """Run every point of the config's `sweep` grid; compare them in sweep.parquet and sweep.html."""
    from genflow.runtime.local_prefect import local_prefect_api

    with local_prefect_api() as prefect_ready:
        from genflow.engine.errors import SweepFailed
        from genflow.flows.run import run_sweep
        from genflow.grid import plan_sweep

        try:
            raw = _raw_config(config, set_)
            plan = plan_sweep(raw, source=str(config))  # every run's config checked before Prefect is waited for
            prefect_ready()
            plan, rows = run_sweep(plan, resume=resume, force=force)
        except _user_errors() as exc:
            fail(str(exc))
        except SweepFailed as exc:
            fail(str(exc), code=1)
    table = Table(title=f"sweep {plan.name!r}: {len(rows)} runs", show_header=True)
    for col, justify in (("run", "left"), ("status", "left"), ("mean score", "right"), ("tokens/s", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        mean, tps = r.get("score_mean"), r.get("tokens_per_s")
        table.add_row(r["run"], str(r.get("status")), "-" if mean is None else f"{mean:.4f}",
                      "-" if tps is None else f"{tps:,.0f}")
    out.print(table)
    out.print(f"compare: {plan.output}/sweep.html  (table: {plan.output}/sweep.parquet)")


@app.command()
def deploy(config: ConfigArg, name: NameOpt = None, work_pool: Annotated[str | None, typer.Option(
           "--work-pool", help="hand runs to this Prefect work pool (`prefect worker start --pool ...`) "
           "instead of `genflow serve`")] = None, set_: SetOpt = None) -> None:
    """Register the job as a Prefect deployment with the config's schedule; `genflow serve` runs it."""
    from genflow.flows import deploy as deployment

    _needs_prefect_server("deploy")
    try:
        raw = _raw_config(config, set_)
        changed = deployment.registered_changes(raw, name, config_file=(config, set_ or []))
        deployment.deploy(raw, name, work_pool, config_file=(config, set_ or []))
        info = deployment.describe_deployment(deployment.full_name(raw, name))
    except _user_errors() as exc:
        fail(str(exc))
    except ValueError as exc:  # Prefect: unknown work pool
        fail(str(exc))
    if changed:
        given = f"{config}'s" + (" with these --set options" if set_ else "")
        out.print(f"deployment {info['name']} was registered with other parameters ({', '.join(changed)}); "
                  f"replaced by {given}", markup=False, highlight=False)
    for s in info["schedules"]:
        out.print(f"schedule: {s['cron']} ({s['timezone']}){'' if s['active'] else ' (inactive)'}")
    if not info["schedules"]:
        out.print("no schedule in the config: runs start only when triggered")
    for when in info["next_runs"]:
        out.print(f"next run: {when:%Y-%m-%d %H:%M %Z}")
    runner = f"a worker of pool {work_pool!r}" if work_pool else f"`{_serve_command(config, name, set_)}`"
    out.print(f"deployment {info['name']} registered; its runs are executed by {runner}.", markup=False,
              highlight=False)
    out.print(f"run it now: prefect deployment run '{info['name']}'")


@app.command()
def serve(config: ConfigArg, name: NameOpt = None, limit: Annotated[int | None, typer.Option(
          "--limit", help="at most this many runs at once")] = None, set_: SetOpt = None) -> None:
    """Serve the job's deployment: run it on its schedule, and whenever triggered, until stopped."""
    from genflow.flows import deploy as deployment
    from genflow.runtime.local_prefect import quiet_prefect_defaults

    _needs_prefect_server("serve")
    quiet_prefect_defaults()
    try:
        raw = _raw_config(config, set_)
        deployment.to_deployment(raw, name, config_file=(config, set_ or []))  # a bad config fails here
        changed = deployment.registered_changes(raw, name, config_file=(config, set_ or []))
    except _user_errors() as exc:
        fail(str(exc))
    if changed:  # the deployment `genflow deploy --set ...` made, served without its --set: say what goes
        given = f"{config}'s" + (" with these --set options" if set_ else "")
        console.print(f"deployment {deployment.full_name(raw, name)} was registered with other parameters "
                      f"({', '.join(changed)}); serving replaces them with {given}. To serve the registered "
                      f"ones, stop and run the `genflow serve` command `genflow deploy` printed (its --set "
                      f"options)", markup=False, highlight=False)
    deployment.serve(raw, name, limit, config_file=(config, set_ or []))


def _serve_command(config: Path, name: str | None, overrides: list[str] | None) -> str:
    """The ``genflow serve`` command that registers what ``genflow deploy`` did: the same config,
    name and ``--set`` overrides, quoted for a shell."""
    import shlex

    return shlex.join(["genflow", "serve", str(config), *(["--name", name] if name else []),
                       *[arg for text in overrides or [] for arg in ("--set", text)]])


@app.command()
def runs(limit: Annotated[int, typer.Option("--limit", "-n", help="how many runs")] = 20,
         deployment_name: Annotated[str | None, typer.Option("--deployment", help="only runs of this deployment "
                                    "(flow/deployment, e.g. genflow-job/nightly)")] = None,
         scheduled: Annotated[bool, typer.Option("--scheduled", help="include runs scheduled for later")] = False
         ) -> None:
    """List recent runs of genflow jobs and sweeps from the Prefect API, newest first."""
    from genflow.runtime.local_prefect import local_prefect_api

    with local_prefect_api() as prefect_ready:  # no PREFECT_API_URL: the local database `genflow run` uses
        from genflow.flows.deploy import list_runs
        from genflow.outputs.artifacts import run_summaries

        try:
            prefect_ready()
            rows = list_runs(limit, deployment_name, scheduled=scheduled)
            summaries = run_summaries(r["id"] for r in rows)  # from each run's counts artifact
        except Exception as exc:  # the API is down or the deployment unknown: one line, no traceback
            fail(f"cannot list runs from the Prefect API: {type(exc).__name__}: {exc}")
    table = Table(show_header=True)
    for col in ("run", "flow", "deployment", "state", "start", "duration", "prompts", "generations", "errors",
                "cost"):
        table.add_column(col, justify="left" if col in ("run", "flow", "deployment", "state", "start") else "right")
    for r in rows:
        start = r["start"].astimezone().strftime("%Y-%m-%d %H:%M:%S") if r["start"] else "-"
        duration = "-" if r["duration_s"] is None else f"{r['duration_s']:.1f}s"
        s = summaries.get(r["id"], {})
        counts = ["-" if s.get(k) is None else f"{s[k]:,}" for k in ("prompts", "generations", "errors")]
        cost = "-" if s.get("cost") is None else f"{s['cost']:.4f}"
        table.add_row(r["name"], r["flow"], r["deployment"] or "-", r["state"], start, duration, *counts, cost)
    out.print(table if rows else "no genflow runs yet")


@app.command()
def report(output: Annotated[str, typer.Argument(help="a job's output folder or s3:// URI (or a sweep's)",
                                                 show_default=False)],
           endpoint_url: Annotated[str | None, typer.Option(
               "--endpoint-url", help="S3 endpoint (the job's storage.endpoint_url)")] = None,
           region: Annotated[str | None, typer.Option(
               "--region", help="S3 region (the job's storage.region)")] = None,
           anonymous: Annotated[bool, typer.Option(
               "--anonymous", help="unsigned S3 requests, for a public bucket (the job's storage.anonymous)")] = False,
           ) -> None:
    """(Re)build report.html and the README.md dataset card of a job's output, or sweep.html and every
    run's report and card of a sweep's.

    The storage options are those of the job's ``storage:`` section; a sweep's runs are read with the same."""
    from genflow.config import StorageSpec
    from genflow.outputs.dataset_card import rebuild_cards
    from genflow.outputs.report import ReportError, rebuild

    try:
        spec = StorageSpec(endpoint_url=endpoint_url, region=region, anonymous=anonymous)
        written = rebuild(output, spec)
        cards = rebuild_cards(output, spec)  # README.md: each job folder's dataset card
    except ReportError as exc:
        fail(str(exc))
    except _user_errors() as exc:
        fail(str(exc))
    for uri in written:  # the pages on stdout, one a line, for scripts; the cards said on stderr
        out.print(uri)
    for uri in cards:
        console.print(f"dataset card: {uri}", highlight=False, markup=False)


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


OutputArg = Annotated[str, typer.Argument(help="a finished job's output folder or s3:// URI", show_default=False)]
ToolOpt = Annotated[str | None, typer.Option("--tool", help="the labelling plugin (genflow plugins: kind labeller); "
                                             "default: the one installed")]
UrlOpt = Annotated[str | None, typer.Option("--url", help="the tool's address (Label Studio: http://127.0.0.1:8080)")]
KeyEnvOpt = Annotated[str | None, typer.Option("--api-key-env", help="the variable holding the tool's key "
                                               "(Label Studio: LABEL_STUDIO_API_KEY)")]
ParamOpt = Annotated[list[str] | None, typer.Option("--param", help="another of the plugin's params: key=value")]
ProjectOpt = Annotated[str | None, typer.Option("--project", help="the project's title (push default: 'genflow "
                                                "<job name> <kind>'; pull: every project pushed or pulled from "
                                                "here, and this one, remembered)")]


def _labeller_params(url: str | None, api_key_env: str | None, param: list[str] | None) -> dict:
    from genflow.config import parse_override

    params = dict(parse_override(p) for p in param or [])
    params.update({k: v for k, v in (("url", url), ("api_key_env", api_key_env)) if v is not None})
    return params


def _label_storage(output: str) -> Any:
    from genflow.data.storage import Storage

    return Storage.open(output)


@label_app.command("push")
def label_push(output: OutputArg, tool: ToolOpt = None, url: UrlOpt = None, api_key_env: KeyEnvOpt = None,
               project: ProjectOpt = None,
               kind: Annotated[str, typer.Option("--kind", help="rankings: order each prompt's candidates; "
                                                 "demonstrations: write each prompt's answer")] = "rankings",
               sample: Annotated[int | None, typer.Option("--sample", min=1, help="push this many prompts, drawn "
                                                          "with --seed (default: all)")] = None,
               seed: Annotated[int, typer.Option("--seed", help="seed of the --sample draw")] = 0,
               disagreeing: Annotated[bool, typer.Option("--disagreeing", help="only prompts where two scorers "
                                                         "order some candidates oppositely")] = False,
               param: ParamOpt = None) -> None:
    """Create or update a labelling project from a finished job; pushing again adds no task twice."""
    from genflow.labelling.labels import LabellingError, push

    try:
        result = push(_label_storage(output), tool, _labeller_params(url, api_key_env, param), kind, project,
                      sample, seed, disagreeing)
    except LabellingError as exc:
        fail(str(exc))
    except RuntimeError as exc:  # the tool answered with an error, or could not be reached
        fail(str(exc), code=1)
    out.print(f"{result.project}: {result.created} tasks added, {result.existing} there already", highlight=False)
    out.print(f"label them at {result.url}", highlight=False)


@label_app.command("pull")
def label_pull(output: OutputArg, tool: ToolOpt = None, url: UrlOpt = None, api_key_env: KeyEnvOpt = None,
               project: ProjectOpt = None,
               kind: Annotated[str | None, typer.Option("--kind", help="the kind of --project's tasks, or only "
                                                        "the projects of this kind")] = None,
               param: ParamOpt = None) -> None:
    """Read finished annotations into human_rankings/ and demonstrations/, and the exporters' human rows;
    then rewrite report.html, the README.md dataset card and, where a Prefect server is set, the job's artifacts."""
    from genflow.labelling.labels import LabellingError, pull

    try:
        pulled = pull(_label_storage(output), tool, _labeller_params(url, api_key_env, param), project, kind)
    except LabellingError as exc:
        fail(str(exc))
    except RuntimeError as exc:
        fail(str(exc), code=1)
    manifest = pulled.manifest
    labelled = manifest.get("labelling") or {}
    for folder, n in (labelled.get("rows") or {}).items():
        out.print(f"{folder}: {n:,} human rows", highlight=False)
    agreement = manifest.get("human_agreement") or {}
    if agreement.get("scorers"):
        table = Table(title="agreement with the human rankings", show_header=True)
        for col in ("scorer", "pairwise accuracy", "pairs", "Kendall tau", "prompts"):
            table.add_column(col, justify="left" if col == "scorer" else "right")
        fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
        for r in agreement["scorers"]:
            table.add_row(r["scorer"], fmt(r["pairwise_accuracy"]), fmt(r["pairs"]), fmt(r["kendall_tau"]),
                          fmt(r["prompts"]))
        out.print(table)
        inter = agreement.get("inter_annotator")
        if inter:
            out.print(f"inter-annotator: Kendall tau {fmt(inter['kendall_tau'])}, pairwise agreement "
                      f"{fmt(inter['agreement'])} over {inter['prompts']} prompts", highlight=False)
    for what, where in pulled.refreshed.items():  # the views that now show these figures
        out.print(f"refreshed {what}: {where}", highlight=False)
    for what in ("report.html", "README.md"):
        if what not in pulled.refreshed:
            out.print(f"{what} not refreshed (see the warning above): `genflow report {output}` rebuilds it",
                      highlight=False)


cache_app = typer.Typer(no_args_is_help=True, help="The response cache jobs share (cache.path or $GENFLOW_CACHE): "
                        "what it holds, and pruning it.")
app.add_typer(cache_app, name="cache")
CacheArg = Annotated[str | None, typer.Argument(help="the cache's folder or s3:// prefix (default: $GENFLOW_CACHE)",
                                                show_default=False)]


def _open_cache(path: str | None) -> Any:
    from genflow.engine.cache import CACHE_ENV, ResponseCache

    where = path or os.environ.get(CACHE_ENV, "").strip()
    if not where:
        fail(f"name the cache's folder, or set ${CACHE_ENV}")
    try:
        return ResponseCache.open(where)
    except _user_errors() as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot open the cache {where}: {exc}")


@cache_app.command("stats")
def cache_stats(path: CacheArg = None) -> None:
    """How many answers the cache holds, their size, and when the oldest and newest were written."""
    from datetime import datetime, timezone

    cache = _open_cache(path)
    stats = cache.stats()
    when = lambda t: "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.print(f"{cache.path}: {stats.entries} answers, {stats.bytes / 1e6:.2f} MB, oldest {when(stats.oldest)}, "
              f"newest {when(stats.newest)}", highlight=False)


@cache_app.command("prune")
def cache_prune(path: CacheArg = None, older_than: Annotated[str, typer.Option(
        "--older-than", help="delete the answers written longer ago than this: 30d, 12h, 2w...")] = "30d") -> None:
    """Delete the cache's answers older than --older-than (a job sends those requests again)."""
    from genflow.engine.cache import parse_age

    try:
        seconds = parse_age(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}")
    cache = _open_cache(path)
    deleted, freed = cache.prune(seconds)
    out.print(f"{cache.path}: deleted {deleted} answers older than {older_than} ({freed / 1e6:.2f} MB)",
              highlight=False)


@app.command("cancel-batches")
def cancel_batches(config: ConfigArg, set_: SetOpt = None) -> None:
    """Cancel the provider's batches a job in batch mode created and that still run (a stopped job
    leaves them running); running the job again sends their unanswered requests in new batches."""
    import asyncio

    from genflow.config import load_config, request_settings, resolve_output
    from genflow.engine.batches import BatchJournal, cancel_batches
    from genflow.registry import get_registry

    try:
        job = load_config(config, set_ or [])
        output = resolve_output(job.output)
        specs = [("generator", s) for s in job.generators] + [("scorer", s) for s in job.scorers]
        cancelled = 0
        for kind, spec in specs:
            if spec.requests.mode != "batch":
                continue
            factory = get_registry().get(kind, spec.plugin).factory.implementation(spec.params)
            plugin = factory(spec.model, factory.Params.model_validate(spec.params), "cpu")
            journal = BatchJournal(str(request_settings(spec, output)["batch_journal"]))

            async def cancel(plugin: Any = plugin, journal: BatchJournal = journal) -> list[tuple[str, str]]:
                try:
                    return await cancel_batches(plugin.batch_api(), journal)
                finally:
                    await plugin.aclose()

            for batch_id, status in asyncio.run(cancel()):
                out.print(f"{os.path.basename(journal.storage.uri.rstrip('/'))} {batch_id}: {status}",
                          highlight=False)
                cancelled += 1
    except _user_errors() as exc:
        fail(str(exc))
    if not cancelled:
        out.print(f"no batch of {config} to cancel (no stage in batch mode, or none created)", highlight=False)


def main() -> None:
    from genflow.runtime.shutdown import exit_after_hooks

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with exit_after_hooks():  # Python's teardown after the exit hooks: seconds, for nothing
        app(prog_name="genflow")


if __name__ == "__main__":
    main()
