"""People in the loop: the tasks a labelling tool gets from a job, and what their labels become.

``genflow label push`` turns a finished job's prompts into :class:`genflow.api.LabelTask` s —
a prompt with its candidates to order (``rankings``), or a prompt to answer
(``demonstrations``) — sampled with a seed, optionally only where the scorers disagree,
and hands them to a :class:`genflow.api.Labeller` plugin. ``genflow label pull`` takes
the plugin's annotations and writes

- ``human_rankings/part-<tool>.parquet``: prompt_id, generation_id, rank, annotator, created_at;
- ``demonstrations/part-<tool>.parquet``: prompt, completion, annotator;

A pull rewrites the parts of the kinds it pulled, from every project of that kind the
output knows (``_labelling/<tool>.json``: those pushed from here, and any named with
``--project``); the other kind's part is left as it was. An annotation the tool hands
over twice (a project known twice) is written once.

Then :func:`refresh` hands, from every tool's parts, what people did to each of the job's
exporters (:meth:`genflow.api.Exporter.export_human`), which turn it into the human rows of
their formats (``<exporter>/part-human.parquet``), and works out how each scorer agrees with
the people (``manifest["human_agreement"]``). A job run calls :func:`refresh` too, so the
human rows and figures follow new scores and the config's ``labelling.human_rows``.
Everything is rewritten whole from what is on storage, so a second pull, or a second run,
changes nothing.

A pull then rewrites what shows those figures (:func:`refresh_views`): ``report.html``, the
``README.md`` dataset card and, where a Prefect server is set (``PREFECT_API_URL``) and
answers, the job's Prefect artifacts (:mod:`genflow.outputs.artifacts`: under the job's keys, with
no flow run). A view that cannot be rewritten costs a warning, never the pull: the rows
are written.

Agreement with people reuses :mod:`genflow.outputs.agreement`'s Kendall tau-b and strict pairs:

- **pairwise accuracy**: of the pairs of candidates a person ordered (every annotation
  counts) and the scorer scores apart, the share the scorer orders the same way;
- **Kendall tau per prompt**: tau-b between the scorer's scores and the people's consensus
  (each candidate's wins minus losses over every annotation of the prompt: for full
  rankings, the mean rank), averaged over the prompts where it is defined;
- **inter-annotator**: for prompts two or more people ranked, tau-b between each two
  annotators' orders (wins minus losses) and the share of pairs both order alike.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import pyarrow as pa

from genflow.api import LABEL_KINDS, Annotation, Exporter, HumanLabels, HumanRanking, LabelCandidate, LabelTask
from genflow.config import job_exporters, stable_hash
from genflow.data import layout, schemas
from genflow.data.storage import Storage
from genflow.outputs.agreement import COMBINED, PairAgreement, kendall_tau_b, strict_pairs

log = logging.getLogger(__name__)

class LabellingError(ValueError):
    """A push or pull that cannot be done as asked; the message says what to change."""


# -- push: the tasks ---------------------------------------------------------------

def read_manifest(storage: Storage) -> dict[str, Any]:
    if not storage.exists(layout.MANIFEST):
        raise LabellingError(f"{storage.uri}: no {layout.MANIFEST}; give the output folder of a finished job")
    manifest: dict[str, Any] = storage.read_json(layout.MANIFEST)
    return manifest


def scorer_weights(manifest: dict[str, Any]) -> dict[str, float]:
    """The job's scorers and their weights, from its manifest's config."""
    scorers = (manifest.get("config") or {}).get("scorers") or []
    return {str(s.get("label") or s["plugin"]): float(s.get("weight", 1.0)) for s in scorers}


def _scores_by_prompt(storage: Storage, weights: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """prompt_id -> generation_id -> {scorer: score}, finite scores of the job's scorers only."""
    table = storage.read_folder(layout.SCORES, columns=["prompt_id", "generation_id", "scorer", "score"])
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    if not table.num_rows:
        return out
    for p, g, s, v in zip(*(table[c].to_pylist() for c in ("prompt_id", "generation_id", "scorer", "score")),
                          strict=True):
        if s in weights and v is not None and math.isfinite(v):
            out[p][g][s] = float(v)
    return out


