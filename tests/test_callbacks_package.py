"""cpt.callbacks, the package users drop into a TRL script: import names, vocabulary, one instance per sequence."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cpt.errors import CptError

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path, pythonpath: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


# ---------------------------------------------------------------------- import names
def test_new_name_imports_from_the_checkout_without_warning(tmp_path):
    result = run_python(
        """
        import warnings
        warnings.simplefilter("error", DeprecationWarning)  # the new name must not warn
        import cpt.callbacks
        from cpt.callbacks import EWCCallback, GeometryConflictCallback, IntegrationCallback
        import sys
        print(cpt.callbacks.__file__)
        print("callbacks" in sys.modules, GeometryConflictCallback.__module__)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    path, flags = result.stdout.splitlines()
    assert Path(path) == REPO / "callbacks" / "__init__.py", "a checkout imports its own callbacks folder"
    assert flags == "False cpt.callbacks.geometry", "the new name does not claim the top-level name"


@pytest.mark.parametrize("new_first", [False, True])
def test_old_name_warns_and_is_the_same_package(tmp_path, new_first):
    result = run_python(
        f"""
        import sys, warnings
        if {new_first}:
            import cpt.callbacks
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import callbacks
            from callbacks.geometry import GeometryConflictCallback as OldGeometry
            from callbacks import IntegrationCallback as OldIntegration
        import cpt.callbacks
        from cpt.callbacks.integration import IntegrationCallback
        ours = [w for w in caught if "import callbacks" in str(w.message)]
        print(len(ours), ours[0].category.__name__, ours[0].filename)
        print(callbacks is cpt.callbacks, OldGeometry is cpt.callbacks.GeometryConflictCallback,
              OldIntegration is IntegrationCallback)
        names = ("ewc", "geometry", "integration")
        print(all(sys.modules["callbacks." + n] is sys.modules["cpt.callbacks." + n] for n in names))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warning, same, submodules = result.stdout.splitlines()
    assert warning == "1 DeprecationWarning <string>", "one warning, pointing at the user's import line"
    assert same == "True True True" and submodules == "True"


def test_checkout_maps_its_own_callbacks_before_an_installed_copy(tmp_path):
    """A checkout that is not installed (``python cpt/run.py``) finds cpt.callbacks in its top-level folder.

    It must win over an editable install of another checkout (which maps cpt.callbacks elsewhere).
    """
    checkout = tmp_path / "checkout"
    (checkout / "cpt").mkdir(parents=True)
    for name in ("__init__.py", "_source_checkout.py"):
        shutil.copy(REPO / "cpt" / name, checkout / "cpt" / name)
    (checkout / "callbacks").mkdir()
    (checkout / "callbacks" / "__init__.py").write_text("from .marker import WHERE\n")
    (checkout / "callbacks" / "marker.py").write_text("WHERE = 'the checkout'\n")
    result = run_python(
        """
        import cpt.callbacks, cpt.callbacks.marker
        print(cpt.callbacks.WHERE)
        print(cpt.callbacks.marker.__name__)
        print(cpt.__file__)
        """,
        cwd=tmp_path,
        pythonpath=checkout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    where, module, cpt_file = result.stdout.splitlines()
    assert where == "the checkout" and module == "cpt.callbacks.marker"
    assert Path(cpt_file).parent == checkout / "cpt"


@pytest.mark.slow
def test_wheel_installs_cpt_callbacks_and_no_top_level_callbacks(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "cpt", source / "cpt", ignore=ignore)
    shutil.copytree(REPO / "callbacks", source / "callbacks", ignore=ignore)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = zipfile.ZipFile(next((tmp_path / "wheel").glob("cpt-*.whl"))).namelist()
    callbacks = sorted(Path(name).name for name in names if name.startswith("cpt/callbacks/"))
    assert callbacks == sorted(path.name for path in (REPO / "callbacks").glob("*.py"))
    assert not [name for name in names if name.startswith("callbacks/")], "the wheel must not claim the top-level name"
    assert "cpt/evaluation/metrics/exact_match/exact_match.py" in names, "the rest of cpt is packaged as before"


# ---------------------------------------------------------------------- one vocabulary
def test_deprecated_keywords_warn_and_keep_working(tmp_path):
    from cpt.callbacks import GeometryConflictCallback, IntegrationCallback

    with pytest.warns(DeprecationWarning) as caught:
        geometry = GeometryConflictCallback(base_dir=tmp_path / "base", output_dir=tmp_path / "g", update_from="base")
    assert [str(w.message) for w in caught] == [
        "GeometryConflictCallback(base_dir=...) is deprecated; use base=",
        "GeometryConflictCallback(update_from=...) is deprecated; use train_from=",
    ]
    assert {w.filename for w in caught} == {__file__}, "the warning points at the caller"
    assert geometry.base_dir == tmp_path / "base" and geometry.train_from == "base" and geometry.update_from == "base"
    with pytest.warns(DeprecationWarning, match="stats_path"):
        integration = IntegrationCallback(
            "sequential", base=tmp_path / "base", state_dir=tmp_path / "state", stats_path=tmp_path / "s.json"
        )
    assert integration.stats_path == tmp_path / "s.json" and integration.train_from == "state"
    assert IntegrationCallback("task_arithmetic", base=tmp_path, state_dir=tmp_path / "state").train_from == "base"
    with pytest.raises(CptError, match="pass base= only"):
        GeometryConflictCallback(base=tmp_path, base_dir=tmp_path, output_dir=tmp_path)
    with pytest.raises(CptError, match="train_from must be 'state'"):
        IntegrationCallback("sequential", base=tmp_path, state_dir=tmp_path, train_from="θ0")
    with pytest.raises(CptError, match="pass base="):
        GeometryConflictCallback(output_dir=tmp_path)


def test_step_task_and_previous_state_come_from_the_state_marker(tmp_path):
    from cpt.callbacks._common import resolve_task

    state = tmp_path / "state"
    args = SimpleNamespace(run_name=None)
    assert resolve_task(args, state_dir=state) == resolve_task(args, state_dir=None)
    first = resolve_task(args, state_dir=state)
    assert (first.step, first.task_name, first.previous_state_dir) == (1, "task1", None)
    state.mkdir()
    (state / "config.json").write_text("{}")
    (state / "cpt_state.json").write_text(json.dumps({"step": 2, "task": "upper"}))
    third = resolve_task(SimpleNamespace(run_name="copy"), state_dir=state)
    assert (third.step, third.task_name, third.previous_state_dir) == (3, "copy", state)
    override = resolve_task(args, state_dir=state, step=1, task_name="again")
    assert (override.step, override.task_name, override.previous_state_dir) == (1, "again", None), (
        "step 1 starts from θ0"
    )
    elsewhere = resolve_task(args, state_dir=state, previous_state_dir=tmp_path / "other")
    assert elsewhere.previous_state_dir == tmp_path / "other" and elsewhere.task_name == "task3"


def test_hub_id_as_base_resolves_to_the_cached_snapshot_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cpt.callbacks import GeometryConflictCallback, IntegrationCallback

    revision = "a" * 40
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert GeometryConflictCallback(base="org/tiny", output_dir=tmp_path / "g").base_dir == snapshot
    missing = IntegrationCallback("sequential", base="org/missing", state_dir=tmp_path / "state")
    with pytest.raises(
        CptError, match=r"IntegrationCallback: base: 'org/missing' is not a local folder .* download it first"
    ):
        _ = missing.base_dir


def test_integration_statistics_are_flat_scalar_metrics(tmp_path):
    from cpt.callbacks import IntegrationCallback

    callback = IntegrationCallback("sequential", base=tmp_path, state_dir=tmp_path / "state")
    stats = {
        "step": 2,
        "task": "upper",
        "seconds": 1.5,
        "summary": {"step_coef": 0.2, "global_scale": None, "skipped": True},
        "per_tensor": {"w": {"alpha": 0.3}},
        "note": "text",
    }
    assert callback.log_metrics(stats) == {
        "integration/seconds": 1.5,
        "integration/summary/step_coef": 0.2,
        "integration/summary/skipped": 1.0,
    }


def test_integration_metrics_leave_per_tensor_mappings_in_the_file(tmp_path):
    """The shapes merge strategies write (GCWM/pipeline summary, OPCM's norm_update, LiNeS' layer_scales):
    only the aggregates become metrics; a mapping named ``*per_tensor`` or keyed by tensor names does not."""
    from cpt.callbacks import IntegrationCallback
    from cpt.callbacks.integration import is_per_tensor_mapping

    q, up = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    stats = {
        "step": 2,
        "task": "upper",
        "seconds": 0.5,
        "summary": {
            "effective_scale": 0.4,
            "effective_scale_per_tensor": {q: 0.3, up: 0.5},
            "norm_update": {q: 1.0, up: 2.0},
            "diagnostics": {"dev_sum": {"mean": 0.1, "attention": 0.05, "mlp": 0.15}},
            "layer_scales": {"0": 0.5, "1": 1.0},
            "ranks": [{"tensors": 3}],
        },
        "per_tensor": {q: {"dev_sum": 0.05}},
    }
    callback = IntegrationCallback("sequential", base=tmp_path, state_dir=tmp_path / "state")
    assert callback.log_metrics(stats) == {
        "integration/seconds": 0.5,
        "integration/summary/effective_scale": 0.4,
        "integration/summary/diagnostics/dev_sum/mean": 0.1,
        "integration/summary/diagnostics/dev_sum/attention": 0.05,
        "integration/summary/diagnostics/dev_sum/mlp": 0.15,
        "integration/summary/layer_scales/0": 0.5,
        "integration/summary/layer_scales/1": 1.0,
    }
    assert is_per_tensor_mapping("per_tensor", {})  # by name, even empty
    assert not is_per_tensor_mapping("diagnostics", {})
    assert not is_per_tensor_mapping("effective_scale_per_tensor", 0.3)  # only mappings are rows
    assert not is_per_tensor_mapping("mixed", {q: 1.0, "mean": 2.0})  # one identifier key: an aggregate mapping


# ---------------------------------------------------------------------- one instance for a whole TRL loop
def _loop(work: Path, base: str, strategy: str, train_from: str, steps: int = 2):
    """The examples' loop: two tasks, one geometry and one integration callback for both; keeps each expert and θ_t."""
    import datasets
    from tiny_training import quiet_cpu_sft_config
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from cpt.callbacks import GeometryConflictCallback, IntegrationCallback

    tokenizer = AutoTokenizer.from_pretrained(base)
    words = ["cat", "dog", "tree", "house", "river", "stone"]
    tasks = {
        "plural": [{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in words],
        "upper": [{"prompt": f"Upper case of {w}:", "completion": f" {w.upper()}"} for w in words],
    }
    geometry = GeometryConflictCallback(
        base=base, state_dir=work / "state", output_dir=work / "geometry", train_from=train_from
    )
    integration = IntegrationCallback(strategy, base=base, state_dir=work / "state", output_dir=work / "integration")
    logs = []
    for task, rows in tasks.items():
        start = work / "state" if train_from == "state" and (work / "state").exists() else base
        model = AutoModelForCausalLM.from_pretrained(start)
        config = quiet_cpu_sft_config(work / "trainer" / task, max_steps=steps, run_name=task)
        trainer = SFTTrainer(
            model,
            config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[geometry, integration],
        )
        geometry.bind_trainer(trainer)
        integration.bind_trainer(trainer)
        trainer.train()
        trainer.model.save_pretrained(work / "experts" / task)  # E_t, as trained (integration does not change it)
        shutil.copytree(work / "state", work / "states" / task)
        logs.append(trainer.state.log_history)
    return logs


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from cpt.tensors import SafetensorsWeights

    weights = SafetensorsWeights(folder)
    return {name: weights.get(name) for name in weights.names()}


@pytest.mark.slow
def test_one_gcwm_instance_in_a_trl_loop_equals_the_offline_merge(tmp_path):
    """The TRL loop's θ_2 is bit-identical to ``cpt merge gcwm`` of the same experts; steps, names, metrics line up."""
    from cpt.geometry import geometry_conflict
    from cpt.merging.offline import merge_checkpoints
    from cpt.testing import build_tiny_model

    base = build_tiny_model(tmp_path / "base", seed=3)
    logs = _loop(tmp_path, base, "gcwm", "base")

    markers = [json.loads((tmp_path / "states" / task / "cpt_state.json").read_text()) for task in ("plural", "upper")]
    assert markers == [{"step": 1, "task": "plural"}, {"step": 2, "task": "upper"}]
    assert sorted(p.name for p in (tmp_path / "integration").iterdir()) == ["1_plural.json", "2_upper.json"]
    assert sorted(p.name for p in (tmp_path / "geometry").glob("*.json")) == ["1_plural.json", "2_upper.json"]
    for step, (log, task) in enumerate(zip(logs, ("plural", "upper")), start=1):
        stats = json.loads((tmp_path / "integration" / f"{step}_{task}.json").read_text())
        logged = [entry for entry in log if "integration/seconds" in entry]
        assert len(logged) == 1 and logged[0]["integration/seconds"] == pytest.approx(stats["seconds"])
        assert logged[0]["integration/summary/step_coef"] == pytest.approx(stats["summary"]["step_coef"])
        assert not any(key.startswith("integration/per_tensor") for key in logged[0])

    merged = merge_checkpoints(
        "gcwm", base, [str(tmp_path / "experts" / "plural"), str(tmp_path / "experts" / "upper")], tmp_path / "offline"
    )
    assert merged["steps"][1]["summary"]["step_coef"] == pytest.approx(0.2)
    ours, offline = _weights(tmp_path / "state"), _weights(tmp_path / "offline")
    assert ours.keys() == offline.keys()
    for name in ours:
        assert torch.equal(ours[name], offline[name]), name

    # The geometry instance measured task 2 against θ_1 (read from the state folder), the update from θ0.
    report = json.loads((tmp_path / "geometry" / "2_upper.json").read_text())
    assert (report["step"], report["task"], report["update_from"]) == (2, "upper", "base")
    theta0, theta1, expert2 = (
        _weights(Path(base)),
        _weights(tmp_path / "states" / "plural"),
        _weights(tmp_path / "experts" / "upper"),
    )
    name = "model.layers.1.mlp.down_proj.weight"
    expected = float(
        geometry_conflict(theta1[name].float() - theta0[name].float(), expert2[name].float() - theta0[name].float())
    )
    assert report["per_tensor"][name]["geometry_conflict"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    first = json.loads((tmp_path / "geometry" / "1_plural.json").read_text())
    assert first["aggregates"]["geometry_conflict"]["mean"] is None, "at t = 1 the state is θ0: no conflict"


def _run_example(tmp_path: Path, name: str, launcher: list[str]) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        *launcher,
        str(REPO / "examples" / "gcwm_trl_script.py"),
        "--steps",
        "2",
        "--output-dir",
        str(tmp_path / name),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_gcwm_trl_script_example_runs_plain_and_under_zero3(tmp_path):
    """The example as users run it; under DeepSpeed ZeRO-3 both callbacks gather E_t themselves, to the same state."""
    plain = _run_example(tmp_path, "plain", [sys.executable])
    assert "task 1 plural: merged in" in plain.stdout and "undefined (the state was θ0)" in plain.stdout
    assert "task 2 upper: merged in" in plain.stdout
    assert f"{tmp_path / 'plain' / 'state'} holds step 2 (upper)" in plain.stdout
    assert json.loads((tmp_path / "plain" / "state" / "cpt_state.json").read_text()) == {"step": 2, "task": "upper"}

    # Under accelerate + ZeRO-3, through a driver that records what the callbacks' gathers returned.
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import json, runpy
            import cpt.callbacks.geometry, cpt.callbacks.integration
            from cpt.tensors import gather_expert_folder

            gathered = []
            def recording_gather(model, folder, *args, **kwargs):
                result = gather_expert_folder(model, folder, *args, **kwargs)
                gathered.append(None if result is None else str(result))
                return result
            cpt.callbacks.geometry.gather_expert_folder = recording_gather
            cpt.callbacks.integration.gather_expert_folder = recording_gather
            runpy.run_path({str(REPO / "examples" / "gcwm_trl_script.py")!r}, run_name="__main__")
            open({str(tmp_path / "gathered.json")!r}, "w").write(json.dumps(gathered))
            """
        )
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml"]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    command = [*launch, "--num_processes", "1", str(driver), "--steps", "2", "--output-dir", str(tmp_path / "zero3")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    gathered = json.loads((tmp_path / "gathered.json").read_text())
    zero3 = tmp_path / "zero3"
    expected = [str(folder / f".expert-{step}") for step in (1, 2) for folder in (zero3 / "geometry", zero3)]
    assert gathered == expected, "each callback gathered E_t itself, geometry first"
    ours, reference = _weights(tmp_path / "zero3" / "state"), _weights(tmp_path / "plain" / "state")
    assert ours.keys() == reference.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5, msg=name)
    a, b = (json.loads((tmp_path / run / "geometry" / "2_upper.json").read_text()) for run in ("plain", "zero3"))
    for tensor, row in a["per_tensor"].items():
        assert b["per_tensor"][tensor]["geometry_conflict"] == pytest.approx(row["geometry_conflict"], abs=1e-5), tensor
    leftovers = [*(tmp_path / "zero3").glob(".expert-*"), *(tmp_path / "zero3" / "geometry").glob(".expert-*")]
    assert not leftovers, "the gathered expert folders are temporary"
