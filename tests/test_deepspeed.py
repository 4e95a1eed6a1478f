"""DeepSpeed ZeRO-2/3 runs (CPU, DS_ACCELERATOR=cpu) give the plain run's results.

Each case launches `accelerate launch --config_file recipes/accelerate/zeroN.yaml cpt/run.py`
as users do (through tests/launch_and_count_engines.py, which then counts the DeepSpeed
objects left alive); the first launch on a machine compiles DeepSpeed's CPU communication
op once (cached in ~/.cache/torch_extensions).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from cpt.recipe import validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    model = build_tiny_model(root / "tiny", seed=0)
    return root, model


def recipe_file(root: Path, model: str, name: str, strategy: dict, peft: dict | None = None) -> Path:
    data = make_recipe(root, model, steps=(3, 3))
    data.update(name=name, strategy=strategy)
    if peft is not None:
        data["peft"] = peft
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def launch(config: str, recipe: Path, processes: int = 1, extra: list[str] = ()) -> list[dict]:
    """Run the recipe under ``accelerate launch``; each rank's count of DeepSpeed objects alive at the end."""
    counts_dir = recipe.parent / f"{recipe.stem}-live-objects"
    counts_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CPT_LIVE_OBJECTS_DIR": str(counts_dir),
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"recipes/accelerate/{config}.yaml",
        "--num_processes",
        str(processes),
        "tests/launch_and_count_engines.py",
        str(recipe),
        *extra,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((counts_dir / f"rank{rank}.json").read_text()) for rank in range(processes)]


def assert_same_run(reference: Path, other: Path) -> None:
    a = AutoModelForCausalLM.from_pretrained(reference / "state").state_dict()
    b = AutoModelForCausalLM.from_pretrained(other / "state").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    for file in sorted((reference / "geometry").glob("*.json")):
        ga, gb = json.loads(file.read_text()), json.loads((other / "geometry" / file.name).read_text())
        for tensor, row in ga["per_tensor"].items():
            for key in ("geometry_conflict", "sar_update_to_state", "norm_update", "norm_state"):
                if row[key] is None:
                    assert gb["per_tensor"][tensor][key] is None
                else:
                    assert gb["per_tensor"][tensor][key] == pytest.approx(row[key], abs=1e-5), (file.name, tensor, key)
    ma = json.loads((reference / "eval" / "matrix.json").read_text())
    mb = json.loads((other / "eval" / "matrix.json").read_text())
    assert mb["rows"] == ma["rows"] and mb["expert_scores"] == ma["expert_scores"]


LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.mark.parametrize(
    "config, processes, strategy, peft",
    [
        ("zero3", 1, {"name": "gcwm", "iters": 10, "step_coef": 1.0}, None),
        ("zero2", 1, {"name": "ewc", "fisher_examples": 4}, None),
        ("zero3", 2, {"name": "ewc", "fisher_examples": 4, "ewc_lambda": 1.0e4}, None),
        ("zero3", 2, {"name": "ewc", "fisher_examples": 4, "ewc_lambda": 1.0e4}, LORA),
    ],
    ids=["zero3-gcwm", "zero2-ewc", "zero3-2proc-ewc", "zero3-2proc-lora-ewc"],
)
def test_zero_matches_plain_run(setup, config, processes, strategy, peft):
    root, model = setup
    name = f"{config}-{processes}-{strategy['name']}" + ("-lora" if peft else "")
    path = recipe_file(root, model, name, strategy, peft)
    overrides = ["--set", "training.per_device_train_batch_size=2"] if processes == 2 else []
    live = launch(config, path, processes, overrides)
    # each task's engine, ZeRO optimizer and (ZeRO-3) partitioned model are freed with its trainer
    assert live == [{"engines": 0, "optimizers": 0, "partitioned_models": 0}] * processes

    plain = validate_recipe({**yaml.safe_load(path.read_text()), "name": f"plain-{name}"})
    if processes == 2:  # same global batch as 2 ranks × 2
        plain.training["per_device_train_batch_size"] = 4
    TaskSequenceRunner(plain).run()
    assert_same_run(plain.run_dir, root / "runs" / name)
    if config == "zero3" and strategy["name"] == "ewc":
        assert_same_ewc_shards(plain.run_dir / "strategy" / "ewc", root / "runs" / name / "strategy" / "ewc", processes)


def assert_same_ewc_shards(plain: Path, sharded: Path, processes: int) -> None:
    """Each ZeRO-3 rank stored only its slice of F and θ*; together they are the plain run's."""
    from safetensors.torch import load_file

    assert not (sharded / "step_2").exists(), "ZeRO-3 ranks store shards, not whole tensors"
    # θ* are the end-of-task weights (same tolerance as the states); F is compared relatively
    for file, atol in (("fisher.safetensors", 1e-8), ("anchors.safetensors", 1e-5)):
        whole = load_file(plain / "step_2" / file)
        shards = [
            load_file(sharded / f"zero3-rank{rank:05d}-of-{processes:05d}" / "step_2" / file)
            for rank in range(processes)
        ]
        assert set(shards[0]) == set(whole)
        for name, tensor in whole.items():
            parts = [shard[name] for shard in shards]
            assert all(part.numel() < tensor.numel() for part in parts), name
            torch.testing.assert_close(torch.cat(parts), tensor.reshape(-1), rtol=1e-4, atol=atol, msg=f"{file} {name}")


def test_zero3_state_is_written_as_save_pretrained_writes_it(setup):
    """A 2-rank ZeRO-3 state, gathered module by module, is the files save_pretrained writes for the plain run.

    ``max_shard_size`` splits the tiny model (≈560 kB) into several shards: the ZeRO-3 run's
    file names and index (weight map, ``total_size``, ``total_parameters``) are those of the
    plain run's state, which ``save_pretrained`` wrote; both loaders read equal weights.
    """
    from cpt.tensors import SafetensorsWeights

    root, model = setup
    name = "zero3-2-sequential-shards"
    path = recipe_file(root, model, name, {"name": "sequential"})
    data = yaml.safe_load(path.read_text())
    data.update(max_shard_size="200KB", geometry={"enabled": False})
    path.write_text(yaml.safe_dump(data))
    launch("zero3", path, 2, ["--set", "training.per_device_train_batch_size=2"])

    plain = validate_recipe({**data, "name": f"plain-{name}"})
    TaskSequenceRunner(plain).run()
    zero3_state, plain_state = root / "runs" / name / "state", plain.run_dir / "state"

    def weight_files(folder: Path) -> list[str]:
        return sorted(file.name for file in folder.iterdir() if "safetensors" in file.name)

    assert weight_files(zero3_state) == weight_files(plain_state)
    assert len(weight_files(zero3_state)) >= 3, "an index and at least two shards"
    index = json.loads((zero3_state / "model.safetensors.index.json").read_text())
    assert index == json.loads((plain_state / "model.safetensors.index.json").read_text())
    assert_same_run(plain.run_dir, root / "runs" / name)
    loaded = AutoModelForCausalLM.from_pretrained(zero3_state).state_dict()
    lazy = SafetensorsWeights(zero3_state)
    assert sorted(lazy.names()) == sorted(index["weight_map"])
    for tensor_name in lazy.names():
        torch.testing.assert_close(lazy[tensor_name], loaded[tensor_name], rtol=0, atol=0, msg=tensor_name)
