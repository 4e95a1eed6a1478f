"""Replay (METHOD §4): buffers, exact stratified mixture counts, determinism across builds and resume, a run."""

import json
import shutil
from collections import Counter

import datasets
import pytest
from task_contexts import task_context

from cpt.errors import CptError
from cpt.integration import TaskContext
from cpt.recipe import validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.strategies import get_strategy
from cpt.testing import build_tiny_model
from cpt.training.replay import ReplayParams, buffer_count, prompt_completion_rows, stratified_counts

from tiny_recipes import strategy_recipe

TASKS = ["a", "b", "c", "d"]


def task_rows(task: str, count: int, chat: bool = False) -> list[dict]:
    if chat:
        return [
            {
                "prompt": [{"role": "user", "content": f"{task}-{i}?"}],
                "completion": [{"role": "assistant", "content": f"{task}-{i}"}],
            }
            for i in range(count)
        ]
    return [{"prompt": f"{task}-{i}:", "completion": f" {task}{i}"} for i in range(count)]


def context(step: int, rows: list[dict], strategy_dir, seed: int = 7) -> TaskContext:
    return task_context(step, TASKS, rows, strategy_dir, seed)


def build(strategy_dir, params: dict, sizes=(20, 20, 20, 10), chat=False) -> list[list[dict]]:
    """Prepare the four tasks' training sets in order with one strategy instance."""
    replay = get_strategy("replay").build(params)
    return [
        replay.prepare_train_dataset(context(step, task_rows(TASKS[step - 1], size, chat), strategy_dir)).to_list()
        for step, size in enumerate(sizes, start=1)
    ]


def source(row: dict) -> str:
    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][0]["content"]
    return prompt.split("-")[0]


def test_buffer_sizes_and_stratified_split():
    assert buffer_count(ReplayParams(buffer_size=64), 10) == 10
    assert buffer_count(ReplayParams(buffer_size=4), 10) == 4
    assert buffer_count(ReplayParams(buffer_fraction=0.25), 10) == 3  # 2.5 rounds half up
    assert buffer_count(ReplayParams(buffer_fraction=0.01), 10) == 1, "at least one example"
    assert (
        stratified_counts(5, 3) == [2, 2, 1]
        and stratified_counts(7, 3) == [3, 2, 2]
        and stratified_counts(2, 3) == [1, 1, 0]
    )
    assert stratified_counts(0, 2) == [0, 0] and stratified_counts(4, 0) == []


def test_mixture_counts_are_exact_and_stratified(tmp_path):
    sets = build(tmp_path / "strategy", {"buffer_size": 4, "ratio": 0.5})
    assert len(sets[0]) == 20 and Counter(map(source, sets[0])) == {"a": 20}, "task 1 trains on its own data only"
    assert Counter(map(source, sets[1])) == {"b": 20, "a": 10}, "ratio 0.5 of 20: 10 replayed from task a"
    assert Counter(map(source, sets[2])) == {"c": 20, "a": 5, "b": 5}
    # 0.5 · 10 = 5 over 3 earlier tasks: 2, 2, 1 (the remainder to the oldest tasks).
    assert Counter(map(source, sets[3])) == {"d": 10, "a": 2, "b": 2, "c": 1}

    buffers = {
        task: [
            json.loads(line) for line in (tmp_path / "strategy" / "replay" / f"{task}.jsonl").read_text().splitlines()
        ]
        for task in TASKS
    }
    assert all(len(rows) == 4 for rows in buffers.values())
    assert all(row in task_rows(task, 20) for task in "abc" for row in buffers[task]), (
        "buffers hold the formatted rows verbatim"
    )
    for rows in sets[1:]:
        for row in rows:
            if source(row) != TASKS[sets.index(rows)]:
                assert row in buffers[source(row)], "replayed rows come from the buffers"
    # A share larger than the buffer cycles through it: 10 from a 4-row buffer → each row 2 or 3 times.
    assert sorted(Counter(json.dumps(r) for r in sets[1] if source(r) == "a").values()) == [2, 2, 3, 3]


