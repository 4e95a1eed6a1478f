"""The strategy contract and its discovery: class attributes, default hooks, entry points (built-in and third-party)."""

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import tomllib
import torch
from merge_steps import perturbed
from safetensors.torch import load_file

import cpt.strategies as strategies
from cpt.errors import CptError
from cpt.integration import TaskContext
from cpt.merging.contract import MergeStrategy
from cpt.strategies import ENTRY_POINT_GROUP, Strategy, StrategyInfo, get_strategy, known_strategies, register_strategy
from cpt.testing import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class NoParams:
    pass


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test stay in the test."""
    known_strategies()  # the built-ins' modules register in the real registry first
    monkeypatch.setattr(strategies, "_REGISTRY", dict(strategies._REGISTRY))


def test_decorator_sets_the_class_attributes_and_registers(scratch_registry):
    @register_strategy(
        "keep_state_test", params=NoParams, train_from="base", description="keeps θ_{t-1}", state_is_expert=False
    )
    class KeepState(Strategy):
        def integrate(self, context):
            return {}

    assert (KeepState.name, KeepState.params_class, KeepState.train_from) == ("keep_state_test", NoParams, "base")
    assert KeepState.state_is_expert is False and KeepState.description == "keeps θ_{t-1}"
    info = get_strategy("keep_state_test")
    assert info == StrategyInfo("keep_state_test", NoParams, KeepState, "base", False, "keeps θ_{t-1}")
    assert info.integrator_class is KeepState  # the former name still reads
    assert "keep_state_test" in known_strategies()
    built = info.build({})
    assert isinstance(built, KeepState) and built.params == NoParams()


def test_decorator_refuses_a_class_outside_the_contract(scratch_registry):
    with pytest.raises(TypeError, match=r"<locals>.Loose must subclass cpt\.strategies\.Strategy"):

        @register_strategy("loose_test", params=NoParams, train_from="state", description="")
        class Loose:
            def integrate(self, context):
                return {}

    assert "loose_test" not in strategies._REGISTRY
    with pytest.raises(ValueError, match="train_from must be 'state' or 'base'"):
        register_strategy("bad_from_test", params=NoParams, train_from="theta0", description="")


def test_a_name_registered_by_two_classes_is_an_error(scratch_registry):
    get_strategy("sequential")  # the built-in first
    with pytest.raises(ValueError, match="'sequential' is registered twice"):

        @register_strategy("sequential", params=NoParams, train_from="state", description="")
        class Other(Strategy):
            def integrate(self, context):
                return {}


def test_default_hooks_and_abstract_integrate(tmp_path):
    class Minimal(Strategy):
        def integrate(self, context):
            return {"integrated": context}

    own = datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}])
    context = TaskContext(step=1, task_name="a", task_names=["a"], train_dataset=own, strategy_dir=tmp_path, seed=0)
    strategy = Minimal(NoParams())
    assert strategy.prepare_train_dataset(context) is own
    assert strategy.training_callbacks(context) == []
    assert strategy.integrate("ctx") == {"integrated": "ctx"}

    class NoIntegrate(Strategy):
        pass

    with pytest.raises(TypeError, match="abstract method.*integrate"):
        NoIntegrate(NoParams())
    with pytest.raises(TypeError, match="abstract method.*merge"):
        type("NoMerge", (MergeStrategy,), {})(NoParams())


def test_integration_callback_reads_train_from_off_the_strategy_class(tmp_path):
    """An instance of a merge strategy trains from θ0, never silently from θ_{t−1}."""
    from cpt.callbacks import IntegrationCallback

    for name, expected in [("gcwm", "base"), ("task_arithmetic", "base"), ("sequential", "state")]:
        instance = get_strategy(name).build({})
        callback = IntegrationCallback(instance, state_dir=tmp_path / "state", base_dir=tmp_path, step=1, task_name="a")
        assert callback.train_from == expected == type(instance).train_from
        assert (
            IntegrationCallback(name, state_dir=tmp_path / "s", base_dir=tmp_path, step=1, task_name="a").train_from
            == expected
        )
    explicit = IntegrationCallback(
        get_strategy("gcwm").build({}),
        state_dir=tmp_path / "s",
        base_dir=tmp_path,
        step=1,
        task_name="a",
        train_from="state",
    )
    assert explicit.train_from == "state"  # a recipe's override still wins


def test_every_builtin_is_an_entry_point_of_its_registered_name():
    table = PYPROJECT["project"]["entry-points"][ENTRY_POINT_GROUP]
    registering = set()
    for path in (REPO / "cpt").rglob("*.py"):
        registering |= set(re.findall(r'^@register_strategy\(\s*"(\w+)"', path.read_text(), flags=re.MULTILINE))
    assert registering == set(table), "a module registers a strategy without an entry point (or the reverse)"
    for name, value in table.items():
        info = get_strategy(name)
        module, _, qualname = value.partition(":")
        assert (info.strategy_class.__module__, info.strategy_class.__qualname__) == (module, qualname)
        assert issubclass(info.strategy_class, Strategy) and info.strategy_class.name == name
    assert set(table) <= set(known_strategies())


def test_unknown_strategy_suggests_the_closest():
    with pytest.raises(
        CptError, match=r"unknown strategy 'gcmw' \(did you mean 'gcwm'\?\); known strategies: .*sequential"
    ):
        get_strategy("gcmw")


def fake_entry_points(monkeypatch, **values):
    points = {name: importlib.metadata.EntryPoint(name, value, ENTRY_POINT_GROUP) for name, value in values.items()}
    monkeypatch.setattr(strategies, "_entry_points", lambda: points)


def test_a_broken_entry_point_is_a_one_line_warning(monkeypatch, caplog):
    fake_entry_points(
        monkeypatch, sequential="cpt.training.sequential:Sequential", broken="cpt_no_such_module_xyz:Thing"
    )
    with caplog.at_level(logging.WARNING, logger="cpt.strategies"):
        found = known_strategies()
    assert "sequential" in found and "broken" not in found
    [message] = [record.getMessage() for record in caplog.records]
    assert "\n" not in message
    assert "'broken'" in message and "cpt_no_such_module_xyz:Thing" in message and "ModuleNotFoundError" in message
    with pytest.raises(
        CptError, match=r"strategy 'broken': cannot import cpt_no_such_module_xyz:Thing \(ModuleNotFoundError"
    ):
        get_strategy("broken")


def test_an_entry_point_named_unlike_its_strategy_is_an_error(monkeypatch):
    fake_entry_points(monkeypatch, seq="cpt.training.sequential:Sequential")
    with pytest.raises(
        CptError, match="loads the strategy registered as 'sequential'; name the entry point 'sequential'"
    ):
        get_strategy("seq")
    with pytest.raises(CptError, match="registered as 'sequential'"):
        known_strategies()
    fake_entry_points(monkeypatch, params="cpt.training.sequential:SequentialParams")
    with pytest.raises(CptError, match="is not a strategy class registered with @register_strategy"):
        get_strategy("params")


# ---------------------------------------------------------------------- a third-party package, installed
@pytest.mark.slow
def test_example_package_installs_and_merges(tmp_path):
    """examples/cpt_strategy_example, installed like any package, is listed and merges through `cpt merge`."""
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(REPO / "examples" / "cpt_strategy_example"),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "HF_HUB_OFFLINE": "1"}

    def cpt(*args):
        return subprocess.run(
            [sys.executable, "-m", "cpt.cli", *args], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    listing = cpt("strategies")
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith("targeted_task_arithmetic"))
    assert "experts from base" in line and "scaling=0.3" in line
    assert "sequential" in listing.stdout and "gcwm" in listing.stdout  # the built-ins beside it

    base = Path(build_tiny_model(tmp_path / "base", seed=0))
    for seed in (1, 2):
        perturbed(base, seed).save_pretrained(tmp_path / f"expert{seed}")
    merged = cpt(
        "merge",
        "--method",
        "targeted_task_arithmetic",
        str(base),
        str(tmp_path / "expert1"),
        str(tmp_path / "expert2"),
        "--output",
        str(tmp_path / "merged"),
        "--set",
        "scaling=0.5",
    )
    assert merged.returncode == 0, merged.stderr

    theta0, state = load_file(base / "model.safetensors"), {}
    for file in (tmp_path / "merged").glob("*.safetensors"):
        state.update(load_file(file))
    experts = [load_file(tmp_path / f"expert{seed}" / "model.safetensors") for seed in (1, 2)]
    assert set(state) == set(theta0)
    target = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.weight$")
    for name, value in theta0.items():
        expected = value + 0.5 * sum(expert[name] - value for expert in experts) if target.search(name) else value
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)
    stats = json.loads((tmp_path / "merged" / "merge_stats.json").read_text())
    assert stats["method"] == "targeted_task_arithmetic" and stats["params"] == {"scaling": 0.5}

    refused = cpt(
        "merge",
        "--method",
        "targeted_task_arithmetic",
        str(base),
        str(tmp_path / "expert1"),
        "--output",
        str(tmp_path / "bad"),
        "--set",
        "scaling=-1",
    )
    assert refused.returncode == 2 and "scaling: Input should be greater than 0" in refused.stderr
