"""Reading prompt datasets: validation, normalisation and streaming into shards.

The input (a Parquet file, a folder of them or an ``s3://`` prefix) is read as a
stream of record batches and cut into shards of ``shard_rows`` prompts, so memory
stays flat however large the input is.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from genflow.data.storage import filesystem_for


class InputError(ValueError):
    """The prompt dataset cannot be used; the message names the file, column or row."""


@dataclass(frozen=True)
class InputDataset:
    uri: str
    dataset: ds.Dataset
    base_dir: str
    """Folder that relative image/mask paths in the rows are resolved against."""
    files: list[str]

    @property
    def columns(self) -> list[str]:
        return self.dataset.schema.names


def _list_parquet(fs: pafs.FileSystem, path: str, uri: str) -> tuple[list[str], str]:
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise InputError(f"cannot reach the input {uri}: {exc}") from None
    if info.type == pafs.FileType.File:
        return [path], posixpath.dirname(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {uri}")
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise InputError(f"cannot list the input {uri}: {exc}") from None
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                   and not posixpath.basename(i.path).startswith((".", "_")))
    if not files:
        raise InputError(f"no .parquet files under {uri}")
    return files, path


def open_input(uri: str, endpoint_url: str | None = None, region: str | None = None,
               anonymous: bool = False) -> InputDataset:
    """Open and check every file's footer: a corrupt file or one without a usable
    ``prompt`` column is reported by name before any work starts. The keyword
    arguments are the job's ``storage`` settings."""
    fs, path = filesystem_for(uri, endpoint_url, region, anonymous)
    files, base = _list_parquet(fs, path, uri)
    schemas = []
    fmt = ds.ParquetFileFormat()
    for f in files:
        try:
            schema = fmt.inspect(f, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{f}: not a readable Parquet file ({exc})") from None
        if "prompt" not in schema.names:
            raise InputError(f"{f}: no 'prompt' column (columns: {', '.join(schema.names)})")
        prompt_type = schema.field("prompt").type
        if not (pa.types.is_string(prompt_type) or pa.types.is_large_string(prompt_type)):
            raise InputError(f"{f}: column 'prompt' must be strings, it is {prompt_type}")
        schemas.append(schema)
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(_disagreement(files, schemas, exc)) from None
    dataset = ds.dataset(files, schema=unified, filesystem=fs, format="parquet")
    if dataset.count_rows() == 0:  # from the files' footers: no data is read
        raise InputError(f"{uri}: the input has no rows ({len(files)} file(s), all empty)")
    return InputDataset(uri, dataset, base if "://" not in uri else "s3://" + base, files)


def _disagreement(files: list[str], schemas: list[pa.Schema], exc: Exception) -> str:
    """Name the first file whose columns cannot join the files before it, and the column."""
    for i in range(1, len(schemas)):
        try:
            pa.unify_schemas(schemas[: i + 1], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            earlier = {f.name: f.type for schema in schemas[:i] for f in schema}
            for field in schemas[i]:
                if field.name in earlier:
                    try:
                        pa.unify_schemas([pa.schema([(field.name, earlier[field.name])]), pa.schema([field])],
                                         promote_options="permissive")
                    except (pa.ArrowInvalid, pa.ArrowTypeError):
                        return (f"{files[i]}: column {field.name!r} is {field.type}, but it is "
                                f"{earlier[field.name]} in the files before it")
            break
    return f"the input files' columns do not agree: {exc}"


def stable_row_id(row_hash_parts: list[str]) -> str:
    return hashlib.sha256("\x1f".join(row_hash_parts).encode()).hexdigest()[:16]


def _prompt_ids(table: pa.Table) -> pa.Array:
    for col in ("id", "task_id"):
        if col in table.column_names:
            ids = pc.cast(table[col], pa.string())
            if ids.null_count == 0:
                return ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    parts = [c for c in ("prompt", "system", "task") if c in table.column_names]
    cols = [table[c].to_pylist() for c in parts]
    return pa.array([stable_row_id([str(v) for v in vals]) for vals in zip(*cols, strict=True)], pa.string())


def check_prompts(batch: pa.RecordBatch | pa.Table, where: str, first_row: int) -> None:
    """Every row needs a prompt: name the first row (of file ``where``) that has none."""
    prompts = batch["prompt"]
    bad = pc.or_kleene(pc.is_null(prompts), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(
        pc.fill_null(prompts, ""))), 0))
    if pc.any(bad).as_py():
        flags = bad.combine_chunks() if isinstance(bad, pa.ChunkedArray) else bad
        idx = pc.indices_nonzero(pc.fill_null(flags, True))[0].as_py()
        raise InputError(f"{where}: row {first_row + idx}: the prompt is null or empty; every row needs a prompt")


