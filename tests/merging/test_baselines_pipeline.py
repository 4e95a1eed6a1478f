"""METHOD §3's baselines through the real streamed pipeline (``run_merge``), the runner and
their recipes, on the tiny model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from merge_steps import context, perturbed, weights
from peft.utils.merge_utils import ties as peft_ties
from transformers import AutoModelForCausalLM

from cpt.merging.pipeline import run_merge
from cpt.recipe import load_recipe
from cpt.strategies import get_strategy
from cpt.testing import build_tiny_model

METHODS = ["ties", "magmax", "wudi", "opcm", "nufilt", "dare_ta", "dare_ties", "localize_stitch", "lines"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Small settings where the defaults would be slow or degenerate on a 64-wide model.
FAST = {"nufilt": {"projection_rank": 8, "lora_rank": 4, "task_rank": 2, "iters": 5}, "wudi": {"iters": 5, "lr": 1e-3}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return Path(build_tiny_model(tmp_path_factory.mktemp("base") / "tiny", seed=4))


@pytest.fixture(scope="module")
def experts(base):
    return [perturbed(base, seed) for seed in (11, 12, 13)]


def run_three(tmp_path, base, experts, name, params=None):
    strategy = get_strategy(name).build(params if params is not None else FAST.get(name, {}))
    states, results = [], []
    for step, model in enumerate(experts, start=1):
        results.append(run_merge(strategy, context(tmp_path / name, base, model, step)))
        states.append(weights(tmp_path / name / "run" / "state"))
    return states, results


def whole_norm(a: dict, b: dict) -> float:
    return math.sqrt(sum(float((a[n] - b[n]).double().square().sum()) for n in b))


@pytest.mark.parametrize("name", METHODS)
def test_three_steps_through_run_merge(tmp_path, base, experts, name):
    theta0 = weights(base)
    states, results = run_three(tmp_path, base, experts, name)
    q = "model.layers.0.self_attn.q_proj.weight"
    for step, (state, result) in enumerate(zip(states, results), start=1):
        assert all(torch.isfinite(v).all() for v in state.values())
        per_tensor = result["per_tensor"]
        assert q in per_tensor and "model.norm.weight" in per_tensor
        if name == "opcm":  # true update norms are known after the global rescale: in the summary
            assert set(result["summary"]["norm_update"]) == set(per_tensor)
        else:
            assert all("norm_update" in s for s in per_tensor.values())
        previous = theta0 if step == 1 else states[step - 2]
        assert whole_norm(state, previous) > 1e-3, "every step moves the state"
    specific = {
        "ties": "sign_conflicts",
        "magmax": "fraction_from_new",
        "wudi": "objective_after",
        "opcm": "split_rank",
        "nufilt": "objective_after",
        "dare_ta": "mask_seed",
        "dare_ties": "sign_conflicts",
        "localize_stitch": "overlap",
        "lines": "scale",
    }[name]
    assert specific in results[1]["per_tensor"][q] and results[1]["per_tensor"][q]["target"] is True
    e = [m.state_dict() for m in experts]
    if name in ("wudi", "opcm", "nufilt"):  # θ_1 = E_1 (WUDI: the zero state delta is dropped)
        for n, v in states[0].items():
            torch.testing.assert_close(v, e[0][n], rtol=0, atol=1e-6)
    if name == "magmax":  # history carried on disk: θ_3 = θ0 + 0.5·(per-entry larger-magnitude τ, later on ties)
        for n, v in theta0.items():
            taus = torch.stack([x[n] - v for x in e])
            pick = len(e) - 1 - taus.flip(0).abs().argmax(dim=0, keepdim=True)
            torch.testing.assert_close(states[2][n], v + 0.5 * taus.gather(0, pick)[0], rtol=0, atol=1e-6)
    if name == "ties":  # M_3 = TIES(TIES(τ_1, τ_2), τ_3), each step peft's ties on one tensor
        for n, v in theta0.items():
            merged = e[0][n] - v
            for x in e[1:]:
                merged = peft_ties([merged, x[n] - v], torch.ones(2), 0.2)
            torch.testing.assert_close(states[2][n], v + 0.3 * merged, rtol=0, atol=1e-6)
    if name == "opcm":  # ‖θ_t − θ0‖ = n̄ (whole model) and λ_t = ‖D_t‖/n̄ carried
        norms = [whole_norm(x, theta0) for x in e]
        for step, (state, result) in enumerate(zip(states, results), start=1):
            mean = sum(norms[:step]) / step
            assert whole_norm(state, theta0) == pytest.approx(mean, rel=1e-4)
            assert result["summary"]["mean_task_norm"] == pytest.approx(mean, rel=1e-4)
            previous = theta0 if step == 1 else states[step - 2]
            true_update = math.sqrt(float((state[q] - previous[q]).square().sum()))
            assert result["summary"]["norm_update"][q] == pytest.approx(true_update, rel=1e-3)
        assert results[2]["summary"]["global_scale"] == pytest.approx(results[2]["summary"]["scale"])
        assert results[1]["summary"]["lambda"] > 1  # D accumulates: ‖D_2‖ > n̄ for near-orthogonal task vectors


def test_new_baselines_through_run_merge_match_an_independent_computation(tmp_path, base, experts):
    """DARE-TA, Localize-and-Stitch and LiNeS (TIES base) after three steps on disk, recomputed
    here from the experts with torch/peft alone (masks from the same seeded generator)."""
    from cpt.merging.dare import dare_mask
    from cpt.merging.localize_stitch import stitch

    theta0 = weights(base)
    e = [m.state_dict() for m in experts]
    taus = [{n: x[n] - v for n, v in theta0.items()} for x in e]
    _, results = run_three(tmp_path / "probe", base, experts, "task_arithmetic")
    targets = sorted(n for n, s in results[0]["per_tensor"].items() if s["target"])
    # DARE-TA: θ_3 = θ0 + 0.3 Σ_t D_t(τ_t) on targets (1/ρ rescale), + 0.3 Σ τ_t elsewhere.
    states, _ = run_three(tmp_path, base, experts, "dare_ta", {"density": 0.5, "seed": 3})
    for n, v in theta0.items():
        parts = [
            tau[n] * dare_mask(v.shape, 0.5, 3, step, n) / 0.5 if n in targets else tau[n]
            for step, tau in enumerate(taus, start=1)
        ]
        torch.testing.assert_close(states[2][n], v + 0.3 * sum(parts), rtol=0, atol=1e-6)
    # Localize-and-Stitch: global top-10 % of each τ_t over the targets, stitched one-shot.
    states, results = run_three(tmp_path, base, experts, "localize_stitch")
    masks = []
    for tau in taus:
        flat = torch.cat([tau[n].flatten() for n in targets]).abs()
        q = flat.sort(descending=True).values[int(0.1 * flat.numel()) - 1]
        masks.append({n: tau[n].abs() >= q for n in targets})
        assert results[len(masks) - 1]["summary"]["threshold"] == pytest.approx(float(q), rel=0, abs=0)
    for n, v in theta0.items():
        expected = stitch([tau[n] for tau in taus], [m[n] for m in masks]) if n in targets else torch.zeros_like(v)
        torch.testing.assert_close(states[2][n], v + expected, rtol=0, atol=1e-6)
    # LiNeS over TIES: M_t by peft's ties, α_t = (1/t)‖S_t‖₁/‖M_t‖₁ over the targets, λ(ℓ) = α + β ℓ/(L−1).
    states, results = run_three(tmp_path, base, experts, "lines", {"base": "ties"})
    layers = AutoModelForCausalLM.from_pretrained(base).config.num_hidden_layers
    merged = dict(taus[0])
    for step in (2, 3):
        merged = {n: peft_ties([merged[n], taus[step - 1][n]], torch.ones(2), 0.2) for n in theta0}
        total = sum(float(sum(tau[n] for tau in taus[:step]).abs().sum()) for n in targets)
        alpha = total / (step * sum(float(merged[n].abs().sum()) for n in targets))
        assert results[step - 1]["summary"]["alpha"] == pytest.approx(alpha, rel=1e-5)
        for n, v in theta0.items():
            match = re.search(r"\.layers\.(\d+)\.", n)
            scale = alpha + (0.5 * int(match.group(1)) / (layers - 1) if match else 0.0)
            torch.testing.assert_close(states[step - 1][n], v + scale * merged[n], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_runner_one_short_run(tmp_path, base, name):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    from tiny_recipes import make_recipe

    data = make_recipe(tmp_path, str(base), steps=(1, 1))
    data["strategy"] = {"name": name, **FAST.get(name, {})}
    data["geometry"] = {"enabled": False}
    data["evaluation"]["evaluate_base"] = False
    recipe = validate_recipe(data)
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) >= 2
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["step"] == 2 and any(s.get("target") for s in stats["per_tensor"].values())
    assert (recipe.run_dir / "state" / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["task_arithmetic", "average", *METHODS, "gcwm", "replay", "ewc"])
def test_recipe_is_the_quickstart_with_this_strategy(name):
    quickstart = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    strategy = data["strategy"] if isinstance(data["strategy"], dict) else {"name": data["strategy"]}
    assert strategy["name"] == name and data["name"] == name
    assert {k: v for k, v in data.items() if k not in ("name", "strategy")} == {
        k: v for k, v in quickstart.items() if k not in ("name", "strategy")
    }
    recipe = load_recipe(RECIPES / f"{name}.yaml", overrides=["strategy.seed=1"] if name == "nufilt" else [])
    params = get_strategy(name).make_params(recipe.strategy.params)
    defaults = get_strategy(name).make_params({})
    # The recipe spells out METHOD's defaults (nufilt's seed overridden above via --set).
    assert {k: v for k, v in vars(params).items() if k != "seed"} == {
        k: v for k, v in vars(defaults).items() if k != "seed"
    }


ROW_SEPARABLE = {  # strategy: parameters (non-target rules chosen so non-target tensors change)
    "task_arithmetic": {},
    "average": {},
    "magmax": {},
    "opcm": {},
    "wudi": FAST["wudi"],
    "nufilt": FAST["nufilt"],
    "gcwm": {"iters": 5, "non_target": "task_arithmetic"},
    "dare_ta": {},
    "dare_ties": {},
    "localize_stitch": {"non_target": "average"},
    "lines": {},
}


@pytest.mark.parametrize("name", sorted(ROW_SEPARABLE))
def test_row_blocks_give_the_whole_tensor_result(tmp_path, base, experts, name, monkeypatch):
    """A tensor larger than one batch is merged in row blocks (element-wise rules only) and
    the states, kept history and per-tensor stats equal those of whole-tensor batches."""
    import cpt.merging.batch_io as pipeline

    monkeypatch.setattr(pipeline, "BATCH_MODEL_FRACTION", 1.0)  # batches up to 128 MiB: nothing split
    whole_states, whole_results = run_three(tmp_path / "whole", base, experts, name, ROW_SEPARABLE[name])
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 4096)  # embedding in 4 KiB row blocks; targets whole
    block_states, block_results = run_three(tmp_path / "blocks", base, experts, name, ROW_SEPARABLE[name])
    embed = "model.embed_tokens.weight"
    strategy = get_strategy(name).build(ROW_SEPARABLE[name])
    assert strategy.rows_separable(False) and not (
        name in ("opcm", "wudi", "nufilt", "gcwm", "dare_ta", "dare_ties", "localize_stitch")
        and strategy.rows_separable(True)
    )
    for step in range(3):
        for tensor_name, value in whole_states[step].items():
            # OPCM's global rescale sums ‖D_t‖² in another order: float rounding only
            torch.testing.assert_close(
                block_states[step][tensor_name], value, rtol=1e-5 if name == "opcm" else 0, atol=1e-7
            )
        whole_stats, block_stats = whole_results[step]["per_tensor"], block_results[step]["per_tensor"]
        assert block_stats[embed]["row_blocks"] > 4 and "row_blocks" not in whole_stats[embed]
        for key, value in whole_stats[embed].items():
            if isinstance(value, float):
                assert block_stats[embed][key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    assert block_states[2][embed].shape == whole_states[2][embed].shape


@pytest.mark.parametrize("split", [False, True])
def test_ties_fusionbench_through_run_merge(tmp_path, base, experts, split, monkeypatch):
    """``form: fusionbench`` on disk (whole-model thresholds streamed; the embedding in row
    blocks when ``split``) equals the transcription of FusionBench's continual TIES."""
    from test_ties_fusionbench import fusionbench_continual_ties

    import cpt.merging.batch_io as pipeline  # where run_merge reads its batch limits

    monkeypatch.setattr(pipeline, "BATCH_MODEL_FRACTION", 1.0)  # whole tensors ...
    if split:
        monkeypatch.setattr(pipeline, "BATCH_BYTES", 4096)  # ... or the embedding in 4 KiB row blocks
    states, results = run_three(tmp_path, base, experts, "ties", {"form": "fusionbench"})
    theta0 = weights(base)
    expected = fusionbench_continual_ties(theta0, [m.state_dict() for m in experts], 0.3, 0.2)
    embed = "model.embed_tokens.weight"
    assert ("row_blocks" in results[1]["per_tensor"][embed]) == split
    for step in range(3):
        for n, v in expected[step].items():
            torch.testing.assert_close(states[step][n], v, rtol=0, atol=1e-6)


def test_combine_row_stats_hand_worked():
    from cpt.merging.pipeline import combine_row_stats

    blocks = [
        (1, {"norm_update": 3.0, "fraction_from_new": 1.0, "recovered": False}),
        (3, {"norm_update": 4.0, "fraction_from_new": 0.0, "recovered": True}),
    ]
    assert combine_row_stats(blocks) == {"norm_update": 5.0, "fraction_from_new": 0.25, "recovered": True}
