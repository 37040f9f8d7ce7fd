"""Shared fixtures: tiny models written once per session, one Prefect harness, one Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.jobs import free_port

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")



@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Every plugin's tiny models (tiny-gpt2, tiny-reward, tiny-code, tiny-sd, tiny-clip), written once."""
    from genflow.registry import get_registry

    directory = tmp_path_factory.mktemp("models")
    written: dict[str, str] = {}
    for result in get_registry().pm.hook.init_tiny_models(directory=directory):
        written.update(result or {})
    return written


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect database and ephemeral API for the session's flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for every in-process job of the session."""
    import ray

    from genflow.config import RaySpec
    from genflow.engine.ray_cluster import init_ray

    init_ray(RaySpec())
    yield
    ray.shutdown()


@pytest.fixture
def job_runner(prefect_harness: None, ray_local: None) -> Any:
    """``run(config_dict, resume=True) -> manifest`` through the real flow, Ray and Prefect."""
    from genflow.flows.run import run_job

    return run_job


@pytest.fixture(scope="session")
def test_plugins_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site folder where the model-free plugins of ``plugins_for_tests`` are installed."""
    from support import plugins_for_tests

    return plugins_for_tests.install(tmp_path_factory.mktemp("test-plugins"))


@pytest.fixture
def test_plugins(test_plugins_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """``echo``, ``tiny-png`` and ``length`` installed for this test, in-process and for subprocesses.

    Yields the environment a ``genflow`` subprocess needs to find them (``run_genflow(env=...)``).
    """
    import ray.cloudpickle
    from support import plugins_for_tests

    from genflow.registry import get_registry

    # In-process Ray workers were started without tests/ on their path: ship the module by value.
    ray.cloudpickle.register_pickle_by_value(plugins_for_tests)
    monkeypatch.syspath_prepend(str(test_plugins_site))
    get_registry(refresh=True)
    yield {"PYTHONPATH": plugins_for_tests.pythonpath(test_plugins_site)}
    monkeypatch.undo()
    get_registry(refresh=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME; yields its API URL."""
    import signal
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = open(home / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc.pid)
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(proc.pid)
    log.close()


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test session started."""
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- OpenAI-protocol servers (tests/support/servers.py) ---------------------------------------------

@pytest.fixture(scope="session")
def transformers_server(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``transformers serve`` on 127.0.0.1 with the tiny GPT-2 (plus a chat template), for the session.

    ``.url`` (base URL, ``.../v1``), ``.model`` (the name to send: the model's path),
    ``.requests()`` (``POST /v1/...`` lines of its access log: requests it answered)."""
    from support import servers

    directory = tmp_path_factory.mktemp("transformers-serve")
    model = servers.write_chat_model(tiny_models["tiny-gpt2"], directory / "tiny-gpt2-chat")
    server = servers.TransformersServe(model, directory / "server.log", free_port()).start()
    yield server
    server.stop()


@pytest.fixture
def make_standin_server() -> Iterator[Any]:
    """``make(latency=0.0, answer=echo_answer) -> StandinServer``, started; all stopped after the test."""
    from support import servers

    started: list[Any] = []

    def make(latency: float = 0.0, answer: Any = servers.echo_answer) -> Any:
        started.append(servers.StandinServer(latency, answer).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def standin_server(make_standin_server: Any) -> Any:
    """A stand-in OpenAI server answering at once (``.url``, ``.received``, ``.requests``)."""
    return make_standin_server()


@pytest.fixture
def make_fault_proxy() -> Iterator[Any]:
    """``make(upstream_url, **faults) -> FaultProxy`` (tests/support/servers.py), started; stopped after the test."""
    from support import servers

    started: list[Any] = []

    def make(upstream: str, **kwargs: Any) -> Any:
        started.append(servers.FaultProxy(upstream, **kwargs).start())
        return started[-1]

    yield make
    for proxy in started:
        proxy.stop()
