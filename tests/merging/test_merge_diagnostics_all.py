"""METHOD §2.10 recorded by the pipeline for every merge strategy (``StepDiagnostics`` via
``run_merge``): hand-worked dev_sum and effective scale for task arithmetic, averaging and
TIES with a known trim, row blocks combined exactly, and task arithmetic's ``non_target``."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cpt.merging.batch_io as pipeline
from cpt.merging.average import Average, AverageParams
from cpt.merging.merge_diagnostics import StepDiagnostics
from cpt.merging.pipeline import run_merge
from cpt.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from cpt.merging.ties import Ties, TiesParams
from cpt.recipe import DEFAULT_TARGETS
from cpt.strategies import get_strategy
from cpt.tensors import compile_targets, is_target

from test_merge_pipeline import context, perturbed, weights


def _targets(state):
    patterns = compile_targets(DEFAULT_TARGETS)
    return [name for name, value in state.items() if value.dim() == 2 and is_target(name, patterns)]


def _whole_norm(tensors):
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _task_vectors(base, experts):
    theta0 = weights(base)
    names = _targets(theta0)
    return theta0, names, [{n: e.state_dict()[n].double() - theta0[n].double() for n in names} for e in experts]


def _run(strategy, tmp_path, base, experts):
    return [run_merge(strategy, context(tmp_path, base, expert, step)) for step, expert in enumerate(experts, 1)]


@pytest.mark.parametrize("small_batches", [False, True])
def test_task_arithmetic_is_plain_addition_at_scale_lambda(tmp_path, base, monkeypatch, small_batches):
    if small_batches:  # targets arrive in row blocks: the per-name sums must combine exactly
        monkeypatch.setattr(pipeline, "BATCH_BYTES", 1024)
    experts = [perturbed(base, 11), perturbed(base, 12)]
    _, names, taus = _task_vectors(base, experts)
    stats = _run(TaskArithmetic(TaskArithmeticParams(scaling=0.3)), tmp_path, base, experts)
    first, second = (s["summary"] for s in stats)
    # Step 1: θ_1 − θ0 = 0.3 τ_1 = s exactly, so dev_sum = 0 and the effective scale is λ.
    assert first["diagnostics"]["dev_sum"]["mean"] == pytest.approx(0, abs=1e-6)
    assert first["effective_scale"] == pytest.approx(0.3, rel=1e-5)
    assert first["mean_task_norm"] == pytest.approx(_whole_norm(taus[0].values()), rel=1e-5)
    for name in names:
        row = stats[0]["per_tensor"][name]
        assert row["dev_sum"] == pytest.approx(0, abs=1e-6) and row["effective_scale"] == pytest.approx(0.3, rel=1e-5)
    # Step 2: ‖0.3 (τ1 + τ2)‖ / mean(‖τ1‖, ‖τ2‖), n̄ carried from step 1 through the history.
    summed = _whole_norm(taus[0][n] + taus[1][n] for n in names)
    mean = (_whole_norm(taus[0].values()) + _whole_norm(taus[1].values())) / 2
    assert second["diagnostics"]["dev_sum"]["mean"] == pytest.approx(0, abs=1e-6)
    assert second["effective_scale"] == pytest.approx(0.3 * summed / mean, rel=1e-5)
    assert second["mean_task_norm"] == pytest.approx(mean, rel=1e-5)
    name = names[0]
    per_tensor = (
        0.3 * float((taus[0][name] + taus[1][name]).norm()) / float((taus[0][name].norm() + taus[1][name].norm()) / 2)
    )
    assert stats[1]["per_tensor"][name]["effective_scale"] == pytest.approx(per_tensor, rel=1e-5)
    assert set(second["diagnostics"]["dev_sum"]) >= {"mean", "attention", "mlp"}
    assert "warning" not in second


def test_average_is_a_weighted_plain_sum(tmp_path, base):
    experts = [perturbed(base, 13), perturbed(base, 14)]
    _, names, taus = _task_vectors(base, experts)
    stats = _run(Average(AverageParams()), tmp_path, base, experts)
    second = stats[1]["summary"]
    assert second["diagnostics"]["dev_sum"]["mean"] == pytest.approx(0, abs=1e-6)
    mean = (_whole_norm(taus[0].values()) + _whole_norm(taus[1].values())) / 2
    halved = _whole_norm((taus[0][n] + taus[1][n]) / 2 for n in names)
    assert second["effective_scale"] == pytest.approx(halved / mean, rel=1e-5)


def _expert_with_targets(base, pattern_of):
    """An expert whose target tensors are θ0 + pattern (non-targets perturbed at random)."""
    model = perturbed(base, 21)
    names = set(_targets(model.state_dict()))
    theta0 = weights(base)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.copy_(theta0[name] + pattern_of(param.shape))
    return model


def test_ties_known_trim(tmp_path, base):
    """τ_1 = τ_2 = τ with half its entries 2 and half 1: at density 0.5 the trim keeps the 2's,
    the signs agree, so M_2 = trim(τ) while s = τ_1 + τ_2 = 2τ. Per entry m − s = −2 everywhere
    and s is 4 or 2: dev_sum = 2 / √((16 + 4)/2) = 2/√10 on every target tensor."""

    def pattern(shape):
        count = math.prod(shape)
        return torch.where(torch.arange(count) < count // 2, 2.0, 1.0).reshape(shape)

    experts = [_expert_with_targets(base, pattern), _expert_with_targets(base, pattern)]
    names = _targets(weights(base))
    stats = _run(Ties(TiesParams(density=0.5, scaling=0.3)), tmp_path, base, experts)
    assert stats[0]["summary"]["diagnostics"]["dev_sum"]["mean"] == pytest.approx(0, abs=1e-6)  # M_1 = τ_1
    for name in names:
        assert stats[1]["per_tensor"][name]["dev_sum"] == pytest.approx(2 / math.sqrt(10), rel=1e-5)
        # θ_2 − θ0 = 0.3·trim(τ); n̄ = ‖τ‖ per tensor: 0.3·√(n/2·4)/√(n/2·4 + n/2·1) = 0.3·√(4/5)
        assert stats[1]["per_tensor"][name]["effective_scale"] == pytest.approx(0.3 * math.sqrt(0.8), rel=1e-5)
    assert stats[1]["summary"]["effective_scale"] == pytest.approx(0.3 * math.sqrt(0.8), rel=1e-5)


def test_step_diagnostics_hand_worked_and_undefined():
    diagnostics = StepDiagnostics(1, (1.0, 0.5))
    base = torch.zeros(1, 2, 2)
    tau = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    new_state = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # s = 0.5 τ = [[1, 0], [0, 0]]: m − s has norm 1
    diagnostics.observe(["model.layers.0.mlp.up_proj.weight"], base, base, new_state, tau)
    diagnostics.observe(["model.layers.0.self_attn.q_proj.weight"], base, base, base, torch.zeros(1, 2, 2))
    rows, summary = diagnostics.finish(scale=2.0)  # a global rescale doubles θ_t − θ0
    assert rows["model.layers.0.mlp.up_proj.weight"] == {
        "norm_task_vector": 2.0,
        "dev_sum": 1.0,
        "effective_scale": pytest.approx(2 * math.sqrt(2) / 2),
    }
    assert rows["model.layers.0.self_attn.q_proj.weight"] == {"norm_task_vector": 0.0}  # s = 0, τ = 0: undefined
    assert summary["effective_scale"] == pytest.approx(math.sqrt(2))
    assert summary["diagnostics"]["dev_sum"] == {"mean": 1.0, "mlp": 1.0}
    assert diagnostics.carried()["task_vector_norms"] == [2.0]
    later = StepDiagnostics(3, (1.0, 1.0), {"task_vector_norms": [1.0]})  # τ_2's norm missing
    later.observe(["w"], base, base, new_state, tau)
    assert "warning" in later.finish()[1]


def test_task_arithmetic_keep_base_non_targets(tmp_path, base):
    """The GCWM control (recipes/gcwm_control_ta.yaml): λ on the targets, θ0 elsewhere."""
    params = get_strategy("task_arithmetic").make_params({"scaling": 0.2, "non_target": "keep_base"})
    assert TaskArithmeticParams().non_target == "add"  # today's behaviour stays the default
    experts = [perturbed(base, 15), perturbed(base, 16)]
    theta0, names, _ = _task_vectors(base, experts)
    _run(TaskArithmetic(params), tmp_path, base, experts)
    state = weights(tmp_path / "run" / "state")
    e1, e2 = experts[0].state_dict(), experts[1].state_dict()
    for name, value in theta0.items():
        if name in names:
            expected = value + 0.2 * (e1[name] - value) + 0.2 * (e2[name] - value)
            torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)
        else:
            assert torch.equal(state[name], value), name
    from cpt.errors import CptError

    with pytest.raises((CptError, ValueError), match="non_target"):
        get_strategy("task_arithmetic").make_params({"non_target": "keep"})


# ---------------------------------------------------------------------- the report
def _integration(run, step, task, summary):
    folder = run / "integration"
    folder.mkdir(exist_ok=True)
    content = {"step": step, "task": task, "summary": summary, "per_tensor": {}}
    (folder / f"{step}_{task}.json").write_text(json.dumps(content))


def test_report_shows_a_verdict_per_step(tmp_path):
    from test_report import TASKS, assert_png, make_run

    from cpt.report import MERGE_PLOT, write_report

    run = make_run(tmp_path / "run", strategy="gcwm")
    # Nothing recorded (a training-time strategy, an older run): no section, no plot.
    text = write_report(run).read_text()
    assert "What each merge did" not in text and not (run / "plots" / MERGE_PLOT).exists()

    _integration(run, 1, TASKS[0], {"effective_scale": 0.2, "diagnostics": {"dev_sum": {"mean": 0.0}}})
    _integration(
        run,
        2,
        TASKS[1],
        {
            "effective_scale": 0.41,
            "diagnostics": {
                "dev_sum": {"mean": 0.023, "attention": 0.02, "mlp": 0.026},
                "dev_sum_relation": {"mean": 0.007},
            },
        },
    )
    _integration(run, 3, TASKS[2], {"global_scale": None})  # a step without the diagnostics: no row
    text = write_report(run).read_text()
    assert "## What each merge did (METHOD §2.10)" in text
    assert "| 2 | past_tense | 0.0230 | 0.0200 | 0.0260 | 0.410 |" in text
    assert (
        "- step 2 (past_tense): merge within 2.3 % of plain addition (relation branch 0.7 %); "
        "effective scale 0.41 of a mean task vector"
    ) in text
    assert "- step 1 (plural): merge within 0.0 % of plain addition; effective scale 0.20 of a mean task vector" in text
    assert "- step 3 (negation): merge" not in text and "| 3 | negation | -" not in text
    assert f"](plots/{MERGE_PLOT})" in text
    assert_png(run / "plots" / MERGE_PLOT)


def test_report_of_a_real_task_arithmetic_merge(tmp_path, base):
    """The pipeline's JSON summary → the report's verdict (λ = 0.3: 0 % from plain addition, scale 0.30)."""
    from cpt.report.loading import RunData
    from cpt.report.merge_effect import merge_effects, merge_verdict

    stats = _run(TaskArithmetic(TaskArithmeticParams(scaling=0.3)), tmp_path, base, [perturbed(base, 17)])
    data = RunData(tmp_path, {}, ["t1"], [], [], {}, {}, {1: {"step": 1, "task": "t1", **stats[0]}}, [])
    (effect,) = merge_effects(data)
    assert merge_verdict(effect) == "merge within 0.0 % of plain addition; effective scale 0.30 of a mean task vector"
