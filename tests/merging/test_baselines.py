"""The data-free merging baselines of METHOD §3 on hand-worked tensors and their properties.

Strategies are driven here by :func:`run_steps`, an in-memory copy of ``run_merge``'s
protocol (``history_keys`` → ``begin_step`` → ``merge`` per equal-shape batch →
``end_step`` → ``finalize_scale``, scalars through a JSON round trip, kept tensors handed
to the next step), so every number below can be checked by hand; the same strategies run
through the real pipeline and runner in ``test_baselines_pipeline.py``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from cpt.merging.inner_solver import adam_merge
from cpt.merging.magmax import MagMax, MagMaxParams
from cpt.merging.nufilt import Nufilt, NufiltParams, top_right_vectors
from cpt.merging.opcm import OPCM, OPCMParams, opcm_project
from cpt.merging.pipeline import TensorBatch
from cpt.merging.ties import Ties, TiesParams, ties_merge
from cpt.merging.wudi import Wudi, WudiParams
from cpt.strategies import get_strategy


class _Source:
    def __init__(self, groups):
        self._groups = groups

    def iterate(self):
        yield from self._groups


def merge_batches(strategy, groups, step: int, keys, kept: dict, scalars: dict) -> tuple[dict, dict, dict]:
    """``strategy.merge`` over every batch of ``groups`` with the history ``kept`` from the last step,
    as ``run_merge`` feeds it; returns the new state, the new kept history and the per-tensor stats."""
    new_state, new_kept, step_stats = {}, defaultdict(dict), {}
    for target, names, _rows, b, s, e, tv in groups:
        history = {
            key: (
                torch.stack([kept[key][n] for n in names])
                if key in kept and all(n in kept[key] for n in names)
                else None
            )
            for key in keys
        }
        result = strategy.merge(TensorBatch(names, target, step, b, s, e, tv, history, scalars))
        for i, name in enumerate(names):
            new_state[name] = result.state[i].float()
            step_stats[name] = result.stats[i] if result.stats else {}
        for key, value in result.history.items():
            for i, name in enumerate(names):
                new_kept[key][name] = value[i].float()
    return new_state, dict(new_kept), step_stats


def run_steps(strategy, base: dict, experts: list[dict], targets: set[str]):
    """θ_1 … θ_T of ``strategy`` on in-memory tensors, as ``run_merge`` computes them.

    Returns the states, the per-tensor stats and the summaries of every step.
    """
    state = {name: value.clone() for name, value in base.items()}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    scalars: dict = {}
    states, stats, summaries = [], [], []
    for step, expert in enumerate(experts, start=1):
        grouped = defaultdict(list)
        for name in base:
            grouped[(name in targets, tuple(base[name].shape))].append(name)
        groups = []
        for (target, _shape), names in grouped.items():
            b = torch.stack([base[n] for n in names]).float()
            s = torch.stack([state[n] for n in names]).float()
            e = torch.stack([expert[n] for n in names]).float()
            groups.append((target, names, None, b, s, e, e - b))
        scalars = json.loads(json.dumps(scalars))
        keys = strategy.history_keys(step, scalars)
        strategy.begin_step(step, _Source(groups), scalars)
        new_state, new_kept, step_stats = merge_batches(strategy, groups, step, keys, kept, scalars)
        summaries.append(strategy.end_step(step, scalars))
        scale = strategy.finalize_scale(step, scalars)
        if scale is not None:
            new_state = {name: base[name] + scale * (value - base[name]) for name, value in new_state.items()}
        state, kept = new_state, new_kept
        states.append(state)
        stats.append(step_stats)
    return states, stats, summaries


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=atol)


# ---------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "name,values,expected",
    [
        ("ties", {}, {"density": 0.2, "scaling": 0.3, "majority_sign": "total"}),
        ("magmax", {}, {"scaling": 0.5}),
        ("wudi", {}, {"lr": 1e-5, "iters": 50, "non_target": "average", "non_target_scaling": 1.0}),
        ("opcm", {}, {"alpha": 0.5}),
        ("nufilt", {}, {"projection_rank": 128, "lora_rank": 64, "task_rank": 8, "lr": 1e-3, "iters": 50}),
        ("ties", {"density": "0.5"}, {"density": 0.5}),
    ],
)
def test_registered_with_method_defaults(name, values, expected):
    params = get_strategy(name).make_params(values)
    assert {key: getattr(params, key) for key in expected} == expected
    assert get_strategy(name).train_from == "base"


def test_bad_values_are_rejected():
    from cpt.errors import CptError

    with pytest.raises(CptError, match="density"):
        get_strategy("ties").make_params({"density": 1.5})
    with pytest.raises(CptError, match="alpha"):
        get_strategy("opcm").make_params({"alpha": -0.1})
    with pytest.raises(CptError, match="did you mean 'lora_rank'"):
        get_strategy("nufilt").make_params({"lora_rnak": 4})
    with pytest.raises(CptError, match="majority_sign"):  # the cross-field rule, through the model validator
        get_strategy("ties").make_params({"form": "fusionbench", "majority_sign": "frequency"})
    # direct construction validates the same way (pydantic's ValidationError is a ValueError)
    with pytest.raises(ValueError, match="density"):
        TiesParams(density=0)
    with pytest.raises(ValueError, match="majority_sign"):
        TiesParams(form="fusionbench", majority_sign="frequency")


# ---------------------------------------------------------------------------- TIES
def test_ties_hand_worked():
    # One target 2×3 tensor W and one non-target bias b (TIES treats both alike), density 0.5.
    base = {"w": torch.zeros(2, 3), "b": t(1.0, 1.0)}
    e1 = {"w": t([4, -1, 2], [-6, 0.5, 0.2]), "b": t(2.5, 0.0)}  # τ_1 = M_1 (untrimmed); b: (1.5, -1)
    e2 = {"w": t([-1, 2, 6], [5, 0.1, 0.3]), "b": t(-3.0, 4.0)}  # τ_2 = (-1, 2, 6, 5, .1, .3); b: (-4, 3)
    states, stats, _ = run_steps(Ties(TiesParams(density=0.5, scaling=0.3)), base, [e1, e2], {"w"})
    # Step 1: θ_1 = θ0 + 0.3 τ_1.
    close(states[0]["w"], 0.3 * e1["w"])
    close(states[0]["b"], t(1.45, 0.7))
    # Step 2, W: trim to 3 of 6 entries each:
    #   M_1 → (4, 0, 2, -6, 0, 0)      τ_2 → (0, 2, 6, 5, 0, 0)
    #   sum (4, 2, 8, -1, 0, 0) → elected signs (+, +, +, −, +, +)
    #   agreeing means: 4, 2, (2+6)/2 = 4, -6 (5 disagrees), 0, 0  → M_2 = (4, 2, 4, -6, 0, 0)
    close(states[1]["w"], 0.3 * t([4, 2, 4], [-6, 0, 0]))
    # b: k = int(0.5·2) = 1 each: M_1 = (1.5, -1) → (1.5, 0); τ_2 = (-4, 3) → (-4, 0);
    #   sum (-2.5, 0) → signs (−, +); entry 0 keeps -4 only → M_2 = (-4, 0); θ_2 = 1 + 0.3 M_2.
    close(states[1]["b"], t(-0.2, 1.0))
    assert stats[1]["w"]["sign_conflicts"] == pytest.approx(1 / 6)  # entry 4: -6 vs 5
    assert stats[1]["w"]["merged_density"] == pytest.approx(4 / 6)
    assert stats[1]["w"]["norm_update"] == pytest.approx(
        float((0.3 * t([4, 2, 4], [-6, 0, 0]) - 0.3 * e1["w"]).norm()), rel=1e-5
    )


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_ties_step_matches_peft(density, majority_sign):
    generator = torch.Generator().manual_seed(0)
    previous = torch.randn(4, 7, 5, generator=generator)
    task = torch.randn(4, 7, 5, generator=generator)
    merged, _ = ties_merge(previous, task, density, majority_sign)
    for i in range(4):
        expected = peft_ties([previous[i], task[i]], torch.ones(2), density, majority_sign_method=majority_sign)
        torch.testing.assert_close(merged[i], expected, rtol=0, atol=0)


def test_ties_trims_per_tensor_not_per_batch():
    # Two tensors of very different scale in one batch: each keeps its own top 50%.
    previous = torch.stack([t(1.0, 2.0, 3.0, 4.0), t(100.0, 200.0, 300.0, 400.0)])
    merged, _ = ties_merge(previous, torch.zeros_like(previous), 0.5)
    close(merged, torch.stack([t(0, 0, 3, 4), t(0, 0, 300, 400)]))


# ---------------------------------------------------------------------------- MagMax
def test_magmax_hand_worked():
    base = {"w": torch.ones(1, 3), "b": t(0.0, 0.0)}
    e1 = {"w": 1 + t([1, -3, 2]), "b": t(1.0, -1.0)}
    e2 = {"w": 1 + t([-2, 1, -2]), "b": t(-0.5, 2.0)}
    e3 = {"w": 1 + t([0.5, 4, 0]), "b": t(0.0, 0.0)}
    states, stats, _ = run_steps(MagMax(MagMaxParams()), base, [e1, e2, e3], {"w"})
    close(states[0]["w"], 1 + 0.5 * t([1, -3, 2]))
    # M_2 = (-2 [|−2|>|1|], -3 [|1|<|−3|], -2 [|−2| = |2|: the later task's entry, the reference's >=])
    close(states[1]["w"], 1 + 0.5 * t([-2, -3, -2]))
    close(states[1]["b"], 0.5 * t(1.0, 2.0))  # b: M_2 = (1, 2)
    # M_3 = (-2, 4, -2): τ_3's 0 loses to every non-zero entry
    close(states[2]["w"], 1 + 0.5 * t([-2, 4, -2]))
    close(states[2]["b"], 0.5 * t(1.0, 2.0))  # τ_3 = 0 changes nothing
    assert stats[1]["w"]["fraction_from_new"] == pytest.approx(2 / 3)
    assert stats[2]["b"]["norm_update"] == 0


def _fusionbench_magmax(task_vectors):
    """FusionBench's MagMax fold, transcribed (``fusion_bench/method/magmax``): a later task
    vector replaces the running selection where ``current.abs() >= running.abs()``."""
    merged = task_vectors[0].clone()
    for current in task_vectors[1:]:
        merged = torch.where(current.abs() >= merged.abs(), current, merged)
    return merged


def test_magmax_ties_keep_the_later_task_as_the_reference():
    # Quantised values make equal magnitudes (of both signs) common.
    generator = torch.Generator().manual_seed(2)
    taus = [torch.randint(-2, 3, (3, 4), generator=generator).float() for _ in range(4)]
    base = {"w": torch.zeros(3, 4)}
    states, _, _ = run_steps(MagMax(MagMaxParams(scaling=1.0)), base, [{"w": tau} for tau in taus], {"w"})
    ties = sum(int(((a.abs() == b.abs()) & (a != b)).sum()) for a, b in itertools.pairwise(taus))
    assert ties > 0  # the case distinguishes > from >=
    close(states[-1]["w"], _fusionbench_magmax(taus))


def test_magmax_recovers_lost_history_from_state():
    strategy = MagMax(MagMaxParams(scaling=0.5))
    base = torch.zeros(1, 3)
    state = 0.5 * t(1.0, -3.0, 2.0)[None]
    task = t(-2.0, 1.0, -2.0)[None]
    result = strategy.merge(TensorBatch(["x"], False, 2, base, state, base + task, task, {"merged": None}, {}))
    close(result.state, 0.5 * t(-2.0, -3.0, -2.0)[None])  # equal magnitudes: the new entry
    assert result.stats[0]["merged_recovered_from_state"] is True


# ---------------------------------------------------------------------------- OPCM
def _opcm_reference(previous, task, alpha):
    """The reference's projection with a full SVD (full_matrices=True), one matrix."""
    u, s, vh = torch.linalg.svd(previous.double(), full_matrices=True)
    v = vh.T
    split = (s.cumsum(0) / s.sum() > alpha).float().argmax().item()
    x = u.T @ task.double() @ v
    x.diagonal().fill_(0)
    x[:split, :split] = 0
    return (u @ x @ v.T).float(), split


