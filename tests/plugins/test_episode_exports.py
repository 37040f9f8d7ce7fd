"""Training data from episodes: TRL's conversational SFT rows and preference pairs over whole
conversations, with the tools the episodes were offered.

The candidates are conversations as the episode loop writes them to ``generations/``
(OpenAI format: calls with their arguments' JSON text, ``tool`` results answering each call
by its id). The rank stage runs on a shard of them, scored by ``code-exec`` (1.0 passes the
hidden tests) and a judge; the rows it writes are read back with ``datasets``, as a user
loads them to train, and the slow test trains TRL's SFTTrainer and DPOTrainer on them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from genflow.config import JobConfig, ToolSpec
from genflow.data import layout
from genflow.data.layout import Shard
from genflow.data.schemas import GENERATIONS, RANKED, RANKINGS, SCORES
from genflow.data.storage import Storage
from genflow.engine.tools import tool_class
from genflow.plugins.training_data.exporters import (
    CONVERSATION_PREFERENCES,
    CONVERSATION_SFT,
    SFT,
    BestOfN,
    PreferencePairs,
)
from genflow.registry import get_registry
from genflow.stages.common import JobContext
from genflow.stages.rank import Conversations, rank_candidates, rank_shard

SYSTEM = "You write Python. Test before you submit."
TASK = "Write add(a, b) returning the sum."
FIRST = "def add(a, b):\n    return a - b"
FIX = "def add(a, b):\n    return a + b"
FAILED = "1 of 2 visible tests FAILED:\nadd(2, 2) returned 0, expected 4"
PASSED = "2 of 2 visible tests passed"


def assistant(*calls: tuple[str, str, str], content: str | None = None) -> dict[str, Any]:
    """An assistant turn as the loop keeps it: each call (id, tool, arguments' JSON text)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                                 for i, n, a in calls]
    return message


def result(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "content": content, "tool_call_id": call_id}


def code(text: str) -> str:
    return json.dumps({"code": text})


def episode(opening: list[dict[str, Any]], *turns: dict[str, Any]) -> list[dict[str, Any]]:
    return [*opening, *turns]


P0_OPENING = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
P1_OPENING = [{"role": "user", "content": "Write sub(a, b)."}]

EPISODES: dict[str, tuple[str, list[dict[str, Any]], str]] = {
    # generation_id: (prompt_id, conversation, final answer)
    # Tests a first attempt, reads the failure, fixes it and submits: passes.
    "fixed": ("p0", episode(P0_OPENING,
                            assistant(("call_0", "run_tests", code(FIRST))), result("call_0", FAILED),
                            assistant(("call_1", "submit", code(FIX))), result("call_1", "submitted")), FIX),
    # A malformed call first (its arguments are not JSON), then tests the fix and submits: passes.
    "retried": ("p0", episode(P0_OPENING,
                              assistant(("call_0", "run_tests", '{"code": "def add(:')),
                              result("call_0", "error: the arguments are not a JSON object"),
                              assistant(("call_1", "run_tests", code(FIX))), result("call_1", PASSED),
                              assistant(("call_1b", "submit", code(FIX))), result("call_1b", "submitted")), FIX),
    # Submits the first attempt untested: fails the hidden tests.
    "hasty": ("p0", episode(P0_OPENING, assistant(("call_0", "submit", code(FIRST))),
                            result("call_0", "submitted")), FIRST),
    # The same conversation as "hasty" but for the server's call id: no pair between them.
    "hasty-again": ("p0", episode(P0_OPENING, assistant(("call_7", "submit", code(FIRST))),
                                  result("call_7", "submitted")), FIRST),
    # p1: answers without a tool call (finish_reason stop); twice the same words.
    "plain": ("p1", episode(P1_OPENING, assistant(content="def sub(a, b):\n    return a - b")),
              "def sub(a, b):\n    return a - b"),
    "plain-again": ("p1", episode(P1_OPENING, assistant(content="def sub(a, b):\n    return a - b")),
                    "def sub(a, b):\n    return a - b"),
}
SINGLE = {"single": ("p0", "def add(a, b):\n    return b - a")}
"""A one-answer candidate of the same job (a second generator without episodes)."""

SCORES_BY_ID = {
    # generation_id: (code-exec, judge); the job's weights: code-exec 1.0, judge 0.5.
    "fixed": (1.0, 0.9),        # 1.45
    "retried": (1.0, 0.2),      # 1.10
    "hasty": (0.0, 1.0),        # 0.50: the judge liked it best, the tests did not
    "hasty-again": (0.0, 0.8),  # 0.40
    "single": (0.0, 0.6),       # 0.30
    "plain": (1.0, 0.7),
    "plain-again": (1.0, 0.5),
}
WEIGHTS = {"code-exec": 1.0, "llm-judge": 0.5}


def generations() -> pa.Table:
    """``generations/`` of both generators, as one shard reads them (episodes with ``messages``)."""
    base = {"sample": 0, "model": "m", "modality": "text", "seed": 0, "params": "{}", "latency_s": 0.1}
    episodes = pa.Table.from_pylist(
        [{**base, "prompt_id": p, "generation_id": g, "generator": "agent", "text": final,
          "prompt": next(x["content"] for x in m if x["role"] == "user"),
          "finish_reason": "submit" if p == "p0" else "stop"} for g, (p, m, final) in EPISODES.items()],
        schema=GENERATIONS)
    episodes = episodes.append_column("messages", pa.array([json.dumps(m) for _, m, _ in EPISODES.values()]))
    single = pa.Table.from_pylist([{**base, "prompt_id": p, "generation_id": g, "generator": "single",
                                    "prompt": TASK, "text": text, "finish_reason": "stop"}
                                   for g, (p, text) in SINGLE.items()], schema=GENERATIONS)
    return pa.concat_tables([episodes, single], promote_options="permissive")


def scores() -> pa.Table:
    rows = [{"generation_id": g, "prompt_id": "", "scorer": s, "score": v, "details": "{}"}
            for g, values in SCORES_BY_ID.items() for s, v in zip(WEIGHTS, values, strict=True)]
    return pa.Table.from_pylist(rows, schema=SCORES)


def offered(*names: str) -> list[dict[str, Any]]:
    """The OpenAI ``tools`` entries the episodes were shown, from the registered tools."""
    registry = get_registry()
    return [tool_class(ToolSpec(name=n), registry).schema(n) for n in names]


def trl_p0(name: str) -> list[dict[str, Any]]:
    """What TRL reads of a p0 episode: arguments as objects, tool results naming their tool."""
    def call(i: str, tool: str, arguments: Any) -> dict[str, Any]:
        return {"role": "assistant", "tool_calls": [
            {"id": i, "type": "function", "function": {"name": tool, "arguments": arguments}}]}

    def answer(i: str, tool: str, content: str) -> dict[str, Any]:
        return {"role": "tool", "content": content, "tool_call_id": i, "name": tool}

    turns = {
        "fixed": [call("call_0", "run_tests", {"code": FIRST}), answer("call_0", "run_tests", FAILED),
                  call("call_1", "submit", {"code": FIX}), answer("call_1", "submit", "submitted")],
        "retried": [call("call_0", "run_tests", '{"code": "def add(:'),  # the model's text: not an object
                    answer("call_0", "run_tests", "error: the arguments are not a JSON object"),
                    call("call_1", "run_tests", {"code": FIX}), answer("call_1", "run_tests", PASSED),
                    call("call_1b", "submit", {"code": FIX}), answer("call_1b", "submit", "submitted")],
        "hasty": [call("call_0", "submit", {"code": FIRST}), answer("call_0", "submit", "submitted")],
    }
    return turns[name]


@pytest.fixture()
def output(tmp_path: Path) -> Path:
    """A shard of a job with an episode generator (``agent``, tools run_tests and submit) and a
    one-answer one (``single``), ranked by the rank stage as a job runs it."""
    config = JobConfig.model_validate({
        "name": "agents", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "out"),
        "generators": [{"label": "agent", "plugin": "openai", "model": "m", "max_turns": 4,
                        "tools": ["run_tests", "submit"], "params": {"base_url": "http://127.0.0.1:1/v1"}},
                       {"label": "single", "plugin": "openai", "model": "m",
                        "params": {"base_url": "http://127.0.0.1:1/v1"}}],
        "scorers": [{"plugin": "code-exec", "weight": 1.0},
                    {"plugin": "llm-judge", "weight": 0.5, "params": {"base_url": "http://127.0.0.1:1/v1"}}],
        "exporters": {"preferences": {"per_prompt": 10}}})
    storage = Storage.open(str(tmp_path / "out"))
    storage.makedirs()
    storage.write_table(layout.PROMPTS_STAGE.part(0), pa.table({
        "prompt_id": ["p0", "p1"], "prompt": [TASK, "Write sub(a, b)."], "task": pa.array([None, None], pa.string()),
        "system": pa.array([SYSTEM, None], pa.string())}))
    gens = generations()
    for label in ("agent", "single"):
        rows = gens.filter(pc.equal(gens["generator"], label))
        if label == "single":
            rows = rows.drop_columns(["messages"])  # a one-answer generator's part has no conversation
        storage.write_table(layout.generate_stage(label).part(0), rows)
    all_scores = scores()
    for scorer in WEIGHTS:
        storage.write_table(layout.score_stage(scorer).part(0),
                            all_scores.filter(pc.equal(all_scores["scorer"], scorer)))
    job = JobContext(config, storage, str(tmp_path))
    exporters = {"preferences": {"per_prompt": 10}, "sft": {}}
    rank_shard(job, Shard(0, "fp", 2), "fp", exporters, get_registry())
    return tmp_path / "out"


