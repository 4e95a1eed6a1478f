"""LoRA experts as PEFT adapter folders: `cpt merge` and `cpt geometry` read them as experts,
and a LoRA run keeps each task's adapter in ``experts/<t>_<task>/``."""

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cpt.diagnostics import GeometrySettings, checkpoint_geometry
from cpt.errors import CptError
from cpt.merging.offline import merge_checkpoints
from cpt.tensors import AdapterExpertWeights, LoraAdapter, SafetensorsWeights, is_adapter_folder
from cpt.testing import build_tiny_model

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """θ0 and two LoRA experts over it, each as an adapter folder and as peft's merged dense folder."""
    root = tmp_path_factory.mktemp("adapters")
    base = Path(build_tiny_model(root / "base", seed=2))
    adapters, dense = [], []
    for seed, extra in ((1, {}), (2, {"use_rslora": True, "r": 2, "alpha_pattern": {"down_proj": 3.0}})):
        torch.manual_seed(seed)
        config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(**{**config, **extra}))
        with torch.no_grad():  # fine-tune-sized updates
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.05)
        model.save_pretrained(root / f"adapter{seed}")
        model.merge_and_unload().save_pretrained(root / f"dense{seed}")
        adapters.append(root / f"adapter{seed}")
        dense.append(root / f"dense{seed}")
    return base, adapters, dense


def state(folder: Path) -> dict[str, torch.Tensor]:
    return {name: value for file in sorted(folder.glob("*.safetensors")) for name, value in load_file(file).items()}


def test_adapter_reads_as_the_merged_expert(experts):
    base, adapters, dense = experts
    assert is_adapter_folder(adapters[0]) and not is_adapter_folder(dense[0])
    base_weights = SafetensorsWeights(base)
    for adapter, merged in zip(adapters, dense):
        expert = AdapterExpertWeights(adapter, base_weights)
        reference = SafetensorsWeights(merged)
        assert expert.names() == base_weights.names()
        for name in base_weights.names():
            assert expert.dtype(name) == base_weights.dtype(name)
            torch.testing.assert_close(expert[name].float(), reference[name].float(), rtol=0, atol=1e-6)
    # PEFT's scale rules: lora_alpha/r, alpha/√r with rsLoRA, alpha_pattern per module
    second = LoraAdapter(adapters[1])
    _, lora_a, scale = second.factors("model.layers.0.self_attn.q_proj.weight")
    assert lora_a.shape[0] == 2 and scale == pytest.approx(8 / 2**0.5)
    assert second.factors("model.layers.0.mlp.down_proj.weight")[2] == pytest.approx(3 / 2**0.5)
    assert LoraAdapter(adapters[0]).factors("model.layers.1.mlp.up_proj.weight")[2] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "method, overrides",
    [("task_arithmetic", ["scaling=0.5"]), ("gcwm", ["iters=5", "rank=4", "step_coef=0.5"])],
)
def test_adapter_merge_equals_dense_merge(tmp_path, experts, method, overrides):
    base, adapters, dense = experts
    from_adapters = merge_checkpoints(method, str(base), list(map(str, adapters)), tmp_path / "a", overrides)
    from_dense = merge_checkpoints(method, str(base), list(map(str, dense)), tmp_path / "d", overrides)
    assert len(from_adapters["steps"]) == len(from_dense["steps"]) == 2
    merged_a, merged_d = state(tmp_path / "a"), state(tmp_path / "d")
    assert merged_a.keys() == merged_d.keys()
    theta0 = state(base)
    moved = 0
    for name, value in merged_d.items():
        torch.testing.assert_close(merged_a[name], value, rtol=0, atol=1e-6)
        moved += int(not torch.equal(value, theta0[name]))
    assert moved >= 2 * len(TARGETS)  # the merge did move the adapted tensors
    # the state is a whole HF model folder (config from the base, the adapter has none)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    torch.testing.assert_close(
        model.state_dict()["model.layers.0.self_attn.q_proj.weight"], merged_d["model.layers.0.self_attn.q_proj.weight"]
    )


