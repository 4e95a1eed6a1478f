"""``cpt check`` and the preflight of ``cpt run``: a broken recipe fails with one line, the run directory untouched."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from cpt.cli import main
from cpt.errors import CptError
from cpt.preflight import check_recipe, optimizer_steps, state_bytes
from cpt.recipe import load_recipe, validate_recipe
from cpt.testing import build_tiny_model

from tiny_recipes import WORDS, make_recipe

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def write_recipe(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_check_prints_the_plan(tmp_path, tiny_model, capsys):
    recipe = write_recipe(tmp_path, make_recipe(tmp_path, tiny_model, steps=(4, 3)))
    code, out, err = run_cli(["check", recipe], capsys)
    assert code == 0, err
    assert "recipe tiny: OK" in out and "run dir" in out and "new run" in out
    # Both tasks, their example counts (12 words − 4 held out) and steps (max_steps), one rendered example each.
    assert "1. plural  train     8  eval    4 (generate)  optimizer steps 4" in out
    assert "2. upper   train     8  eval    4 (choice)  optimizer steps 3" in out
    assert "prompt:     'Plural of " in out and "completion: ' " in out
    assert "<|im_start|>user" in out, "chat prompts are shown through the chat template"
    assert "14 target tensors" in out  # 2 layers × 7 projections of the tiny model
    assert re.search(r"disk       \d+\.\d\d GB free; one state of this model is 0\.00 GB", out)
    assert not (tmp_path / "runs").exists(), "check creates nothing"


def test_a_disk_that_cannot_hold_two_states_is_refused_before_anything_runs(tmp_path, tiny_model, capsys, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path, make_recipe(tmp_path, tiny_model)))
    files = sorted(str(path) for path in Path(tiny_model).glob("*.safetensors"))
    with safe_open(files[0], "pt") as handle:
        parameters = sum(handle.get_tensor(name).numel() for name in handle.keys())
    state = state_bytes(recipe, files, {"all": (parameters,)})
    assert state == 4 * parameters  # float32, the recipe's default dtype
    auto = recipe.model_copy(update={"model": recipe.model.model_copy(update={"dtype": "auto"})})
    assert state_bytes(auto, files, {}) == sum(Path(file).stat().st_size for file in files)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * state - 1))
    line = _check_fails(capsys, ["run", write_recipe(tmp_path, make_recipe(tmp_path, tiny_model))])
    assert line.startswith("error: output_dir: 0.00 GB free on the disk of ") and "free at least 0.00 GB" in line
    assert not (tmp_path / "runs" / "tiny").exists(), "refused before the run directory was created"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2 * state))
    assert main(["check", write_recipe(tmp_path, make_recipe(tmp_path, tiny_model))]) == 0


def test_optimizer_steps_follow_the_trainer():
    from types import SimpleNamespace as Args

    base = dict(
        max_steps=-1,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=1,
        num_train_epochs=1.0,
        dataloader_drop_last=False,
    )
    assert optimizer_steps(Args(**base), 192, 1) == 12
    assert optimizer_steps(Args(**base), 193, 1) == 13  # the last short batch is a step
    assert (
        optimizer_steps(Args(**{**base, "gradient_accumulation_steps": 5}), 192, 1) == 3
    )  # 12 batches → 2 full + 1 partial
    assert optimizer_steps(Args(**{**base, "num_train_epochs": 2.5}), 192, 2) == 15  # 6 per epoch on 2 processes
    assert optimizer_steps(Args(**{**base, "max_steps": 7}), 192, 1) == 7


def test_run_plan_resume_complete_and_refusal(tmp_path, tiny_model):
    recipe = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(1, 1)))
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True)
    manifest = {
        "recipe_fingerprint": recipe.fingerprint(),
        "status": "running",
        "tasks": [{"status": "done"}, {"status": "pending"}],
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    assert check_recipe(recipe).action == "resume"
    assert "1/2 tasks done" in check_recipe(recipe).action_detail
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "status": "complete"}))
    assert check_recipe(recipe).action == "complete"
    other = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 1)))
    with pytest.raises(CptError, match="holds a run of a different recipe .* pass --overwrite"):
        check_recipe(other)
    assert check_recipe(other, overwrite=True).action == "overwrite"
    (run_dir / "manifest.json").unlink()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(CptError, match="is not a cpt run directory"):
        check_recipe(recipe)


def _check_fails(capsys, argv) -> str:
    code, out, err = run_cli(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_model_folder_problems_are_one_line(tmp_path, tiny_model, capsys):
    broken = tmp_path / "no-config"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").unlink()
    recipe = write_recipe(tmp_path, make_recipe(tmp_path, str(broken)))
    assert "has no config.json" in _check_fails(capsys, ["check", recipe])

    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    recipe = write_recipe(tmp_path, make_recipe(tmp_path, str(no_weights)))
    assert "no *.safetensors weights" in _check_fails(capsys, ["check", recipe])

    recipe = write_recipe(tmp_path, make_recipe(tmp_path, str(tmp_path / "nowhere")))
    assert "model.name_or_path" in _check_fails(capsys, ["check", recipe])


def test_targets_selecting_nothing_are_refused_for_merge_strategies(tmp_path, tiny_model, capsys):
    data = make_recipe(tmp_path, tiny_model, strategy="gcwm", targets=[r"\.nothing_proj\.weight$"])
    recipe = write_recipe(tmp_path, data)
    line = _check_fails(capsys, ["check", recipe])
    assert line.startswith("error: targets:") and "select no 2-D tensor" in line and "gcwm" in line
    # Sequential without geometry never reads the targets: nothing to refuse.
    data = make_recipe(tmp_path, tiny_model, targets=[r"\.nothing_proj\.weight$"], geometry={"enabled": False})
    assert run_cli(["check", write_recipe(tmp_path, data)], capsys)[0] == 0


def test_training_and_data_problems_found_before_training(tmp_path, tiny_model, capsys):
    recipe = write_recipe(tmp_path, make_recipe(tmp_path, tiny_model))
    # A prompt longer than max_length leaves no completion token to learn.
    line = _check_fails(capsys, ["check", recipe, "--set", "training.max_length=2"])
    assert "tasks[0]" in line and "max_length=2" in line
    # A column the data does not have.
    line = _check_fails(capsys, ["check", recipe, "--set", "tasks.0.fields.prompt=question"])
    assert "tasks[0].fields.prompt: column 'question' not in the data" in line
    # LoRA on modules the model does not have.
    line = _check_fails(capsys, ["check", recipe, "--set", "peft={target_modules: [qkv]}"])
    assert line.startswith("error: peft.target_modules:")
    # An eval file that does not exist.
    line = _check_fails(capsys, ["check", recipe, "--set", "tasks.0.eval={data: {path: missing.jsonl}}"])
    assert "tasks[0].eval.data.path: file 'missing.jsonl' not found" in line


def test_run_with_a_broken_recipe_leaves_no_run_directory(tmp_path, tiny_model, capsys):
    data = make_recipe(tmp_path, tiny_model)
    data["tasks"][1]["fields"]["prompt"] = "nope"
    line = _check_fails(capsys, ["run", write_recipe(tmp_path, data)])
    assert "tasks[1].fields.prompt" in line
    assert not (tmp_path / "runs" / "tiny").exists(), "the preflight failed before the run directory was created"


# ---------------------------------------------------------------------- every shipped recipe
def _asset_cache_for_recipes(root: Path, model: str) -> Path:
    """A CPT_CACHE holding the recipes' assets: the tiny model under the SmolLM2 asset's name
    and small BIG-bench-shaped datasets (the real assets need a download; see ``cpt assets``)."""
    from cpt.assets import ASSET_FORMAT, MODEL_ASSETS

    for name in MODEL_ASSETS:
        folder = root / "models" / name
        shutil.copytree(model, folder)
        (folder / "cpt_asset.json").write_text(json.dumps({"asset": name, "format": ASSET_FORMAT}))
    tasks = set()
    for path in RECIPES:
        for task in yaml.safe_load(path.read_text())["tasks"]:
            asset = task["train"].get("asset")
            if asset:
                tasks.add(asset.split(":", 1)[1])
    for task in tasks:
        folder = root / "datasets" / "bigbench" / task
        folder.mkdir(parents=True)
        rows = [{"input": word, "target": word + "s", "targets": [word + "s"]} for word in WORDS]
        (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:9]))
        (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[9:]))
        (folder / "meta.json").write_text(json.dumps({"format": ASSET_FORMAT}))
    return root


def _real_assets_cached() -> bool:
    from cpt.assets.cache import cache_dir
    from cpt.assets.dataset_files import dataset_ready
    from cpt.assets.gguf import model_ready

    names = {
        task["train"]["asset"]
        for path in RECIPES
        for task in yaml.safe_load(path.read_text())["tasks"]
        if "asset" in task["train"]
    }
    return model_ready(cache_dir() / "models" / "smollm2-135m-instruct") and all(
        dataset_ready(cache_dir() / "datasets" / "bigbench" / name.split(":", 1)[1]) for name in names
    )


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[path.stem for path in RECIPES])
def test_every_shipped_recipe_passes_check(recipe_path, tmp_path, tiny_model, monkeypatch, capsys):
    """Every recipe in recipes/ passes ``cpt check`` unchanged.

    With the real assets cached (``cpt assets fetch``) it runs against them; otherwise against
    a stand-in cache: the tiny model under the SmolLM2 asset name and small BIG-bench-shaped
    task files, so the recipes' fields, strategies, targets and training arguments are checked
    offline (the real counts differ).
    """
    if not _real_assets_cached():
        monkeypatch.setenv("CPT_CACHE", str(_asset_cache_for_recipes(tmp_path / "cache", tiny_model)))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["check", str(recipe_path)], capsys)
    assert code == 0, err
    recipe = load_recipe(recipe_path)
    assert f"recipe {recipe.name}: OK" in out and out.count("optimizer steps") == len(recipe.tasks)


def test_probes_are_checked_and_listed(tmp_path, tiny_model, capsys):
    """A probe's data loads before anything runs; the plan lists each probe as evaluated, never trained."""
    probe_file = tmp_path / "probe.jsonl"
    probe_file.write_text("".join(json.dumps({"input": f"Echo {w}:", "target": f" {w}"}) + "\n" for w in WORDS))
    data = make_recipe(tmp_path, tiny_model)
    data["probes"] = [{"name": "echo", "data": {"path": str(probe_file)}}]
    recipe = write_recipe(tmp_path, data)
    code, out, err = run_cli(["check", recipe], capsys)
    assert code == 0 and f"probe echo: {len(WORDS)} generate (evaluated" in out, err
    data["probes"] = [{"name": "echo", "data": {"path": str(tmp_path / "missing.jsonl")}}]
    line = _check_fails(capsys, ["check", write_recipe(tmp_path, data)])
    assert "probes[0].data.path" in line and "not found" in line
