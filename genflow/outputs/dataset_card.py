"""``<output>/README.md``: the output folder as a Hugging Face dataset that describes itself.

The card's YAML front matter has one ``configs`` entry per folder of parts the job
wrote (the folders and their counts come from the manifest's ``rows``: the core
folders, every exporter's, ``errors``), each with ``data_files`` globbed relative
to the output, so

    datasets.load_dataset(OUTPUT, "<folder>")

loads that folder by name. ``dataset_info`` gives each config's features, translated
from its first part's Parquet schema into the card's feature syntax, and its row
count. ``generations`` is the default config. The body records what made the data:
the config hash, the models and plugin versions, the seeds and the counts, all read
from ``manifest.json`` (its config is redacted).

Where people labelled the output (``genflow label pull``), the body shows how each scorer
agrees with them (``manifest["human_agreement"]``, the figures the report shows).

The card is rewritten, atomically, at the end of every run, by ``genflow label pull`` and
by ``genflow report OUTPUT``; a folder that no longer has rows is no longer listed.
This module needs no ``datasets``: the engine install does not have it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from genflow.data import layout
from genflow.data.storage import Storage

if TYPE_CHECKING:
    from genflow.config import StorageSpec

log = logging.getLogger(__name__)

CARD = "README.md"
SPLIT = "train"
DEFAULT_CONFIG = layout.GENERATIONS


class UnsupportedType(TypeError):
    """An Arrow type the card's feature syntax has no word for (a map, a union)."""


def part_glob(folder: str) -> str:
    """The parts of a folder, relative to the output: what ``data_files`` lists."""
    return f"{folder}/part-*.parquet"


# -- Arrow schema -> feature YAML (as datasets' Features._to_yaml_list writes it) --------------

_SIMPLE = {pa.string(): "string", pa.large_string(): "large_string", pa.float64(): "float64",
           pa.float32(): "float32", pa.float16(): "float16", pa.bool_(): "bool", pa.binary(): "binary",
           pa.large_binary(): "large_binary", pa.null(): "null", pa.string_view(): "string_view",
           pa.date32(): "date32", pa.date64(): "date64"}


def _dtype(t: pa.DataType) -> str:
    if t in _SIMPLE:
        return _SIMPLE[t]
    if pa.types.is_integer(t):
        return str(t)
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}{', tz=' + t.tz if t.tz else ''}]"
    if pa.types.is_time(t) or pa.types.is_duration(t):
        return str(t)
    if pa.types.is_decimal(t):
        return f"decimal{t.bit_width}({t.precision}, {t.scale})"
    raise UnsupportedType(str(t))


def _feature(t: pa.DataType) -> dict[str, Any]:
    """One feature as a mapping: ``{"dtype": ...}``, ``{"list": ...}`` or ``{"struct": [...]}``."""
    if pa.types.is_dictionary(t):
        return _feature(t.value_type)
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        kind = "large_list" if pa.types.is_large_list(t) else "list"
        inner = _feature(t.value_type)
        entry: dict[str, Any] = {kind: inner["dtype"] if list(inner) == ["dtype"]
                                 else inner["struct"] if list(inner) == ["struct"] else inner}
        if pa.types.is_fixed_size_list(t):
            entry["length"] = t.list_size
        return entry
    return {"dtype": _dtype(t)}


def features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    """A Parquet schema as the card's ``features`` list (raises :class:`UnsupportedType`)."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


# -- the card -------------------------------------------------------------------------------------

@dataclass
class FolderFacts:
    """What a folder's Parquet footers say: its schema (the first part's), rows and sizes."""

    schema: pa.Schema
    rows: int
    num_bytes: int
    """Uncompressed bytes of the data, as the footers count them."""
    download_size: int
    """Bytes of the part files."""


def folder_facts(storage: Storage, folder: str) -> FolderFacts | None:
    """Read every part's footer (not its data); None for a folder with no parts."""
    facts: FolderFacts | None = None
    for rel in storage.list(folder, ".parquet"):
        with storage.fs.open_input_file(storage.path(rel)) as f:
            meta = pq.ParquetFile(f).metadata
            size = f.size()
        num_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        if facts is None:
            facts = FolderFacts(meta.schema.to_arrow_schema(), 0, 0, 0)
        facts.rows += meta.num_rows
        facts.num_bytes += num_bytes
        facts.download_size += size
    return facts


