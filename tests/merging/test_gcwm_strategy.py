"""GCWM through the streamed pipeline equals the math applied tensor by tensor (METHOD §2.8)."""

import json

import pytest
import torch
from merge_steps import context, perturbed, weights

from cpt.merging.gcwm import GCWM, GCWMParams, gcwm_continual_step
from cpt.merging.pipeline import run_merge

TARGET = "model.layers.1.mlp.down_proj.weight"


@pytest.mark.parametrize("memory", ["current_anchor", "all_history"])
def test_three_steps_match_direct_math(tmp_path, base, memory):
    params = GCWMParams(memory=memory, iters=20, lr=1e-3)
    experts = [perturbed(base, seed) for seed in (21, 22, 23)]
    strategy = GCWM(params)
    for step, expert in enumerate(experts, start=1):
        stats = run_merge(strategy, context(tmp_path, base, expert, step))
    state = weights(tmp_path / "run" / "state")
    theta0 = weights(base)

    for name in (TARGET, "model.layers.0.self_attn.q_proj.weight"):
        taus = [expert.state_dict()[name] - theta0[name] for expert in experts]
        merged, total, history = None, torch.zeros_like(theta0[name]), []
        for step, tau in enumerate(taus, start=1):
            merged, increment, _ = gcwm_continual_step(step, tau, merged, history or None, params)
            total += increment
            history.append(tau)
        torch.testing.assert_close(state[name], theta0[name] + total, rtol=1e-5, atol=1e-6)
    # Non-target tensors keep θ0 (the reference's `non_target: base`).
    torch.testing.assert_close(state["model.embed_tokens.weight"], theta0["model.embed_tokens.weight"], rtol=0, atol=0)
    row = stats["per_tensor"][TARGET]
    assert (
        0.0 <= row["conflict"] <= 1.0
        and 0.15 <= row["alpha"] <= 0.95
        and row["branch"] in ("plain", "relation", "both")
    )
    assert row["step_coef"] == pytest.approx(0.2)
    kept = sorted(p.name for p in (tmp_path / "run" / "history" / "step-3").iterdir())
    expected = ["merged", "scalars.json"] + (["tau_1", "tau_2", "tau_3"] if memory == "all_history" else [])
    assert kept == expected


def test_memory_size_window(tmp_path, base):
    strategy = GCWM(GCWMParams(memory="all_history", memory_size=2, iters=5))
    for step, seed in enumerate((31, 32, 33), start=1):
        run_merge(strategy, context(tmp_path, base, perturbed(base, seed), step))
    kept = sorted(p.name for p in (tmp_path / "run" / "history" / "step-3").iterdir())
    assert kept == ["merged", "scalars.json", "tau_3"], "with memory_size 2, step 4 needs only τ_3"


def test_gcwm_recipe_end_to_end(tmp_path, base):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    from tiny_recipes import make_recipe

    data = make_recipe(tmp_path, str(base), steps=(2, 2))
    data["strategy"] = {"name": "gcwm", "iters": 10, "step_coef": 1.0}
    recipe = validate_recipe(data)
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) == 3
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["summary"]["memory"] == "current_anchor"
    assert stats["per_tensor"][TARGET]["target"] is True


def test_low_rank_history_storage(tmp_path, base):
    """all_history with history_rank: factors kept instead of dense τ, error reported and exact
    when the rank covers the task vectors (rank-8 perturbations here... plus the fine-tune's own)."""
    dense, low = tmp_path / "dense", tmp_path / "low"
    experts = [perturbed(base, seed) for seed in (41, 42, 43)]
    for folder, rank in ((dense, -1), (low, 64)):
        strategy = GCWM(GCWMParams(memory="all_history", iters=5, history_rank=rank))
        for step, expert in enumerate(experts, start=1):
            stats = run_merge(strategy, context(folder, base, expert, step))
    kept = sorted(p.name for p in (low / "run" / "history" / "step-3").iterdir())
    assert kept == [
        "merged",
        "scalars.json",
        "tau_1.left",
        "tau_1.right",
        "tau_2.left",
        "tau_2.right",
        "tau_3.left",
        "tau_3.right",
    ]
    # Rank 64 covers every tiny tensor (min side ≤ 64 for attention, ≤ 64 of 128 for MLP up/gate).
    row = stats["per_tensor"]["model.layers.0.self_attn.q_proj.weight"]
    assert row["history_error"] < 1e-5
    down = stats["per_tensor"][TARGET]  # 64×128: rank 64 is exact as well
    assert down["history_error"] < 1e-5
    a, b = weights(dense / "run" / "state"), weights(low / "run" / "state")
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=0, atol=2e-5
        )  # float32 reconstruction, amplified a little by Adam

    coarse = tmp_path / "coarse"
    strategy = GCWM(GCWMParams(memory="all_history", iters=5, history_rank=2))
    for step, expert in enumerate(experts[:2], start=1):
        stats = run_merge(strategy, context(coarse, base, expert, step))
    assert 0.1 < stats["per_tensor"][TARGET]["history_error"] < 1.0, "rank 2 of a full-rank τ loses energy, and says so"
