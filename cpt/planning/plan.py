"""``cpt plan``: train (or reuse) every task's expert from θ0, measure the predicted conflict of
task orders and plan the order of least conflict (METHOD.md §7).

Three phases, each timed (the cost of planning is printed with the plan):

1. **experts** — each task's expert trained from θ0 exactly as a θ0-strategy run of the recipe in
   its given order trains it (same data, training arguments and seed ``recipe.seed + position``),
   through the expert cache (:mod:`cpt.study.expert_cache`): experts a study or an earlier plan
   trained are reused, and the experts this command trains are reused by later runs.
2. **geometry** — the step conflicts ``c(S, j) = mean_tensors GC(Σ_{s∈S} τ_s, τ_j)`` (METHOD §7,
   §1) that the search asks for, one pass over the target tensors per batch of requests, each
   tensor's task vectors read lazily (:class:`cpt.tensors.SafetensorsWeights`; LoRA experts as
   their factors, the subset sums as stacked factors, never dense).
3. **search** — :func:`cpt.planning.order.plan_order` (exact for T ≤ 8, greedy above).

``--write`` writes the recipe file with its ``tasks`` reordered and everything else as read.
"""

from __future__ import annotations

import gc
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from cpt.diagnostics import BATCH_BYTES, GeometrySettings
from cpt.errors import CptError
from cpt.geometry import Delta, LowRankDelta, RightBasis, compute_dtype_for, conflict_from_bases, right_basis
from cpt.planning.order import EXACT_MAX_TASKS, OrderPlan, StepRequest, plan_order

__all__ = [
    "ExpertVectors",
    "PlanResult",
    "TaskVectors",
    "measure_step_conflicts",
    "request_conflicts",
    "train_experts",
    "plan_recipe",
    "format_plan",
    "reordered_recipe_text",
    "write_reordered_recipe",
]


# ---------------------------------------------------------------------------- tensor math (one tensor)
def _subset_sums(deltas: Sequence[Delta], masks: torch.Tensor) -> Delta:
    """``Σ_{s∈S} τ_s`` for every row of ``masks`` ``[n, T]`` (0/1), batched ``[n, …]``.

    Dense deltas are summed; LoRA deltas stay low rank: the sum of ``s_t B_t A_t`` over a set is
    ``[s_1 B_1 … s_T B_T] · diag(mask) · [A_1; …; A_T]`` (METHOD §7: bases of a sum from the
    members' stacked factors), with the factors of the tasks outside the set zeroed.
    """
    dtype = compute_dtype_for(deltas[0].dtype)
    if isinstance(deltas[0], LowRankDelta):
        lora_b = torch.cat([d.lora_B.to(dtype) * float(d.scale) for d in deltas], dim=-1)  # [d_out, T·r]
        lora_a = torch.cat([d.lora_A.to(dtype) for d in deltas], dim=-2)  # [T·r, d_in]
        ranks = torch.tensor([d.lora_B.shape[-1] for d in deltas])
        column_mask = masks.to(lora_b.dtype).repeat_interleave(ranks, dim=1)  # [n, T·r]
        stacked_b = lora_b.unsqueeze(0) * column_mask.unsqueeze(1)
        return LowRankDelta(stacked_b, lora_a.unsqueeze(0).expand(len(masks), -1, -1), 1.0)
    dense = torch.stack([d.to(dtype) for d in deltas])  # [T, d_out, d_in]
    return torch.einsum("nt,tij->nij", masks.to(dense.dtype), dense)


def _singles(deltas: Sequence[Delta], tasks: Sequence[int]) -> Delta:
    dtype = compute_dtype_for(deltas[0].dtype)
    if isinstance(deltas[0], LowRankDelta):
        scales = torch.tensor([float(deltas[t].scale) for t in tasks], dtype=torch.float64)
        return LowRankDelta(
            torch.stack([deltas[t].lora_B.to(dtype) for t in tasks]),
            torch.stack([deltas[t].lora_A.to(dtype) for t in tasks]),
            scales,
        )
    return torch.stack([deltas[t].to(dtype) for t in tasks])


def _select(basis: RightBasis, index: torch.Tensor) -> RightBasis:
    return RightBasis(basis.basis[index], basis.singular_values[index], basis.ranks[index], basis.squared_norm[index])