def load(folder: Path) -> list[dict[str, Any]]:
    from datasets import load_dataset

    return load_dataset("parquet", data_dir=str(folder), split="train").to_list()


def test_sft_rows_are_the_best_conversation_of_each_prompt_with_its_tools(output: Path) -> None:
    rows = {r["prompt_id"]: r for r in load(output / "sft")}
    assert sorted(rows) == ["p0", "p1"]
    best = rows["p0"]
    assert best["generation_id"] == "fixed" and best["score"] == pytest.approx(1.45) and best["source"] == "model"
    # TRL's language-modelling column: the whole episode, opening included, as the template reads it.
    assert best["messages"] == [*P0_OPENING, *trl_p0("fixed")]
    assert best["tools"] == offered("run_tests", "submit")
    assert [t["function"]["name"] for t in best["tools"]] == ["run_tests", "submit"]
    assert best["tools"][0]["function"]["parameters"]["required"] == ["code"]
    # An episode that called no tool: its opening and its answer, no tool_calls key filled in as null.
    assert rows["p1"]["messages"] == [*P1_OPENING, {"role": "assistant", "content": "def sub(a, b):\n    return a - b"}]
    assert rows["p1"]["generation_id"] == "plain"


def test_pairs_are_whole_episodes_passing_over_failing_then_by_the_other_scorers(output: Path) -> None:
    pairs = load(output / "preferences")
    got = {(r["chosen_id"], r["rejected_id"]) for r in pairs}
    passing, failing = {"fixed", "retried"}, {"hasty", "hasty-again", "single"}
    # Every passing episode over every failing candidate: the tests decide, though the judge
    # liked "hasty" best of all.
    assert {(c, r) for c in passing for r in failing} <= got
    assert not any(c in failing and r in passing for c, r in got)
    # Among equals, the higher-scored by the judge; "hasty" and "hasty-again" differ only in a
    # call's id: no pair between them. p1's two answers are the same words: no pair either.
    assert ("fixed", "retried") in got and ("hasty", "single") in got and ("hasty-again", "single") in got
    assert len(got) == len(pairs) == 6 + 1 + 2
    assert not {("hasty", "hasty-again"), ("plain", "plain-again")} & got
    by_ids = {(r["chosen_id"], r["rejected_id"]): r for r in pairs}
    # TRL's conversational preference columns: the opening as the prompt, each episode's turns after it.
    pair = by_ids[("retried", "hasty")]
    assert pair["prompt"] == P0_OPENING
    assert pair["chosen"] == trl_p0("retried") and pair["rejected"] == trl_p0("hasty")
    assert pair["tools"] == offered("run_tests", "submit")
    assert (pair["score_chosen"], pair["score_rejected"]) == (pytest.approx(1.1), pytest.approx(0.5))
    # The one-answer candidate takes part as what it was sent and what it said: no tools of its own.
    single = by_ids[("hasty", "single")]
    assert single["rejected"] == [{"role": "assistant", "content": "def add(a, b):\n    return b - a"}]
    assert single["tools"] == offered("run_tests", "submit")  # the episode's, which the prompt shows
    assert [r["prompt_id"] for r in pairs] == sorted(r["prompt_id"] for r in pairs)