def disagreeing_prompts(storage: Storage, weights: dict[str, float]) -> set[str]:
    """Prompts where two of the job's scorers order some pair of candidates oppositely."""
    if len(weights) < 2:
        raise LabellingError(f"--disagreeing needs a job with two scorers or more; this one has "
                             f"{len(weights)} ({', '.join(weights) or 'none'})")
    found = set()
    for prompt_id, candidates in _scores_by_prompt(storage, weights).items():
        for a, b in combinations(weights, 2):
            ids = sorted(g for g, s in candidates.items() if a in s and b in s)
            same, total = strict_pairs([candidates[g][a] for g in ids], [candidates[g][b] for g in ids])
            if same < total:
                found.add(prompt_id)
                break
    return found


def choose_prompts(prompt_ids: Iterable[str], sample: int | None, seed: int,
                   only: set[str] | None = None) -> list[str]:
    """The prompts to push: all (or those in ``only``), or ``sample`` of them drawn with ``seed``;
    the same arguments draw the same prompts, so pushing again adds nothing."""
    ids = sorted(set(prompt_ids) if only is None else set(prompt_ids) & only)
    if sample is not None and sample < len(ids):
        ids = sorted(random.Random(seed).sample(ids, sample))
    return ids


def task_key(kind: str, prompt_id: str, generation_ids: Iterable[str] = ()) -> str:
    """genflow's key of a task: the same prompt with the same candidates is the same task."""
    return f"genflow-{kind}-{stable_hash([prompt_id, sorted(generation_ids)])}"


def label_tasks(storage: Storage, kind: str, sample: int | None = None, seed: int = 0,
                disagreeing: bool = False) -> list[LabelTask]:
    """The tasks of a finished job's output: one per chosen prompt. A ranking task shows the
    prompt's candidates in an order shuffled per task (no position tells which the scorers liked)."""
    manifest = read_manifest(storage)
    only = disagreeing_prompts(storage, scorer_weights(manifest)) if disagreeing else None
    if kind == "demonstrations":
        prompts = storage.read_folder(layout.PROMPTS, columns=["prompt_id", "prompt"])
        text = dict(zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist(), strict=True))
        return [LabelTask(task_key(kind, p), kind, p, text[p]) for p in choose_prompts(text, sample, seed, only)]
    if kind != "rankings":
        raise LabellingError(f"unknown kind of task {kind!r}: rankings or demonstrations")
    ranked = storage.read_folder(layout.RANKINGS, columns=["prompt_id", "generation_id"])
    if not ranked.num_rows:
        raise LabellingError(f"{storage.uri}: no rankings/; a job needs scorers to rank its candidates")
    candidates: dict[str, list[str]] = defaultdict(list)
    for p, g in zip(ranked["prompt_id"].to_pylist(), ranked["generation_id"].to_pylist(), strict=True):
        candidates[p].append(g)
    chosen = [p for p in choose_prompts(candidates, sample, seed, only) if len(candidates[p]) >= 2]
    generations = _generations(storage, set(chosen))
    base_dir = str(manifest.get("input_dir") or "")
    tasks = []
    for prompt_id in chosen:
        ids = sorted(candidates[prompt_id])
        key = task_key(kind, prompt_id, ids)
        random.Random(key).shuffle(ids)
        shown = []
        for g in ids:
            row = generations[g]
            image = (layout.candidate_image(storage, row["image_path"], base_dir)
                     if row["modality"] == "image" and row["image_path"] else None)
            shown.append(LabelCandidate(g, row["modality"], row["text"], image))
        tasks.append(LabelTask(key, kind, prompt_id, generations[ids[0]]["prompt"], tuple(shown)))
    return tasks