def _chunk(count: int, bytes_per_item: int) -> int:
    return max(1, min(count, BATCH_BYTES // max(1, bytes_per_item)))


def request_conflicts(
    deltas: Sequence[Delta], requests: Sequence[StepRequest], settings: GeometrySettings = GeometrySettings()
) -> torch.Tensor:
    """``GC(Σ_{s∈S} τ_s, τ_j)`` of one tensor for every request ``(S, j)`` (METHOD §7 with §1's conflict).

    ``deltas[t]`` is task t's delta of this tensor (dense ``[d_out, d_in]`` or :class:`LowRankDelta`,
    all of one kind). Each distinct set's basis and each task's basis is computed once.
    Returns ``[len(requests)]`` float64, NaN where either side is zero.
    """
    subsets = list(dict.fromkeys(previous for previous, _ in requests))
    tasks = sorted({task for _, task in requests})
    subset_row = {subset: row for row, subset in enumerate(subsets)}
    task_row = {task: row for row, task in enumerate(tasks)}
    d_out, d_in = deltas[0].shape[-2], deltas[0].shape[-1]

    masks = torch.zeros(len(subsets), len(deltas))
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = 1.0
    if isinstance(deltas[0], LowRankDelta):  # the masked B factors; A is shared (an expanded view)
        per_sum_bytes = 4 * d_out * sum(d.lora_B.shape[-1] for d in deltas)
    else:
        per_sum_bytes = 4 * d_out * d_in
    size = _chunk(len(subsets), per_sum_bytes)
    parts = [
        right_basis(_subset_sums(deltas, masks[start : start + size]), settings.rank, settings.energy)
        for start in range(0, len(subsets), size)
    ]
    subset_bases = _concat_bases(parts)
    task_bases = right_basis(_singles(deltas, tasks), settings.rank, settings.energy)

    subset_index = torch.tensor([subset_row[previous] for previous, _ in requests])
    task_index = torch.tensor([task_row[task] for _, task in requests])
    size = _chunk(len(requests), 8 * d_in * 4 * settings.rank)
    out = []
    for start in range(0, len(requests), size):
        stop = start + size
        conflict, _ = conflict_from_bases(
            _select(subset_bases, subset_index[start:stop]),
            _select(task_bases, task_index[start:stop]),
            settings.eps,
            settings.eig_floor,
        )
        out.append(conflict)
    return torch.cat(out)


def _concat_bases(parts: list[RightBasis]) -> RightBasis:
    """Bases of several chunks as one batch (padding the rank dimension with zero columns)."""
    if len(parts) == 1:
        return parts[0]
    width = max(part.basis.shape[-1] for part in parts)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[-1]))

    return RightBasis(
        torch.cat([pad(part.basis) for part in parts]),
        torch.cat([pad(part.singular_values) for part in parts]),
        torch.cat([part.ranks for part in parts]),
        torch.cat([part.squared_norm for part in parts]),
    )


# ---------------------------------------------------------------------------- task vectors (files)
@dataclass
class ExpertVectors:
    """Where one task's expert is: a full-weights folder (read lazily) or LoRA factors (small)."""

    task: str
    folder: Path | None = None
    lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
    cache_hit: bool | None = None
    seconds: float = 0.0


class TaskVectors:
    """``τ_t = E_t − θ0`` of every target tensor, read one tensor at a time (METHOD §7)."""

    def __init__(self, base_folder: str | Path, experts: Sequence[ExpertVectors], targets: list[str]):
        from cpt.tensors import SafetensorsWeights, compile_targets, is_target

        self.base = SafetensorsWeights(base_folder)
        self.experts = list(experts)
        self._weights = [SafetensorsWeights(e.folder) if e.lora is None else None for e in self.experts]
        patterns = compile_targets(targets)
        names = [n for n in self.base.names() if len(self.base.shape(n)) == 2 and is_target(n, patterns)]
        for expert in self.experts:  # LoRA experts change only their adapted layers
            if expert.lora is not None:
                names = [n for n in names if n in expert.lora]
        if not names:
            raise CptError(f"targets: no target tensor of the base model is changed by every expert ({targets})")
        self.names = names

    def deltas(self, name: str) -> list[Delta]:
        out: list[Delta] = []
        base = None
        for expert, weights in zip(self.experts, self._weights):
            if expert.lora is not None:
                lora_b, lora_a, scale = expert.lora[name]
                out.append(LowRankDelta(lora_b.float(), lora_a.float(), scale))
            else:
                if base is None:
                    base = self.base.get(name).float()
                out.append(weights.get(name).float() - base)
        return out

    def release(self) -> None:
        self.base.release()
        for weights in self._weights:
            if weights is not None:
                weights.release()