@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4), (6, 2)])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_opcm_thin_svd_equals_full_svd_reference(shape, alpha):
    generator = torch.Generator().manual_seed(len(shape) + shape[0] * 10 + int(alpha * 100))
    previous = torch.randn(3, *shape, generator=generator)
    task = torch.randn(3, *shape, generator=generator)
    projected, split = opcm_project(previous, task, alpha)
    for i in range(3):
        expected, k = _opcm_reference(previous[i], task[i], alpha)
        torch.testing.assert_close(projected[i], expected, rtol=0, atol=2e-5)
        assert int(split[i]) == k


@pytest.mark.parametrize(
    "alpha,split,kept",
    [
        # P = diag(3, 2, 1): cumsum(s)/sum(s) = (0.5, 0.833, 1).
        (0.5, 1, [[0, 2, 2], [2, 0, 0], [0, 2, 0]]),  # first share > 0.5 at index 1: only the diagonal goes
        (0.9, 2, [[0, 0, 2], [0, 0, 0], [0, 2, 0]]),  # index 2: the diagonal and the leading 2×2 block go
    ],
)
def test_opcm_hand_worked(alpha, split, kept):
    # Whole model: a target W (3×3) and a non-target b (2); θ0 = 1 everywhere.
    base = {"w": torch.ones(3, 3), "b": torch.ones(2)}
    tau1 = {"w": torch.diag(t(3.0, 2.0, 1.0)), "b": t(1.0, 1.0)}  # ‖τ_1‖² = 14 + 2 = 16
    tau2 = {"w": t([1, 2, 2], [2, 1, 0], [0, 2, 1]), "b": t(4.0, 1.0)}  # ‖τ_2‖² = 19 + 17 = 36
    experts = [{k: base[k] + v[k] for k in base} for v in (tau1, tau2)]
    states, stats, summaries = run_steps(OPCM(OPCMParams(alpha=alpha)), base, experts, {"w"})
    # Step 1: θ_1 = E_1, λ_1 = 1.
    close(states[0]["w"], experts[0]["w"])
    close(states[0]["b"], experts[0]["b"])
    assert summaries[0]["lambda"] == 1.0 and summaries[0]["mean_task_norm"] == pytest.approx(4.0)
    # Step 2: P = τ_1 (U = V = I), X = τ_2 with the removed entries zeroed → τ̃ = `kept`;
    # D_2 = 1·P + τ̃ on W, 1·P + τ_2 = (5, 2) on b. n̄ = (4 + 6)/2 = 5.
    delta_w = torch.diag(t(3.0, 2.0, 1.0)) + t(*kept)
    delta_b = t(5.0, 2.0)
    norm_d = math.sqrt(float(delta_w.square().sum()) + 29.0)  # α=0.5: √(30+29) = √59; α=0.9: √(22+29) = √51
    close(states[1]["w"], 1 + delta_w * 5 / norm_d)
    close(states[1]["b"], 1 + delta_b * 5 / norm_d)
    assert summaries[1]["lambda"] == pytest.approx(norm_d / 5, rel=1e-6)
    assert summaries[1]["mean_task_norm"] == pytest.approx(5.0)
    assert stats[1]["w"]["split_rank"] == split and "split_rank" not in stats[1]["b"]
    assert stats[1]["w"]["norm_projected_task_vector"] == pytest.approx(float(t(*kept).norm()), rel=1e-5)
    # The summary's update norm is the true ‖θ_2 − θ_1‖ after the rescale.
    true_update = math.sqrt(float((states[1]["w"] - states[0]["w"]).square().sum()))
    assert summaries[1]["norm_update"]["w"] == pytest.approx(true_update, rel=1e-4)
    # The stored delta has the mean task-vector norm.
    stored = math.sqrt(sum(float((states[1][k] - base[k]).square().sum()) for k in base))
    assert stored == pytest.approx(5.0, rel=1e-5)