def _generations(storage: Storage, prompt_ids: set[str]) -> dict[str, dict[str, Any]]:
    columns = ["prompt_id", "generation_id", "prompt", "modality", "text", "image_path"]
    table = storage.read_folder(layout.GENERATIONS, columns=columns)
    return {r["generation_id"]: r for r in table.to_pylist() if r["prompt_id"] in prompt_ids}


# -- pull: what people did ---------------------------------------------------------

def annotations_tables(annotations: list[Annotation], prompts: dict[str, str], tool: str,
                       known: dict[str, set[str]]) -> tuple[pa.Table, pa.Table]:
    """``human_rankings/`` and ``demonstrations/`` rows of a tool's annotations, in a fixed order.
    ``known``: each prompt's generation ids; a ranked id the job does not have is left out."""
    rankings, demonstrations = [], []
    for a in sorted(unique_annotations(annotations), key=lambda a: (a.prompt_id, a.annotation_id)):
        if a.kind == "rankings":
            ids = [g for g in a.ranking if g in known.get(a.prompt_id, ())]
            if len(set(ids)) < len(ids):
                log.warning("%s annotation %s of prompt %s lists a candidate more than once; keeping the "
                            "best place of each", tool, a.annotation_id, a.prompt_id)
                ids = list(dict.fromkeys(ids))
            if len(ids) < 2:
                continue
            rankings += [{"prompt_id": a.prompt_id, "generation_id": g, "rank": i + 1, "annotator": a.annotator,
                          "created_at": a.created_at, "ranking_id": a.annotation_id, "tool": tool}
                         for i, g in enumerate(ids)]
        elif a.completion and a.completion.strip() and a.prompt_id in prompts:
            demonstrations.append({"prompt": prompts[a.prompt_id], "completion": a.completion,
                                   "annotator": a.annotator, "prompt_id": a.prompt_id, "created_at": a.created_at,
                                   "demonstration_id": f"human-{stable_hash([tool, a.annotation_id])}",
                                   "tool": tool})
    return (pa.Table.from_pylist(rankings, schema=schemas.HUMAN_RANKINGS),
            pa.Table.from_pylist(demonstrations, schema=schemas.DEMONSTRATIONS))


def unique_annotations(annotations: list[Annotation]) -> list[Annotation]:
    """Each annotation once: the same task's annotation with the same id is one, however often
    the tool handed it over."""
    seen: dict[tuple[str, str, str], Annotation] = {}
    for a in annotations:
        seen.setdefault((a.kind, a.key, a.annotation_id), a)
    if len(seen) < len(annotations):
        log.info("%d annotations were handed over more than once; each is written once",
                 len(annotations) - len(seen))
    return list(seen.values())


def write_pulled(storage: Storage, tool: str, annotations: list[Annotation],
                 kinds: Iterable[str] = LABEL_KINDS) -> dict[str, int]:
    """Write a tool's annotations of ``kinds`` as its parts of ``human_rankings/`` (rankings) and
    ``demonstrations/``, replacing what an earlier pull wrote of those kinds (the part of a kind
    not pulled is left as it is); returns the rows written of each."""
    prompts = storage.read_folder(layout.PROMPTS, columns=["prompt_id", "prompt"])
    text = dict(zip(prompts["prompt_id"].to_pylist(), prompts["prompt"].to_pylist(), strict=True))
    generations = storage.read_folder(layout.GENERATIONS, columns=["prompt_id", "generation_id"])
    known: dict[str, set[str]] = defaultdict(set)
    for p, g in zip(generations["prompt_id"].to_pylist(), generations["generation_id"].to_pylist(), strict=True):
        known[p].add(g)
    rankings, demonstrations = annotations_tables(annotations, text, tool, known)
    written = {}
    for kind, folder, table in (("rankings", layout.HUMAN_RANKINGS, rankings),
                                ("demonstrations", layout.DEMONSTRATIONS, demonstrations)):
        if kind in kinds:
            storage.write_table(layout.labelled_part(folder, tool), table)  # no rows: the part goes
            written[folder] = table.num_rows
    return written


