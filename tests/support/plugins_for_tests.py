"""Model-free plugins for engine tests and benchmarks: fast, deterministic, and able
to misbehave on cue (sleep, raise, kill their own worker process).

They reach genflow the way a third-party plugin does: through the ``genflow``
entry-point group of an installed distribution. :func:`install` writes that
distribution's ``dist-info`` into a folder; put the folder and this module's folder
on the path (``sys.path`` in-process, ``PYTHONPATH`` for a ``genflow`` subprocess,
whose Ray workers inherit it).

- ``echo`` (generator, text): the prompt reversed, plus ``suffix`` and one "!" per sample index;
  ``keys`` makes its ``batch_keys`` observable (``words``) or broken.
- ``tiny-png`` (generator, image): a 4x4 PNG whose colour comes from the prompt.
- ``length`` (scorer, text/code/image): ``scale`` x the candidate's length.
- ``copy-train`` (trainer, policy): "trains" by copying the starting model's folder, and writes
  ``trained_on.json`` (the rows it read, its seed); ``fail_once_marker`` fails the first
  training (of a model whose path holds ``fail_on_model``) only, remembered by that file.
- ``scripted-user`` (generator, text): a simulated user that asks "question n" and logs what it
  was given (``state_dir/users.jsonl``).
- ``echo-async`` (generator, text): ``echo`` as a request plugin (``async def generate``, one
  request a call), each attempt logged as ``request <generation_id>``; ``transient_on``
  answers the first ``transient_times`` attempts of matching prompts with a 429
  (``TransientError``), ``fail_on`` is a permanent failure (``RowError``).

``fail_on`` raises for matching prompts; ``crash_on`` kills the worker process
(``os._exit``) every time it meets a matching prompt; ``crash_once_on`` kills it the
first time only, remembered by a marker file in ``state_dir``. With ``state_dir``
set, every construction and every call appends a line to ``state_dir/calls.log``.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from genflow import hookimpl
from genflow.api import (
    ChatRequest,
    ChatTurn,
    Generation,
    GenerationRequest,
    Generator,
    PluginParams,
    RowError,
    Score,
    ScoreItem,
    Scorer,
    Trainer,
    TransientError,
)

DIST_NAME = "genflow-test-plugins"
ENTRY_POINT = "testplugins"
HERE = Path(__file__).resolve().parents[1]  # tests/: where `support` is importable from


class Misbehaviour(PluginParams):
    delay_s: float = Field(0.0, ge=0.0)
    """Sleep this long per batch: makes a job slow enough to kill half-way."""
    fail_on: list[str] = Field(default_factory=list)
    crash_on: list[str] = Field(default_factory=list)
    crash_once_on: list[str] = Field(default_factory=list)
    hold_on: list[str] = Field(default_factory=list)
    """A call with one of these in a prompt waits until ``<state_dir>/release`` exists: a job held
    mid-way, however fast or slow the machine runs it."""
    state_dir: str | None = None


class EchoParams(Misbehaviour):
    suffix: str = ""
    keys: Literal["default", "words", "broken"] = "default"
    """``words``: ``batch_keys`` is the prompt's word count, and every call logs its
    prompts' word counts; ``broken``: ``batch_keys`` raises."""
    api_token: str | None = None
    """A secret as a config may hold one: every row fails if it arrives hidden (``***``)."""


class LengthParams(Misbehaviour):
    scale: float = 1.0


def _log(state_dir: str | None, line: str) -> None:
    if state_dir:
        with open(Path(state_dir) / "calls.log", "a") as f:
            f.write(f"{line} pid={os.getpid()} ppid={os.getppid()}\n")


def calls(state_dir: str | Path) -> list[str]:
    """Lines of ``calls.log``: ``init <plugin>`` and ``call <plugin> <n items>``."""
    path = Path(state_dir) / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def _misbehave(params: Misbehaviour, texts: list[str]) -> None:
    """Crash the process on cue; raise nothing (row failures are per item)."""
    for text in texts:
        if any(s in text for s in params.crash_on):
            os._exit(3)
        for s in params.crash_once_on:
            if s in text and params.state_dir:
                marker = Path(params.state_dir) / f"crashed-{hashlib.sha1(s.encode()).hexdigest()[:8]}"
                if not marker.exists():
                    marker.write_text(text)
                    os._exit(4)


