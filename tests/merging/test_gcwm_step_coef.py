"""GCWM's ``step_coef: norm`` (METHOD §2.9) and the step summary's n̄_t, ‖m_t‖, c_t and
effective scale (METHOD §2.10), on hand-worked values and through the streamed pipeline."""

from __future__ import annotations

import math

import pytest
import torch
from merge_steps import context, perturbed, weights
from pydantic import TypeAdapter, ValidationError

from cpt.merging.gcwm import GCWM, GCWMParams, gcwm_continual_step, norm_step_coefficient, step_coefficient
from cpt.merging.pipeline import run_merge
from cpt.recipe import DEFAULT_TARGETS
from cpt.tensors import compile_targets, is_target


def test_norm_step_coefficient_hand_worked():
    assert norm_step_coefficient([3.0, 5.0], 8.0) == (0.5, 4.0)  # n̄ = 4, c = 4/8
    assert norm_step_coefficient([2.0], 2.0) == (1.0, 2.0)  # step 1: m_1 = τ_1, c_1 = 1
    assert norm_step_coefficient([1.0, 2.0, 6.0], 1.5) == (2.0, 3.0)
    assert norm_step_coefficient([2.0], 0.0) == (0.0, 2.0)  # m = 0: θ_t = θ0 whatever c
    with pytest.raises(ValueError):
        norm_step_coefficient([], 1.0)
    with pytest.raises(ValueError):
        norm_step_coefficient([1.0, math.nan], 1.0)


def test_norm_params_validation():
    params = TypeAdapter(GCWMParams).validate_python({"step_coef": "norm"})
    assert params.step_coef == "norm"
    assert TypeAdapter(GCWMParams).validate_python({"step_coef": 0.3}).step_coef == 0.3
    assert GCWMParams().step_coef == 0.2  # METHOD's value stays the default
    with pytest.raises(ValidationError):
        TypeAdapter(GCWMParams).validate_python({"step_coef": "nrm"})
    with pytest.raises(ValueError, match="decay"):
        GCWMParams(step_coef="norm", decay=0.5)
    with pytest.raises(ValueError, match="non_target"):
        GCWMParams(step_coef="norm", non_target="task_arithmetic")
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\] or 'norm', got inf"):
        GCWMParams(step_coef=math.inf)
    for bad in (0, -0.2, 1.5, True, [0.2]):  # c_t ∈ (0, 1]: 0 never moves, above 1 overshoots m_t
        with pytest.raises(ValueError, match=r"a number in \(0, 1\] or 'norm'"):
            GCWMParams(step_coef=bad)
    assert GCWMParams(step_coef=1).step_coef == 1.0 and GCWMParams(step_coef="0.5").step_coef == 0.5
    with pytest.raises(ValueError, match=r"got 'nrm' \(did you mean 'norm'\?\)"):
        GCWMParams(step_coef="nrm")
    with pytest.raises(ValueError, match="norm_step_coefficient"):
        step_coefficient(1, params)
    tau = torch.randn(2, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="coefficient"):
        gcwm_continual_step(1, tau, None, None, params)
    _, increment, stats = gcwm_continual_step(1, tau, None, None, params, coefficient=0.5)
    assert torch.equal(increment, 0.5 * tau) and float(stats["step_coef"]) == 0.5


def _target_names(state):
    patterns = compile_targets(DEFAULT_TARGETS)
    return [name for name, value in state.items() if value.dim() == 2 and is_target(name, patterns)]


