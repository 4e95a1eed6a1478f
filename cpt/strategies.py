"""The strategy contract and registry: how an expert is integrated into the model state.

A strategy is one small module: a parameters dataclass (the names recipes and ``--set``
use) and a subclass of :class:`Strategy` registered by name with
:func:`register_strategy`; the recipe's ``strategy:`` picks one. Built-in and third-party
strategies are found the same way, through the ``cpt.strategies`` entry-point group
(``pyproject.toml``)::

    [project.entry-points."cpt.strategies"]
    my_method = "my_package.my_module:MyMethod"

A strategy module::

    @dataclass
    class MyParams:
        scale: float = 0.5      # documented here, validated from the recipe (pydantic)

    @register_strategy("my_method", params=MyParams, train_from="base",
                       description="one line for `cpt strategies`")
    class MyMethod(Strategy):           # or MergeStrategy: a per-tensor-batch rule
        def integrate(self, context: IntegrationContext) -> dict: ...   # returns stats

Parameter checks live in the dataclass's type annotations (``Annotated[float, Field(gt=0)]``,
``Literal[...]``): :meth:`StrategyInfo.make_params` validates them with pydantic, so every
strategy's bad values read the same way (``field: message (strategy 'name')``).
"""

from __future__ import annotations

import abc
import dataclasses
import difflib
import functools
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import TypeAdapter, ValidationError

from cpt.errors import CptError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import TrainerCallback

    from cpt.integration import IntegrationContext, TaskContext

#: The entry-point group built-in and third-party strategies are found through.
ENTRY_POINT_GROUP = "cpt.strategies"
TRAIN_FROM = ("state", "base")

logger = logging.getLogger(__name__)


class Strategy(abc.ABC):
    """The contract of an integration strategy: one method to implement, two hooks to override.

    The class attributes are set by :func:`register_strategy`; they describe the class, not
    an instance, so whoever holds an instance reads them from ``type(strategy)``.

    Hooks, called by the runner for each task t in this order:

    1. :meth:`prepare_train_dataset` — the examples task t trains on (default: its own);
    2. :meth:`training_callbacks` — extra callbacks for task t's trainer (default: none);
       a callback with ``loss_term(model)`` adds that term to the loss
       (:class:`cpt.training.trainer.CptSFTTrainer`);
    3. :meth:`integrate` — after training: write θ_t from the expert E_t (required).

    Args:
        params: an instance of :attr:`params_class` (built from recipe values by
            :meth:`StrategyInfo.make_params`).
    """

    #: The registered name (the recipe's ``strategy:``).
    name: ClassVar[str]
    #: The parameters dataclass.
    params_class: ClassVar[type]
    #: What experts train from: ``state`` (θ_{t−1}) or ``base`` (θ0); a recipe may override it.
    train_from: ClassVar[Literal["state", "base"]]
    #: True when the integrated state is exactly the expert (no reload needed to evaluate it).
    state_is_expert: ClassVar[bool] = False
    #: One line for ``cpt strategies``.
    description: ClassVar[str] = ""

    def __init__(self, params: Any):
        self.params = params

    def prepare_train_dataset(self, context: TaskContext) -> Any:
        """The ``datasets.Dataset`` task t trains on; default: the task's own examples."""
        return context.train_dataset

    def training_callbacks(self, context: TaskContext) -> list[TrainerCallback]:
        """Extra ``TrainerCallback`` instances for task t's trainer; default: none."""
        return []

    @abc.abstractmethod
    def integrate(self, context: IntegrationContext) -> dict:
        """Write θ_t to ``context.state_dir`` (atomically) and return statistics for the run record."""


@dataclass(frozen=True)
class StrategyInfo:
    """What the registry knows of a strategy (all read from its class)."""

    name: str
    params_class: type
    strategy_class: type[Strategy]
    train_from: Literal["state", "base"]
    #: True when the integrated state is exactly the expert (no reload needed to evaluate it).
    state_is_expert: bool
    description: str

    @classmethod
    def of(cls, strategy_class: type[Strategy]) -> StrategyInfo:
        return cls(
            strategy_class.name,
            strategy_class.params_class,
            strategy_class,
            strategy_class.train_from,
            strategy_class.state_is_expert,
            strategy_class.description,
        )

    @property
    def integrator_class(self) -> type[Strategy]:
        """Former name of :attr:`strategy_class`."""
        return self.strategy_class

    def make_params(self, values: dict[str, Any]) -> Any:
        """Build the parameters dataclass from recipe values; bad keys/values → CptError."""
        fields = {field.name: field for field in dataclasses.fields(self.params_class)}
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                accepted = ", ".join(fields) or "none"
                raise CptError(f"{key}: unknown parameter of strategy {self.name!r}{hint}; accepted: {accepted}")
        try:
            return TypeAdapter(self.params_class).validate_python(values)
        except ValidationError as exc:
            from cpt.recipe import format_validation_error

            # "<parameter>: problem"; "parameters: ..." for a rule across parameters (no field)
            raise CptError(f"{format_validation_error(exc, where='parameters')} (strategy {self.name!r})") from None

    def build(self, values: dict[str, Any]) -> Strategy:
        return self.strategy_class(self.make_params(values))


