"""A bf16 base model end to end: training in bf16, merge and geometry math in float32/64
(METHOD §1–§3), the state written in bf16."""

import json
import math
from pathlib import Path

import pytest
import torch
from merge_steps import context
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.diagnostics import GeometrySettings, pair_geometry
from cpt.merging.batch_io import run_merge
from cpt.recipe import DEFAULT_TARGETS
from cpt.strategies import get_strategy
from cpt.tensors import LoraAdapter, compile_targets, is_target
from cpt.testing import build_tiny_model

LORA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def save_as(model, tokenizer, folder: Path, dtype: torch.dtype) -> Path:
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_base(tmp_path_factory):
    """θ0 saved in bf16 (``config.json`` says so), as users download 1–8B models."""
    root = tmp_path_factory.mktemp("bf16")
    folder = Path(build_tiny_model(root / "f32", seed=2))
    return save_as(
        AutoModelForCausalLM.from_pretrained(folder),
        AutoTokenizer.from_pretrained(folder),
        root / "base",
        torch.bfloat16,
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {name: value for file in sorted(folder.glob("*.safetensors")) for name, value in load_file(file).items()}


def assert_bf16_folder(folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    assert files
    for file in files:
        with safe_open(file, framework="pt") as handle:
            assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"BF16"}
    config = json.loads((folder / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def perturbed(base: Path, seed: int, dtype: torch.dtype):
    """A fine-tune-sized change of θ0 in ``dtype`` (the values are bf16 numbers either way)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_((param + 0.01 * torch.randn(param.shape, generator=generator)).to(torch.bfloat16))
    return model.to(dtype)


@pytest.mark.parametrize(
    "method, params", [("task_arithmetic", {"scaling": 0.5}), ("gcwm", {"iters": 5, "rank": 4, "step_coef": 0.5})]
)
def test_bf16_merge_is_the_float32_merge_rounded_to_bf16(tmp_path, bf16_base, method, params):
    """Step by step, the bf16 run's state is exactly the float32 computation over the same
    (bf16-valued) tensors, rounded once to bf16."""
    f32_base = save_as(
        AutoModelForCausalLM.from_pretrained(bf16_base),
        AutoTokenizer.from_pretrained(bf16_base),
        tmp_path / "b32",
        torch.float32,
    )
    strategy_bf16 = get_strategy(method).build(dict(params))
    strategy_f32 = get_strategy(method).build(dict(params))
    theta0 = tensors(bf16_base)
    previous = {name: value.float() for name, value in theta0.items()}
    for step, seed in ((1, 5), (2, 6)):
        expert = perturbed(bf16_base, seed, torch.bfloat16)
        expert_f32 = perturbed(bf16_base, seed, torch.float32)
        run_merge(strategy_bf16, context(tmp_path / "bf16", bf16_base, expert, step))
        run_merge(strategy_f32, context(tmp_path / "f32", f32_base, expert_f32, step))
        state = tmp_path / "bf16" / "run" / "state"
        assert_bf16_folder(state)
        got, reference = tensors(state), tensors(tmp_path / "f32" / "run" / "state")
        for name, value in got.items():
            assert value.dtype == torch.bfloat16
            torch.testing.assert_close(value, reference[name].to(torch.bfloat16), rtol=0, atol=0)
        if method == "task_arithmetic":  # and by hand: θ_t = θ_{t−1} + λ(E_t − θ0), in float32, rounded once
            experts = expert_f32.state_dict()
            for name, value in got.items():
                expected = previous[name] + 0.5 * (experts[name] - theta0[name].float())
                torch.testing.assert_close(value, expected.to(torch.bfloat16), rtol=0, atol=0)
        # step t+1 reads θ_t as the bf16 run stored it
        reference_state = tmp_path / "f32" / "run" / "state" / "model.safetensors"
        save_file({name: value.float() for name, value in got.items()}, reference_state, metadata={"format": "pt"})
        previous = {name: value.float() for name, value in got.items()}
    moved = sum(not torch.equal(got[name], theta0[name]) for name in got)
    assert moved > 0


def run_tiny(tmp_path: Path, base: Path, strategy: dict, **extra):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    from tiny_recipes import make_recipe

    data = make_recipe(tmp_path, str(base), steps=(2, 2))
    data["model"]["dtype"] = "bfloat16"
    data["strategy"] = strategy
    data["evaluation"]["evaluate_base"] = False
    data.update(extra)
    recipe = validate_recipe(data)
    TaskSequenceRunner(recipe).run()
    return recipe.run_dir


def geometry_rows(run_dir: Path, step_file: str) -> dict[str, dict]:
    report = json.loads((run_dir / "geometry" / step_file).read_text())
    return report["per_tensor"]


def assert_finite_geometry(rows: dict[str, dict]) -> None:
    defined = 0
    for row in rows.values():
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), key
                defined += 1
    assert defined > 0


def test_bf16_lora_run_state_merge_and_geometry(tmp_path, bf16_base):
    """LoRA over a bf16 model with task arithmetic: the state is bf16 and is the float32 merge
    of the adapters' updates rounded to bf16; step 2's geometry is the float32 computation."""
    run_dir = run_tiny(
        tmp_path,
        bf16_base,
        {"name": "task_arithmetic", "scaling": 0.5},
        peft={"r": 4, "lora_alpha": 8, "target_modules": LORA_TARGETS},
    )
    state = run_dir / "state"
    assert_bf16_folder(state)
    theta0 = {name: value.float() for name, value in tensors(bf16_base).items()}
    adapters = [LoraAdapter(run_dir / "experts" / "1_plural"), LoraAdapter(run_dir / "experts" / "2_upper")]
    theta1 = {}
    for name, value in theta0.items():
        theta1[name] = (value + 0.5 * adapters[0].delta(name) if name in adapters[0] else value).to(torch.bfloat16)
    got = tensors(state)
    for name in theta0:
        expected = theta1[name].float() + (0.5 * adapters[1].delta(name) if name in adapters[1] else 0)
        torch.testing.assert_close(got[name], expected.to(torch.bfloat16), rtol=0, atol=0)
    # geometry of step 2: GC(θ1 − θ0, Δ2) from float32 deltas of the bf16 tensors (dense here)
    rows = geometry_rows(run_dir, "2_upper.json")
    assert_finite_geometry(rows)
    names = sorted(rows)
    patterns = compile_targets(DEFAULT_TARGETS)
    assert all(is_target(name, patterns) for name in names)

    def update(name):
        return adapters[1].delta(name) if name in adapters[1] else torch.zeros(theta0[name].shape)

    expected = pair_geometry(names, lambda name: theta1[name].float() - theta0[name], update, GeometrySettings())
    compared = 0
    for name in names:
        for key, value in expected[name].items():
            if key in rows[name] and isinstance(value, float):
                assert rows[name][key] == pytest.approx(value, abs=1e-5), (name, key)
                compared += 1
    adapted = [name for name in names if name in adapters[1]]
    assert len(adapted) == 2 * len(LORA_TARGETS)  # two layers
    assert all(rows[name]["geometry_conflict"] is not None for name in adapted)
    assert compared >= len(adapted)


@pytest.mark.parametrize(
    "strategy",
    [{"name": "sequential"}, {"name": "gcwm", "iters": 5, "rank": 4, "bary_iters": 5}],
    ids=["sequential", "gcwm"],
)
def test_bf16_full_fine_tune_run(tmp_path, bf16_base, strategy):
    """Full fine-tuning in bf16: the state is bf16, it moved, and the geometry is finite."""
    run_dir = run_tiny(tmp_path, bf16_base, strategy)
    assert_bf16_folder(run_dir / "state")
    theta0, got = tensors(bf16_base), tensors(run_dir / "state")
    assert sum(not torch.equal(got[name], theta0[name]) for name in theta0) > 0
    assert_finite_geometry(geometry_rows(run_dir, "2_upper.json"))
