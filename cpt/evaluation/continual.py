"""Metrics of a continual run (METHOD §5) and a readable accuracy-matrix table.

``matrix[i][j-1]`` is ``R[i][j]``: the score of the state after task ``i`` on task ``j``'s
eval set (row 0 = the base model), so a finished run of T tasks has T+1 rows of T
columns. With ``k`` the index of the last row present (tasks completed so far):

- ``ACC = mean_{j≤k} R[k][j]``
- ``BWT = mean_{j<k} (R[k][j] − R[j][j])``                       (needs k ≥ 2)
- ``FWT = mean_{1<j≤min(k+1,T)} (R[j−1][j] − R[0][j])``          (needs row j−1; k ≥ 1, T ≥ 2)
- ``forgetting = mean_{j<k} (max_{1≤i<k} R[i][j] − R[k][j])``    (needs k ≥ 2)

For a finished run (k = T) these are exactly METHOD §5. For a run in progress they are
§5's metrics of the tasks learnt so far, except FWT, which uses every row present: row k
already holds the zero-shot score on task k+1, i.e. its forward transfer. Undefined
metrics are ``None``. Entries may be ``None`` (not evaluated); terms that need a ``None``
entry are left out of the means.

Probes (eval-only tasks, never trained) are columns of their own, ``P[i][p]`` = the score
of the state after task ``i`` on probe ``p``. They never enter the metrics above (METHOD §5
is over the sequence's tasks); :func:`general_ability_kept` gives their one figure:

- ``kept[p] = P[k][p] / P[0][p]`` (``None`` when either is missing or the base scored 0),
  and its mean over the probes where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cpt.errors import CptError


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _check_matrix(matrix: Sequence[Sequence[float | None]]) -> list[list[float | None]]:
    rows = [list(r) for r in matrix]
    if not rows:
        return rows
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            raise CptError(
                f"accuracy matrix row {i} has {len(row)} entries but row 0 has {width}; every row needs one per task"
            )
        for j, x in enumerate(row):
            if x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(float(x))):
                raise CptError(f"accuracy matrix entry [{i}][{j}] is {x!r}; expected a number or None")
    if len(rows) > width + 1:
        raise CptError(
            f"accuracy matrix has {len(rows)} rows for {width} tasks; expected at most {width + 1} (base + one per task)"
        )
    return [[None if x is None else float(x) for x in row] for row in rows]


def continual_metrics(
    matrix: Sequence[Sequence[float | None]],
    expert_scores: Sequence[float | None] | None = None,
) -> dict:
    """ACC, BWT, FWT and average forgetting of an accuracy matrix (METHOD §5).

    Args:
        matrix: rows of scores; row 0 = base, row i = after task i; one column per task.
            A run in progress may have fewer than T+1 rows.
        expert_scores: optional ``E_t``'s score on task t, one per task (``None`` allowed).

    Returns a dict with ``acc``, ``bwt``, ``fwt``, ``forgetting`` (floats or ``None``),
    ``per_task_forgetting`` (one value per task j < k, ``None`` where undefined),
    ``num_tasks`` (T, the number of columns), ``num_completed`` (k), ``acc_all_tasks``
    (mean of row k over all T tasks), and, from ``expert_scores``, ``expert_scores``,
    ``expert_acc`` (mean of E_j over j ≤ k) and ``normalized_acc`` (mean over j ≤ k of
    R[k][j] / E_j, for E_j > 0) — ``None`` without expert scores.
    """
    R = _check_matrix(matrix)
    T = len(R[0]) if R else 0
    k = len(R) - 1  # tasks completed; -1 for an empty matrix

    def r(i: int, j: int) -> float | None:  # R[i][j], tasks numbered from 1
        return R[i][j - 1]

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    acc = _mean([x for j in range(1, k + 1) if (x := r(k, j)) is not None]) if k >= 1 else None
    acc_all = _mean([x for x in R[k] if x is not None]) if k >= 1 else None

    bwt = None
    forgetting = None
    per_task_forgetting: list[float | None] = []
    if k >= 2:
        bwt = _mean([d for j in range(1, k) if (d := diff(r(k, j), r(j, j))) is not None])
        for j in range(1, k):
            earlier = [x for i in range(1, k) if (x := r(i, j)) is not None]
            per_task_forgetting.append(diff(max(earlier), r(k, j)) if earlier else None)
        forgetting = _mean([f for f in per_task_forgetting if f is not None])

    fwt = None
    if k >= 1 and T >= 2:
        fwt = _mean([d for j in range(2, min(k + 1, T) + 1) if (d := diff(r(j - 1, j), r(0, j))) is not None])

    experts = None
    expert_acc = None
    normalized_acc = None
    if expert_scores is not None:
        experts = [None if x is None else float(x) for x in expert_scores]
        if len(experts) != T:
            raise CptError(
                f"expert_scores has {len(experts)} entries for {T} tasks; give one per task (None if missing)"
            )
        if k >= 1:
            expert_acc = _mean([x for x in experts[:k] if x is not None])
            normalized_acc = _mean(
                [
                    x / e
                    for j in range(1, k + 1)
                    if (x := r(k, j)) is not None and (e := experts[j - 1]) is not None and e > 0
                ]
            )

    return {
        "acc": acc,
        "bwt": bwt,
        "fwt": fwt,
        "forgetting": forgetting,
        "num_tasks": T,
        "num_completed": max(k, 0),
        "per_task_forgetting": per_task_forgetting,
        "acc_all_tasks": acc_all,
        "expert_scores": experts,
        "expert_acc": expert_acc,
        "normalized_acc": normalized_acc,
    }


def needed_entries(num_tasks: int) -> list[list[int]]:
    """Per row ``i = 0..T``, the tasks ``j`` (numbered from 1) whose entry ``R[i][j]`` METHOD §5's
    metrics of the finished run read — what ``evaluation.rows: needed`` scores.

    Read off the definitions of METHOD §5 term by term:

    - ``ACC = mean_j R[T][j]``: row T, every task;
    - ``BWT = mean_{j<T} (R[T][j] − R[j][j])``: row T and the diagonal ``R[j][j]``, j < T;
    - ``FWT = mean_{j>1} (R[j−1][j] − R[0][j])``: the base row's tasks 2..T and the entry just
      above the diagonal, ``R[j−1][j]`` (row t's score on task t+1, before it is learnt);
    - forgetting ``= mean_{j<T} (max_{1≤i<T} R[i][j] − R[T][j])``: every row 1..T−1 on every
      task j < T — the max runs over all earlier rows, including those before task j was
      learnt (as :func:`continual_metrics` and :mod:`cpt.study.statistics` compute it).

    So the base row skips task 1, rows ``1..T−2`` skip task T, rows ``T−1`` and ``T`` are whole
    (for T = 4, 3 of the 20 entries). Every metric of a run in progress (after
    ``k < T`` tasks, :func:`continual_metrics`) reads a subset of these too: row k on tasks
    ``≤ k+1``, earlier rows on tasks ``< k``.
    """
    T = num_tasks
    needed: list[set[int]] = [set() for _ in range(T + 1)]
    needed[T].update(range(1, T + 1))  # ACC (and the R[T][j] of BWT and forgetting)
    for j in range(1, T):
        needed[j].add(j)  # BWT: R[j][j]
        for i in range(1, T):
            needed[i].add(j)  # forgetting: max over rows 1..T-1
    for j in range(2, T + 1):
        needed[j - 1].add(j)  # FWT: R[j-1][j]
        needed[0].add(j)  # FWT: R[0][j]
    return [sorted(tasks) for tasks in needed]


def general_ability_kept(probe_rows: Sequence[Sequence[float | None] | None], probe_names: Sequence[str]) -> dict:
    """The "general ability kept" figure of probe scores: score after the last task / the base's.

    Args:
        probe_rows: row 0 = base, row i = after task i, one column per probe; rows not
            evaluated (yet) may be ``None``. The last row that is not ``None`` is "the last task".
        probe_names: one name per column.

    Returns ``{"per_probe": {name: kept or None}, "mean": mean of the defined values or None,
    "base": row 0, "last": row k, "last_row": k}``; ``kept`` is ``None`` for k = 0 (no task
    done), a missing score, or a base score of 0 (the ratio is undefined).
    """
    names = [str(name) for name in probe_names]
    rows = [None if row is None else list(row) for row in probe_rows]
    for i, row in enumerate(rows):
        if row is not None and len(row) != len(names):
            raise CptError(f"probe row {i} has {len(row)} entries for {len(names)} probes; give one per probe")
    last = max((i for i, row in enumerate(rows) if row is not None), default=-1)
    base = rows[0] if rows and rows[0] is not None else [None] * len(names)
    final = rows[last] if last >= 1 else [None] * len(names)
    per_probe: dict[str, float | None] = {}
    for name, start, end in zip(names, base, final):
        defined = start is not None and end is not None and float(start) > 0
        per_probe[name] = float(end) / float(start) if defined else None
    return {
        "per_probe": per_probe,
        "mean": _mean([value for value in per_probe.values() if value is not None]),
        "base": base,
        "last": final,
        "last_row": max(last, 0),
    }


def format_general_ability(kept: dict) -> str:
    """One line of :func:`general_ability_kept`'s result: ``general ability kept: a 0.950, b 1.020 (mean 0.985)``."""
    parts = ", ".join(f"{name} {_fmt(value)}" for name, value in kept["per_probe"].items())
    return f"general ability kept (probe after last task / base): {parts} (mean {_fmt(kept['mean'])})"


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def format_matrix_table(
    matrix: Sequence[Sequence[float | None]],
    task_names: Sequence[str],
    expert_scores: Sequence[float | None] | None = None,
    metrics: dict | None = None,
    *,
    probe_rows: Sequence[Sequence[float | None] | None] | None = None,
    probe_names: Sequence[str] | None = None,
) -> str:
    """A fixed-width text table of the accuracy matrix with the continual metrics under it.

    Rows ``base``, ``after <task>`` (those present), and ``expert`` when expert scores are
    given; one column per task; 3 decimals, ``-`` for a missing entry. The metrics line gives
    ACC, BWT, FWT and forgetting (``n/a`` where undefined). ``metrics`` defaults to
    :func:`continual_metrics` of the same inputs.

    With ``probe_names``, one ``probe:<name>`` column per probe follows the task columns
    (``probe_rows`` aligned with the matrix rows; never in the metrics) and a last line gives
    the general ability kept (:func:`general_ability_kept`).
    """
    R = _check_matrix(matrix)
    names = [str(n) for n in task_names]
    T = len(R[0]) if R else len(names)
    if len(names) != T:
        raise CptError(f"{len(names)} task names for an accuracy matrix of {T} tasks; give one name per task")
    if metrics is None:
        metrics = continual_metrics(R, expert_scores)

    probes = [str(name) for name in probe_names or []]
    probe_table = [list(row) if row is not None else [None] * len(probes) for row in probe_rows or []]
    probe_table += [[None] * len(probes)] * (len(R) - len(probe_table))

    labels = ["base"] + [f"after {names[i - 1]}" for i in range(1, len(R))]
    body = [[_fmt(x) for x in row] + [_fmt(x) for x in probe_row] for row, probe_row in zip(R, probe_table)]
    if expert_scores is not None:
        labels.append("expert")
        body.append([_fmt(None if x is None else float(x)) for x in expert_scores] + ["-"] * len(probes))
    headers = names + [f"probe:{name}" for name in probes]
    label_w = max([len(s) for s in labels] + [len("state")])
    col_w = [max(len(headers[j]), 6, *(len(row[j]) for row in body)) for j in range(len(headers))]
    columns = range(len(headers))

    lines = ["  ".join([f"{'state':<{label_w}}"] + [f"{headers[j]:>{col_w[j]}}" for j in columns])]
    lines.append("  ".join(["-" * label_w] + ["-" * w for w in col_w]))
    for label, row in zip(labels, body):
        lines.append("  ".join([f"{label:<{label_w}}"] + [f"{row[j]:>{col_w[j]}}" for j in columns]))

    def show(key: str, signed: bool = False) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else _fmt(value, signed)

    summary = f"ACC {show('acc')}  BWT {show('bwt', True)}  FWT {show('fwt', True)}  forgetting {show('forgetting')}"
    done, total = metrics.get("num_completed"), metrics.get("num_tasks")
    if done is not None and total is not None and done < total:
        summary += f"  (after {done} of {total} tasks)"
    if metrics.get("normalized_acc") is not None:
        summary += f"  ACC/expert {show('normalized_acc')}"
    lines.append(summary)
    if probes:
        lines.append(format_general_ability(general_ability_kept(probe_table, probes)))
    return "\n".join(lines)


__all__ = [
    "continual_metrics",
    "format_general_ability",
    "format_matrix_table",
    "general_ability_kept",
    "needed_entries",
]
