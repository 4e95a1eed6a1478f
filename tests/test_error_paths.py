"""Every user error is one line and exit status 2, with no traceback, and the run directory untouched.

Three families:

* the recipe schema, walked field by field: each field of the pydantic models in
  ``cpt/recipe.py`` gets a value of the wrong type, one out of its range (where the field has
  bounds), and each section an unknown key; all through ``--set``;
* values the schema accepts but the model, the data, the trainer, the optimizer or the file
  system refuse later (found by trying), plus ``--set`` itself (bad index, bad YAML);
* ``cpt merge``, ``cpt geometry``, ``cpt report`` and ``cpt compare`` with missing files,
  mismatched shapes, non-run directories and bad options.

The CLI runs in-process (``cpt.cli.main``) with stderr captured.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from cpt.cli import main
from cpt.recipe import Recipe, StrategySpec
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 3-task recipe on the tiny model, and checkpoints/folders for the other commands."""
    root = tmp_path_factory.mktemp("errors")
    base = build_tiny_model(root / "base", seed=0)
    build_tiny_model(root / "e1", seed=1)
    build_tiny_model(root / "e2", seed=2)
    build_tiny_model(root / "narrow", seed=3, hidden_size=32)  # another shape
    data = make_recipe(root, base)
    data["tasks"].append({**data["tasks"][0], "name": "third"})
    data["probes"] = [{"name": "probe", "data": {"path": str(root / "plural.jsonl")}, "eval": {"max_examples": 2}}]
    (root / "recipe.yaml").write_text(yaml.safe_dump(data))
    (root / "empty").mkdir()
    (root / "a_file").write_text("x")
    (root / "broken_run").mkdir()
    (root / "broken_run" / "manifest.json").write_text("{")
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "manifest.json").write_text(json.dumps({"format": 1}))
    return root


def expect_one_line_error(argv: list[str], capsys, workspace: Path, *names: str) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err, captured.err
    assert code == 2, f"exit {code} for {argv}: {captured.err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv}: {lines}"
    for name in names:
        assert name in lines[0], f"{argv}: {lines[0]!r} does not name {name!r}"
    assert not (workspace / "runs" / "tiny").exists(), "the run directory was touched"
    return lines[0]


# ---------------------------------------------------------------------- the schema, walked
def _bounds(field) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        if isinstance(item, (annotated_types.Gt, annotated_types.Ge)):
            low = getattr(item, "gt", getattr(item, "ge", None))
        if isinstance(item, (annotated_types.Lt, annotated_types.Le)):
            high = getattr(item, "lt", getattr(item, "le", None))
    return low, high