def test_opcm_three_steps_keep_mean_norm_and_accumulate_delta():
    generator = torch.Generator().manual_seed(3)
    base = {
        "q": torch.randn(6, 4, generator=generator),
        "k": torch.randn(6, 4, generator=generator),
        "up": torch.randn(8, 4, generator=generator),
        "norm": torch.randn(4, generator=generator),
    }
    scales = [0.5, 2.0, 1.0]
    experts = [{n: v + s * torch.randn(v.shape, generator=generator) for n, v in base.items()} for s in scales]
    states, stats, summaries = run_steps(OPCM(OPCMParams()), base, experts, {"q", "k", "up"})
    task_norms = [math.sqrt(sum(float((e[n] - base[n]).square().sum()) for n in base)) for e in experts]
    lam_prev = 1.0
    for step, state in enumerate(states, start=1):
        mean = sum(task_norms[:step]) / step
        stored = math.sqrt(sum(float((state[n] - base[n]).square().sum()) for n in base))
        assert stored == pytest.approx(mean, rel=1e-5), step
        assert summaries[step - 1]["lambda"] == pytest.approx(
            math.sqrt(sum(s["norm_delta_unscaled"] ** 2 for s in stats[step - 1].values())) / mean, rel=1e-5
        )
        if step > 1:
            # D_t = λ_{t−1} P + (τ_t on non-target tensors): the non-target tensor accumulates exactly.
            expected = lam_prev * (states[step - 2]["norm"] - base["norm"]) + (experts[step - 1]["norm"] - base["norm"])
            close(state["norm"] - base["norm"], expected / summaries[step - 1]["lambda"], atol=1e-5)
            assert all(0 <= stats[step - 1][n]["split_rank"] < 4 for n in ("q", "k", "up"))
        lam_prev = summaries[step - 1]["lambda"]