def test_widest_margin_first_and_rankings_unchanged(output: Path) -> None:
    ranked = pq.read_table(output / "rankings")
    assert ranked.schema == RANKINGS
    assert ranked.filter(pc.equal(ranked["prompt_id"], "p0"))["generation_id"].to_pylist() == [
        "fixed", "retried", "hasty", "hasty-again", "single"]
    table = PreferencePairs(PreferencePairs.Params()).export(
        rank_candidates(generations(), scores(), WEIGHTS, Conversations(
            {"agent": offered("run_tests", "submit")}, {"p0": SYSTEM})))
    assert table.schema == CONVERSATION_PREFERENCES
    assert table.select(["chosen_id", "rejected_id"]).to_pylist() == [{"chosen_id": "fixed", "rejected_id": "single"}]


def test_a_one_answer_candidate_is_its_system_prompt_and_answer_in_a_job_with_episodes() -> None:
    ranked = rank_candidates(generations(), scores(), WEIGHTS, Conversations({}, {"p0": SYSTEM}))
    assert ranked.schema == RANKED
    rows = {r["generation_id"]: r for r in ranked.to_pylist()}
    assert json.loads(rows["single"]["messages"]) == [
        *P0_OPENING, {"role": "assistant", "content": "def add(a, b):\n    return b - a"}]
    assert json.loads(rows["fixed"]["messages"]) == EPISODES["fixed"][1]  # as the loop wrote it
    assert rows["fixed"]["tools"] is None  # no tools offered to this job's generators
    sft = BestOfN(BestOfN.Params(min_score=1.4)).export(ranked)
    assert sft.schema == CONVERSATION_SFT and sft["generation_id"].to_pylist() == ["fixed"]