def judgements(storage: Storage) -> list[HumanRanking]:
    """Every annotation in ``human_rankings/`` (all tools), in a fixed order."""
    table = storage.read_folder(layout.HUMAN_RANKINGS, schema=schemas.HUMAN_RANKINGS)
    grouped: dict[tuple[str, str, str, str], list[tuple[int, str]]] = defaultdict(list)
    for r in table.to_pylist():
        grouped[(r["prompt_id"], r["tool"], r["ranking_id"], r["annotator"])].append((r["rank"], r["generation_id"]))
    return [HumanRanking(p, annotator, f"{tool}:{rid}", tuple(g for _, g in sorted(rows)))
            for (p, tool, rid, annotator), rows in sorted(grouped.items())]


def net_wins(orders: Iterable[tuple[str, ...]]) -> dict[str, int]:
    """Each candidate's wins minus losses over these orders (best first)."""
    net: dict[str, int] = defaultdict(int)
    for order in orders:
        for i, better in enumerate(order):
            for worse in order[i + 1:]:
                net[better] += 1
                net[worse] -= 1
    return dict(net)


# -- the human rows of the training data ---------------------------------------------

def job_exporters_of(manifest: dict[str, Any]) -> dict[str, Exporter]:
    """The exporters of the job whose manifest this is, made with their params; one that is not
    installed here is left out, with a warning (its human rows are left as they are)."""
    from genflow.registry import get_registry

    registry = get_registry()
    config = manifest.get("config") or {}
    wanted = [name for name, value in (config.get("exporters") or {}).items() if value is not False]
    missing = [name for name in wanted if not any(p.kind == "exporter" and p.name == name for p in registry.all())]
    for name in missing:
        log.warning("exporter %r of this job is not installed: its human rows are not made", name)
    if missing:
        config = {**config, "exporters": {k: v for k, v in config["exporters"].items() if k not in missing}}
    out = {}
    for name, params in job_exporters(config, registry).items():
        factory = registry.get("exporter", name).factory
        out[name] = factory(factory.Params.model_validate(params))
    return out


def _leave_out(storage: Storage, folder: str, prompt_ids: set[str]) -> None:
    """``labelling.human_rows: instead``: the exporters' rows of these prompts leave ``folder``'s
    shard parts; the rank markers follow, so resume still trusts them."""
    for rel in storage.list(folder, ".parquet"):
        part = layout.parse_part(rel)
        if part is None or part.label:
            continue
        table = storage.read_table(rel)
        keep = pa.array([p not in prompt_ids for p in table["prompt_id"].to_pylist()], pa.bool_())
        if all(keep.to_pylist()):
            continue
        kept = table.filter(keep)
        storage.write_table(rel, kept)  # deletes the part when nothing is left
        marker = layout.RANK_STAGE.marker(part.shard)
        if storage.exists(marker):
            data = storage.read_json(marker)
            data.setdefault("rows", {})[folder] = kept.num_rows
            if not kept.num_rows:
                data["parts"] = [p for p in data.get("parts", []) if p != rel]
            storage.write_json(marker, data)