def test_opcm_zero_previous_delta_keeps_task_vector():
    projected, split = opcm_project(torch.zeros(2, 3, 3), torch.arange(18.0).reshape(2, 3, 3), 0.5)
    close(projected, torch.arange(18.0).reshape(2, 3, 3))
    assert split.tolist() == [0, 0]


# ---------------------------------------------------------------------------- WUDI
def test_wudi_hand_worked():
    # Target 1×2 tensors; one Adam step of lr 0.1 moves every entry by 0.1 against the
    # sign of the gradient (m̂/√v̂ = g/|g| at step 1).
    base = {"w": t([0.0, 0.0]), "b": t(1.0)}
    e1 = {"w": t([1.0, 0.0]), "b": t(3.0)}
    e2 = {"w": t([1.0, 1.0]), "b": t(2.0)}
    states, stats, _ = run_steps(
        Wudi(WudiParams(lr=0.1, iters=1, non_target="sum", non_target_scaling=0.5)), base, [e1, e2], {"w"}
    )
    # t = 1: θ_1 − θ0 = 0 is dropped; L(m) = ((m − u1)·u1)², m_0 = u1 has zero gradient → θ_1 = E_1.
    close(states[0]["w"], t([1.0, 0.0]))
    close(states[0]["b"], t(2.0))  # 1 + 0.5·2
    assert stats[0]["w"]["active_vectors"] == 1
    # t = 2: u1 = (1, 0), u2 = (1, 1); L = (m0 − 1)² + (m0 + m1 − 2)²/2, m_0 = (2, 1):
    # ∇L = (2(m0 − 1) + (m0 + m1 − 2), m0 + m1 − 2) = (3, 1) > 0 → m = (1.9, 0.9).
    close(states[1]["w"], t([1.9, 0.9]), atol=1e-6)
    close(states[1]["b"], t(2.5))  # θ_1 + 0.5·τ_2 = 2 + 0.5
    # L(m_0) = 1 + 1/2 = 1.5; L(m) = 0.81 + 0.8²/2 = 1.13.
    assert stats[1]["w"]["objective_before"] == pytest.approx(1.5)
    assert stats[1]["w"]["objective_after"] == pytest.approx(1.13, rel=1e-5)
    assert stats[1]["w"]["active_vectors"] == 2