def _leaf_type(annotation) -> typing.Any:
    """``X | None`` → X."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if (
        typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and len(args) == 1
    ):
        return args[0]
    return annotation


def _wrong_values(annotation) -> list[tuple[str, str]]:
    """(YAML text, kind) pairs of plausible but wrong values for a field of this type."""
    leaf = _leaf_type(annotation)
    origin = typing.get_origin(leaf)
    if leaf is bool:
        return [("maybe", "wrong type")]
    if leaf is int:
        return [("abc", "wrong type"), ("1.5", "wrong type")]
    if leaf is float:
        return [("abc", "wrong type")]
    if leaf is str:
        return [("[1, 2]", "wrong type")]
    if origin is typing.Literal:
        return [("bogus_choice", "not a choice")]
    if origin is list or (
        origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
        and list in map(typing.get_origin, typing.get_args(leaf))
    ):
        return [("5", "wrong type")]
    if origin is dict or leaf is dict:
        return [("not_a_mapping", "wrong type")]
    if isinstance(leaf, type) and issubclass(leaf, BaseModel):
        return [("not_a_mapping", "wrong type")]
    return []


def _schema_cases() -> list[tuple[str, str, str]]:
    """(``--set`` argument, field name the error must name, kind) for every field of the recipe schema."""
    cases = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        if model is not StrategySpec:  # strategy parameters are open; tested below
            cases.append((f"{prefix}bogus_key=1", "bogus_key", "unknown key"))
        for name, field in model.model_fields.items():
            path = f"{prefix}{name}"
            leaf = _leaf_type(field.annotation)
            if (
                typing.get_origin(leaf) is list
                and typing.get_args(leaf)
                and isinstance(typing.get_args(leaf)[0], type)
                and issubclass(typing.get_args(leaf)[0], BaseModel)
            ):
                cases.append((f"{path}=not_a_list", name, "wrong type"))
                walk(typing.get_args(leaf)[0], f"{path}.0.")  # the first task
                continue
            if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                cases.append((f"{path}=not_a_mapping", name, "wrong type"))
                walk(leaf, f"{path}.")
                continue
            for value, kind in _wrong_values(field.annotation):
                cases.append((f"{path}={value}", name, kind))
            low, high = _bounds(field)
            if low is not None:
                cases.append((f"{path}={low - 5}", name, "out of range"))
            if high is not None:
                cases.append((f"{path}={high + 5}", name, "out of range"))

    walk(Recipe, "")
    return cases


SCHEMA_CASES = _schema_cases()


def test_the_walk_covers_the_schema():
    paths = {case[0].split("=")[0] for case in SCHEMA_CASES}
    # Spot checks across every section: the walk reaches nested models and the task list.
    for expected in (
        "name",
        "seed",
        "model.dtype",
        "peft.r",
        "peft.lora_dropout",
        "training",
        "strategy.train_from",
        "targets",
        "geometry.energy",
        "evaluation.batch_size",
        "divergence.patience",
        "tasks.0.train.path",
        "tasks.0.fields.prompt_template",
        "tasks.0.eval.normalize.ignore_case",
        "tasks.0.eval.held_out",
        "tasks.0.max_examples",
        "tasks.0.eval.data.split",
    ):
        assert expected in paths, expected
    assert len(SCHEMA_CASES) > 100


@pytest.mark.parametrize("override,field,kind", SCHEMA_CASES, ids=[f"{case[0]}" for case in SCHEMA_CASES])
def test_schema_field_with_a_wrong_value(override, field, kind, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    expect_one_line_error(["check", "recipe.yaml", "--set", override], capsys, workspace, field)


# ---------------------------------------------------------------------- refused after the schema: found by trying
LATE_CASES = [
    # --set itself
    ("tasks.7.max_examples=3", "tasks.7"),  # a 3-task recipe (was an IndexError)
    ("tasks.3.name=x", "index must be 0 to 2"),
    ("tasks.x.name=x", "must be a list index"),
    ("name.x=3", "name is not a section"),
    ("tasks.0.fields.prompt_template={", "not a valid YAML value"),
    ("noequals", "expected KEY=VALUE"),
    # the model
    ("model.name_or_path=/nonexistent/model", "model.name_or_path"),
    ("model.name_or_path=recipe.yaml", "model.name_or_path"),
    ("model.name_or_path=empty", "no config.json"),
    ("model.name_or_path=nonexistent-org/nonexistent-model", "model.name_or_path"),
    ("model.attn_implementation=bogus", "model.attn_implementation"),
    ("peft={target_modules: [qkv_proj]}", "peft.target_modules"),
    # targets of a merge strategy
    ("strategy={name: gcwm} --set targets=[nothing_proj]", "targets"),
    ("strategy={name: ties, density: 5}", "density"),
    ("strategy={name: gcwm, rank: -1}", "rank"),
    # the data
    ("tasks.0.train.path=missing.jsonl", "tasks[0].train.path"),
    ("tasks.0.eval={data: {path: missing.jsonl}}", "tasks[0].eval.data.path"),
    ("tasks.0.eval.held_out=12", "tasks[0].eval.held_out"),
    ("tasks.0.fields.prompt=question", "tasks[0].fields.prompt"),
    ("tasks.0.fields.prompt_template={nope}", "prompt_template"),
    ("tasks.0.fields.prompt_template='{nope}'", "tasks[0].fields.prompt_template"),
    ("tasks.0.fields.messages=input", "tasks[0].fields.messages"),
    ("tasks.1.fields.choices=word", "tasks[1].fields.choices"),
    ("tasks.1.fields.label=word", "tasks[1].fields.label"),
    ("tasks.0.eval.normalize.regexes_to_ignore=['(']", "regexes_to_ignore"),
    # training arguments (SFTConfig accepts them; the trainer, optimizer or collator would not)
    ("training.learning_rate=-1", "learning rate"),
    ("training.adam_beta1=5", "beta"),
    ("training.per_device_train_batch_size=0", "per_device_train_batch_size"),
    ("training.gradient_accumulation_steps=0", "gradient_accumulation_steps"),
    ("training.max_steps=-1 --set tasks.1.training.max_steps=-1 --set training.num_train_epochs=0", "num_train_epochs"),
    ("training.max_length=2", "max_length=2"),
    ("training.fp16=true", "fp16"),
    ("training.report_to=bogus", "report_to"),
    ("training.eval_strategy=steps", "eval_strategy"),
    ("training.padding_free=true", "padding_free"),
    ("training.optim=bogus", "SFTConfig"),
    ("training.lr_scheduler_type=cosine_with_min_lr", "scheduler"),
    ("training.deepspeed=/nonexistent.json", "deepspeed"),
    ("training.warmup_ratio=5", "warmup_ratio"),
    ("training.output_dir=x", "training.output_dir"),
    ("tasks.0.training.learning_rate=abc", "tasks[0].training.learning_rate"),
    # the run directory
    ("output_dir=a_file", "output_dir"),
]


@pytest.mark.parametrize("override,name", LATE_CASES, ids=[case[0] for case in LATE_CASES])
def test_value_refused_after_the_schema(override, name, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    argv = ["check", "recipe.yaml"]
    for part in override.split(" --set "):
        argv += ["--set", part]
    expect_one_line_error(argv, capsys, workspace, name)


UNION_CASES = [
    # a value that no branch of a union accepts: the field's recipe path, what it accepts, a did-you-mean
    (
        "strategy={name: gcwm, step_coef: nrm}",
        "strategy.step_coef: must be a number in (0, 1] or 'norm', got 'nrm' (did you mean 'norm'?) (strategy 'gcwm')",
    ),
    (
        "strategy={name: gcwm, step_coef: 2}",
        "strategy.step_coef: must be a number in (0, 1] or 'norm', got 2 (strategy 'gcwm')",
    ),
    (
        "strategy={name: lines, alpha: aut}",
        "strategy.alpha: expected a number or 'auto', got 'aut' (did you mean 'auto'?) (strategy 'lines')",
    ),
    (
        "peft={target_modules: allLinear}",
        "peft.target_modules: expected a list or 'all-linear', got 'allLinear' (did you mean 'all-linear'?)",
    ),
    ("max_shard_size=[1]", "max_shard_size: expected an integer or a string, got [1]"),
]


@pytest.mark.parametrize("override,message", UNION_CASES, ids=[case[0] for case in UNION_CASES])
def test_union_value_names_the_field_and_what_it_accepts(override, message, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    line = expect_one_line_error(["check", "recipe.yaml", "--set", override], capsys, workspace)
    assert line == f"error: recipe.yaml: {message}"


def test_run_refuses_before_touching_anything(workspace, capsys, monkeypatch):
    """``cpt run`` goes through the same checks (here an IndexError before the fix, then a late data error)."""
    monkeypatch.chdir(workspace)
    expect_one_line_error(["run", "recipe.yaml", "--set", "tasks.7.max_examples=3"], capsys, workspace, "tasks.7")
    expect_one_line_error(
        ["run", "recipe.yaml", "--set", "tasks.2.fields.completion=nope"],
        capsys,
        workspace,
        "tasks[2].fields.completion",
    )
    assert not list((workspace / "runs").glob(".*.lock")), "the run lock is released"


def test_recipe_file_problems(workspace, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    expect_one_line_error(["check", "missing.yaml"], capsys, workspace, "missing.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    expect_one_line_error(["check", str(tmp_path / "bad.yaml")], capsys, workspace, "invalid YAML")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    expect_one_line_error(["check", str(tmp_path / "list.yaml")], capsys, workspace, "YAML mapping")


# ---------------------------------------------------------------------- merge, geometry, report, compare
OTHER_COMMANDS = [
    # cpt merge
    ("merge --method ties base e1 narrow --output out", "narrow"),  # mismatched shapes
    ("merge --method ties base e1 nowhere --output out", "nowhere"),
    ("merge --method ties nowhere e1 e2 --output out", "nowhere"),
    ("merge --method ties base e1 empty --output out", "empty"),
    ("merge --method ties base e1 a_file --output out", "a_file"),
    ("merge --method bogus base e1 e2 --output out", "bogus"),
    ("merge --method sequential base e1 e2 --output out", "--method sequential"),
    ("merge --method ties base e1 e2 --output out --set density=5", "density"),
    ("merge --method ties base e1 e2 --output out --set bogus=1", "bogus"),
    ("merge --method gcwm base e1 e2 --output out --set step_coef=nrm", "step_coef: must be a number in (0, 1]"),
    ("merge --method ties base e1 e2 --output out --set a.b=1", "--set a.b"),
    ("merge --method gcwm base e1 e2 --output out --set rank=abc", "rank"),
    ("merge --method ties base e1 e2 --output out --targets (", "--targets"),
    ("merge --method ties base e1 e2 --output out --targets nothing_matches", "--targets"),
    ("merge --method ties base e1 e2 --output a_file", "--output"),
    # cpt geometry
    ("geometry base e1 --output g.json", "at least two"),
    ("geometry base e1 narrow --output g.json", "narrow"),
    ("geometry base e1 nowhere --output g.json", "nowhere"),
    ("geometry nowhere e1 e2 --output g.json", "nowhere"),
    ("geometry base e1 empty --output g.json", "empty"),
    ("geometry base e1 e2 --output g.json --rank 0", "--rank"),
    ("geometry base e1 e2 --output g.json --energy 2", "--energy"),
    ("geometry base e1 e2 --output g.json --eps -1", "--eps"),
    ("geometry base e1 e2 --output g.json --targets (", "--targets"),
    ("geometry base e1 e2 --output g.json --targets nothing", "no target tensors"),
    ("geometry base e1 e2 --output a_file/g.json", "--output"),
    ("geometry base e1 e2 --output g.json --device bogus", "--device"),
    # cpt report
    ("report nowhere", "nowhere"),
    ("report empty", "empty"),
    ("report a_file", "a_file"),
    ("report broken_run", "broken_run/manifest.json"),
    ("report not_a_run", "not_a_run/manifest.json"),
    # cpt compare
    ("compare nowhere", "nowhere"),
    ("compare empty", "empty"),
    ("compare broken_run not_a_run", "broken_run"),
    ("compare not_a_run", "not_a_run"),
]


@pytest.mark.parametrize("command,name", OTHER_COMMANDS, ids=[case[0] for case in OTHER_COMMANDS])
def test_other_commands(command, name, workspace, capsys, monkeypatch):
    monkeypatch.chdir(workspace)
    before = sorted(p.name for p in workspace.iterdir())
    expect_one_line_error(command.split(" "), capsys, workspace, name)
    assert sorted(p.name for p in workspace.iterdir()) == before, "a refused command writes nothing"


def test_geometry_on_a_missing_gpu(workspace, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(workspace)
    expect_one_line_error("geometry base e1 e2 --output g.json --device cuda".split(" "), capsys, workspace, "--device")


def test_compare_output_is_a_file(workspace, capsys, monkeypatch, tmp_path):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    recipe = validate_recipe(
        make_recipe(
            tmp_path,
            str(workspace / "base"),
            steps=(1, 1),
            evaluation={"batch_size": 4, "max_new_tokens": 2, "evaluate_base": False, "evaluate_experts": False},
            geometry={"enabled": False},
        )
    )
    TaskSequenceRunner(recipe).run()
    capsys.readouterr()
    monkeypatch.chdir(workspace)
    expect_one_line_error(["compare", str(recipe.run_dir), "--output", "a_file"], capsys, workspace, "--output")


def test_set_changes_one_place_even_through_yaml_aliases(tmp_path):
    from cpt.recipe import load_recipe

    data = make_recipe(tmp_path, "model")
    data["tasks"].append({**data["tasks"][0], "name": "third"})  # shares 'fields' with task 0: dumped as an alias
    path = tmp_path / "aliased.yaml"
    path.write_text(yaml.safe_dump(data))
    assert "*id" in path.read_text()
    recipe = load_recipe(path, ["tasks.2.fields.completion=answer"])
    assert recipe.tasks[2].fields.completion == "answer" and recipe.tasks[0].fields.completion == "target"


def test_a_full_disk_is_one_line_and_says_how_to_resume(capsys, monkeypatch):
    import errno

    import cpt.cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/state/model.safetensors")

    monkeypatch.setattr(cpt.cli, "_report", full)
    assert main(["report", "runs/x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: no space left on the device writing runs/x/state/model.safetensors; free some"
    )
    assert "run the same command again to resume" in err

    def other(args):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cpt.cli, "_report", other)
    with pytest.raises(PermissionError):  # any other OS error is not disguised as this one
        main(["report", "runs/x"])
