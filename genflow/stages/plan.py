"""Planning a job: its input cut into shards, each written under ``prompts/`` with its marker."""

from __future__ import annotations

from genflow.config import JobConfig
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.prompts import InputDataset, InputError, shard_tables, table_fingerprint
from genflow.data.resume import DoneIndex, StageOutcome, drop_stale_shards, finished, mark_finished
from genflow.data.storage import Storage
from genflow.stages.common import write_part


def plan_shards(config: JobConfig, source: InputDataset, storage: Storage, resume: bool,
                part_folders: list[str]) -> list[Shard]:
    """Cut the input into shards, write each as ``prompts/part-NNNNN.parquet``.

    Rows stream from the input; only one shard is in memory at a time. Parts in
    ``part_folders`` of shards left over from an earlier, larger input are removed.
    """
    shards = []
    done = DoneIndex(storage) if resume else None
    stage = layout.PROMPTS_STAGE
    for index, table in enumerate(shard_tables(source, config.shard_rows)):
        shard = Shard(index, table_fingerprint(table), table.num_rows)
        if not (done and finished(storage, stage, shard, shard.fingerprint, done)):
            parts: list[str] = []
            write_part(storage, stage.part(index), table, parts)
            mark_finished(storage, StageOutcome(stage.name, index, shard.fingerprint,
                                                {layout.PROMPTS: table.num_rows}, parts=parts))
        shards.append(shard)
    if not shards:
        raise InputError(f"{config.input}: the input has no rows")
    drop_stale_shards(storage, len(shards), part_folders)
    return shards