def measure_step_conflicts(
    vectors: TaskVectors, requests: Sequence[StepRequest], settings: GeometrySettings
) -> list[float]:
    """``c(S, j) = mean_tensors GC(Σ_{s∈S} τ_s, τ_j)`` for every request (METHOD §7): one pass over the
    target tensors; the mean is over the tensors where GC is defined (both sides non-zero)."""
    totals = torch.zeros(len(requests), dtype=torch.float64)
    counts = torch.zeros(len(requests), dtype=torch.float64)
    for name in vectors.names:
        conflict = request_conflicts(vectors.deltas(name), requests, settings)
        defined = torch.isfinite(conflict)
        totals += torch.where(defined, conflict, torch.zeros_like(conflict))
        counts += defined.to(torch.float64)
    vectors.release()
    out = []
    for (previous, task), total, count in zip(requests, totals.tolist(), counts.tolist()):
        if count == 0:
            names = [vectors.experts[t].task for t in sorted(previous | {task})]
            raise CptError(
                f"conflict of {names} is undefined on every target tensor: an expert equals θ0 "
                "(did its training run any steps? check training.max_steps and the task's data)"
            )
        out.append(total / count)
    return out


# ---------------------------------------------------------------------------- experts (training)
def train_experts(recipe, cache, work_dir: Path) -> tuple[str, list[ExpertVectors]]:
    """Every task's expert from θ0, through the expert cache; returns θ0's folder and the experts.

    Each expert is trained as a θ0-strategy run of the recipe in its given order trains it
    (``cpt.runner.TaskSequenceRunner.train_task``): same data, training arguments and seed. The
    ``report_to`` trackers see the experts one after another on one step axis (:mod:`cpt.trackers`),
    as a run's tasks, rather than every expert's curve restarting at step 0.
    """
    from transformers import set_seed
    from trl import SFTConfig

    from cpt.data import build_task_data
    from cpt.models import RecipeModels
    from cpt.runner import log
    from cpt.study.expert_cache import train_or_reuse_expert, write_expert
    from cpt.tensors import is_peft_model, lora_factors, unwrap_model
    from cpt.trackers import offset_tracker_steps
    from cpt.training.trainer import CptSFTTrainer

    # The runner's loaders (model, tokenizer, LoRA config, θ0's folder) so that experts match a run's.
    models = RecipeModels(recipe)
    base = models.resolve_base()
    base_folder = models.base_folder(base)
    tokenizer = models.load_tokenizer(base)
    experts = []
    tracker_offset = 0  # optimizer steps of the experts trained so far (a cached one adds none)
    for index, task in enumerate(recipe.tasks):
        step = index + 1
        started = time.perf_counter()
        data = build_task_data(task, index, recipe.seed)
        args = SFTConfig(output_dir=str(work_dir / task.name), seed=recipe.seed + step, **recipe.training_args(task))
        set_seed(recipe.seed + step)
        trainer = CptSFTTrainer(
            model=models.load_model(base),
            args=args,
            train_dataset=data.train,
            processing_class=tokenizer,
            peft_config=models.peft_config(),
        )
        offset_tracker_steps(trainer.callback_handler.callbacks, tracker_offset)
        record: dict = {}
        train_or_reuse_expert(
            trainer,
            recipe=recipe,
            train_dataset=data.train,
            base_folder=base_folder,
            train_from="base",
            cacheable=True,
            record=record,
            label=task.name,
            cache=cache,
        )
        tracker_offset += trainer.state.global_step
        model = unwrap_model(trainer.model)
        hit = record.get("expert_cache", {}).get("hit")
        if is_peft_model(model):
            factors = {
                name: (b.detach().float().cpu().clone(), a.detach().float().cpu().clone(), scale)
                for name, (b, a, scale) in lora_factors(model).items()
            }
            expert = ExpertVectors(task.name, lora=factors, cache_hit=hit)
        elif "expert_cache" in record:
            expert = ExpertVectors(task.name, folder=cache.entry_dir(record["expert_cache"]["key"]), cache_hit=hit)
        else:  # the cache could not hold it (e.g. several processes): keep it for this plan only
            folder = work_dir / task.name / "expert"
            folder.mkdir(parents=True, exist_ok=True)
            write_expert(model, folder)
            expert = ExpertVectors(task.name, folder=folder, cache_hit=None)
        expert.seconds = time.perf_counter() - started
        source = "from the cache" if hit else "trained"
        log(f"plan: expert {step}/{len(recipe.tasks)} {task.name}: {source} ({expert.seconds:.1f} s)")
        experts.append(expert)
        del trainer, model
        gc.collect()
    return str(base_folder), experts


# ---------------------------------------------------------------------------- the command
@dataclass
class PlanResult:
    """A plan and its cost: the order (task names), the step conflicts and the wall seconds of each phase."""

    tasks: list[str]
    plan: OrderPlan
    seconds: dict[str, float] = field(default_factory=dict)
    experts: list[ExpertVectors] = field(default_factory=list)

    @property
    def planned_tasks(self) -> list[str]:
        return [self.tasks[index] for index in self.plan.order]