def refresh(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the exporters' human rows and the figures from what was pulled; returns the manifest
    updated with ``labelling``, ``human_agreement`` and the rows of the folders involved (it writes
    nothing else of the manifest). An output nobody labelled is left as it is."""
    found = judgements(storage)
    demonstrations = storage.read_folder(layout.DEMONSTRATIONS, schema=schemas.DEMONSTRATIONS)
    exporters = job_exporters_of(manifest)
    if not found and not demonstrations.num_rows:
        if "labelling" in manifest:  # everything pulled before is gone from the tool: so are its rows
            for name in exporters:
                storage.delete(layout.human_part(name))
            for key in ("labelling", "human_agreement"):
                manifest.pop(key, None)
            _count_human_rows(storage, manifest, exporters)
        return manifest
    mode = ((manifest.get("config") or {}).get("labelling") or {}).get("human_rows", "beside")
    columns = ["prompt_id", "generation_id", "prompt", "modality", "text", "image_path"]
    ranked_ids = {g for j in found for g in j.order}
    generations = {r["generation_id"]: r for r in storage.read_folder(layout.GENERATIONS, columns=columns).to_pylist()
                   if r["generation_id"] in ranked_ids}
    found = [j for j in found if all(g in generations for g in j.order)]  # a rerun may have dropped some
    labels = HumanLabels(tuple(found), generations, demonstrations)
    labelled = {"rankings": {j.prompt_id for j in found},
                "demonstrations": set(demonstrations["prompt_id"].to_pylist())}
    made: dict[str, int] = {}
    for name, exporter in exporters.items():
        table = exporter.export_human(labels)
        if table is None:  # this format has no rows made by people
            continue
        if mode == "instead":
            prompts = set().union(*(labelled.get(kind, set()) for kind in exporter.human_kinds))
            if "prompt_id" in table.column_names:
                prompts |= set(table["prompt_id"].to_pylist())
            _leave_out(storage, name, prompts)
        storage.write_table(layout.human_part(name), table)  # no rows: the part goes
        made[name] = table.num_rows
    weights = scorer_weights(manifest)
    manifest["human_agreement"] = human_agreement(found, _scores_by_prompt(storage, weights), weights)
    people = {j.annotator for j in found} | set(demonstrations["annotator"].to_pylist())
    manifest["labelling"] = {
        "human_rows": mode, "rankings": len(found), "annotators": len(people),
        "rows": {layout.HUMAN_RANKINGS: sum(len(j.order) for j in found),
                 layout.DEMONSTRATIONS: demonstrations.num_rows, **made},
    }
    _count_human_rows(storage, manifest, exporters)
    return manifest


def _count_human_rows(storage: Storage, manifest: dict[str, Any], exporters: Iterable[str]) -> None:
    from genflow.outputs.manifest import count_rows

    rows = manifest.setdefault("rows", {})
    for folder in (*layout.HUMAN_FOLDERS, *exporters):
        if folder in rows or storage.list(folder, ".parquet"):
            rows[folder] = count_rows(storage, folder)


# -- agreement with people ---------------------------------------------------------

def human_agreement(found: list[HumanRanking], scores: dict[str, dict[str, dict[str, float]]],
                    weights: dict[str, float]) -> dict[str, Any]:
    """How each scorer, and the combined score, agrees with the people's rankings; and how the
    people agree with each other (see the module's docstring)."""
    names = [*weights, COMBINED] if weights else []
    accuracy = {n: [0, 0] for n in names}
    tau = {n: PairAgreement() for n in names}
    by_prompt: dict[str, list[HumanRanking]] = defaultdict(list)
    for j in found:
        by_prompt[j.prompt_id].append(j)
    inter = PairAgreement()
    inter_prompts = 0
    for prompt_id, js in sorted(by_prompt.items()):
        candidates = scores.get(prompt_id, {})

        def value(g: str, name: str, _c: dict[str, dict[str, float]] = candidates) -> float | None:
            s = _c.get(g, {})
            if name == COMBINED:
                return sum(weights[k] * s[k] for k in weights) if all(k in s for k in weights) else None
            return s.get(name)

        consensus = net_wins(j.order for j in js)
        for name in names:
            for j in js:
                scored = [g for g in j.order if value(g, name) is not None]
                same, total = strict_pairs([value(g, name) for g in scored],  # type: ignore[misc]
                                           [-i for i in range(len(scored))])
                accuracy[name][0] += same
                accuracy[name][1] += total
            ids = sorted(g for g in consensus if value(g, name) is not None)
            t = kendall_tau_b([value(g, name) for g in ids], [consensus[g] for g in ids])  # type: ignore[misc]
            if t is not None:
                tau[name].tau_sum += t
                tau[name].prompts += 1
        people: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for j in js:
            people[j.annotator].append(j.order)
        if len(people) >= 2:
            inter_prompts += 1
            nets = {a: net_wins(orders) for a, orders in people.items()}
            for a, b in combinations(sorted(nets), 2):
                common = sorted(set(nets[a]) & set(nets[b]))
                if len(common) >= 2:
                    inter.add([nets[a][g] for g in common], [nets[b][g] for g in common])
    rows = []
    for name in names:
        same, total = accuracy[name]
        sums = tau[name]
        rows.append({"scorer": name, "pairwise_accuracy": round(same / total, 6) if total else None, "pairs": total,
                     "kendall_tau": round(sums.tau_sum / sums.prompts, 6) if sums.prompts else None,
                     "prompts": sums.prompts})
    inter_row = inter.row("annotators", "annotators")
    return {
        "rankings": len(found), "prompts": len(by_prompt), "annotators": len({j.annotator for j in found}),
        "scorers": rows,
        "inter_annotator": {"prompts": inter_prompts, "annotator_pairs": inter.prompts,
                            "kendall_tau": inter_row["kendall_tau"], "agreement": inter_row["agreement"],
                            "pairs": inter_row["pairs"]} if inter_prompts else None,
    }


# -- the commands: push and pull through a labelling plugin ------------------------------

def installed_tool(tool: str | None) -> str:
    """``tool``, or when none is named the one labelling plugin installed (an error names them
    when there are several, or says there is none)."""
    if tool:
        return tool
    from genflow.registry import get_registry

    names = sorted(p.name for p in get_registry().all() if p.kind == "labeller")
    if len(names) != 1:
        raise LabellingError("name the labelling plugin with --tool: " + (
            ", ".join(names) if names else "none is installed (genflow plugins lists them)"))
    return names[0]


def labeller(tool: str, params: dict[str, Any]) -> Any:
    """The labelling plugin called ``tool``, made with these params (validated by its ``Params``)."""
    from pydantic import ValidationError

    from genflow.config import _format_errors
    from genflow.registry import get_registry

    info = get_registry().get("labeller", tool)
    if not info.available:
        raise LabellingError(info.unavailable_reason())
    try:
        checked = info.factory.Params.model_validate(params)
    except ValidationError as exc:
        raise LabellingError(f"labeller {tool!r}: bad params:\n{_format_errors(exc)}") from None
    from genflow.secrets import Scrubber, install, plugin_secrets

    install(Scrubber(plugin_secrets(info.factory, params, f"labeller {tool}")))  # an error body echoing its key
    return info.factory(checked)


def _without_secrets(annotations: list[Annotation], tool: str) -> list[Annotation]:
    """The annotations to write: one whose text holds a secret of this process (the tool's key,
    echoed by its server or pasted by a person) is training data no more and is left out, with a
    warning; an annotator or date holding one is blanked."""
    from dataclasses import replace

    from genflow.secrets import installed

    scrubber = installed()
    if not scrubber:
        return annotations
    kept = []
    for a in annotations:
        secret = scrubber.find(a.completion) or next(filter(None, map(scrubber.find, a.ranking)), None)
        if secret is not None:
            log.warning("%s annotation %s of prompt %s holds a secret (%s): it is not written", tool,
                        a.annotation_id, a.prompt_id, secret.where)
            continue
        kept.append(replace(a, annotator=scrubber.scrub(a.annotator), created_at=scrubber.scrub(a.created_at)))
    return kept


def default_project(manifest: dict[str, Any], kind: str) -> str:
    return f"genflow {manifest.get('name', 'job')} {kind}"


def _record(storage: Storage, tool: str) -> list[dict[str, Any]]:
    rel = layout.labelling_record(tool)
    return list(storage.read_json(rel).get("projects", [])) if storage.exists(rel) else []


def push(storage: Storage, tool: str | None, params: dict[str, Any], kind: str, project: str | None = None,
         sample: int | None = None, seed: int = 0, disagreeing: bool = False) -> Any:
    """Send the output's tasks to the tool's project (``tool``: None for the one installed);
    remembers the project in ``_labelling/``."""
    tool = installed_tool(tool)
    manifest = read_manifest(storage)
    project = project or default_project(manifest, kind)
    tasks = label_tasks(storage, kind, sample, seed, disagreeing)
    if not tasks:
        raise LabellingError("no prompt to push" + (" where the scorers disagree" if disagreeing else ""))
    result = labeller(tool, params).push(project, kind, tasks)
    entry = {"project": project, "kind": kind, **{k: v for k, v in params.items() if k == "url"}}
    records = _record(storage, tool)
    if entry not in records:
        storage.write_json(layout.labelling_record(tool), {"projects": [*records, entry]})
    return result


@dataclass(frozen=True)
class Pulled:
    """What a pull did: the manifest it wrote, and the views of the output it rewrote from it."""

    manifest: dict[str, Any]
    refreshed: dict[str, str] = field(default_factory=dict)
    """What was rewritten -> where: ``report.html`` and ``README.md`` (their URIs), ``Prefect
    artifacts`` (the server's address). A view missing here was not rewritten: a warning said why."""


def refresh_views(storage: Storage, manifest: dict[str, Any]) -> dict[str, str]:
    """Rewrite what shows the output's figures after a pull: ``report.html``, the ``README.md``
    dataset card, and the job's Prefect artifacts where a server is set and answers. A failure
    is a warning, never raised; returns what was rewritten (see :attr:`Pulled.refreshed`)."""
    from genflow.outputs.artifacts import prefect_server, publish_job_artifacts
    from genflow.outputs.dataset_card import CARD, write_card_safely
    from genflow.outputs.report import REPORT_FILE, write_report_safely

    done: dict[str, str] = {}
    report = write_report_safely(storage, manifest)
    if report is not None:
        done[REPORT_FILE] = report
    card = write_card_safely(storage, manifest)
    if card is not None:
        done[CARD] = card
    server = prefect_server()  # None: none set, or one that does not answer (a warning said so)
    if server is not None and publish_job_artifacts(storage, manifest, report):
        done["Prefect artifacts"] = server
    return done


def pull(storage: Storage, tool: str | None, params: dict[str, Any], project: str | None = None,
         kind: str | None = None) -> Pulled:
    """Read every finished annotation of the output's projects on the tool, write them, refresh
    the human rows and the views of the output (:func:`refresh_views`). The projects: those known
    here (pushed from here, or named before), of ``kind`` only when given; ``project`` (of ``kind``,
    rankings by default) joins them and is remembered. The parts of the kinds pulled are rewritten,
    the others kept. ``tool``: None for the one installed."""
    tool = installed_tool(tool)
    manifest = read_manifest(storage)
    if kind is not None and kind not in LABEL_KINDS:
        raise LabellingError(f"unknown kind of task {kind!r}: {' or '.join(LABEL_KINDS)}")
    records = _record(storage, tool)
    named = {"project": project, "kind": kind or "rankings"} if project is not None else None
    kinds = {named["kind"]} if named is not None else set(LABEL_KINDS) if kind is None else {kind}
    projects: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in [*records, *([named] if named else [])]:
        if isinstance(entry, dict) and entry.get("kind") in kinds and entry.get("project"):
            projects.setdefault((str(entry["project"]), str(entry["kind"])), entry)
    if not projects:
        raise LabellingError(f"{storage.uri} was not pushed to {tool} from here" +
                             (f" as {kind}" if kind else "") + "; name the project with --project (and --kind)")
    plugin = labeller(tool, params)
    annotations = _without_secrets([a for title, k in projects for a in plugin.pull(title, k)], tool)
    counts = write_pulled(storage, tool, annotations, kinds)
    log.info("%s: %s", tool, ", ".join(f"{n} rows of {folder}" for folder, n in counts.items()))
    if named is not None and not any(isinstance(r, dict) and (r.get("project"), r.get("kind")) ==
                                     (named["project"], named["kind"]) for r in records):
        storage.write_json(layout.labelling_record(tool), {"projects": [*records, named]})  # later pulls keep it
    manifest = refresh(storage, manifest)
    storage.write_json(layout.MANIFEST, manifest)
    return Pulled(manifest, refresh_views(storage, manifest))