def card_folders(manifest: dict[str, Any]) -> list[str]:
    """The folders the card may list, in the manifest's order (the core folders, the exporters', errors)."""
    from genflow.outputs.report.read import folder_counts

    return [folder for folder, _ in folder_counts(manifest)]


def card_metadata(storage: Storage, manifest: dict[str, Any]) -> dict[str, Any]:
    """The YAML front matter: ``configs``, ``dataset_info`` and what made the data."""
    facts = {folder: f for folder in card_folders(manifest)
             if (f := folder_facts(storage, folder)) is not None and f.rows}  # a glob must match a part
    default = DEFAULT_CONFIG if DEFAULT_CONFIG in facts else next(iter(facts), None)
    configs: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    for folder, f in facts.items():
        config: dict[str, Any] = {"config_name": folder,
                                  "data_files": [{"split": SPLIT, "path": part_glob(folder)}]}
        if folder == default:
            config["default"] = True
        configs.append(config)
        info: dict[str, Any] = {"config_name": folder}
        try:
            info["features"] = features_yaml(f.schema)
        except UnsupportedType as exc:  # datasets then infers the features from the parts
            log.info("dataset card: %s features left out (%s)", folder, exc)
        info["splits"] = [{"name": SPLIT, "num_bytes": f.num_bytes, "num_examples": f.rows}]
        info["download_size"] = f.download_size
        info["dataset_size"] = f.num_bytes
        infos.append(info)
    return {
        "pretty_name": f"genflow job {manifest.get('name')}",
        "tags": ["genflow", "synthetic"],
        "configs": configs,
        "dataset_info": infos,
        "genflow": {"job": manifest.get("name"), "status": manifest.get("status"),
                    "config_hash": manifest.get("config_hash"), "created": manifest.get("created"),
                    "seeds": manifest.get("seeds") or {}, "rows": {f: x.rows for f, x in facts.items()},
                    "errors": (manifest.get("errors") or {}).get("rows", 0),
                    **({"filtered": {t: e.get("rows", 0) for t, e in manifest["filtered"].items()}}
                       if manifest.get("filtered") else {}),
                    "models": models(manifest), "versions": versions(manifest)},
    }


def models(manifest: dict[str, Any]) -> dict[str, Any]:
    """Each generator's and scorer's plugin, model and plugin version (label -> entry)."""
    out: dict[str, Any] = {}
    for label, p in (manifest.get("plugins") or {}).items():
        model = p.get("model")
        out[label] = {"kind": p.get("kind"), "plugin": p.get("plugin"),
                      "model": model.get("model") if isinstance(model, dict) else model,
                      "plugin_version": p.get("version"), "source": p.get("source")}
    return out


def versions(manifest: dict[str, Any]) -> dict[str, Any]:
    """The engine's and the plugins' distributions, and the exporters' versions."""
    out = dict(manifest.get("versions") or {})
    for name, e in (manifest.get("exporters") or {}).items():
        out.setdefault(f"exporter {name}", e.get("version"))
    return out


def build_card(storage: Storage, manifest: dict[str, Any]) -> str:
    """The card's text: front matter, then a short description of the data."""
    meta = card_metadata(storage, manifest)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    name = manifest.get("name")
    lines = [f"# {_plain(name)}", "",
             f"Generated by genflow: job `{_code(name)}`, status {_plain(manifest.get('status'))}, "
             f"created {_plain(manifest.get('created'))}, config hash `{_code(manifest.get('config_hash'))}`.",
             "", "## Loading", "", "```python", "from datasets import load_dataset", ""]
    for c in meta["configs"]:
        lines.append(f'load_dataset("path/to/this/folder", "{c["config_name"]}", split="{SPLIT}")')
    lines += ["```", "", "## Configs", "", "| config | rows | files |", "|---|---:|---|"]
    for c, info in zip(meta["configs"], meta["dataset_info"], strict=True):
        lines.append(f"| {c['config_name']} | {info['splits'][0]['num_examples']:,} | "
                     f"`{c['data_files'][0]['path']}` |")
    lines += ["", "## Models", "", "| label | kind | plugin | model | plugin version |", "|---|---|---|---|---|"]
    for label, m in meta["genflow"]["models"].items():
        lines.append(f"| {_plain(label)} | {_plain(m['kind'])} | {_plain(m['plugin'])} | `{_code(m['model'])}` "
                     f"| {_plain(m['plugin_version'])} |")
    seeds = ", ".join(f"{_plain(k)}: {_plain(v)}" for k, v in meta["genflow"]["seeds"].items())
    lines += ["", f"Seeds: {seeds or '-'}.", "",
              "Versions: " + ", ".join(f"{_plain(k)} {_plain(v)}" for k, v in meta["genflow"]["versions"].items())
              + ".", "", *human_agreement_lines(manifest), *filtered_lines(manifest),
              "`manifest.json` next to this card holds the whole (redacted) config, timings and metrics;",
              "`report.html` shows the scores and samples.", ""]
    return f"---\n{front}---\n\n" + "\n".join(lines)


