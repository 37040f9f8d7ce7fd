"""A third-party filter plugin, installed the way any distribution's is (an entry point of the
``genflow`` group): ``min-words`` leaves out texts of fewer than ``min_words`` words.

``hold_on``: a shard holding a text with this string waits in :meth:`MinWords.signatures` until
``state_dir/release`` exists (a job killed mid-filter, deterministically)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import Field

from genflow import hookimpl
from genflow.api import Filter, PluginParams, Removal

DIST_NAME = "genflow-test-filters"
ENTRY_POINT = "testfilters"
HERE = Path(__file__).resolve().parents[1]  # tests/: where `support` is importable from


class MinWordsParams(PluginParams):
    min_words: int = Field(3, ge=1)
    hold_on: str | None = None
    state_dir: str | None = None


class MinWords(Filter):
    """Leaves out texts of fewer than ``min_words`` words (signature: the word count)."""

    Params: ClassVar[type[PluginParams]] = MinWordsParams
    signature_type: ClassVar[Any] = pa.int32()
    params: MinWordsParams

    def signatures(self, texts: list[str]) -> list[Any] | pa.Array:
        hold = self.params.hold_on
        if hold and self.params.state_dir and any(hold in t for t in texts):
            release = Path(self.params.state_dir) / "release"
            while not release.exists():
                time.sleep(0.05)
        return [len(t.split()) for t in texts]

    def decide(self, signatures: pa.Array, groups: pa.Array | None) -> list[Removal]:
        return [Removal(row, f"fewer than {self.params.min_words} words ({n})")
                for row, n in enumerate(signatures.to_pylist()) if n is not None and n < self.params.min_words]


@hookimpl
def register_filters(register: Any) -> None:
    register("min-words", MinWords)


def install(site: Path) -> Path:
    """Write this module's distribution metadata (with its entry point) into ``site``."""
    info = site / f"{DIST_NAME.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST_NAME}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[genflow]\n{ENTRY_POINT} = {__name__}\n")
    return site


def pythonpath(site: Path) -> str:
    """``PYTHONPATH`` that makes the plugin importable and discoverable in a subprocess."""
    return os.pathsep.join([str(site), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
