"""What the stage/plugin tags cost a task run: the job flow sets them once per stage with
``prefect.tags(...)``; ``task.with_options(tags=...)`` per call is shown beside it.

A flow calls a trivial task N times, as the job flow calls one task per shard; the three
ways run alternately, ``--rounds`` times, in one process on one ephemeral Prefect API.

    python -m benchmarks.bench_task_tags [--tasks 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow, tags, task
    from prefect.cache_policies import NO_CACHE

    @task(cache_policy=NO_CACHE)
    def shard(i: int) -> int:
        return i

    @flow
    def untagged(n: int) -> None:
        for i in range(n):
            shard(i)

    @flow
    def tagged_once(n: int) -> None:
        with tags("stage:score/hf-reward", "plugin:hf-reward"):
            for i in range(n):
                shard(i)

    @flow
    def tagged_per_call(n: int) -> None:
        for i in range(n):
            shard.with_options(tags={"stage:score/hf-reward", "plugin:hf-reward"})(i)

    untagged(5)  # the API starts, the flow is registered
    ways = {"no tags": untagged, "prefect.tags once a stage": tagged_once,
            "with_options(tags) each call": tagged_per_call}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, run in ways.items():
            t = time.perf_counter()
            run(args.tasks)
            seconds[name].append(time.perf_counter() - t)
    base = statistics.median(seconds["no tags"])
    print(f"{args.tasks} task runs per flow, median of {args.rounds} rounds")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:<32} {1000 * median / args.tasks:6.2f} ms/task   {median / base:5.2f}x no tags")


if __name__ == "__main__":
    main()