#: Strategies registered in this process (by importing their module), by name.
_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(
    name: str,
    *,
    params: type,
    train_from: Literal["state", "base"],
    description: str,
    state_is_expert: bool = False,
) -> Callable[[type], type]:
    """Class decorator: set the strategy's class attributes and register it under ``name``.

    A strategy in a script or test is usable once its module ran; a strategy in a package is
    found through its ``cpt.strategies`` entry point (named ``name``) without importing it first.
    """
    if train_from not in TRAIN_FROM:
        raise ValueError(f"strategy {name!r}: train_from must be 'state' or 'base', not {train_from!r}")
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"strategy {name!r}: params must be a dataclass, not {params!r}")

    def decorate(strategy_class: type) -> type:
        if not (isinstance(strategy_class, type) and issubclass(strategy_class, Strategy)):
            raise TypeError(
                f"strategy {name!r}: {getattr(strategy_class, '__qualname__', repr(strategy_class))} must subclass "
                "cpt.strategies.Strategy (or cpt.merging.contract.MergeStrategy for a per-tensor merge rule)"
            )
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified_name(existing.strategy_class) != _qualified_name(strategy_class):
            raise ValueError(
                f"strategy {name!r} is registered twice: {_qualified_name(existing.strategy_class)} "
                f"and {_qualified_name(strategy_class)}"
            )
        strategy_class.name = name
        strategy_class.params_class = params
        strategy_class.train_from = train_from
        strategy_class.state_is_expert = state_is_expert
        strategy_class.description = description
        _REGISTRY[name] = StrategyInfo.of(strategy_class)
        return strategy_class

    return decorate


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


# ---------------------------------------------------------------------- discovery
@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The ``cpt.strategies`` entry points by name: installed packages' plus, in a source
    checkout of cpt, the checkout's own ``pyproject.toml`` (so running from a checkout
    that was never installed, or installed before a strategy was added, sees its built-ins)."""
    found: dict[str, importlib.metadata.EntryPoint] = {}
    checkout = _checkout_entry_points()
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry_point, "dist", None)
        if checkout is not None and dist is not None and dist.metadata["Name"] == "cpt":
            continue  # the checkout's pyproject.toml is the newer list of cpt's own
        other = found.get(entry_point.name)
        if other is not None and other.value != entry_point.value:
            raise CptError(
                f"strategy {entry_point.name!r} has two entry points ({other.value} and "
                f"{entry_point.value}); uninstall one of the packages providing it"
            )
        found[entry_point.name] = entry_point
    for entry_point in (checkout or {}).values():
        other = found.get(entry_point.name)
        if other is not None and other.value != entry_point.value:
            raise CptError(
                f"strategy {entry_point.name!r} is built into cpt; a package also provides it "
                f"({other.value}): rename that entry point"
            )
        found[entry_point.name] = entry_point
    return found


def _checkout_entry_points() -> dict[str, importlib.metadata.EntryPoint] | None:
    """cpt's ``cpt.strategies`` entry points from ``pyproject.toml`` beside the package, if any."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10: an installed cpt's metadata is then the only source
        return None
    project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {})
    if project.get("name") != "cpt":
        return None
    table = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    return {name: importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in table.items()}


def _load(entry_point: importlib.metadata.EntryPoint) -> StrategyInfo:
    """Import an entry point's strategy; CptError when it is not the strategy it is named for."""
    loaded = entry_point.load()
    if not (isinstance(loaded, type) and issubclass(loaded, Strategy)) or "name" not in vars(loaded):
        raise CptError(
            f"entry point {entry_point.name} = {entry_point.value!r} of group {ENTRY_POINT_GROUP!r} "
            "is not a strategy class registered with @register_strategy"
        )
    if loaded.name != entry_point.name:
        raise CptError(
            f"entry point {entry_point.name} = {entry_point.value!r} of group {ENTRY_POINT_GROUP!r} "
            f"loads the strategy registered as {loaded.name!r}; name the entry point {loaded.name!r}"
        )
    return _REGISTRY.setdefault(entry_point.name, StrategyInfo.of(loaded))


def strategy_names() -> list[str]:
    """Every strategy name (entry points and in-process registrations), without importing any."""
    return sorted({*_entry_points(), *_REGISTRY})


def known_strategies() -> dict[str, StrategyInfo]:
    """Every strategy, by name, imported. An entry point that fails to import is skipped with
    a one-line warning (``get_strategy`` of that name then raises the cause)."""
    strategies = dict(_REGISTRY)
    for name, entry_point in _entry_points().items():
        if name in strategies:
            continue
        try:
            strategies[name] = _load(entry_point)
        except CptError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken third-party package must not break cpt
            logger.warning(
                "cpt: skipping strategy %r (entry point %s): %s: %s",
                name,
                entry_point.value,
                type(exc).__name__,
                " ".join(str(exc).split()),
            )
    return dict(sorted(strategies.items()))


def get_strategy(name: str) -> StrategyInfo:
    """The strategy registered as ``name`` (imports only its module); unknown → CptError."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    entry_point = _entry_points().get(name)
    if entry_point is None:
        names = strategy_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CptError(f"unknown strategy {name!r}{hint}; known strategies: {', '.join(names)}")
    try:
        return _load(entry_point)
    except CptError:
        raise
    except Exception as exc:
        raise CptError(
            f"strategy {name!r}: cannot import {entry_point.value} ({type(exc).__name__}: {' '.join(str(exc).split())})"
        ) from exc
