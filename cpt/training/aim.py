"""AIMMerging — Adaptive Iterative Model Merging (METHOD §4.B): the rules, and the ``aim_merging`` strategy.

The method (EMNLP 2025, arXiv 2509.17348; reference code WoodScene/AimMerging, a modified
HF 4.28 ``Trainer``) trains task t ≥ 2 normally and, at every optimizer step, watches a
*forgetting signal* — the loss on a small memory of earlier tasks' examples. Every so often
it *merges*: from the weights ``θ_k`` reached since the last merge it takes ``M`` extra
"outer" optimizer steps on memory batches, then sets the trainable set ``P`` to a weighted
combination of the inner update ``Δ_in = θ_k − A`` and the outer update ``Δ_out = θ_M − θ_k``
on top of the anchor ``A`` (the weights at the previous merge). The interval ``K`` between
merges adapts to a *learning signal* ``Λ = ‖Δ_in‖₁ / K``.

This module holds the rules as plain Python/torch (no Hugging Face objects), each citing the
§4.B item it implements:

* :func:`memory_indices` — the memory of a finished task (§4.B "Memory");
* :class:`AIMSchedule` — the trainer state, the threshold and flag rules, when to merge,
  the weight table and the interval adaptation (§4.B "State", steps 2-3);
* :func:`merge_weights`, :func:`adapt_interval`, :func:`merge_tensor` — the pieces of a merge.

The training-time work (probe, outer steps, the merge of the live parameters) is
:class:`callbacks.AIMMergingCallback`; the :class:`AIMMerging` strategy (``aim_merging``)
builds it from the persisted memory of earlier tasks and writes the expert as the state.

Where cpt departs from the reference code, and why (each is listed in METHOD §4.B)
-------------------------------------------------------------------------------------
* **Paper vs code.** The paper adapts the interval from the trend of Λ over a sliding
  window and its merge-weight formula could not be read; cpt follows the *code* (last pair
  of Λ, the fixed weight table), whose parameters (``max_step_len``, ``min_step_len``,
  ``cold_start_step``, ``threshold_factor``) exist only there.
* **Outer optimizer.** The reference builds an ``outer_optimizer`` (lr 1e-3) but its fp32
  path steps the task's own AdamW. cpt does the same by default (``outer_optimizer: task``);
  ``outer_optimizer: separate`` uses a separate AdamW with ``outer_lr`` instead.
* **Seeded memory batches.** The reference draws memory batches with an unseeded
  ``RandomSampler``; cpt draws them from the run's seed (and the task), so runs repeat.
* **Memory seed.** The reference samples each task's memory with Python ``random`` seeded 42;
  cpt seeds it from the run's seed and the task's step (the same rule, reproducible per run).
* **Model selection.** The reference ends each task with ``load_best_model_at_end=True``
  (dev loss on past and current tasks every 40 steps). That selection uses past-task dev
  data and can land between merges, so cpt keeps the task's final state (METHOD: default
  ``select_best: false``). The ``select_best: true`` option is not implemented.
* **One adapter per task.** The reference continues one LoRA adapter across tasks; cpt's
  runner merges each task's adapter into the state θ_{t−1} and starts a fresh adapter for
  the next task (as for every strategy). The trainable set P is therefore that task's adapter
  (factors A and B separately, as the reference) plus any other trainable tensor
  (``modules_to_save``); under full fine-tuning P is every trainable tensor.
* **Memory size on generative tasks.** The reference stratifies by the ``output`` label,
  ``max(1, n/classes)`` per class; when every output is distinct (generation tasks) that
  keeps one example *per class*, i.e. the whole training set, not 2 %. cpt stratifies by the
  completion and caps the memory at ``⌊ratio·n⌋`` by drawing that many classes uniformly
  when there are more classes than places; it also keeps at least one example per task
  (``⌊2 %·n⌋`` is 0 below 50 examples). Classification tasks sample exactly as the reference.
* **Division guards.** ``Λ_prev = 0`` or ``Λ_b = 0`` (no movement, e.g. a zero learning rate)
  would divide by zero in the reference; cpt takes γ = 1 (no change from the decrease rule) and
  ``K ← S_max`` (the increase rule's limit) respectively.
* **Single process.** The reference runs on one device. The callback refuses DeepSpeed and
  multi-process runs (their outer steps would need ``accelerator.backward`` over gathered
  parameters and synchronised memory batches); this is not implemented yet.
* **Mid-task resume.** A task resumed from a trainer checkpoint restarts the AIM state at the
  resumed step (anchor = the resumed weights, interval K0, the first merge K0 + n_c + 1 or
  more steps later, as at a task's start); resuming between tasks is exact
  (the memory of earlier tasks is persisted in the strategy folder).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from cpt.errors import CptError
from cpt.integration import IntegrationContext, TaskContext
from cpt.strategies import Strategy, register_strategy
from cpt.training.replay import ReplayBuffers, prompt_completion_rows

#: The phases of a step between two merges (§4.B step 2).
CALIBRATING = "calibrating"
MONITORING = "monitoring"


# ---------------------------------------------------------------------------- memory (§4.B "Memory")
def memory_indices(labels: Sequence[Hashable], ratio_percent: float, seed: int | str) -> list[int]:
    """The examples of a finished task kept in AIM's memory (METHOD §4.B "Memory").

    ``⌊ratio_percent/100 · n⌋`` examples (at least one), stratified by label:
    ``max(1, wanted // classes)`` per class in order of first appearance, then topped up
    uniformly from the rest (reference ``load_data.py`` L84-148). cpt caps the memory at the
    wanted count when there are more classes than places (see the module docstring).

    Args:
        labels: one label per training example (cpt uses the completion).
        ratio_percent: the memory size in percent of the task (``memory_ratio``, 2).
        seed: seeds Python ``random`` (cpt: the run's seed and the task).
    """
    count = len(labels)
    if count == 0:
        return []
    wanted = min(count, max(1, math.floor(count * ratio_percent / 100)))
    rng = random.Random(seed)
    by_label: dict[Hashable, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    classes = list(by_label)
    if len(classes) > wanted:  # cpt: cap (the reference would keep one per class, i.e. all of a generative task)
        classes = rng.sample(classes, wanted)
    per_class = max(1, wanted // len(classes))
    picked: list[int] = []
    for label in classes:
        members = by_label[label]
        picked += rng.sample(members, min(per_class, len(members)))
    if len(picked) < wanted:
        chosen = set(picked)
        rest = [index for index in range(count) if index not in chosen]
        picked += rng.sample(rest, wanted - len(picked))
    return picked


# ---------------------------------------------------------------------------- merge pieces (§4.B step 3)
def merge_weights(flags: int, interval: int, important_k: int = 70) -> tuple[float, float]:
    """``(w_in, w_out)`` from the weight table (METHOD §4.B step 3, reference L1896-1947).

    "History important" ⇔ ``flags > 1``; "new task important" ⇔ ``interval ≤ important_k``.
    """
    history_important = flags > 1
    new_task_important = interval <= important_k
    if history_important:
        return (0.5, 0.5) if new_task_important else (0.4, 0.6)
    return (0.6, 0.4) if new_task_important else (0.5, 0.5)


def merge_tensor(
    anchor: torch.Tensor, inner: torch.Tensor, outer: torch.Tensor, w_in: float, w_out: float
) -> torch.Tensor:
    """``A + w_in·(θ_k − A) + w_out·(θ_M − θ_k)`` in float32, cast back to the anchor's dtype (§4.B step 3)."""
    anchor32 = anchor.float()
    inner32 = inner.float()
    return (anchor32 + w_in * (inner32 - anchor32) + w_out * (outer.float() - inner32)).to(anchor.dtype)


def adapt_interval(
    interval: int,
    learning_signal: float,
    previous_signal: float,
    *,
    min_step_len: int = 2,
    max_step_len: int = 128,
    halve_at: int = 64,
) -> tuple[int, float]:
    """The next planned interval K and the factor γ (METHOD §4.B "Interval adaptation", reference L2686-2720).

    * ``Λ_b ≥ Λ_prev`` (learning more): ``γ = Λ_b/Λ_prev``, ``K ← max(S_min, ⌊K/γ⌋)``, then
      ``K ← ⌊K/2⌋`` if ``K ≥ halve_at``.
    * else: ``γ = Λ_prev/Λ_b + (1 if K < halve_at else 0.5)`` (the old K), ``K ← min(S_max, ⌊K·γ⌋)``.

    cpt guards: ``Λ_prev = 0`` gives γ = 1; ``Λ_b = 0 < Λ_prev`` gives ``K = S_max``.
    """
    if learning_signal >= previous_signal:
        gamma = learning_signal / previous_signal if previous_signal > 0 else 1.0
        new_interval = max(min_step_len, math.floor(interval / gamma))
        if new_interval >= halve_at:
            new_interval //= 2
        return new_interval, gamma
    if learning_signal <= 0:
        return max_step_len, math.inf
    gamma = previous_signal / learning_signal + (1.0 if interval < halve_at else 0.5)
    return min(max_step_len, math.floor(interval * gamma)), gamma


# ---------------------------------------------------------------------------- the schedule (§4.B "State", 2, 3)
@dataclass
class AIMSchedule:
    """The AIM trainer state and its rules, without any model (METHOD §4.B "State", steps 2 and 3).

    Call :meth:`observe` with each step's probe loss, then :meth:`should_merge`; after a merge
    (outer steps and the weighted combination, done by the caller with :meth:`weights`) call
    :meth:`finish_merge` with ``‖Δ_in‖₁``. Defaults are the § table's.
    """

    inner_iterations: int = 8
    outer_iterations: int = 8
    cold_start_step: int = 3
    max_step_len: int = 128
    min_step_len: int = 2
    threshold_factor: float = 2.0
    calib_frac: float = 2 / 3
    force_flags: int = 3
    important_k: int = 70
    halve_at: int = 64
    adaptive: bool = True

    interval: int = field(init=False)
    """K, the planned interval."""
    outer_steps: int = field(init=False)
    """M, the outer steps of the next merge."""
    ratio: float = field(init=False)
    """r = M0/K0."""
    outer_begin: int = field(init=False)
    calibration: list[float] = field(init=False)
    """H, the calibration losses since the last merge."""
    threshold: float = field(init=False)
    """δ."""
    flags: int = field(init=False)
    """f."""
    forced: bool = field(init=False)
    """Whether a flag was forced (no loss above δ) since the last merge."""
    learning_signals: list[float] = field(init=False)
    """Λ_list."""
    last_merge_step: int = field(init=False)

    def __post_init__(self) -> None:
        if self.inner_iterations < 1 or self.outer_iterations < 0:
            raise CptError(
                f"aim_merging: inner_iterations must be ≥ 1 and outer_iterations ≥ 0 "
                f"(got {self.inner_iterations}, {self.outer_iterations})"
            )
        self.reset()

    def reset(self, start_step: int = 0) -> None:
        """The state at train begin (§4.B "State", reference L784-789); ``start_step`` > 0 for a resumed task."""
        self.interval = self.inner_iterations
        self.outer_steps = self.outer_iterations
        self.ratio = self.outer_iterations / self.inner_iterations
        self.outer_begin = start_step + self.inner_iterations
        self.calibration = []
        self.threshold = 0.0
        self.flags = 0
        self.forced = False
        self.learning_signals = []
        self.last_merge_step = start_step

    @property
    def calibration_count(self) -> int:
        """``n_c = ⌊calib_frac·K⌋``; δ is set at the (n_c+1)-th value (§4.B step 2)."""
        return math.floor(self.calib_frac * self.interval)

    def observe(self, step: int, loss: float) -> str:
        """Step 2 (the signal, reference L2476-2500) for the probe loss ``L_g`` at step ``g``; returns the phase."""
        count = self.calibration_count
        if len(self.calibration) < count:
            self.calibration.append(float(loss))
            return CALIBRATING
        if len(self.calibration) == count:
            self.calibration.append(float(loss))
            self.threshold = sum(self.calibration) / len(self.calibration) * self.threshold_factor
            return CALIBRATING
        if loss >= self.threshold:
            self.flags += 1
        elif step >= self.outer_begin + self.interval:
            self.flags += 1
            self.forced = True
        return MONITORING

    def should_merge(self, step: int) -> bool:
        """Step 3's condition (reference L2514): ``(g ≥ outer_begin and f ≥ 1) or f ≥ force_flags``."""
        return (step >= self.outer_begin and self.flags >= 1) or self.flags >= self.force_flags

    def weights(self) -> tuple[float, float]:
        """``(w_in, w_out)`` for the current f and K (§4.B weight table)."""
        return merge_weights(self.flags, self.interval, self.important_k)

    def finish_merge(self, step: int, inner_l1: float) -> dict[str, Any]:
        """After a merge at step g: Λ_b, the adaptation, and the reset (§4.B step 3, reference L2681-2735).

        Returns the merge's record (g, K, steps since the previous merge, f, forced, weights,
        Λ_b, γ, next K, M).
        """
        w_in, w_out = self.weights()
        learning_signal = inner_l1 / self.interval  # the planned K, not the steps actually taken (L2681)
        record: dict[str, Any] = {
            "step": step,
            "interval": self.interval,
            "steps_since_previous_merge": step - self.last_merge_step,
            "flags": self.flags,
            "forced": self.forced,
            "w_in": w_in,
            "w_out": w_out,
            "outer_steps": self.outer_steps,
            "learning_signal": learning_signal,
            "gamma": None,
        }
        # Cold start: adapt only once more than cold_start_step values are in Λ_list (before this merge).
        if self.adaptive and len(self.learning_signals) > self.cold_start_step:
            self.interval, gamma = adapt_interval(
                self.interval,
                learning_signal,
                self.learning_signals[-1],
                min_step_len=self.min_step_len,
                max_step_len=self.max_step_len,
                halve_at=self.halve_at,
            )
            self.outer_steps = math.floor(self.interval * self.ratio)
            record["gamma"] = gamma
        self.learning_signals.append(learning_signal)
        self.outer_begin = step + self.interval
        self.calibration = []
        self.threshold = 0.0
        self.flags = 0
        self.forced = False
        self.last_merge_step = step
        record["next_interval"] = self.interval
        record["next_outer_steps"] = self.outer_steps
        return record


# ---------------------------------------------------------------------------- the strategy
@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class AIMMergingParams:
    """METHOD §4.B's defaults (the reference scripts'); ranges in the annotations, checked by pydantic on every path."""

    inner_iterations: Annotated[int, Field(ge=1)] = 8
    """K0, the initial planned interval between merges."""
    outer_iterations: Annotated[int, Field(ge=0)] = 8
    """M0, outer (memory) optimizer steps per merge; M = ⌊K·M0/K0⌋ after adaptation."""
    cold_start_step: Annotated[int, Field(ge=0)] = 3
    """Merges before the interval starts adapting (it adapts from merge cold_start_step + 2)."""
    max_step_len: Annotated[int, Field(ge=1)] = 128
    """S_max, the largest interval."""
    min_step_len: Annotated[int, Field(ge=1)] = 2
    """S_min, the smallest interval."""
    threshold_factor: Annotated[float, Field(gt=0)] = 2.0
    """δ = mean(calibration losses) × threshold_factor."""
    calib_frac: Annotated[float, Field(ge=0, le=1)] = 2 / 3
    """n_c = ⌊calib_frac·K⌋ calibration losses, then one more."""
    force_flags: Annotated[int, Field(ge=1)] = 3
    """Merge early once this many flags were raised."""
    important_k: Annotated[int, Field(ge=1)] = 70
    """"New task important" (weight table) iff K ≤ important_k."""
    halve_at: Annotated[int, Field(ge=1)] = 64
    """Halve K when K ≥ halve_at after a decrease; add 0.5 instead of 1 when K ≥ halve_at."""
    memory_ratio: Annotated[float, Field(gt=0, le=100)] = 2.0
    """Percent of each finished task's examples kept in memory (label-stratified)."""
    outer_batch_size: Annotated[int, Field(ge=1)] = 32
    """Examples per probe and outer batch."""
    adaptive: bool = True
    """Adapt the interval K to the learning signal."""
    outer_optimizer: Literal["task", "separate"] = "task"
    """``task``: the outer steps step the task's own optimizer (the reference's fp32 path);
    ``separate``: a separate AdamW with ``outer_lr``."""
    outer_lr: Annotated[float, Field(gt=0)] = 1e-3
    """Learning rate of the separate outer optimizer."""


def _label_key(completion: Any) -> str:
    return completion if isinstance(completion, str) else json.dumps(completion, sort_keys=True, ensure_ascii=False)


@register_strategy(
    "aim_merging",
    params=AIMMergingParams,
    train_from="state",
    state_is_expert=True,
    description="AIMMerging: training-time iterative merging driven by a memory of earlier tasks (METHOD §4.B)",
)
class AIMMerging(Strategy):
    """Sequential fine-tuning with :class:`callbacks.AIMMergingCallback` (METHOD §4.B); θ_t = E_t.

    Memory: when task t's callbacks are built, a label-stratified ``memory_ratio`` % of its
    training examples is written to ``<strategy_dir>/aim_memory/<task>.jsonl`` (atomically,
    kept on a rerun); task t trains with the memories of tasks < t. Task 1 has no memory and
    trains plainly. The per-step and per-merge record goes to ``<strategy_dir>/aim/<t>_<task>.json``.
    """

    def __init__(self, params: AIMMergingParams):
        super().__init__(params)
        self.callback = None

    def memories(self, context: TaskContext) -> ReplayBuffers:
        return ReplayBuffers(Path(context.strategy_dir) / "aim_memory")

    def write_memory(self, context: TaskContext) -> None:
        """Write task t's own memory (for tasks > t) unless it is there already (deterministic: seed and step)."""
        memories = self.memories(context)
        if memories.path(context.task_name).is_file():
            return
        rows = prompt_completion_rows(
            context.train_dataset, "aim_merging", context.task_name, "its memory keeps prompt/completion rows"
        )
        keep = memory_indices(
            [_label_key(row["completion"]) for row in rows],
            self.params.memory_ratio,
            f"cpt-aim-memory:{context.seed}:{context.step}",
        )
        memories.write(context.task_name, [rows[index] for index in keep])

    def memory_rows(self, context: TaskContext) -> list[dict[str, Any]]:
        """The memories of tasks 1..t−1, in task order."""
        memories = self.memories(context)
        rows: list[dict[str, Any]] = []
        for name in context.task_names[: context.step - 1]:
            rows += memories.read(name)
        return rows

    def training_callbacks(self, context: TaskContext) -> list:
        import datasets

        from cpt.callbacks.aim import AIMMergingCallback

        self.write_memory(context)
        rows = self.memory_rows(context)
        params = self.params
        self.callback = AIMMergingCallback(
            datasets.Dataset.from_list(rows) if rows else None,
            inner_iterations=params.inner_iterations,
            outer_iterations=params.outer_iterations,
            cold_start_step=params.cold_start_step,
            max_step_len=params.max_step_len,
            min_step_len=params.min_step_len,
            threshold_factor=params.threshold_factor,
            calib_frac=params.calib_frac,
            force_flags=params.force_flags,
            important_k=params.important_k,
            halve_at=params.halve_at,
            outer_batch_size=params.outer_batch_size,
            adaptive=params.adaptive,
            outer_optimizer=params.outer_optimizer,
            outer_lr=params.outer_lr,
            seed=f"{context.seed}:{context.step}",
            record_path=Path(context.strategy_dir) / "aim" / f"{context.step}_{context.task_name}.json",
        )
        return [self.callback]

    def integrate(self, context: IntegrationContext) -> dict:
        context.write_state_from_model()
        return self.callback.summary() if self.callback is not None else {}


__all__ = [
    "AIMMerging",
    "AIMMergingParams",
    "AIMSchedule",
    "CALIBRATING",
    "MONITORING",
    "adapt_interval",
    "memory_indices",
    "merge_tensor",
    "merge_weights",
]
