"""Probes scored by lm-evaluation-harness (the optional ``lm-eval`` extra: ``pip install 'cpt[lm-eval]'``).

A recipe probe with ``lm_eval: {task: NAME | yaml: PATH, num_fewshot, limit, metric}`` is
scored on the live model and tokenizer, wrapped in lm-eval's ``HFLM``, by
``lm_eval.simple_evaluate`` — no reload, no network when the task's data is local (a task
YAML over a local jsonl file) or already in the datasets cache.

The score is one metric of the task's results (``metric``; default ``acc``, else
``exact_match``, else the first the task reports), taken with lm-eval's ``none`` filter when
there are several. Each document's outcome is written like a task's (METHOD §6,
:mod:`cpt.evaluation.outcomes`): ``id`` (lm-eval's doc id), ``kind`` ``"lm-eval"``,
``prompt`` (the first request's context), ``prediction`` (the filtered response),
``reference`` (the target), ``correct`` (the document's metric value is 1) and ``value``.

Usage::

    score = evaluate_lm_eval(model, tokenizer, LmEvalSpec(yaml="probe.yaml"), outcomes_file=Path("eval/0_probe-x.jsonl"))
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cpt.errors import CptError

#: Metrics tried, in order, when the probe names none.
DEFAULT_METRICS = ("acc", "exact_match")


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CptError(
            "probes: an lm_eval probe needs lm-evaluation-harness; install the extra: pip install 'cpt[lm-eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def _yaml_task_name(path: Path, where: str) -> str:
    """The ``task:`` name of an lm-eval task YAML (its ``!function`` tags are read as plain text)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except (OSError, yaml.YAMLError) as exc:
        raise CptError(f"{where}.yaml: cannot read {str(path)!r} ({type(exc).__name__}: {exc})") from None
    name = config.get("task") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        raise CptError(f"{where}.yaml: {str(path)!r} has no 'task:' name; an lm-eval task YAML starts with task: NAME")
    return name


def pick_metric(task_results: dict[str, Any], wanted: str | None, where: str) -> tuple[str, str]:
    """``(metric, results key)`` of the score: ``wanted`` or the first of :data:`DEFAULT_METRICS`
    the task reports (else its first metric), preferring lm-eval's ``none`` filter."""
    keys = [key for key in task_results if "," in key and "_stderr" not in key.split(",")[0]]
    available = list(dict.fromkeys(key.split(",")[0] for key in keys))
    if not available:
        raise CptError(f"{where}: lm-eval reported no metric for the task")
    if wanted is not None and wanted not in available:
        raise CptError(f"{where}.metric: {wanted!r} is not a metric of the task; it reports: {', '.join(available)}")
    metric = wanted or next((name for name in DEFAULT_METRICS if name in available), available[0])
    candidates = [key for key in keys if key.split(",")[0] == metric]
    key = f"{metric},none" if f"{metric},none" in candidates else candidates[0]
    return metric, key


def _first_context(arguments: Any) -> Any:
    """The context (prompt) of a sample's first request, as lm-eval logs it (dict or tuple form)."""
    first = next(iter(arguments.values())) if isinstance(arguments, dict) else (arguments[0] if arguments else None)
    if isinstance(first, dict):
        return next(iter(first.values()), "")
    if isinstance(first, (list, tuple)):
        return first[0] if first else ""
    return first


def _plain(value: Any) -> Any:
    """``value`` as JSON data (lm-eval responses hold tuples and numpy numbers)."""
    return json.loads(json.dumps(value, default=str))


def outcome_lines(samples: list[dict], metric: str) -> list[dict]:
    """Per-document outcome records of lm-eval's logged samples (see the module docstring)."""
    records = []
    for sample in sorted(samples, key=lambda sample: sample.get("doc_id", 0)):
        value = sample.get(metric)
        value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        response = sample.get("filtered_resps")
        if isinstance(response, (list, tuple)) and len(response) == 1:
            response = response[0]
        records.append(
            {
                "id": sample.get("doc_id"),
                "kind": "lm-eval",
                "prompt": _plain(_first_context(sample.get("arguments"))),
                "prediction": _plain(response),
                "reference": _plain(sample.get("target")),
                "correct": isinstance(value, float) and value >= 1.0,
                "value": value if isinstance(value, float) and math.isfinite(value) else None,
            }
        )
    return records


def evaluate_lm_eval(
    model,
    tokenizer,
    spec,
    *,
    batch_size: int = 16,
    outcomes_file: Path | None = None,
    where: str = "lm_eval",
) -> float:
    """Score ``model`` on the lm-eval task of ``spec`` (:class:`cpt.recipe.LmEvalSpec`); the score in [0, 1] for
    accuracy-like metrics. Writes per-document outcomes to ``outcomes_file`` (atomically) when given.
    """
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    from cpt.io import atomic_write_text

    if spec.yaml is not None:
        path = Path(spec.yaml)
        if not path.is_file():
            raise CptError(
                f"{where}.yaml: file {str(path)!r} not found (relative paths are taken from the current directory)"
            )
        task_name = _yaml_task_name(path, where)
        task_manager = TaskManager(include_path=str(path.resolve().parent))
    else:
        task_name = spec.task
        task_manager = TaskManager()
    if task_name not in task_manager.all_tasks:
        raise CptError(f"{where}: lm-eval knows no task {task_name!r}; give a task name it lists or a task YAML")

    was_training = model.training
    model.eval()
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=[task_name],
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=0,  # the score only; cpt's statistics resample the per-document outcomes
        )
    finally:
        model.train(was_training)
    if results is None or task_name not in results.get("results", {}):
        raise CptError(f"{where}: lm-eval returned no result for task {task_name!r}")
    metric, key = pick_metric(results["results"][task_name], spec.metric, where)
    score = float(results["results"][task_name][key])
    if outcomes_file is not None:
        records = outcome_lines(results.get("samples", {}).get(task_name, []), metric)
        atomic_write_text(
            Path(outcomes_file), "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        )
    return score


__all__ = ["DEFAULT_METRICS", "evaluate_lm_eval", "outcome_lines", "pick_metric"]
