"""Per-example evaluation outcomes as JSON lines (METHOD §6, "Per-example outcomes").

A run keeps, for every evaluation of a task, one line per eval example so statistics can
resample examples and a reader can see what the model got wrong:

    eval/<row>_<task>.jsonl     row = 0 (base), t (after task t) or "expert"

Each line is a JSON object:

- ``id``: the example's id (the source's id, else its index in the task's eval set);
- ``kind``: ``"generation"`` or ``"choice"``;
- ``prompt``: the prompt as given (a string or a list of chat messages);
- ``prediction`` / ``reference``: the generated and target texts (generation), or the
  chosen and correct choice indices (choice);
- ``correct``: whether the prediction was right (the metric's term for this example);
- choice only: ``choices`` (the choice texts) and ``scores`` (each choice's log-likelihood).

Usage:

    >>> result = evaluate_choice(model, tokenizer, examples)
    >>> write_outcomes(outcomes_path(run_dir / "eval", 3, "arc"), result)
    >>> records = read_outcomes(run_dir / "eval" / "3_arc.jsonl")
    >>> wrong_answers(run_dir / "eval", 3, ["arc", "gsm8k"], limit=3)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from cpt.errors import CptError

#: Fields every outcome line carries.
OUTCOME_FIELDS = ("id", "kind", "prompt", "prediction", "reference", "correct")
#: Row name of an expert's evaluation (the other rows are integers: 0 base, t after task t).
EXPERT_ROW = "expert"


def outcome_records(result) -> list[dict]:
    """One JSON-ready dict per example of an :class:`~cpt.evaluation.EvalResult`, in eval order."""
    missing = [name for name in ("kind", "example_ids", "prompts", "correct") if getattr(result, name, None) is None]
    if missing:
        raise CptError(
            f"the evaluation result has no per-example outcomes ({', '.join(missing)} missing); "
            "evaluate with cpt.evaluation.evaluate_choice or evaluate_generation"
        )
    count = result.num_examples
    columns = {
        "example_ids": result.example_ids,
        "prompts": result.prompts,
        "predictions": result.predictions,
        "references": result.references,
        "correct": result.correct,
    }
    if result.kind == "choice":
        columns.update(scores=result.scores, choices=result.choices)
    for name, column in columns.items():
        if column is None or len(column) != count:
            size = 0 if column is None else len(column)
            raise CptError(f"the evaluation result's {name} has {size} entries, not {count}")
    records = []
    for i in range(count):
        record = {
            "id": result.example_ids[i],
            "kind": result.kind,
            "prompt": result.prompts[i],
            "prediction": result.predictions[i],
            "reference": result.references[i],
            "correct": bool(result.correct[i]),
        }
        if result.kind == "choice":
            record["choices"] = list(result.choices[i])
            record["scores"] = [float(score) for score in result.scores[i]]
        records.append(record)
    return records


def _row_name(row: int | str) -> str:
    if row == EXPERT_ROW:
        return EXPERT_ROW
    if isinstance(row, int) and not isinstance(row, bool) and row >= 0:
        return str(row)
    raise CptError(f"outcome row {row!r} must be 0 (base), t ≥ 1 (after task t) or {EXPERT_ROW!r}")


def _file_safe(task: str) -> str:
    """The task name as a file-name part: characters other than letters, digits, ``._-`` become ``_``."""
    if not isinstance(task, str) or not task:
        raise CptError(f"outcome task name must be a non-empty string, got {task!r}")
    return re.sub(r"[^A-Za-z0-9._-]", "_", task)


def outcomes_path(eval_dir: str | os.PathLike, row: int | str, task: str) -> Path:
    """``eval_dir/<row>_<task>.jsonl``: row 0 base, t after task t, ``"expert"``; unsafe task characters → ``_``."""
    return Path(eval_dir) / f"{_row_name(row)}_{_file_safe(task)}.jsonl"


def _json_line(record: dict) -> str:
    def finite(value):  # -inf log-likelihoods are written as null (JSON has no infinities)
        return None if isinstance(value, float) and not math.isfinite(value) else value

    if "scores" in record:
        record = {**record, "scores": [finite(score) for score in record["scores"]]}
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


def write_outcomes(path: str | os.PathLike, result) -> Path:
    """Write ``result``'s per-example outcomes to ``path`` as JSON lines, atomically; returns the path.

    ``result`` is an :class:`~cpt.evaluation.EvalResult` from ``evaluate_choice`` or
    ``evaluate_generation``. A kill mid-write leaves the previous file (or none), never half
    of one (:func:`cpt.io.atomic_write_text`).
    """
    from cpt.io import atomic_write_text

    path = Path(path)
    lines = [_json_line(record) for record in outcome_records(result)]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def read_outcomes(path: str | os.PathLike) -> list[dict]:
    """The outcome records of a file :func:`write_outcomes` wrote, in eval order.

    :class:`CptError` naming the file and line when it is missing, not JSON lines, or a
    line lacks one of :data:`OUTCOME_FIELDS`.
    """
    path = Path(path)
    if not path.is_file():
        raise CptError(f"{path}: no such outcomes file; evaluations write eval/<row>_<task>.jsonl")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CptError(
                    f"{path}:{number}: not a JSON line ({exc.msg}); the file is damaged: evaluate again"
                ) from None
            if not isinstance(record, dict) or any(field not in record for field in OUTCOME_FIELDS):
                raise CptError(f"{path}:{number}: an outcome needs the fields {', '.join(OUTCOME_FIELDS)}")
            records.append(record)
    return records


def correct_vector(records: Sequence[dict]) -> list[bool]:
    """Per example, whether it was right (the input of accuracy and of example resampling)."""
    return [bool(record["correct"]) for record in records]


def wrong_answers(
    eval_dir: str | os.PathLike, row: int | str, tasks: Iterable[str], *, limit: int = 3
) -> dict[str, list[dict]]:
    """Per task, up to ``limit`` wrong outcomes of evaluation row ``row``, for a report.

    The first wrong examples in eval order are taken, so a report is reproducible and two
    runs on the same eval set show the same examples where both got them wrong. A task
    without an outcomes file for that row (e.g. a run from before outcomes were written)
    is left out of the answer.
    """
    if not isinstance(limit, int) or limit < 0:
        raise CptError(f"limit must be a non-negative integer, got {limit!r}")
    picked: dict[str, list[dict]] = {}
    for task in tasks:
        path = outcomes_path(eval_dir, row, task)
        if not path.is_file():
            continue
        picked[task] = [record for record in read_outcomes(path) if not record["correct"]][:limit]
    return picked


def _shorten(value, max_chars: int) -> str:
    if isinstance(value, list):  # chat messages: the last user turn is what was asked
        value = next((m.get("content", "") for m in reversed(value) if isinstance(m, dict)), "")
    text = " ".join(str(value).split())
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def format_wrong_answers(picked: dict[str, list[dict]], *, max_chars: int = 160) -> str:
    """Markdown text of :func:`wrong_answers`' result: per task, prompt, prediction and reference.

    Choice outcomes show the chosen and correct choice texts; long texts are cut to
    ``max_chars`` with whitespace collapsed.
    """
    lines: list[str] = []
    for task, records in picked.items():
        lines.append(f"**{task}**" + ("" if records else ": no wrong answers"))
        for record in records:
            prediction, reference = record["prediction"], record["reference"]
            if record.get("kind") == "choice" and record.get("choices"):
                prediction = record["choices"][prediction]
                reference = record["choices"][reference]
            lines.append(
                f"- `{record['id']}` {_shorten(record['prompt'], max_chars)!r} → "
                f"{_shorten(prediction, max_chars)!r} (expected {_shorten(reference, max_chars)!r})"
            )
    return "\n".join(lines)


__all__ = [
    "EXPERT_ROW",
    "OUTCOME_FIELDS",
    "correct_vector",
    "format_wrong_answers",
    "outcome_records",
    "outcomes_path",
    "read_outcomes",
    "write_outcomes",
    "wrong_answers",
]
