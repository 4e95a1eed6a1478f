"""Recipe validation: every error path is one line naming the field, exit status 2."""

import subprocess
import sys

import pytest
import yaml

from cpt.errors import CptError
from cpt.recipe import apply_overrides, load_recipe, validate_recipe


def base_recipe(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"input": "cat", "target": "cats"}\n{"input": "dog", "target": "dogs"}\n')
    return {
        "name": "demo",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tmp_path / "model")},
        "training": {"max_steps": 2, "learning_rate": 1e-4},
        "tasks": [
            {"name": "plural", "train": {"path": str(data)}, "eval": {"held_out": 1}},
            {"name": "plural2", "train": {"path": str(data)}, "eval": {"data": {"path": str(data)}}},
        ],
    }


def error_of(data):
    with pytest.raises(CptError) as info:
        validate_recipe(data, source="r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_valid_recipe_and_defaults(tmp_path):
    recipe = validate_recipe(base_recipe(tmp_path))
    assert recipe.strategy.name == "sequential"
    assert recipe.geometry.rank == 32 and recipe.geometry.energy == 0.95
    assert recipe.run_dir == tmp_path / "runs" / "demo"
    args = recipe.training_args(recipe.tasks[0])
    assert args["max_steps"] == 2 and args["learning_rate"] == 1e-4
    assert recipe.fingerprint() == validate_recipe(base_recipe(tmp_path)).fingerprint()


def test_strategy_shorthand_and_task_override(tmp_path):
    data = base_recipe(tmp_path)
    data["strategy"] = "sequential"
    data["tasks"][1]["training"] = {"learning_rate": 5e-4}
    recipe = validate_recipe(data)
    assert recipe.strategy.name == "sequential"
    assert recipe.training_args(recipe.tasks[1])["learning_rate"] == 5e-4
    assert recipe.training_args(recipe.tasks[0])["learning_rate"] == 1e-4


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda d: d["tasks"][1]["eval"].update(kind="multiple"),
            "r.yaml: tasks[1].eval.kind: Input should be 'generate' or 'choice'",
        ),
        (lambda d: d.update(colour="red"), "r.yaml: colour: unknown key; accepted keys: name, output_dir"),
        (lambda d: d["tasks"][0].update(trian={}), "tasks[0].trian: unknown key (did you mean 'train'?)"),
        (lambda d: d["model"].pop("name_or_path"), "model.name_or_path: required field is missing"),
        (lambda d: d.pop("tasks"), "tasks: required field is missing"),
        (lambda d: d.update(tasks=[]), "tasks: List should have at least 1 item"),
        (
            lambda d: d["tasks"][0]["train"].update(hub="x/y"),
            "tasks[0].train: give exactly one of 'path', 'hub' or 'asset'",
        ),
        (
            lambda d: d["tasks"][0]["train"].update(path="data.txt"),
            "unsupported file type .txt; accepted: .jsonl, .json, .csv, .parquet",
        ),
        (
            lambda d: d["tasks"][0]["eval"].update(data={"path": "x.jsonl"}),
            "tasks[0].eval: give either 'data' or 'held_out', not both",
        ),
        (lambda d: d["tasks"][0].update(eval={}), "tasks[0]: eval: give 'data' (an eval file) or 'held_out'"),
        (lambda d: d["tasks"][1].update(name="plural"), "task name 'plural' is used twice"),
        (lambda d: d["tasks"][0].update(name="bad name"), "tasks[0].name: task name 'bad name' must be letters"),
        (lambda d: d["tasks"][0]["eval"].update(kind="choice"), "eval kind 'choice' needs fields.choices"),
        (
            lambda d: d["tasks"][0].update(fields={"prompt": "input", "completion": None}),
            "tasks[0].fields: set 'messages', or both 'prompt' and 'completion'",
        ),
        (
            lambda d: d["tasks"][0].update(fields={"prompt_template": "{oops"}),
            "tasks[0].fields: prompt_template is not a valid format string",
        ),
        (lambda d: d["tasks"][0].update(max_examples=0), "tasks[0].max_examples: Input should be greater than 0"),
        (lambda d: d.update(targets=["(unclosed"]), "targets: '(unclosed' is not a valid regular expression"),
        (lambda d: d.update(peft={"r": -1}), "peft.r: Input should be greater than 0"),
        (lambda d: d["model"].update(dtype="int3"), "model.dtype: Input should be"),
        (
            lambda d: d.update(strategy={"name": "magic"}),
            "r.yaml: strategy: unknown strategy 'magic'; known strategies: aim_merging, average, dare_ta, dare_ties, ewc, gcwm, lines, localize_stitch, magmax, nufilt, opcm, replay, sequential, task_arithmetic, ties, wudi",
        ),
        (
            lambda d: d.update(strategy={"name": "sequential", "step_coef": 1}),
            "strategy.step_coef: unknown parameter of strategy 'sequential'",
        ),
        (
            lambda d: d["training"].update(learning_rat=1e-4),
            "r.yaml: training.learning_rat: not an SFTConfig field; did you mean learning_rate",
        ),
        (lambda d: d["training"].update(learning_rate="fast"), "training.learning_rate: 'fast' is not a valid float"),
        (
            lambda d: d["training"].update(lr_scheduler_type="zigzag"),
            "training: SFTConfig refused these settings: zigzag is not a valid SchedulerType",
        ),
        (lambda d: d["training"].update(output_dir="x"), "training.output_dir: set by cpt, not by the recipe"),
        (
            lambda d: d["tasks"][1].update(training={"max_stepz": 3}),
            "r.yaml: tasks[1].training.max_stepz: not an SFTConfig field",
        ),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutate, expected):
    data = base_recipe(tmp_path)
    mutate(data)
    assert expected in error_of(data)


def test_yaml_and_file_errors(tmp_path):
    with pytest.raises(CptError, match="recipe file '.*missing.yaml' not found"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntasks: [\n")
    with pytest.raises(CptError, match=r"broken.yaml: line \d+, column \d+: invalid YAML"):
        load_recipe(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(CptError, match="a recipe is a YAML mapping"):
        load_recipe(scalar)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(CptError, match="invalid YAML"):
        load_recipe(unsafe)


def test_overrides(tmp_path):
    data = base_recipe(tmp_path)
    apply_overrides(
        data, ["training.learning_rate=3e-4", "tasks.1.max_examples=7", "strategy.name=sequential", "seed=9"]
    )
    recipe = validate_recipe(data)
    assert recipe.training["learning_rate"] == 3e-4
    assert recipe.tasks[1].max_examples == 7 and recipe.seed == 9
    with pytest.raises(CptError, match="expected KEY=VALUE"):
        apply_overrides(data, ["learning_rate"])
    with pytest.raises(CptError, match="tasks.x must be a list index"):
        apply_overrides(data, ["tasks.x.name=a"])


def test_cli_exit_status_2_without_traceback(tmp_path):
    data = base_recipe(tmp_path)
    data["tasks"][1]["eval"]["kind"] = "multiple"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = subprocess.run([sys.executable, "-m", "cpt.cli", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}: tasks[1].eval.kind: Input should be 'generate' or 'choice'"]
    assert not (tmp_path / "runs").exists()