def test_adapter_geometry_equals_dense_geometry_from_factors(experts, monkeypatch):
    base, adapters, dense = experts
    settings = GeometrySettings(rank=8)
    reference = checkpoint_geometry(str(base), list(map(str, dense)), settings)

    def no_dense_product(self, name):
        raise AssertionError("geometry formed the dense B·A")

    monkeypatch.setattr(LoraAdapter, "delta", no_dense_product)
    from_adapters = checkpoint_geometry(str(base), list(map(str, adapters)), settings)
    mixed = checkpoint_geometry(str(base), [str(adapters[0]), str(dense[1])], settings)
    for report in (from_adapters, mixed):
        (pair,), (expected,) = report["pairs"], reference["pairs"]
        assert report["num_tensors"] == reference["num_tensors"]
        defined = 0
        for name, row in expected["per_tensor"].items():
            for key, value in row.items():
                got = pair["per_tensor"][name][key]
                if value is None:
                    assert got is None, (name, key)
                    continue
                defined += 1
                assert got == pytest.approx(value, abs=1e-5), (name, key)
        assert defined > 0
        assert pair["mean_geometry_conflict"] == pytest.approx(expected["mean_geometry_conflict"], abs=1e-5)


def test_adapters_that_are_not_plain_lora_are_refused(tmp_path, experts):
    base, adapters, _ = experts
    import shutil

    folder = tmp_path / "dora"
    shutil.copytree(adapters[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(CptError, match="use_dora"):
        LoraAdapter(folder)
    other_base = Path(build_tiny_model(tmp_path / "other", hidden_size=32))
    with pytest.raises(CptError, match="in the base"):
        AdapterExpertWeights(adapters[0], SafetensorsWeights(other_base))


def test_lora_run_keeps_adapters_and_they_reproduce_the_state(tmp_path, experts):
    """A task-arithmetic LoRA run keeps experts/<t>_<task>/ adapters; `cpt merge` of them is the run's state."""
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    from tiny_recipes import make_recipe

    base = experts[0]
    data = make_recipe(tmp_path, str(base), steps=(2, 2))
    data["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS}
    data["strategy"] = {"name": "task_arithmetic", "scaling": 0.5}
    data["geometry"] = {"enabled": False}
    data["evaluation"]["evaluate_base"] = False
    recipe = validate_recipe(data)
    TaskSequenceRunner(recipe).run()
    kept = [recipe.run_dir / "experts" / "1_plural", recipe.run_dir / "experts" / "2_upper"]
    for folder in kept:
        assert {path.name for path in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        assert (folder / "adapter_model.safetensors").stat().st_size < (Path(base) / "model.safetensors").stat().st_size
        assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder) is not None
    merge_checkpoints("task_arithmetic", str(base), list(map(str, kept)), tmp_path / "again", ["scaling=0.5"])
    run_state, again = state(recipe.run_dir / "state"), state(tmp_path / "again")
    assert run_state.keys() == again.keys()
    for name, value in run_state.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-6)


def test_cli_takes_adapter_folders(tmp_path, experts):
    """`cpt merge` (through its preflight) and `cpt geometry` accept adapter folders as experts."""
    import os
    import subprocess
    import sys

    base, adapters, dense = experts
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cli(*args):
        result = subprocess.run(
            [sys.executable, "-m", "cpt.cli", *map(str, args)], capture_output=True, text=True, env=env
        )
        assert result.returncode == 0, result.stderr
        return result

    cli(
        "merge", "--method", "task_arithmetic", base, *adapters, "--output", tmp_path / "m", "--max-shard-size", "100KB"
    )
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    expected = merge_checkpoints("task_arithmetic", str(base), list(map(str, dense)), tmp_path / "d")
    assert expected["steps"]
    merged, reference = state(tmp_path / "m"), state(tmp_path / "d")
    for name, value in reference.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6)
    cli("geometry", base, *adapters, "--output", tmp_path / "g.json", "--rank", "8")
    pair = json.loads((tmp_path / "g.json").read_text())["pairs"][0]
    assert 0 < pair["mean_geometry_conflict"] <= 1