class _Misbehaving:
    params: Any

    def _begin(self, kind: str, texts: list[str]) -> None:
        _log(self.params.state_dir, f"call {kind} {len(texts)}")
        if self.params.delay_s:
            time.sleep(self.params.delay_s)
        if self.params.state_dir and any(s in t for s in self.params.hold_on for t in texts):
            while not (Path(self.params.state_dir) / "release").exists():
                time.sleep(0.05)
        _misbehave(self.params, texts)
        bad = [t for t in texts if any(s in t for s in self.params.fail_on)]
        if bad:
            raise ValueError(f"refusing prompt {bad[0]!r}")


class Echo(_Misbehaving, Generator):
    """The prompt reversed (no model)."""

    modality = "text"
    Params = EchoParams
    params: EchoParams

    def __init__(self, model: str | None, params: PluginParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        _log(self.params.state_dir, "init echo")

    def batch_keys(self, requests: list[GenerationRequest]) -> list[Any]:
        if self.params.keys == "broken":
            raise RuntimeError("batch_keys is broken on purpose")
        if self.params.keys == "words":
            return [len(r.prompt.split()) for r in requests]
        return super().batch_keys(requests)

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        if self.params.keys == "words":
            _log(self.params.state_dir, "words " + ",".join(str(len(r.prompt.split())) for r in requests))
        self._begin("echo", [r.prompt for r in requests])
        if self.params.api_token == "***":
            return [RowError("the plugin was given the hidden api_token, not the real one") for _ in requests]
        return [Generation(text=" " + r.prompt[::-1] + self.params.suffix + "!" * r.sample,
                           num_tokens=len(r.prompt.split()), finish_reason="stop") for r in requests]


class TinyPng(_Misbehaving, Generator):
    """A 4x4 PNG coloured by the prompt and sample (no model)."""

    modality = "image"
    Params = Misbehaviour

    def generate(self, requests: list[GenerationRequest]) -> list[Generation | RowError]:
        from PIL import Image

        self._begin("tiny-png", [r.prompt for r in requests])
        out: list[Generation | RowError] = []
        for r in requests:
            rgb = hashlib.sha256(f"{r.prompt}|{r.seed}".encode()).digest()[:3]
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), tuple(rgb)).save(buf, format="PNG")
            out.append(Generation(image=buf.getvalue(), finish_reason="stop"))
        return out


class Length(_Misbehaving, Scorer):
    """``scale`` x the candidate's length in characters (bytes for images)."""

    modalities = ("text", "code", "image")
    Params = LengthParams
    params: LengthParams

    def __init__(self, model: str | None, params: PluginParams, device: str = "cpu") -> None:
        super().__init__(model, params, device)
        _log(self.params.state_dir, "init length")

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        self._begin("length", [i.prompt for i in items])
        return [Score(self.params.scale * len(i.text if i.text is not None else (i.image or b"")),
                      {"chars": len(i.text or "")}) for i in items]


class EchoAsyncParams(PluginParams):
    delay_s: float = Field(0.0, ge=0.0)
    fail_on: list[str] = Field(default_factory=list)
    transient_on: list[str] = Field(default_factory=list)
    transient_times: int = 1
    hang_on: list[str] = Field(default_factory=list)
    """Never answer (the engine's timeout must end the attempt) the first time."""
    state_dir: str | None = None
    endpoint: str = "http://unused.invalid"
    """Where a real client would send requests: in ``unhashed_params``, so it changes no id."""
    key_env: str | None = None
    """An API key's variable, read in the worker: answers carry the key's hash, never the key."""
    hold_after: int | None = None
    """Requests after this many (counted in ``state_dir``'s log) get no answer until a file
    ``release`` is in ``state_dir``: a test kills the job mid-shard on an event, not a time."""