def plan_recipe(recipe, *, cache=None, exact_max_tasks: int = EXACT_MAX_TASKS, work_dir: Path | None = None):
    """Plan ``recipe``'s task order (METHOD §7); returns a :class:`PlanResult`.

    Args:
        recipe: a validated :class:`cpt.recipe.Recipe` (its strategy is irrelevant: experts come from θ0).
        cache: the :class:`cpt.study.expert_cache.ExpertCache` (default: ``ExpertCache()``).
        exact_max_tasks: plan exactly up to this many tasks, greedily above (METHOD §7: 8).
        work_dir: where trainers write their scratch output (default: a temporary folder).
    """
    from cpt.study.expert_cache import ExpertCache

    if cache is None:
        cache = ExpertCache()
    settings = GeometrySettings(
        recipe.geometry.rank, recipe.geometry.energy, recipe.geometry.eps, recipe.geometry.eig_floor
    )
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cpt-plan-") as scratch:
        started = time.perf_counter()
        base_folder, experts = train_experts(recipe, cache, Path(work_dir or scratch))
        seconds["experts"] = time.perf_counter() - started

        vectors = TaskVectors(base_folder, experts, recipe.targets)
        geometry_seconds = [0.0]

        def measure(requests):
            started = time.perf_counter()
            values = measure_step_conflicts(vectors, requests, settings)
            geometry_seconds[0] += time.perf_counter() - started
            return values

        started = time.perf_counter()
        plan = plan_order(len(recipe.tasks), measure, exact_max_tasks=exact_max_tasks)
        seconds["geometry"] = geometry_seconds[0]
        seconds["search"] = time.perf_counter() - started - geometry_seconds[0]
    seconds["total"] = seconds["experts"] + seconds["geometry"] + seconds["search"]
    return PlanResult([task.name for task in recipe.tasks], plan, seconds, experts)


def format_plan(result: PlanResult, num_tensors: int | None = None) -> str:
    """The plan as the command prints it: planned order with its step conflicts, the given order's, the cost."""
    plan = result.plan
    names = result.tasks
    width = max(len(name) for name in names)
    lines = [f"planned order ({plan.method}, {plan.measured} step conflicts measured; METHOD §7):"]

    def steps(order: list[int], conflicts: list[float]) -> list[str]:
        rows = [f"  1. {names[order[0]]:<{width}}  (first task: no conflict)"]
        for position, (task, value) in enumerate(zip(order[1:], conflicts), start=2):
            rows.append(f"  {position}. {names[task]:<{width}}  conflict {value:.4f}")
        return rows

    lines += steps(plan.order, plan.step_conflicts)
    lines.append(f"  predicted conflict C = {plan.cost:.4f}")
    given = list(range(len(names)))
    lines.append("given order:")
    lines += steps(given, plan.given_step_conflicts)
    lines.append(f"  predicted conflict C = {plan.given_cost:.4f}")
    if plan.order == given:
        lines.append("the given order is already the planned one")
    else:
        relative = plan.improvement / plan.given_cost if plan.given_cost > 0 else math.nan
        lines.append(f"planned order: {plan.improvement:.4f} less conflict than the given one ({relative:.1%})")
    seconds = result.seconds
    hits = sum(1 for expert in result.experts if expert.cache_hit)
    lines.append(
        f"cost of planning: {seconds['total']:.1f} s — experts {seconds['experts']:.1f} s "
        f"({hits}/{len(result.experts)} from the cache), geometry {seconds['geometry']:.1f} s, "
        f"search {seconds['search']:.3f} s"
    )
    return "\n".join(lines)


def reordered_recipe_text(recipe_path: str | Path, order: Sequence[int]) -> str:
    """The recipe file's YAML with ``tasks`` in ``order`` (indices into the file's task list).

    Everything else is kept as read (values, key order); comments and anchors are not (PyYAML).
    """
    from cpt.recipe import _yaml_load

    data = _yaml_load(Path(recipe_path).read_text(encoding="utf-8"))
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if not isinstance(tasks, list) or sorted(order) != list(range(len(tasks))):
        raise CptError(f"{recipe_path}: its tasks list does not match the planned order; plan the file as it is now")
    data["tasks"] = [tasks[index] for index in order]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def write_reordered_recipe(recipe_path: str | Path, order: Sequence[int], output: str | Path, header: str = "") -> Path:
    """Write :func:`reordered_recipe_text` atomically to ``output``."""
    from cpt.io import atomic_write_text

    text = reordered_recipe_text(recipe_path, order)
    output = Path(output)
    atomic_write_text(output, (header + text) if header else text)
    return output