def test_a_job_without_episodes_writes_what_it_always_did() -> None:
    one_answer = generations().drop_columns(["messages"])
    ranked = rank_candidates(one_answer, scores(), WEIGHTS)
    assert ranked["messages"].null_count == ranked["tools"].null_count == ranked.num_rows
    sft = BestOfN(BestOfN.Params()).export(ranked)
    assert sft.schema == SFT
    assert sft.to_pylist()[0] == {"prompt": TASK, "completion": FIX, "score": pytest.approx(1.45), "prompt_id": "p0",
                                  "generation_id": "fixed", "source": "model"}


TOOL_TEMPLATE = (
    "{% if tools %}tools:{% for tool in tools %} {{ tool.function.name }}"
    "({{ tool.function.parameters.properties | list | join(', ') }}){% endfor %}\n{% endif %}"
    "{% for message in messages %}{{ message.role }}:"
    "{% if message.content is defined %} {{ message.content }}{% endif %}"
    "{% if message.tool_calls is defined %}{% for call in message.tool_calls %}"
    " call {{ call.function.name }} {{ call.function.arguments | tojson }}{% endfor %}{% endif %}"
    "{% if message.role == 'assistant' %}<|endoftext|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")
"""A chat template that shows the tools and renders calls and their results (as a tool-calling
model's template does, in few tokens)."""


@pytest.mark.slow
def test_trl_trains_on_the_exported_conversations(output: Path, tmp_path: Path) -> None:
    """SFTTrainer and DPOTrainer each take two steps on the parquet folders as exported."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from genflow.plugins.shared.causal_lm import write_tiny_gpt2

    model_dir = write_tiny_gpt2(tmp_path / "model", n_layer=1, n_embd=32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = TOOL_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    common = {"max_steps": 2, "per_device_train_batch_size": 2, "report_to": [], "max_length": 512,
              "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "dataset_num_proc": None}

    sft = load_dataset("parquet", data_dir=str(output / "sft"), split="train")
    rendered = tokenizer.apply_chat_template(sft[0]["messages"], tools=sft[0]["tools"], tokenize=False)
    assert 'tools: run_tests(code) submit(code, answer)' in rendered
    assert f'assistant: call run_tests {json.dumps({"code": FIRST})}' in rendered
    assert f"tool: {FAILED}" in rendered
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                         train_dataset=sft, args=SFTConfig(output_dir=str(tmp_path / "sft"), **common))
    trained = trainer.train()
    assert trained.global_step == 2 and math.isfinite(trained.training_loss)

    pairs = load_dataset("parquet", data_dir=str(output / "preferences"), split="train")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tokenizer,
                         train_dataset=pairs, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common))
    assert len(trainer.train_dataset) == len(pairs)  # no pair lost to its prompt's length
    trained = trainer.train()
    assert trained.global_step == 2 and math.isfinite(trained.training_loss)