def test_wudi_non_target_tensors_average_by_default():
    # b: θ0 = 1, τ_1 = 2, τ_2 = 4, τ_3 = −2. average: θ_1 = E_1 = 3; θ_2 = 1 + (2 + 4)/2 = 4;
    # θ_3 = 1 + (3 − 2)/2 = 1.5. sum (λ = 1): 3, 7, 5 — the two rules differ from step 2 on.
    base = {"w": t([0.0, 0.0]), "b": t(1.0)}
    experts = [{"w": t([1.0, 0.0]), "b": t(3.0)}, {"w": t([0.0, 1.0]), "b": t(5.0)}, {"w": t([1.0, 1.0]), "b": t(-1.0)}]
    averaged, _, _ = run_steps(Wudi(WudiParams(iters=0)), base, experts, {"w"})
    summed, _, _ = run_steps(Wudi(WudiParams(iters=0, non_target="sum")), base, experts, {"w"})
    assert [float(s["b"]) for s in averaged] == pytest.approx([3.0, 4.0, 1.5])
    assert [float(s["b"]) for s in summed] == pytest.approx([3.0, 7.0, 5.0])
    # FusionBench's batch rule on two tasks, mean of the task vectors, is the continual step 2.
    assert float(averaged[1]["b"]) == pytest.approx(1 + (2.0 + 4.0) / 2)
    # iters = 0 keeps m_0 = Σ u_i on the target tensors: both rules agree there.
    close(averaged[2]["w"], summed[2]["w"])


