"""A third-party genflow plugin, as an outside author writes one: it only implements hooks.

- ``rubric`` (scorer): reads the input's own ``rubric`` column (items separated by
  ``;``) and scores a candidate by the share of items its text contains. Its
  ``summarize`` and ``report_sections`` give the job's coverage table.
- ``graded`` (exporter): the best candidate of each prompt with a pass/fail grade
  against ``threshold``; it runs in every job with scorers (``job_params``) and
  writes ``<output>/graded/``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from genflow import hookimpl
from genflow.api import Exporter, PluginParams, ReportSection, RowError, Score, ScoreItem, Scorer

SEPARATOR = ";"


class RubricParams(PluginParams):
    case_sensitive: bool = Field(False, description="Match rubric items with their case.")


class RubricScorer(Scorer):
    """The share of the row's rubric items that the candidate's text contains."""

    Params: ClassVar[type[PluginParams]] = RubricParams
    description: ClassVar[str] = "share of the row's rubric items found in the candidate"
    input_columns: ClassVar[tuple[str, ...]] = ("rubric",)
    params: RubricParams

    def score(self, items: list[ScoreItem]) -> list[Score | RowError]:
        out: list[Score | RowError] = []
        for item in items:
            rubric = item.inputs.get("rubric")
            if not rubric:
                out.append(RowError("rubric: the row has no rubric"))
                continue
            wanted = [r.strip() for r in rubric.split(SEPARATOR) if r.strip()]
            text = item.text or ""
            if not self.params.case_sensitive:
                text, wanted = text.lower(), [w.lower() for w in wanted]
            hits = [w for w in wanted if w in text]
            out.append(Score(len(hits) / len(wanted),
                             {"hits": hits, "inputs": sorted(item.inputs),
                              "outcome": f"{len(hits)}/{len(wanted)} rubric items"}))
        return out

    @classmethod
    def summarize(cls, scores: pa.Table, params: PluginParams) -> dict[str, Any]:
        values = scores["score"].drop_null()
        full = sum(1 for v in values.to_pylist() if v >= 1.0)
        return {"coverage": pc.mean(values).as_py() if len(values) else None, "complete": full,
                "candidates": len(values)}

    @classmethod
    def report_sections(cls, name: str, metrics: dict[str, Any]) -> list[ReportSection]:
        coverage = metrics.get("coverage")
        return [ReportSection("Rubric coverage", ["scorer", "coverage", "complete", "candidates"],
                              [[name, "–" if coverage is None else f"{coverage * 100:.1f}%",
                                metrics.get("complete"), metrics.get("candidates")]],
                              "Share of each row's rubric items found in its candidates.")]


class GradedParams(PluginParams):
    threshold: float = Field(0.5, description="The lowest score that passes.")


GRADED = pa.schema([("prompt_id", pa.string()), ("generation_id", pa.string()), ("answer", pa.string()),
                    ("score", pa.float64()), ("grade", pa.string())])


class GradedExporter(Exporter):
    """Each prompt's best candidate, graded pass or fail against a threshold."""

    Params: ClassVar[type[PluginParams]] = GradedParams
    description: ClassVar[str] = "best candidate per prompt with a pass/fail grade"
    params: GradedParams

    @classmethod
    def job_params(cls, ranking: Any) -> dict[str, Any] | None:
        return {"threshold": 0.5}

    def export(self, ranked: pa.Table) -> pa.Table | None:
        best = [r for r in ranked.to_pylist() if r["rank"] == 1]
        rows = [{"prompt_id": r["prompt_id"], "generation_id": r["generation_id"], "answer": r["text"],
                 "score": r["score"], "grade": "pass" if r["score"] >= self.params.threshold else "fail"}
                for r in best]
        return pa.Table.from_pylist(rows, schema=GRADED) if rows else None


@hookimpl
def register_scorers(register: Any) -> None:
    register("rubric", RubricScorer)


@hookimpl
def register_exporters(register: Any) -> None:
    register("graded", GradedExporter)
