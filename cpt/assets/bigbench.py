"""BIG-bench dataset assets: a JSON task of the ``bigbench==1.0.0`` sdist → rows and meta.

``bigbench:<task path>`` names any folder under ``bigbench/benchmark_tasks/`` that holds a
``task.json``. Generation examples become ``{"input", "target", "targets"}`` rows, multiple
choice (``target_scores``) ``{"input", "choices", "scores", "target"}`` rows (the target is
the first choice with the highest score). The task's prefixes and description go to
``meta.json`` under ``"task"``, not applied. The first full scan of the archive saves the
list of JSON tasks next to it, so an unknown task is reported (with close matches) without
reading the 358 MB archive again.
"""

from __future__ import annotations

import json
import tarfile
from typing import Any

from cpt.assets.cache import cache_dir, log
from cpt.assets.dataset_files import scalar_extras
from cpt.assets.did_you_mean import unknown_path_error
from cpt.assets.download import download_package
from cpt.assets.registry import DATASET_SOURCES, PINNED_PACKAGES
from cpt.errors import CptError
from cpt.io import atomic_write_json, read_json

BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def read_bigbench(task: str) -> tuple[list[dict], dict]:
    """The rows and meta of BIG-bench task ``task`` (its ``task.json`` in the sdist)."""
    # The list of JSON tasks, saved by the first full scan of the archive, answers
    # "unknown task" without downloading or reading the archive again.
    index_path = cache_dir() / "downloads" / f"{PINNED_PACKAGES['bigbench'].filename}.tasks.json"
    index = read_json(index_path)
    if isinstance(index, list) and task not in index:
        raise _bigbench_unknown(task, index)
    archive = download_package("bigbench", f"bigbench:{task}")

    data = None
    tasks = []
    log(f"reading {task}/task.json from {archive.name} ({PINNED_PACKAGES['bigbench'].size_mb} MB)…")
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            name = member.name
            if not (member.isfile() and name.startswith(BIGBENCH_ROOT) and name.endswith("/task.json")):
                continue
            member_task = name[len(BIGBENCH_ROOT) : -len("/task.json")]
            tasks.append(member_task)
            if member_task == task:
                handle = tar.extractfile(member)
                data = json.loads(handle.read().decode("utf-8"))
                if isinstance(index, list):
                    break
    if not isinstance(index, list):
        index = sorted(tasks)
        atomic_write_json(index_path, index)
    if data is None:
        raise _bigbench_unknown(task, index)
    return _convert_bigbench(task, data, index)


def _bigbench_unknown(task: str, index: list[str]) -> CptError:
    error = unknown_path_error("bigbench", task, index, "BIG-bench JSON task")
    return CptError(f"{error} (only tasks with a task.json are supported)")


_BIGBENCH_META_KEYS = (
    "name",
    "description",
    "keywords",
    "metrics",
    "preferred_score",
    "task_prefix",
    "example_input_prefix",
    "example_output_prefix",
    "choice_prefix",
    "few_shot_example_separator",
    "append_choices_to_input",
    "output_regex",
    "stop_string",
)


def _convert_bigbench(task: str, data: dict, index: list[str]) -> tuple[list[dict], dict]:
    examples = data.get("examples") if isinstance(data, dict) else None
    if not examples:
        subtasks = [known for known in index if known.startswith(task + "/")]
        if subtasks:
            listed = ", ".join(f"bigbench:{subtask}" for subtask in subtasks[:8])
            more = f" and {len(subtasks) - 8} more" if len(subtasks) > 8 else ""
            raise CptError(
                f"BIG-bench task '{task}' has no examples of its own; name one of its subtasks: {listed}{more}"
            )
        raise CptError(f"BIG-bench task '{task}' has no examples")
    rows = [_bigbench_row(task, i, example) for i, example in enumerate(examples)]
    num_multiple_choice = sum("choices" in row for row in rows)
    if num_multiple_choice == len(rows):
        kind = "multiple_choice"
    else:
        kind = "generation" if num_multiple_choice == 0 else "mixed"
    meta = {
        "source": "bigbench",
        "package": "bigbench",
        "version": PINNED_PACKAGES["bigbench"].version,
        "file": f"{BIGBENCH_ROOT}{task}/task.json",
        "license": DATASET_SOURCES["bigbench"][2],
        "task_format": kind,
        "task": {key: data[key] for key in _BIGBENCH_META_KEYS if key in data},
    }
    return rows, meta


def _bigbench_row(task: str, i: int, example: Any) -> dict:
    where = f"BIG-bench task '{task}' example {i}"
    if not isinstance(example, dict) or "input" not in example:
        raise CptError(f"{where} has no 'input'")
    row: dict[str, Any] = {"input": str(example["input"])}
    scores = example.get("target_scores")
    if isinstance(scores, dict) and scores:
        choices = [str(choice) for choice in scores]
        values = [float(score) for score in scores.values()]
        row["choices"] = choices
        row["scores"] = values
        row["target"] = choices[values.index(max(values))]
    elif "target" in example:
        target = example["target"]
        targets = [str(answer) for answer in target] if isinstance(target, list) else [str(target)]
        if not targets:
            raise CptError(f"{where} has an empty target list")
        row["target"] = targets[0]
        row["targets"] = targets
    else:
        raise CptError(f"{where} has neither 'target' nor 'target_scores'")
    row.update(scalar_extras(example, {"input", "target", "target_scores", "choices", "scores", "targets"}))
    return row