def _torch_adam_wudi(vectors, lr, iters):
    """The WUDI reference loop, literally: torch.optim.Adam on Σ ‖(m − u_i)u_iᵀ‖²/‖u_i‖²."""
    tvs = torch.stack(vectors).double()
    merged = torch.nn.Parameter(tvs.sum(0))
    optimizer = torch.optim.Adam([merged], lr=lr)
    norms = tvs.flatten(1).square().sum(1)
    for _ in range(iters):
        inner = (merged[None] - tvs) @ tvs.mT
        loss = (inner.square().flatten(1).sum(1) / norms).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach().float()


def test_wudi_equals_gcwm_plain_branch_and_reference_adam():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(3, 6, 5, generator=generator)
    previous = 0.1 * torch.randn(3, 6, 5, generator=generator)
    task = 0.1 * torch.randn(3, 6, 5, generator=generator)
    params = WudiParams(lr=1e-3, iters=30)
    result = Wudi(params).merge(TensorBatch(["a", "b", "c"], True, 2, base, base + previous, base + task, task, {}, {}))
    merged = result.state - base
    close(merged, adam_merge([previous, task], [1.0, 1.0], lr=1e-3, iters=30), atol=1e-6)
    for i in range(3):
        close(merged[i], _torch_adam_wudi([previous[i], task[i]], 1e-3, 30), atol=2e-6)
    # It moved (the check can fail): Adam went 30 steps of ~1e-3 from m_0 = Σ u_i, downhill.
    assert all(0.01 < s["norm_displacement"] and s["objective_after"] < s["objective_before"] for s in result.stats)


# ---------------------------------------------------------------------------- NUFILT
def test_nufilt_hand_worked():
    # θ0 = 0; Δ = θ_1 − θ0 = diag(2, 1); τ_2 = all ones; r_p = r_v = 1.
    base = {"w": torch.zeros(2, 2), "b": t(0.0)}
    e1 = {"w": torch.diag(t(2.0, 1.0)), "b": t(1.0)}
    e2 = {"w": torch.ones(2, 2), "b": t(3.0)}
    params = NufiltParams(projection_rank=1, task_rank=1, lora_rank=1, iters=0, non_target_scaling=0.5)
    states, stats, _ = run_steps(Nufilt(params), base, [e1, e2], {"w"})
    close(states[0]["w"], e1["w"])  # θ_1 = E_1
    close(states[0]["b"], e1["b"])
    # V̂ = e1 → P = diag(0, 1); τP = [[0, 1], [0, 1]]; A = 0 → θ_2 = θ_1 + τP.
    close(states[1]["w"], t([2, 1], [0, 2]))
    close(states[1]["b"], t(2.5))  # 1 + 0.5·3
    # Objective at A = 0: V̂_t = (1, 1)/√2, M = Δ + τP = [[2, 1], [0, 2]];
    # T = [Δe1, τV̂_t] = [(2, 0), (√2, √2)], MV = [(2, 0), (3, 2)/√2]; T − MV = [0, (−1/√2, 0)] → 0.5.
    assert stats[1]["w"]["objective_before"] == pytest.approx(0.5, rel=1e-5)
    assert stats[1]["w"]["objective_after"] == pytest.approx(0.5, rel=1e-5)
    assert stats[1]["w"]["norm_filtered"] == pytest.approx(math.sqrt(2), rel=1e-5)
    assert stats[1]["w"]["norm_adapter"] == 0
    # With Adam, the correction lowers that objective.
    states, stats, _ = run_steps(
        Nufilt(NufiltParams(projection_rank=1, task_rank=1, lora_rank=1, lr=0.05, iters=50)), base, [e1, e2], {"w"}
    )
    # τBA = (τB)A has columns ∝ τ·b = (1, 1)ᵀ: the best it can do leaves T − MV's second
    # column (−1/√2, 0) minus its projection on (1, 1)/√2, i.e. (−1/2√2, 1/2√2): 0.25.
    # Adam (lr 0.05, 50 steps) gets there.
    assert stats[1]["w"]["objective_after"] == pytest.approx(0.25, abs=1e-3)
    assert stats[1]["w"]["objective_after"] >= 0.25 - 1e-6
    close(states[1]["b"], t(4.0))  # default non-target λ = 1