def check_text(batch: pa.RecordBatch, where: str, first_row: int) -> None:
    """Parquet stores strings as bytes and does not check them: a value that is not UTF-8 is
    named here (file, row, column), not found by a worker halfway through the job."""
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            for i in range(len(column)):
                try:
                    column[i].as_py()
                except UnicodeDecodeError as exc:
                    raise InputError(f"{where}: row {first_row + i}: column {name!r} is not valid UTF-8 "
                                     f"({exc.reason} at byte {exc.start}); fix the text or drop the row") from None
            raise InputError(f"{where}: column {name!r} holds invalid text") from None


ENGINE_COLUMNS = ("id", "task_id", "prompt", "task", "system", "response", "responses")
"""Input columns the engine itself reads: ids, the prompt, routing, and candidates the rows carry."""


def infer_task(columns: list[str]) -> str | None:
    """The ``task`` of rows of a dataset without a ``task`` column, as the plugins recognise
    its format (the code family: HumanEval's and MBPP's test columns make code rows)."""
    from genflow.registry import get_registry

    return get_registry().pm.hook.infer_task(columns=list(columns))


def normalize(table: pa.Table, first_row: int = 0) -> pa.Table:
    """Add ``prompt_id`` (and ``task``, where the plugins recognise the rows) to rows whose prompts are checked."""
    ids = _prompt_ids(table)
    out = table
    if "task" not in out.column_names:
        out = out.append_column("task", pa.array([infer_task(out.column_names)] * len(out), pa.string()))
    if "prompt_id" in out.column_names:
        out = out.drop_columns(["prompt_id"])
    return out.add_column(0, "prompt_id", ids)


def _batches(source: InputDataset, batch_rows: int) -> Iterator[tuple[pa.RecordBatch, str, int]]:
    """Checked record batches, file by file in order, with the file and the batch's first row in it."""
    for fragment in source.dataset.get_fragments():
        batches = fragment.to_batches(schema=source.dataset.schema, batch_size=batch_rows)
        row = 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowInvalid, OSError) as exc:  # a file whose footer was fine but whose data is not
                raise InputError(f"{fragment.path}: reading failed after row {row}: {exc}") from None
            check_text(batch, fragment.path, row)
            check_prompts(batch, fragment.path, row)
            yield batch, fragment.path, row
            row += batch.num_rows


def shard_tables(source: InputDataset, shard_rows: int) -> Iterator[pa.Table]:
    """Normalised shards of ``shard_rows`` rows, streamed: memory holds one shard and one
    read batch (and the ids seen so far), whatever the size of the input. Shards run across
    file boundaries. Every row's id is checked: none empty, none twice in the whole input."""
    pending: list[tuple[pa.RecordBatch, str, int]] = []
    pending_rows = 0
    ids = _IdCheck()
    for batch, path, row in _batches(source, min(shard_rows, 65536)):
        while batch.num_rows:
            take = min(shard_rows - pending_rows, batch.num_rows)
            pending.append((batch.slice(0, take), path, row))
            pending_rows += take
            batch, row = batch.slice(take), row + take
            if pending_rows == shard_rows:
                yield ids.checked(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield ids.checked(pending)


class _IdCheck:
    """Refuses empty ids and an id that two rows share: different prompts would share
    generation ids, a row would carry another's columns and rankings would span prompts."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}

    def checked(self, pending: list[tuple[pa.RecordBatch, str, int]]) -> pa.Table:
        table = normalize(pa.Table.from_batches([b for b, _, _ in pending]))
        where = [(path, row + i) for b, path, row in pending for i in range(b.num_rows)]
        source = next((c for c in ("id", "task_id") if c in table.column_names
                       and table[c].null_count == 0), None)
        for i, value in enumerate(table["prompt_id"].to_pylist()):
            path, row = where[i]
            if not value or not value.strip():
                raise InputError(f"{path}: row {row}: the {source} is empty; every row needs an id of its own "
                                 f"(or leave out the {source} column: the row's hash is used)")
            earlier = self.seen.setdefault(value, f"{path}: row {row}")
            if earlier != f"{path}: row {row}":
                what = (f"the same {source} {value!r}" if source else
                        "the same prompt (and system and task), so the same id")
                raise InputError(f"{path}: row {row} has {what} as {earlier}; ids must be unique "
                                 f"(drop the duplicate rows, or give every row an id of its own)")
        return table


def table_fingerprint(table: pa.Table) -> str:
    """Content hash of a table (its Arrow IPC bytes), whatever batches it was read in."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:20]


def carried_columns(table: pa.Table, read_columns: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Input columns neither the engine nor the job's plugins (``read_columns``) read:
    carried through to ``generations/``."""
    return [c for c in table.column_names
            if c not in ENGINE_COLUMNS and c not in read_columns and c != "prompt_id"]