def test_mixture_is_deterministic_across_builds_and_resume(tmp_path):
    params = {"buffer_size": 3, "ratio": 0.7}
    first = build(tmp_path / "one", params)
    second = build(tmp_path / "two", params)
    assert first == second

    # Resume: a new strategy instance, in a run directory holding only the persisted buffers.
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "one" / "replay", tmp_path / "resumed" / "replay")
    replay = get_strategy("replay").build(params)
    resumed = replay.prepare_train_dataset(context(4, task_rows("d", 10), tmp_path / "resumed")).to_list()
    assert resumed == first[3]
    assert Counter(map(source, resumed)) == {"d": 10, "a": 3, "b": 2, "c": 2}
    # The persisted buffers are what is replayed (not a re-sample of the earlier data).
    (tmp_path / "resumed" / "replay" / "a.jsonl").write_text(json.dumps({"prompt": "a-x:", "completion": " ax"}) + "\n")
    tampered = replay.prepare_train_dataset(context(4, task_rows("d", 10), tmp_path / "resumed")).to_list()
    assert [row for row in tampered if source(row) == "a"] == [{"prompt": "a-x:", "completion": " ax"}] * 3
    # A different seed gives a different sample.
    other = (
        get_strategy("replay")
        .build(params)
        .prepare_train_dataset(context(1, task_rows("a", 20), tmp_path / "seed", seed=8))
    )
    assert (tmp_path / "seed" / "replay" / "a.jsonl").read_text() != (
        tmp_path / "one" / "replay" / "a.jsonl"
    ).read_text()
    assert len(other) == 20


def test_conversational_rows_round_trip_and_formats_must_match(tmp_path):
    sets = build(tmp_path / "chat", {"buffer_size": 2, "ratio": 0.2}, chat=True)
    replayed = [row for row in sets[3] if source(row) != "d"]
    assert len(replayed) == 2 and all(row in task_rows(source(row), 20, chat=True) for row in replayed)

    replay = get_strategy("replay").build({"ratio": 0.5})
    replay.prepare_train_dataset(context(1, task_rows("a", 4, chat=True), tmp_path / "mixed"))
    with pytest.raises(
        CptError, match="task 'b' is plain text but a replayed example of an earlier task is conversational"
    ):
        replay.prepare_train_dataset(context(2, task_rows("b", 4), tmp_path / "mixed"))


def test_missing_buffer_is_a_clear_error(tmp_path):
    replay = get_strategy("replay").build({})
    with pytest.raises(CptError, match="the buffer of task 'a' .* is missing"):
        replay.prepare_train_dataset(context(2, task_rows("b", 20), tmp_path))


def test_rows_without_prompt_or_completion_are_a_clear_error(tmp_path):
    """Replay and AIMMerging's memory keep prompt/completion rows; each names what is missing and why it needs it."""
    rows = [{"prompt": f"a-{i}:", "text": "x"} for i in range(4)]
    with pytest.raises(CptError, match=r"^replay: task 'a' has no completion column\(s\); replay mixes prompt/"):
        get_strategy("replay").build({}).prepare_train_dataset(context(1, rows, tmp_path))
    with pytest.raises(CptError, match=r"^aim_merging: task 'a' has no completion column\(s\); its memory keeps"):
        get_strategy("aim_merging").build({}).write_memory(context(1, rows, tmp_path))
    assert prompt_completion_rows(datasets.Dataset.from_list(task_rows("a", 2)), "replay", "a", "") == task_rows("a", 2)


def test_bad_parameters_are_refused():
    for bad, message in [
        ({"ratio": -0.1}, "ratio"),
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_fraction": 1.5}, "buffer_fraction"),
    ]:
        with pytest.raises(CptError, match=message):
            get_strategy("replay").make_params(bad)


def test_two_task_replay_run(tmp_path):
    tiny = build_tiny_model(tmp_path / "tiny", seed=0, hidden_size=32)
    recipe = validate_recipe(strategy_recipe(tmp_path, tiny, {"name": "replay", "buffer_size": 3, "ratio": 0.5}))
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) == 3 and all(len(row) == 2 for row in result.matrix[1:])
    folder = recipe.run_dir / "strategy" / "replay"
    buffer = [json.loads(line) for line in (folder / "plural.jsonl").read_text().splitlines()]
    assert len(buffer) == 3 and all(
        row["prompt"].startswith("Plural of ") and row["completion"] == " " + row["prompt"][10:-1] + "s"
        for row in buffer
    )
    assert len((folder / "upper.jsonl").read_text().splitlines()) == 3
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["own_examples"] == 8 and stats["replayed_examples"] == {"plural": 4}
    manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert [task["status"] for task in manifest["tasks"]] == ["done", "done"]
