"""The search for the task order of least predicted conflict (METHOD.md §7). Pure: no files, no models.

METHOD §7 scores an order ``π`` of T tasks by

    C(π) = Σ_{t=2..T} c(P_t, π(t)),    c(P, j) = mean_tensors GC(Σ_{s∈P} τ_s, τ_j),

where ``P_t = {π(1), …, π(t−1)}`` is the *set* of tasks integrated before step t (the state is
the plain sum of their task vectors, so the order inside the prefix does not matter). A step's
cost therefore depends only on (previous set, next task), and the least cost of reaching a set
``S`` is ``best(S) = min_{j∈S} best(S∖{j}) + c(S∖{j}, j)`` with ``best({j}) = 0``: a dynamic
programme over the 2^T subsets (Held–Karp's recursion with the "last city" dropped, because the
step cost does not depend on the last task, only on the set). That is exact; it needs every
``c(S, j)`` with ``1 ≤ |S| ≤ T−1``, i.e. ``T·2^(T−1) − T`` step conflicts (1,016 for T = 8).

Above :data:`EXACT_MAX_TASKS` tasks the planner is greedy: the first two tasks are the pair of
least conflict (the first step's cost is symmetric, ``GC`` being symmetric), then each step adds
the task of least conflict with the set so far. That needs ``T(T−1)/2`` pairwise conflicts and
``T−3`` further rounds of at most ``T`` conflicts each.

The step conflicts come from a caller-supplied ``measure(requests) -> costs``, called with a
batch of ``(previous set, next task)`` requests at a time so that the caller can compute them in
one pass over the model's tensors. Tasks are the integers ``0 … T−1`` (positions in the given
order); sets are ``frozenset``\\ s of them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "EXACT_MAX_TASKS",
    "TIE_TOLERANCE",
    "StepRequest",
    "OrderPlan",
    "order_cost",
    "order_requests",
    "exact_order",
    "greedy_order",
    "plan_order",
]

#: Largest number of tasks planned exactly (METHOD §7: "exact for T ≤ 8").
EXACT_MAX_TASKS = 8

#: Costs this close (relative) are a tie. Two orders that differ only in their first two tasks always tie
#: (the first step's conflict is symmetric), but GC(τ_a, τ_b) and GC(τ_b, τ_a) are computed separately and
#: may differ in the last bit: without a tolerance that bit, not the conflict, would pick the order.
TIE_TOLERANCE = 1e-9


def _ties(cost: float, least: float) -> bool:
    return cost - least <= TIE_TOLERANCE * max(1.0, abs(least))


def _first_least(candidates, key):
    """The first of ``candidates`` (in their order) whose ``key`` ties the least one (:data:`TIE_TOLERANCE`)."""
    candidates = list(candidates)
    least = min(key(candidate) for candidate in candidates)
    return next(candidate for candidate in candidates if _ties(key(candidate), least))


#: One step conflict to measure: (the set of tasks already integrated, the task added next).
StepRequest = tuple[frozenset[int], int]
#: Measures a batch of step conflicts; returns one finite float per request, in order.
Measure = Callable[[Sequence[StepRequest]], Sequence[float]]


@dataclass
class OrderPlan:
    """What the planner found (METHOD §7).

    Args:
        order: the planned order, task indices into the given order.
        step_conflicts: ``c(P_t, π(t))`` for t = 2..T of the planned order (T−1 values).
        cost: ``C`` of the planned order (the sum of ``step_conflicts``).
        given_step_conflicts: the same for the given order ``0 … T−1``.
        given_cost: ``C`` of the given order.
        method: ``"exact"`` (dynamic programme over subsets) or ``"greedy"``.
        measured: how many step conflicts were measured.
    """

    order: list[int]
    step_conflicts: list[float]
    cost: float
    given_step_conflicts: list[float]
    given_cost: float
    method: str
    measured: int = 0
    conflicts: dict[StepRequest, float] = field(default_factory=dict, repr=False)

    @property
    def improvement(self) -> float:
        """How much less conflict the planned order has than the given one (``given_cost − cost``)."""
        return self.given_cost - self.cost


def order_requests(order: Sequence[int]) -> list[StepRequest]:
    """The ``(previous set, next task)`` of every step t = 2..T of ``order``."""
    return [(frozenset(order[:position]), order[position]) for position in range(1, len(order))]


def order_cost(order: Sequence[int], conflict: Callable[[frozenset[int], int], float]) -> tuple[float, list[float]]:
    """``C(π)`` and its per-step terms, with ``conflict(previous set, next task)`` the step cost (METHOD §7)."""
    steps = [float(conflict(previous, task)) for previous, task in order_requests(order)]
    return math.fsum(steps), steps


class _Table:
    """Measured step conflicts, asking ``measure`` only for what is not known yet."""

    def __init__(self, measure: Measure):
        self.measure = measure
        self.values: dict[StepRequest, float] = {}

    def ensure(self, requests: Sequence[StepRequest]) -> None:
        missing = list(dict.fromkeys(request for request in requests if request not in self.values))
        if not missing:
            return
        values = list(self.measure(missing))
        if len(values) != len(missing):
            raise ValueError(f"measure returned {len(values)} conflicts for {len(missing)} requests")
        for request, value in zip(missing, values):
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"step conflict of {sorted(request[0])} → {request[1]} is not finite ({value})")
            self.values[request] = value

    def __call__(self, previous: frozenset[int], task: int) -> float:
        return self.values[(previous, task)]


def _check_tasks(num_tasks: int) -> None:
    if num_tasks < 1:
        raise ValueError(f"need at least one task to order, got {num_tasks}")


def exact_order(num_tasks: int, conflict: Callable[[frozenset[int], int], float]) -> list[int]:
    """The order of least ``C`` by dynamic programming over subsets (METHOD §7).

    ``conflict(S, j)`` must be defined for every ``S`` with ``1 ≤ |S| ≤ T−1`` and ``j ∉ S``.
    Ties (within :data:`TIE_TOLERANCE`) go to the order that comes first lexicographically, so
    the given order ``0 … T−1`` is kept unless another is less conflicting. Returns a
    permutation of ``range(num_tasks)``.
    """
    _check_tasks(num_tasks)
    tasks = range(num_tasks)
    # best[S] = (least cost of integrating the set S in some order, that order)
    best: dict[frozenset[int], tuple[float, tuple[int, ...]]] = {frozenset([j]): (0.0, (j,)) for j in tasks}
    for size in range(2, num_tasks + 1):
        for members in itertools.combinations(tasks, size):
            chosen = frozenset(members)
            candidates = []
            for last in members:
                previous = chosen - {last}
                cost, order = best[previous]
                candidates.append((cost + conflict(previous, last), (*order, last)))
            best[chosen] = _first_least(sorted(candidates, key=lambda candidate: candidate[1]), lambda c: c[0])
    return list(best[frozenset(tasks)][1])


def _all_prefix_requests(num_tasks: int) -> list[StepRequest]:
    tasks = range(num_tasks)
    return [
        (frozenset(previous), task)
        for size in range(1, num_tasks)
        for previous in itertools.combinations(tasks, size)
        for task in tasks
        if task not in previous
    ]


def greedy_order(num_tasks: int, measure: Measure) -> list[int]:
    """The greedy order (METHOD §7 above T = 8): the pair of least conflict first, then, step by step,
    the task of least conflict with the set so far. Ties (:data:`TIE_TOLERANCE`) go to the lowest index. ``measure`` as in
    :func:`plan_order`."""
    return _greedy(num_tasks, _Table(measure))


def _greedy(num_tasks: int, table: _Table) -> list[int]:
    _check_tasks(num_tasks)
    if num_tasks == 1:
        return [0]
    pairs = list(itertools.combinations(range(num_tasks), 2))
    table.ensure([(frozenset([first]), second) for first, second in pairs])
    order = list(_first_least(pairs, lambda pair: table(frozenset([pair[0]]), pair[1])))
    while len(order) < num_tasks:
        previous = frozenset(order)
        remaining = [task for task in range(num_tasks) if task not in previous]
        table.ensure([(previous, task) for task in remaining])
        order.append(_first_least(remaining, lambda task, previous=previous: table(previous, task)))
    return order


def plan_order(num_tasks: int, measure: Measure, *, exact_max_tasks: int = EXACT_MAX_TASKS) -> OrderPlan:
    """Plan the order of ``num_tasks`` tasks (METHOD §7): exact up to ``exact_max_tasks``, greedy above.

    ``measure`` is called with batches of ``(previous set, next task)`` requests (each at most
    once) and returns their step conflicts. The given order is ``0 … T−1``; its conflicts are
    measured too, so the plan says how far the planned order is from it.
    """
    _check_tasks(num_tasks)
    table = _Table(measure)
    given = list(range(num_tasks))
    if num_tasks <= exact_max_tasks:
        table.ensure(_all_prefix_requests(num_tasks))
        order, method = exact_order(num_tasks, table), "exact"
    else:
        table.ensure(order_requests(given))
        order, method = _greedy(num_tasks, table), "greedy"
    cost, steps = order_cost(order, table)
    given_cost, given_steps = order_cost(given, table)
    return OrderPlan(
        order=order,
        step_conflicts=steps,
        cost=cost,
        given_step_conflicts=given_steps,
        given_cost=given_cost,
        method=method,
        measured=len(table.values),
        conflicts=dict(table.values),
    )