def _random_nufilt_batch(seed, n=3, d_out=12, d_in=10, rank=5):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d_out, d_in, generator=generator)
    # A previous delta of rank 5: its null space is a real part of R^{d_in}.
    previous = torch.randn(n, d_out, rank, generator=generator) @ torch.randn(n, rank, d_in, generator=generator) * 0.1
    task = 0.1 * torch.randn(n, d_out, d_in, generator=generator)
    return TensorBatch(["l0.q", "l1.q", "l2.q"][:n], True, 2, base, base + previous, base + task, task, {}, {})


def test_nufilt_filter_vanishes_on_previous_top_directions():
    batch = _random_nufilt_batch(7)
    params = NufiltParams(projection_rank=3, lora_rank=4, task_rank=2, iters=0)
    result = Nufilt(params).merge(batch)
    update = result.state - batch.state
    _, _, vh = torch.linalg.svd(batch.state_delta.double())
    v_hat = vh[:, :3].mT.float()
    assert float((update @ v_hat).abs().max()) < 1e-5  # τ P V̂ = 0
    # ... and only there: the rest of τ passes unchanged (τ P = τ − τ V̂ V̂ᵀ).
    close(update, batch.task_vector - batch.task_vector @ v_hat @ v_hat.mT, atol=1e-5)
    assert [s["projection_rank"] for s in result.stats] == [3, 3, 3]


def test_nufilt_adam_lowers_objective_and_is_batch_invariant():
    batch = _random_nufilt_batch(8)
    params = NufiltParams(projection_rank=3, lora_rank=4, task_rank=2, iters=50, lr=1e-2)
    result = Nufilt(params).merge(batch)
    for s in result.stats:
        assert s["objective_after"] < 0.9 * s["objective_before"], s
        assert s["norm_adapter"] > 0
    # Tensor by tensor (B seeded per tensor name): the same states.
    for i, name in enumerate(batch.names):
        one = TensorBatch(
            [name],
            True,
            2,
            batch.base[i : i + 1],
            batch.state[i : i + 1],
            batch.expert[i : i + 1],
            batch.task_vector[i : i + 1],
            {},
            {},
        )
        close(Nufilt(params).merge(one).state[0], result.state[i], atol=1e-5)


def test_nufilt_ranks_capped_and_null_directions_dropped():
    # Exactly rank-2 previous delta on a 4×3 tensor: r_p = 128 keeps only its 2 real directions.
    vectors, kept = top_right_vectors(torch.tensor([[[1.0, 0, 0], [0, 2, 0], [0, 0, 0], [0, 0, 0]]]), 128)
    assert vectors.shape == (1, 3, 3) and kept.tolist() == [2]
    close(vectors[0, :, 2], torch.zeros(3))
    batch = _random_nufilt_batch(9, d_out=6, d_in=4, rank=4)
    result = Nufilt(NufiltParams(iters=2)).merge(batch)  # defaults 128/64/8 on a 6×4 tensor
    assert torch.isfinite(result.state).all()
    assert all(s["projection_rank"] == 4 and s["lora_rank"] == 4 and s["task_rank"] == 4 for s in result.stats)
    assert all(s["norm_filtered"] < 1e-5 for s in result.stats)  # full-rank Δ: P = 0
