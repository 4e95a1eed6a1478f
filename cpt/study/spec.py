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

Variant names are deterministic: ``name`` (default: the strategy) followed by
``-<param><value>`` for every grid parameter, in the order written, e.g.
``gcwm-step_coef0.2``. Every run's recipe is the base recipe with ``name``
``<variant>-seed<s>``, ``output_dir`` ``<study folder>/runs``, ``seed`` ``s`` and
``strategy`` the variant's.
"""

from __future__ import annotations

import copy
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


class Variant:
    """One expanded variant: a name, a strategy and scalar parameters."""

    def __init__(self, name: str, strategy: str, params: dict[str, Any], train_from: str | None = None):
        self.name, self.strategy, self.params, self.train_from = name, strategy, params, train_from

    def strategy_section(self) -> dict[str, Any]:
        section = {"name": self.strategy, **self.params}
        if self.train_from is not None:
            section["train_from"] = self.train_from
        return section

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Variant({self.name!r}, {self.strategy!r}, {self.params!r})"


def _value_text(value: Any) -> str:
    return _SLUG.sub("_", str(value).lower() if isinstance(value, bool) else str(value)).strip("_")


def expand_variants(specs: list[VariantSpec]) -> list[Variant]:
    """Grid expansion (module docstring); names must come out unique."""
    variants: list[Variant] = []
    for spec in specs:
        params = spec.params
        grid = [key for key, value in params.items() if isinstance(value, list)]
        for key in grid:
            if not params[key]:
                raise CptError(f"variants: {spec.strategy}.{key} is an empty list; give at least one value")
        for values in itertools.product(*(params[key] for key in grid)):
            chosen = {**params, **dict(zip(grid, values))}
            name = spec.name or spec.strategy
            name += "".join(f"-{key}{_value_text(value)}" for key, value in zip(grid, values))
            variants.append(Variant(_SLUG.sub("_", name), spec.strategy, chosen, spec.train_from))
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

    def recipe_for(self, variant: Variant, seed: int) -> Recipe:
        data = copy.deepcopy(self.base_recipe)
        data.update(
            name=self.run_name(variant, seed),
            output_dir=str(self.runs_dir),
            seed=seed,
            strategy=variant.strategy_section(),
        )
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
    variants = expand_variants(spec.variants)
    study = Study(spec, path, base, variants)
    for variant in variants:  # validate every variant's recipe now, not after hours of other runs
        study.recipe_for(variant, spec.seeds[0])
    return study
