"""A third-party genflow plugin, as an outside author writes one: it only implements hooks.

- ``rubric`` (scorer): reads the input's own ``rubric`` column (items separated by
  ``;``) and scores a candidate by the share of items its text contains. It writes a
  column of its own to ``scores/``, ``rubric_hits`` (the items found, an int32), beside
  the ``details`` JSON. Its ``summarize`` and ``report_sections`` give the job's coverage
  table.
- ``graded`` (exporter): the best candidate of each prompt with a pass/fail grade
  against ``threshold``; it runs in every job with scorers (``job_params``) and
  writes ``<output>/graded/``. From people's rankings (``genflow label pull``) it makes
  rows of its own: each ranked prompt's candidate people put first most often, graded
  ``human`` (``graded/part-human.parquet``).
- ``inbox`` (labeller): a labelling "tool" that is two JSON files, for the tests: a push
  writes the tasks to ``<folder>/<project>.tasks.json``, a pull reads the annotations
  people left in ``<folder>/<project>.annotations.json``.
- ``search-corpus`` (tool): an episode's model searches a local text file (passages
  separated by blank lines) for a query's words and reads the passages that hold most of
  them, best first.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from genflow import hookimpl
from genflow.api import (
    Annotation,
    Exporter,
    HumanLabels,
    Labeller,
    LabelTask,
    PluginParams,
    PushResult,
    ReportSection,
    RowError,
    Score,
    ScoreItem,
    Scorer,
    Tool,
    ToolContext,
    ToolError,
    ToolResult,
)

SEPARATOR = ";"


class RubricParams(PluginParams):
    case_sensitive: bool = Field(False, description="Match rubric items with their case.")


class RubricScorer(Scorer):
    """The share of the row's rubric items that the candidate's text contains."""

    Params: ClassVar[type[PluginParams]] = RubricParams
    description: ClassVar[str] = "share of the row's rubric items found in the candidate"
    input_columns: ClassVar[tuple[str, ...]] = ("rubric",)
    extra_columns: ClassVar[dict[str, pa.DataType]] = {"rubric_hits": pa.int32()}
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
                              "outcome": f"{len(hits)}/{len(wanted)} rubric items"},
                             columns={"rubric_hits": len(hits)}))
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
    human_kinds: ClassVar[tuple[str, ...]] = ("rankings",)
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

    def export_human(self, labels: HumanLabels) -> pa.Table:
        """Each ranked prompt's candidate people put first most often (ties: the smaller id);
        ``score``: the share of the prompt's rankings that put it first."""
        firsts: dict[str, Counter[str]] = {}
        for ranking in labels.rankings:
            firsts.setdefault(ranking.prompt_id, Counter())[ranking.order[0]] += 1
        rows = []
        for prompt_id, counts in sorted(firsts.items()):
            top, n = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
            rows.append({"prompt_id": prompt_id, "generation_id": top, "answer": labels.candidates[top]["text"],
                         "score": n / sum(counts.values()), "grade": "human"})
        return pa.Table.from_pylist(rows, schema=GRADED)


class InboxParams(PluginParams):
    folder: str = Field(description="Where the tasks are written and the annotations read.")


class Inbox(Labeller):
    """Tasks out to a JSON file, annotations in from another."""

    Params: ClassVar[type[PluginParams]] = InboxParams
    description: ClassVar[str] = "labelling through two JSON files (tests)"
    params: InboxParams

    def _file(self, project: str, what: str) -> Path:
        return Path(self.params.folder) / f"{project.replace(' ', '_')}.{what}.json"

    def push(self, project: str, kind: str, tasks: list[LabelTask]) -> PushResult:
        path = self._file(project, "tasks")
        path.parent.mkdir(parents=True, exist_ok=True)
        known = json.loads(path.read_text()) if path.exists() else {}
        new = {t.key: {"prompt_id": t.prompt_id, "kind": kind, "candidates": [c.generation_id for c in t.candidates]}
               for t in tasks if t.key not in known}
        path.write_text(json.dumps({**known, **new}, sort_keys=True))
        return PushResult(project, len(new), len(tasks) - len(new), str(path))

    def pull(self, project: str, kind: str) -> list[Annotation]:
        path = self._file(project, "annotations")
        if not path.exists():
            raise RuntimeError(f"inbox: no project {project!r} ({path} is missing)")
        return [Annotation(a["key"], kind, a["prompt_id"], a["annotator"], a["created_at"], a["id"],
                           ranking=tuple(a.get("ranking", ())), completion=a.get("completion"))
                for a in json.loads(path.read_text())]


class SearchParams(PluginParams):
    corpus: str = Field(description="A UTF-8 text file; its passages are separated by blank lines.")
    top_k: int = Field(3, ge=1, description="Passages an answer holds at most.")


class SearchArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(description="Words to look for.")


_WORD = re.compile(r"\w+")


class SearchCorpus(Tool):
    """Search the reference notes for words and read the passages that hold most of them."""

    Params: ClassVar[type[PluginParams]] = SearchParams
    Arguments: ClassVar[type[BaseModel]] = SearchArguments
    timeout_s: ClassVar[float] = 5.0
    params: SearchParams

    def __init__(self, params: PluginParams) -> None:
        super().__init__(params)
        text = Path(self.params.corpus).read_text(encoding="utf-8")
        self.passages = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]

    def run(self, arguments: BaseModel, context: ToolContext) -> ToolResult:
        assert isinstance(arguments, SearchArguments)
        words = {w.lower() for w in _WORD.findall(arguments.query)}
        if not words:
            raise ToolError("the query has no words to look for")
        found = [(len(words & {w.lower() for w in _WORD.findall(p)}), i) for i, p in enumerate(self.passages)]
        best = sorted((-n, i) for n, i in found if n)[:self.params.top_k]
        if not best:
            return ToolResult(f"no passage holds any of: {', '.join(sorted(words))}", details={"found": []})
        return ToolResult("\n\n".join(f"[{i + 1}] {self.passages[i]}" for _, i in best),
                          details={"found": [i + 1 for _, i in best]})


@hookimpl
def register_tools(register: Any) -> None:
    register("search-corpus", SearchCorpus)


@hookimpl
def register_scorers(register: Any) -> None:
    register("rubric", RubricScorer)


@hookimpl
def register_exporters(register: Any) -> None:
    register("graded", GradedExporter)


@hookimpl
def register_labellers(register: Any) -> None:
    register("inbox", Inbox)