def filtered_lines(manifest: dict[str, Any]) -> list[str]:
    """The card's section on the rows the job's filters left out (``manifest["filtered"]``)."""
    found = manifest.get("filtered")
    if not isinstance(found, dict) or not found:
        return []
    lines = ["## Filtered", "", "Rows the job's filters left out of the data above (each one is in `filtered/` "
             "with its reason and the row it duplicates):", "", "| applies to | filter | rows left out |",
             "|---|---|---:|"]
    for target, entry in found.items():
        for name, count in (entry.get("by_filter") or {}).items():
            lines.append(f"| {_plain(target)} | {_plain(name)} | {int(count):,} |")
    return [*lines, ""]


def human_agreement_lines(manifest: dict[str, Any]) -> list[str]:
    """The card's section on how the scorers agree with the people who ranked the candidates
    (figures as the report shows them); none where nobody did."""
    from genflow.outputs.report.render import fmt

    found = manifest.get("human_agreement")
    if not isinstance(found, dict) or not found.get("scorers"):
        return []
    lines = ["## Agreement with people", "",
             f"{fmt(found.get('rankings'))} rankings of {fmt(found.get('prompts'))} prompts by "
             f"{fmt(found.get('annotators'))} people (`genflow label pull`). Pairwise accuracy: of the pairs people "
             "ordered that the scorer scores apart, the share it orders their way; Kendall τ: tau-b against the "
             "people's consensus, averaged over prompts.", "",
             "| scorer | pairwise accuracy | pairs | Kendall τ | prompts |", "|---|---:|---:|---:|---:|"]
    for r in found["scorers"]:
        lines.append(f"| {_plain(r.get('scorer'))} | {fmt(r.get('pairwise_accuracy'))} | {fmt(r.get('pairs'))} "
                     f"| {fmt(r.get('kendall_tau'))} | {fmt(r.get('prompts'))} |")
    inter = found.get("inter_annotator")
    if isinstance(inter, dict):
        lines += ["", f"People with each other, over {fmt(inter.get('prompts'))} prompts two or more ranked: "
                  f"Kendall τ {fmt(inter.get('kendall_tau'))}, pairwise agreement {fmt(inter.get('agreement'))}."]
    return [*lines, ""]


def write_card(storage: Storage, manifest: dict[str, Any] | None = None) -> str:
    """Write ``README.md`` atomically next to the job's outputs; returns its URI."""
    manifest = manifest if manifest is not None else storage.read_json(layout.MANIFEST)
    storage.write_bytes(CARD, build_card(storage, manifest).encode())
    return storage.uri_of(CARD)


def write_card_safely(storage: Storage, manifest: dict[str, Any]) -> str | None:
    """``write_card`` at the end of a job: a card that cannot be written never fails the job."""
    try:
        return write_card(storage, manifest)
    except Exception as exc:  # the data is written; the card describes it
        log.warning("dataset card %s not written (%s: %s)", CARD, type(exc).__name__, exc)
        return None


def rebuild_cards(uri: str, storage: StorageSpec | None = None) -> list[str]:
    """Rewrite the card of a job's output folder, or of each run folder of a sweep's
    (``genflow report OUTPUT``); returns the cards written."""
    from genflow.config import StorageSpec

    settings = (storage or StorageSpec()).model_dump()
    root = Storage.open(uri, **settings)
    if root.exists(layout.MANIFEST):
        return [write_card(root)]
    written = []
    for run in root.list_dirs(""):
        run_storage = Storage.open(f"{uri.rstrip('/')}/{run.strip('/')}", **settings)
        if run_storage.exists(layout.MANIFEST):
            written.append(write_card(run_storage))
    return written


def _plain(value: Any) -> str:
    text = " ".join(str(value).split()) if value is not None else "-"
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _code(value: Any) -> str:
    return _plain(value).replace("`", "'")