def _norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_norm_mode_through_the_pipeline(tmp_path, base):
    params = GCWMParams(step_coef="norm", iters=10, lr=1e-3)
    experts = [perturbed(base, seed) for seed in (51, 52)]
    theta0 = weights(base)
    targets = _target_names(theta0)
    strategy = GCWM(params)
    taus = {name: [expert.state_dict()[name] - theta0[name] for expert in experts] for name in targets}
    summaries = []
    for step, expert in enumerate(experts, start=1):
        summaries.append(run_merge(strategy, context(tmp_path, base, expert, step))["summary"])
        state = weights(tmp_path / "run" / "state")
        if step == 1:  # m_1 = τ_1 and c_1 = n̄_1/‖τ_1‖ = 1: the targets are the expert's
            for name in targets:
                torch.testing.assert_close(state[name], expert.state_dict()[name], rtol=0, atol=1e-6)
    # Step 2 by hand: m_2 from the math per tensor, then c_2 = mean(‖τ_1‖, ‖τ_2‖) / ‖m_2‖.
    merged = {}
    for name in targets:
        m_1, _, _ = gcwm_continual_step(1, taus[name][0], None, None, params, coefficient=1.0)
        merged[name], _, _ = gcwm_continual_step(2, taus[name][1], m_1, None, params, coefficient=1.0)
    task_norms = [_norm(taus[name][k] for name in targets) for k in (0, 1)]
    mean_norm = sum(task_norms) / 2
    merged_norm = _norm(merged.values())
    c_2 = mean_norm / merged_norm
    assert summaries[0]["step_coef"] == pytest.approx(1.0, rel=1e-9)
    assert summaries[0]["global_scale"] is None  # c_1 = 1: no rescale pass
    summary = summaries[1]
    assert summary["step_coef_mode"] == "norm"
    assert summary["mean_task_norm"] == pytest.approx(mean_norm, rel=1e-6)
    assert summary["norm_merged"] == pytest.approx(merged_norm, rel=1e-5)
    assert summary["step_coef"] == pytest.approx(c_2, rel=1e-5)
    assert summary["global_scale"] == pytest.approx(c_2, rel=1e-5)
    for name in targets:
        torch.testing.assert_close(state[name], theta0[name] + c_2 * merged[name], rtol=1e-4, atol=1e-6)
    # the state keeps the size of one mean task vector: effective scale 1
    assert _norm(state[name] - theta0[name] for name in targets) == pytest.approx(mean_norm, rel=1e-5)
    assert summary["effective_scale"] == pytest.approx(1.0, rel=1e-5)
    for name in theta0:  # non-target tensors stay θ0 (non_target: base)
        if name not in targets:
            torch.testing.assert_close(state[name], theta0[name], rtol=0, atol=0)


def test_constant_mode_summary_records_norms_and_effective_scale(tmp_path, base):
    params = GCWMParams(iters=5, lr=1e-3)
    experts = [perturbed(base, seed) for seed in (61, 62)]
    theta0 = weights(base)
    targets = _target_names(theta0)
    strategy = GCWM(params)
    first = run_merge(strategy, context(tmp_path, base, experts[0], 1))
    tau_1 = {name: experts[0].state_dict()[name] - theta0[name] for name in targets}
    # step 1: θ_1 − θ0 = 0.2 τ_1 and n̄_1 = ‖τ_1‖, so the effective scale is 0.2, per tensor too
    assert first["summary"]["step_coef"] == pytest.approx(0.2)
    assert first["summary"]["mean_task_norm"] == pytest.approx(_norm(tau_1.values()), rel=1e-6)
    assert first["summary"]["effective_scale"] == pytest.approx(0.2, rel=1e-5)
    per_tensor = first["summary"]["effective_scale_per_tensor"]
    assert set(per_tensor) == set(targets)
    assert all(value == pytest.approx(0.2, rel=1e-5) for value in per_tensor.values())
    assert first["summary"]["global_scale"] is None
    second = run_merge(strategy, context(tmp_path, base, experts[1], 2))["summary"]
    state = weights(tmp_path / "run" / "state")
    tau_2 = {name: experts[1].state_dict()[name] - theta0[name] for name in targets}
    mean_norm = (_norm(tau_1.values()) + _norm(tau_2.values())) / 2
    state_norm = _norm(state[name] - theta0[name] for name in targets)
    assert second["mean_task_norm"] == pytest.approx(mean_norm, rel=1e-6)
    assert second["norm_state_delta"] == pytest.approx(state_norm, rel=1e-4)
    assert second["effective_scale"] == pytest.approx(state_norm / mean_norm, rel=1e-4)
    name = targets[0]
    by_hand = float((state[name] - theta0[name]).norm()) / ((float(tau_1[name].norm()) + float(tau_2[name].norm())) / 2)
    assert second["effective_scale_per_tensor"][name] == pytest.approx(by_hand, rel=1e-4)
    assert set(second["diagnostics"]["effective_scale"]) >= {"mean", "attention", "mlp"}


def test_norm_mode_refuses_a_history_without_norms(tmp_path, base):
    experts = [perturbed(base, seed) for seed in (71, 72)]
    run_merge(GCWM(GCWMParams(iters=3)), context(tmp_path, base, experts[0], 1))
    scalars = tmp_path / "run" / "history" / "step-1" / "scalars.json"
    scalars.write_text("{}")  # a run from before the norms were carried
    with pytest.raises(ValueError, match="--overwrite"):
        run_merge(GCWM(GCWMParams(step_coef="norm", iters=3)), context(tmp_path, base, experts[1], 2))
