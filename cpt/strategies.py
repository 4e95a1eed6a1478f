"""The strategy registry: how an expert is integrated into the model state.

A strategy is one small unit: a parameters dataclass (the names recipes and ``--set``
use) and an integrator with one entry point, ``integrate(context)``. Strategies register
themselves by name with :func:`register_strategy`; the recipe's ``strategy:`` picks one.

Adding a strategy::

    @dataclass
    class MyParams:
        scale: float = 0.5      # documented here, validated from the recipe

    @register_strategy("my_method", params=MyParams, train_from="base",
                       description="one line for `cpt strategies`")
    class MyMethod:
        def __init__(self, params: MyParams): ...
        def integrate(self, context: IntegrationContext) -> dict: ...   # returns stats
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import TypeAdapter, ValidationError

from cpt.errors import CptError

if TYPE_CHECKING:  # pragma: no cover
    pass


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    params_class: type
    integrator_class: type
    train_from: Literal["state", "base"]
    #: True when the integrated state is exactly the expert (no reload needed to evaluate it).
    state_is_expert: bool
    description: str

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
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"]) or "parameters"  # a dataclass-level check has no field
            raise CptError(f"{where}: {error['msg'].removeprefix('Value error, ')} (strategy {self.name!r})") from None

    def build(self, values: dict[str, Any]) -> Any:
        return self.integrator_class(self.make_params(values))


_REGISTRY: dict[str, StrategyInfo] = {}


def register_strategy(
    name: str,
    *,
    params: type,
    train_from: Literal["state", "base"],
    description: str,
    state_is_expert: bool = False,
) -> Callable[[type], type]:
    def decorate(integrator_class: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} is registered twice")
        _REGISTRY[name] = StrategyInfo(name, params, integrator_class, train_from, state_is_expert, description)
        return integrator_class

    return decorate


def _load_builtin_strategies() -> None:
    # Importing the modules runs their @register_strategy decorators.
    import cpt.merging.average  # noqa: F401
    import cpt.merging.gcwm  # noqa: F401
    import cpt.merging.magmax  # noqa: F401
    import cpt.merging.nufilt  # noqa: F401
    import cpt.merging.opcm  # noqa: F401
    import cpt.merging.task_arithmetic  # noqa: F401
    import cpt.merging.ties  # noqa: F401
    import cpt.merging.wudi  # noqa: F401
    import cpt.training.ewc  # noqa: F401
    import cpt.training.replay  # noqa: F401
    import cpt.training.sequential  # noqa: F401


def known_strategies() -> dict[str, StrategyInfo]:
    _load_builtin_strategies()
    return dict(sorted(_REGISTRY.items()))


def get_strategy(name: str) -> StrategyInfo:
    strategies = known_strategies()
    if name not in strategies:
        raise CptError(f"unknown strategy {name!r}; known strategies: {', '.join(strategies)}")
    return strategies[name]