class EchoAsync(Generator):
    """``echo`` as a request plugin: one request per (async) call, as an API client is."""

    Params = EchoAsyncParams
    params: EchoAsyncParams
    unhashed_params = ("endpoint", "key_env")

    @classmethod
    def secret_env(cls, params: PluginParams) -> list[str]:
        key_env = getattr(params, "key_env", None)
        return [key_env] if key_env else []

    async def generate(self, request: GenerationRequest) -> Generation | RowError:  # type: ignore[override]
        import asyncio

        state = self.params.state_dir
        _log(state, f"request {request.generation_id}")
        if state and self.params.hold_after is not None:
            ordinal = sum(1 for line in calls(state) if line.startswith("request "))
            while ordinal > self.params.hold_after and not (Path(state) / "release").exists():
                await asyncio.sleep(0.01)
        if self.params.delay_s:
            await asyncio.sleep(self.params.delay_s)
        if state and any(s in request.prompt for s in self.params.hang_on):
            marker = Path(state) / f"hung-{request.generation_id}"
            if not marker.exists():
                marker.write_text("")
                await asyncio.sleep(3600)
        if state and any(s in request.prompt for s in self.params.transient_on):
            marker = Path(state) / f"attempts-{request.generation_id}"
            seen = int(marker.read_text()) if marker.exists() else 0
            marker.write_text(str(seen + 1))
            if seen < self.params.transient_times:
                raise TransientError("429 Too Many Requests", retry_after=0.05, rate_limited=True)
        if any(s in request.prompt for s in self.params.fail_on):
            return RowError(f"400 Bad Request: refusing prompt {request.prompt!r}")
        signed = ""
        if self.params.key_env:
            key = os.environ.get(self.params.key_env)
            if not key:
                return RowError(f"401: ${self.params.key_env} is not set in the worker")
            signed = " key:" + hashlib.sha256(key.encode()).hexdigest()[:8]
        return Generation(text=" " + request.prompt[::-1] + "!" * request.sample + signed,
                          num_tokens=len(request.prompt.split()), prompt_tokens=len(request.prompt),
                          finish_reason="stop")


class CopyTrainParams(PluginParams):
    fail_once_marker: str | None = None
    fail_on_model: str = ""
    """Fail (once) only a training that starts from a model whose path holds this text."""


class CopyTrain(Trainer):
    """A policy trainer without training: the starting model, copied, and what it read."""

    Params = CopyTrainParams
    data_format = "preference"
    trains = "policy"
    params: CopyTrainParams

    def train(self, data: str, model: str, output_dir: str, seed: int, device: str = "cpu") -> dict[str, Any]:
        import json
        import shutil

        import pyarrow.parquet as pq

        marker = self.params.fail_once_marker
        if marker and self.params.fail_on_model in model and not Path(marker).exists():
            Path(marker).write_text("failed once")
            raise RuntimeError("copy-train fails its first training, as asked")
        rows = pq.read_table(data).num_rows
        shutil.copytree(model, output_dir, dirs_exist_ok=True)
        (Path(output_dir) / "trained_on.json").write_text(json.dumps({"rows": rows, "seed": seed}))
        return {"rows": rows}


@hookimpl
def register_trainers(register: Any) -> None:
    register("copy-train", CopyTrain)


class ScriptedUserParams(PluginParams):
    state_dir: str | None = None


class ScriptedUser(Generator):
    """A simulated user without a model (``user: {plugin: scripted-user}``): after assistant turn n
    it asks "question n+1" and, with ``state_dir``, appends what it was given (the turn, its seed
    and messages) as a JSON line to ``state_dir/users.jsonl``."""

    Params = ScriptedUserParams
    params: ScriptedUserParams

    async def generate(self, request: GenerationRequest) -> Generation:  # type: ignore[override]
        return Generation(text=request.prompt)

    async def chat(self, request: ChatRequest) -> ChatTurn:
        import json

        if self.params.state_dir:
            with open(Path(self.params.state_dir) / "users.jsonl", "a") as f:
                f.write(json.dumps({"generation_id": request.generation_id, "turn": request.turn,
                                    "seed": request.seed, "messages": request.messages}) + "\n")
        return ChatTurn(f"question {request.turn + 1}", finish_reason="stop", prompt_tokens=len(request.messages),
                        num_tokens=2)


@hookimpl
def register_generators(register: Any) -> None:
    register("echo", Echo)
    register("tiny-png", TinyPng)
    register("echo-async", EchoAsync)
    register("scripted-user", ScriptedUser)


@hookimpl
def register_scorers(register: Any) -> None:
    register("length", Length)


def install(site: Path) -> Path:
    """Write this module's distribution metadata (with its entry point) into ``site``."""
    info = site / f"{DIST_NAME.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[genflow]\n{ENTRY_POINT} = {__name__}\n")
    return site


def pythonpath(site: Path) -> str:
    """``PYTHONPATH`` that makes the plugins importable and discoverable in a subprocess."""
    return os.pathsep.join([str(site), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
