"""GeometryConflictCallback in a plain TRL script and in the runner, against cpt.geometry directly."""

import json

import datasets
import pytest
import torch
from tiny_training import quiet_cpu_sft_config
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from cpt.callbacks import GeometryConflictCallback
from cpt.diagnostics import tensor_depth, tensor_family
from cpt.geometry import geometry_conflict, right_basis, subspace_alignment_ratio
from cpt.testing import build_tiny_model

TARGET_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A base θ0 and a state θ_{t−1} = θ0 + a low-rank change on every target tensor."""
    root = tmp_path_factory.mktemp("geo")
    base = build_tiny_model(root / "base", seed=1)
    model = AutoModelForCausalLM.from_pretrained(base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(TARGET_SUFFIXES):
                left = torch.randn(param.shape[0], 3, generator=generator)
                right = torch.randn(3, param.shape[1], generator=generator)
                param.add_(0.02 * left @ right)
    model.save_pretrained(root / "state")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "state")
    return root, base, str(root / "state")


def train(start, callback, peft_config=None, steps=3):
    tokenizer = AutoTokenizer.from_pretrained(start)
    model = AutoModelForCausalLM.from_pretrained(start)
    data = datasets.Dataset.from_list(
        [{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in ["cat", "dog", "tree", "car"]]
    )
    args = quiet_cpu_sft_config(callback.output_dir / "trainer", max_steps=steps)
    trainer = SFTTrainer(
        model, args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config, callbacks=[callback]
    )
    callback.bind_trainer(trainer)
    trainer.train()
    return trainer


def load(folder):
    return {k: v for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_full_finetune_matches_direct_geometry(tmp_path, folders):
    root, base, state = folders
    callback = GeometryConflictCallback(
        base=base, state_dir=state, output_dir=tmp_path / "geometry", step=2, task_name="plural"
    )
    trainer = train(state, callback)
    report = json.loads((tmp_path / "geometry" / "2_plural.json").read_text())
    assert report["num_tensors"] == 14 and len(report["per_tensor"]) == 14
    theta0, previous = load(base), load(state)
    expert = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    for name, row in report["per_tensor"].items():
        state_delta = previous[name] - theta0[name]
        update = expert[name] - previous[name]
        expected = float(geometry_conflict(state_delta, update, rank=32, energy=0.95, eps=1e-6))
        assert row["geometry_conflict"] == pytest.approx(expected, rel=1e-6, abs=1e-9), name
        assert 0.0 <= row["geometry_conflict"] <= 1.0
        expected_sar = float(subspace_alignment_ratio(update, right_basis(state_delta, 32, 0.95)))
        assert row["sar_update_to_state"] == pytest.approx(expected_sar, rel=1e-6, abs=1e-9)
        assert row["norm_update"] == pytest.approx(float(update.double().norm()), rel=1e-5)
        assert row["norm_state"] == pytest.approx(float(state_delta.double().norm()), rel=1e-5)
    aggregates = report["aggregates"]["geometry_conflict"]
    values = [row["geometry_conflict"] for row in report["per_tensor"].values()]
    assert aggregates["mean"] == pytest.approx(sum(values) / len(values))
    attention = [row["geometry_conflict"] for n, row in report["per_tensor"].items() if "self_attn" in n]
    assert aggregates["by_family"]["attention"] == pytest.approx(sum(attention) / len(attention))
    assert set(aggregates["by_depth"]) == {"0", "1"}
    assert aggregates["top"][0]["geometry_conflict"] == max(values) and len(aggregates["top"]) == 10
    logged = [entry for entry in trainer.state.log_history if "geometry/conflict_mean" in entry]
    assert logged and logged[0]["geometry/conflict_mean"] == pytest.approx(aggregates["mean"])


def test_lora_update_uses_factors_and_matches_dense(tmp_path, folders):
    from peft import LoraConfig

    root, base, state = folders
    callback = GeometryConflictCallback(
        base=base, state_dir=state, output_dir=tmp_path / "geometry", step=2, task_name="lora"
    )
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        task_type="CAUSAL_LM",
        init_lora_weights="gaussian",
    )
    trainer = train(state, callback, peft_config=lora)
    report = json.loads((tmp_path / "geometry" / "2_lora.json").read_text())
    theta0, previous = load(base), load(state)
    merged = {}
    from cpt.tensors import model_tensors

    merged = dict(model_tensors(trainer.model))
    for name, row in report["per_tensor"].items():
        update = merged[name] - previous[name]
        if any(key in name for key in ("q_proj", "v_proj", "down_proj")):
            expected = float(geometry_conflict(previous[name] - theta0[name], update))
            assert row["geometry_conflict"] == pytest.approx(expected, rel=1e-4, abs=1e-7), name
            assert row["rank_update"] <= 4
        else:  # no adapter on this tensor: nothing changed, conflict undefined
            assert row["norm_update"] == 0.0 and row["geometry_conflict"] is None


def test_first_step_conflict_undefined_and_keep_updates(tmp_path, folders):
    root, base, state = folders
    first = GeometryConflictCallback(base=base, output_dir=tmp_path / "g", step=1, task_name="a", keep_updates=True)
    train(base, first)
    report = json.loads((tmp_path / "g" / "1_a.json").read_text())
    assert all(row["geometry_conflict"] is None for row in report["per_tensor"].values())
    assert report["aggregates"]["geometry_conflict"]["mean"] is None
    assert report["earlier_updates"] == {}
    second = GeometryConflictCallback(
        base=base, state_dir=state, output_dir=tmp_path / "g", step=2, task_name="b", keep_updates=True
    )
    train(state, second)
    report = json.loads((tmp_path / "g" / "2_b.json").read_text())
    earlier = report["earlier_updates"]["1_a"]
    assert set(earlier["per_tensor"]) == set(report["per_tensor"])
    assert 0.0 < earlier["mean_geometry_conflict"] < 1.0
    assert (tmp_path / "g" / "bases" / "2_b.safetensors").exists()


def test_family_and_depth_names():
    assert tensor_family("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert tensor_family("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert tensor_family("model.embed_tokens.weight") == "other"
    assert tensor_depth("model.layers.12.mlp.up_proj.weight") == 12
    assert tensor_depth("lm_head.weight") is None


def test_cpt_geometry_command(tmp_path, folders):
    """`cpt geometry BASE A B C` writes one entry per unordered pair, deltas against BASE."""
    import subprocess
    import sys

    root, base, state = folders
    other = root / "other"
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    model.save_pretrained(other)
    out = tmp_path / "geometry.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cpt.cli",
            "geometry",
            base,
            state,
            str(other),
            state,
            "--output",
            str(out),
            "--rank",
            "8",
        ],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(p["a"], p["b"]) for p in report["pairs"]] == [(state, str(other)), (state, state), (str(other), state)]
    same = report["pairs"][1]
    assert same["mean_geometry_conflict"] == pytest.approx(0.0, abs=1e-6), "identical deltas have no conflict"
    first = report["pairs"][0]
    theta0, a, b = load(base), load(state), load(str(other))
    name = "model.layers.0.self_attn.q_proj.weight"
    row = first["per_tensor"][name]
    assert row["geometry_conflict"] == pytest.approx(
        float(geometry_conflict(a[name] - theta0[name], b[name] - theta0[name], rank=8)), rel=1e-6
    )
    assert set(row) == {"geometry_conflict", "sar_a_to_b", "sar_b_to_a", "norm_a", "norm_b"}
    # Tensors the second checkpoint did not change: its delta is zero, so the conflict is undefined.
    assert first["per_tensor"]["model.layers.0.mlp.up_proj.weight"]["geometry_conflict"] is None
    assert "conflict" in result.stdout and str(out) in result.stdout

    bad = subprocess.run(
        [sys.executable, "-m", "cpt.cli", "geometry", base, state, "--output", str(out)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "error: geometry: give at least two checkpoints to compare"
