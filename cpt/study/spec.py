"""The study file: one base recipe, variants (strategy + parameters, list values are grids), seeds.

Example (``studies/quickstart.yaml``)::

    recipe: recipes/quickstart.yaml      # the base recipe (path relative to the current folder)
    name: quickstart-study               # default: the study file's name
    output_dir: runs/studies             # the study folder is <output_dir>/<name>
    seeds: [0, 1, 2]
    set: ["training.max_steps=20"]       # optional overrides of the base recipe (as `cpt run --set`)
    variants:
      - sequential                       # shorthand for {strategy: sequential}
      - strategy: gcwm
        step_coef: [0.2, 0.5]            # a list is a grid: two variants
      - {strategy: ties, name: ties-k20, density: 0.2}
    statistics: {resamples: 2000, confidence: 0.95, seed: 0}
    keep_weights: false                  # the default: a finished run's weights are removed (see below)

Variant names are deterministic: ``name`` (default: the strategy) followed by
``-<param><value>`` for every grid parameter, in the order written, e.g.
``gcwm-step_coef0.2``. Every run's recipe is the base recipe with ``name``
``<variant>-seed<s>``, ``output_dir`` ``<study folder>/runs``, ``seed`` ``s`` and
``strategy`` the variant's.

**Task order.** A variant may train the recipe's tasks in another order (the ordering
study of METHOD §7, ``studies/ordering.yaml``)::

    variants:
      - {strategy: sequential, order: planned}          # → sequential-order_planned
      - {strategy: sequential, orders: [planned, reverse_planned, "random:1"]}   # a grid over orders
      - {strategy: task_arithmetic, order: [c, a, b]}   # one explicit order → task_arithmetic-order_c.a.b

``order`` is one of

* ``given`` (the default): the recipe's order; the variant's name has no order suffix;
* ``planned``: the order of least predicted conflict (``cpt plan``, METHOD §7), planned once
  per (study, seed) from the seed's experts trained from θ0 (through the expert cache) and
  recorded in ``<study folder>/plan-seed<s>.json``;
* ``reverse_planned``: that order reversed;
* ``random:<k>``: a fixed permutation for the integer ``k``: the tasks sorted by the SHA-256
  of ``"<k>:<task name>"`` (so it depends on ``k`` and the task names only, neither on the
  seed, nor on the order the recipe lists the tasks, nor on a library's random generator);
* a list of task names: that order (a permutation of the recipe's tasks).

A list value of ``order`` is *one* order, never a grid; ``orders: [...]`` (a list of such
values) is the grid over orders. Every other parameter's list is a grid as above. The order
suffix comes last in the name: ``-order_<value>`` (``planned``, ``reverse_planned``,
``random_<k>``, or the task names joined by ``.``).

**Weights.** A study answers which variant is better; its runs' results are their manifests,
``eval/``, ``geometry/``, ``integration/`` and ``plots/``. Their weights — ``state/`` (one
model), ``history/`` (GCWM's merge memory), ``strategy/`` (e.g. EWC's Fisher) — are only
needed while a run is running, so once a run is finished a study removes them (and records
``weights_removed`` in its manifest): 63 runs of SmolLM2-135M would keep 33 GB otherwise.
``keep_weights: true`` keeps them; the weights of any one variant are one ``cpt run`` of its
recipe (``runs/<variant>-seed<s>/recipe.yaml``) away, with its experts from the cache.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from cpt.errors import CptError
from cpt.recipe import Recipe, _yaml_load, apply_overrides, validate_recipe

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


class VariantSpec(BaseModel):
    """A strategy name, an optional name, and parameters given flat (a list value is a grid)."""

    model_config = ConfigDict(extra="allow")
    strategy: str
    name: str | None = None
    train_from: str | None = None
    order: Any = Field(None, description="the task order: given, planned, reverse_planned, random:<k> or task names")
    orders: Any = Field(None, description="a grid over orders: a list of `order` values")

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StatisticsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    resamples: int = Field(2000, gt=0, description="bootstrap resamples B (METHOD §6)")
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(0, description="seeds the resampling, so a summary is reproducible")


class StudySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: str = Field(description="path of the base recipe YAML")
    name: str | None = None
    output_dir: str | None = Field(None, description="default: the base recipe's output_dir + '/studies'")
    seeds: list[int] = Field([0, 1, 2], min_length=1)
    set: list[str] = Field([], description="overrides of the base recipe, KEY=VALUE as `cpt run --set`")
    variants: list[VariantSpec] = Field(min_length=1)
    statistics: StatisticsSpec = StatisticsSpec()
    keep_weights: bool = Field(
        False,
        description="keep every finished run's weights (state/, history/, strategy/); by default a study keeps "
        "what its summary and `cpt report` read (manifest, eval/, geometry/, integration/, plots/) and removes "
        "the weights once a run is finished — a study of many runs would otherwise keep one model per run",
    )

    @field_validator("variants", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"strategy": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds {seeds} repeat a seed; give each seed once")
        return seeds


#: The named task orders (module docstring); ``random:<k>`` and lists of task names are the others.
ORDER_KEYWORDS = ("given", "planned", "reverse_planned")
_RANDOM_ORDER = re.compile(r"random:(-?\d+)")

#: A normalised order: a keyword, ``"random:<k>"``, or a tuple of task names.
Order = str | tuple[str, ...]


def parse_order(value: Any, task_names: list[str], where: str) -> Order:
    """Check one ``order`` value against the recipe's ``task_names``; a one-line :class:`CptError` names ``where``."""
    if isinstance(value, str):
        if value in ORDER_KEYWORDS:
            return value
        match = _RANDOM_ORDER.fullmatch(value.strip())
        if match:
            return f"random:{int(match.group(1))}"
        close = difflib.get_close_matches(value, [*ORDER_KEYWORDS, "random:1"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CptError(
            f"{where}: {value!r} is not a task order{hint}; use given, planned, reverse_planned, random:<k> "
            "or a list of the recipe's task names"
        )
    if isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        unknown = [name for name in value if name not in task_names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], task_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CptError(
                f"{where}: {unknown[0]!r} is not a task of the recipe{hint}; its tasks: {', '.join(task_names)}"
            )
        repeated = sorted({name for name in value if value.count(name) > 1})
        missing = [name for name in task_names if name not in value]
        if repeated or missing:
            problem = f"repeats {', '.join(repeated)}" if repeated else f"leaves out {', '.join(missing)}"
            raise CptError(f"{where}: the order {list(value)} {problem}; list every task of the recipe once")
        return tuple(value)
    raise CptError(
        f"{where}: {value!r} is not a task order; use given, planned, reverse_planned, random:<k> or a list of task names"
    )


def order_suffix(order: Order) -> str:
    """The variant-name suffix of an order: empty for ``given`` (module docstring)."""
    if order == "given":
        return ""
    text = ".".join(order) if isinstance(order, tuple) else order
    return f"-order_{_value_text(text)}"


def random_order(task_names: list[str], key: int) -> list[str]:
    """``random:<key>``: the tasks sorted by SHA-256 of ``"<key>:<name>"`` (stable across versions and platforms)."""
    return sorted(task_names, key=lambda name: (hashlib.sha256(f"{key}:{name}".encode()).hexdigest(), name))


class Variant:
    """One expanded variant: a name, a strategy, scalar parameters and the task order."""

    def __init__(
        self,
        name: str,
        strategy: str,
        params: dict[str, Any],
        train_from: str | None = None,
        order: Order = "given",
    ):
        self.name, self.strategy, self.params, self.train_from = name, strategy, params, train_from
        self.order = order

    @property
    def needs_plan(self) -> bool:
        """Whether the variant's order comes from the planner (METHOD §7)."""
        return self.order in ("planned", "reverse_planned")

    @property
    def order_text(self) -> str | list[str]:
        """The order as written in a summary: the keyword, ``random:<k>``, or the list of names."""
        return list(self.order) if isinstance(self.order, tuple) else self.order

    def strategy_section(self) -> dict[str, Any]:
        section = {"name": self.strategy, **self.params}
        if self.train_from is not None:
            section["train_from"] = self.train_from
        return section

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Variant({self.name!r}, {self.strategy!r}, {self.params!r})"


def _value_text(value: Any) -> str:
    return _SLUG.sub("_", str(value).lower() if isinstance(value, bool) else str(value)).strip("_")


def _variant_orders(spec: VariantSpec, task_names: list[str] | None) -> list[Order]:
    """The orders of one variant spec: ``order`` (one), ``orders`` (a grid) or ``given``."""
    where = f"variants: {spec.name or spec.strategy}"
    if spec.order is not None and spec.orders is not None:
        raise CptError(f"{where}: give either order (one order) or orders (a grid over orders), not both")
    if spec.orders is not None and (not isinstance(spec.orders, list) or not spec.orders):
        raise CptError(f"{where}.orders: give a non-empty list of orders (e.g. [planned, reverse_planned, 'random:1'])")
    values = spec.orders if spec.orders is not None else ["given" if spec.order is None else spec.order]
    if task_names is None:  # no recipe to check names against (a spec expanded on its own)
        task_names = sorted({name for value in values if isinstance(value, list) for name in value})
    field = "orders" if spec.orders is not None else "order"
    orders = [parse_order(value, task_names, f"{where}.{field}") for value in values]
    if len(set(orders)) != len(orders):
        raise CptError(f"{where}.orders: an order is listed twice; give each order once")
    return orders


def expand_variants(specs: list[VariantSpec], task_names: list[str] | None = None) -> list[Variant]:
    """Grid expansion (module docstring); names must come out unique.

    ``task_names``: the base recipe's tasks, which explicit orders are checked against.
    """
    variants: list[Variant] = []
    for spec in specs:
        params = spec.params
        grid = [key for key, value in params.items() if isinstance(value, list)]
        for key in grid:
            if not params[key]:
                raise CptError(f"variants: {spec.strategy}.{key} is an empty list; give at least one value")
        orders = _variant_orders(spec, task_names)
        for values in itertools.product(*(params[key] for key in grid)):
            chosen = {**params, **dict(zip(grid, values))}
            name = spec.name or spec.strategy
            name += "".join(f"-{key}{_value_text(value)}" for key, value in zip(grid, values))
            for order in orders:
                variants.append(
                    Variant(_SLUG.sub("_", name + order_suffix(order)), spec.strategy, chosen, spec.train_from, order)
                )
    names = [variant.name for variant in variants]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise CptError(
            f"variants: the name(s) {', '.join(duplicates)} come out twice; give those variants distinct 'name's"
        )
    return variants


class Study:
    """A validated study: the spec, its expanded variants, the base recipe data and its folder."""

    def __init__(self, spec: StudySpec, source: Path, base_recipe: dict[str, Any], variants: list[Variant]):
        self.spec, self.source, self.base_recipe, self.variants = spec, source, base_recipe, variants
        self.plans: dict[int, dict[str, Any]] = {}
        """The planned order of each seed (``cpt.study.run.plan_seed`` fills it): ``{"planned": [...], ...}``."""
        self.name = spec.name or source.stem
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise CptError(f"{source}: name {self.name!r} must be letters, digits, '_', '-' or '.'")
        output = spec.output_dir or str(Path(base_recipe.get("output_dir", "runs")) / "studies")
        self.root = Path(output) / self.name

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def run_name(self, variant: Variant, seed: int) -> str:
        return f"{variant.name}-seed{seed}"

    @property
    def task_names(self) -> list[str]:
        """The base recipe's tasks in its (given) order."""
        return [task["name"] for task in self.base_recipe["tasks"]]

    @property
    def needs_plans(self) -> bool:
        return any(variant.needs_plan for variant in self.variants)

    def plan_path(self, seed: int) -> Path:
        return self.root / f"plan-seed{seed}.json"

    def task_order(self, variant: Variant, seed: int) -> list[str]:
        """The task names in the order ``variant``'s run of ``seed`` trains them (module docstring)."""
        order = variant.order
        if isinstance(order, tuple):
            return list(order)
        if order == "given":
            return self.task_names
        if order.startswith("random:"):
            return random_order(self.task_names, int(order.split(":", 1)[1]))
        if seed not in self.plans:
            raise CptError(
                f"variant {variant.name}: the planned order of seed {seed} is not known yet; "
                "`cpt study` plans it before the seed's runs"
            )
        planned = list(self.plans[seed]["planned"])
        return planned if order == "planned" else planned[::-1]

    def same_order_groups(self, seed: int) -> list[list[str]]:
        """Variants that differ only in their order yet train the same task order on ``seed`` (known orders only):
        lists of two or more variant names, at least one of them with an order other than ``given``."""
        groups: dict[tuple, list[Variant]] = {}
        for variant in self.variants:
            if variant.needs_plan and seed not in self.plans:
                continue
            setting = (variant.strategy, repr(sorted(variant.params.items())), variant.train_from)
            groups.setdefault((setting, tuple(self.task_order(variant, seed))), []).append(variant)
        return [
            [variant.name for variant in group]
            for group in groups.values()
            if len(group) > 1 and any(variant.order != "given" for variant in group)
        ]

    def check_distinct_orders(self) -> None:
        """Refuse variants whose fixed orders (given, ``random:<k>``, lists) coincide: they would run the same runs."""
        seed = self.spec.seeds[0]
        by_name = {variant.name: variant for variant in self.variants}
        for names in self.same_order_groups(seed):
            order = " → ".join(self.task_order(by_name[names[0]], seed))
            raise CptError(
                f"{self.source}: variants: {', '.join(names)} train the tasks in the same order ({order}); "
                "give one of them another random:<k> or order"
            )

    def recipe_for(self, variant: Variant, seed: int, *, order: list[str] | None = None) -> Recipe:
        """The run recipe of (variant, seed); ``order`` overrides the variant's task order (validation uses it)."""
        data = copy.deepcopy(self.base_recipe)
        data.update(
            name=self.run_name(variant, seed),
            output_dir=str(self.runs_dir),
            seed=seed,
            strategy=variant.strategy_section(),
        )
        by_name = {task["name"]: task for task in data["tasks"]}
        data["tasks"] = [by_name[name] for name in (order or self.task_order(variant, seed))]
        try:
            return validate_recipe(data, source=f"{self.source} (variant {variant.name}, seed {seed})")
        except CptError as exc:
            raise CptError(str(exc)) from None


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read and validate a study file and its base recipe; every problem is a one-line CptError."""
    from cpt.recipe import format_validation_error

    path = Path(path)
    if not path.is_file():
        raise CptError(f"study file {str(path)!r} not found; pass the path of a study YAML (see README, 'Studies')")
    try:
        data = _yaml_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - YAML errors of any kind become one line
        raise CptError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CptError(f"{path}: a study is a YAML mapping with keys recipe, seeds, variants")
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        message = format_validation_error(exc)  # names the field path; the accepted keys are StudySpec's
        error = exc.errors()[0]
        if error["type"] == "extra_forbidden":  # name the keys the owning section accepts (not the recipe's)
            owner = StatisticsSpec if error["loc"][0] == "statistics" else StudySpec
            message = (
                f"{'.'.join(str(p) for p in error['loc'])}: unknown key; accepted keys: {', '.join(owner.model_fields)}"
            )
        raise CptError(f"{path}: {message}") from None
    recipe_path = Path(spec.recipe)
    if not recipe_path.is_file():
        raise CptError(f"{path}: recipe {spec.recipe!r} not found (paths are relative to the current folder)")
    try:
        base = _yaml_load(recipe_path.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise CptError(f"{recipe_path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(base, dict):
        raise CptError(f"{recipe_path}: a recipe is a YAML mapping")
    base = apply_overrides(base, [*spec.set, *(overrides or [])])
    task_names = [
        task.name for task in validate_recipe({**copy.deepcopy(base), "name": "base"}, source=str(recipe_path)).tasks
    ]
    variants = expand_variants(spec.variants, task_names)
    study = Study(spec, path, base, variants)
    for variant in variants:  # validate every variant's recipe now, not after hours of other runs
        # (a planned order is known only once the seed's experts exist; the task set is what matters here)
        study.recipe_for(variant, spec.seeds[0], order=task_names if variant.needs_plan else None)
    study.check_distinct_orders()
    return study
