"""DARE (METHOD §3.A): the § hand-worked cases, seeding, statistics and PEFT cross-checks."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils
from test_baselines import close, run_steps, t

from cpt.merging import dare
from cpt.merging.dare import (
    DareTaParams,
    DareTaskArithmetic,
    DareTies,
    DareTiesParams,
    dare_mask,
    dare_sparsify,
    mask_seed,
    ties_prime,
)
from cpt.merging.pipeline import TensorBatch
from cpt.strategies import get_strategy

TAU = t(0.4, -0.2, 0.1, 0.3)
MASK = torch.tensor([True, True, False, False])


@pytest.mark.parametrize(
    "name,expected",
    [
        ("dare_ta", {"density": 0.2, "rescale": "inverse", "scaling": 0.3, "seed": 0}),
        ("dare_ties", {"density": 0.2, "rescale": "inverse", "scaling": 0.3, "trim_k": None, "seed": 0}),
    ],
)
def test_registered_with_method_defaults(name, expected):
    info = get_strategy(name)
    params = info.make_params({})
    assert {key: getattr(params, key) for key in expected} == expected and info.train_from == "base"


# ---------------------------------------------------------------------------- § test 1: the operator
@pytest.mark.parametrize(
    "rescale,expected,factor",
    [
        ("inverse", [0.8, -0.4, 0, 0], 2.0),
        ("l1", [0.4 / 0.6, -0.2 / 0.6, 0, 0], 1.0 / 0.6),  # r = ‖τ‖₁/‖m⊙τ‖₁ = 1.0/0.6
        ("none", [0.4, -0.2, 0, 0], 1.0),
    ],
)
def test_operator_hand_worked(rescale, expected, factor):
    sparsified, r = dare_sparsify(TAU[None], MASK[None], 0.5, rescale)
    close(sparsified[0], expected)
    assert float(r[0]) == pytest.approx(factor, rel=1e-6)


def test_operator_edges():
    # ρ = 1 is the identity whatever the mask; l1 falls back to r = 1 on an (almost) empty selection.
    close(dare_sparsify(TAU[None], torch.zeros(1, 4, dtype=torch.bool), 1.0, "l1")[0][0], TAU)
    sparsified, r = dare_sparsify(t(1e-9, 1.0)[None], torch.tensor([[True, False]]), 0.5, "l1")
    assert float(r[0]) == 1.0
    close(sparsified[0], [1e-9, 0.0], atol=0)


def _inject(monkeypatch, masks):
    """Replace the seeded draw by given masks, by (step, name)."""
    monkeypatch.setattr(dare, "dare_mask", lambda shape, density, seed, step, name: masks[(step, name)])


# ---------------------------------------------------------------------------- § tests 2 and 3: the continual forms
def test_dare_ta_hand_worked(monkeypatch):
    _inject(monkeypatch, {(1, "w"): MASK})
    base = {"w": torch.ones(4), "b": t(1.0, 1.0)}
    expert = {"w": 1 + TAU, "b": t(2.0, 0.0)}
    states, stats, _ = run_steps(DareTaskArithmetic(DareTaParams(density=0.5)), base, [expert], {"w"})
    close(states[0]["w"], [1.24, 0.88, 1, 1])
    close(states[0]["b"], [1.3, 0.7])  # non-target: dense task arithmetic
    assert stats[0]["w"]["density"] == 0.5 and stats[0]["w"]["rescale"] == 2.0
    assert stats[0]["w"]["norm_sparsified"] == pytest.approx(float(t(0.8, -0.4).norm()))
    assert stats[0]["w"]["mask_seed"] == mask_seed(0, 1, "w") and "density" not in stats[0]["b"]


def test_ties_prime_hand_worked():
    merged, extra = ties_prime(t(0.5, 0.1, -0.2, 0)[None], t(0.8, -0.4, 0, 0)[None])
    # sums (1.3, −0.3, −0.2, 0) → signs (+, −, −, +) → (mean(0.5, 0.8), −0.4, −0.2, 0)
    close(merged[0], [0.65, -0.4, -0.2, 0])
    assert float(extra["sign_conflicts"][0]) == pytest.approx(0.25)  # entry 1: 0.1 vs −0.4
    assert float(extra["dropped_by_election"][0]) == pytest.approx(
        1 / 4
    )  # 0.1 dropped, per entry of the 4-entry tensor


def test_dare_ties_two_steps(monkeypatch):
    _inject(monkeypatch, {(1, "w"): torch.tensor([True, True, True, False]), (2, "w"): MASK})
    base = {"w": torch.zeros(4), "b": t(0.0)}
    e1 = {"w": t(0.25, 0.05, -0.1, 7.0), "b": t(2.0)}  # D_1 = (0.5, 0.1, −0.2, 0) = M_1
    e2 = {"w": TAU, "b": t(-1.0)}  # D_2 = (0.8, −0.4, 0, 0)
    states, stats, _ = run_steps(DareTies(DareTiesParams(density=0.5)), base, [e1, e2], {"w"})
    close(states[0]["w"], 0.3 * t(0.5, 0.1, -0.2, 0))
    close(states[1]["w"], 0.3 * t(0.65, -0.4, -0.2, 0))
    close(states[1]["b"], 0.3 * t(2.0))  # dense TIES′: sum +1 elects +, keeps 2
    assert stats[1]["w"]["sign_conflicts"] == pytest.approx(0.25)
    assert stats[1]["w"]["density"] == 0.5


def test_dare_ties_trim_k_is_full_ties_after_dare(monkeypatch):
    _inject(monkeypatch, {(2, "w"): MASK})
    previous, task = t(0.5, 0.1, -0.2, 0.05), TAU
    batch = TensorBatch(
        ["w"], True, 2, torch.zeros(1, 4), 0.3 * previous[None], task[None], task[None], {"merged": previous[None]}, {}
    )
    result = DareTies(DareTiesParams(density=0.5, trim_k=0.5)).merge(batch)
    # trim both to 2 entries: M → (0.5, 0, −0.2, 0), D → (0.8, −0.4, 0, 0); signs (+, −, −, +)
    close(result.state[0], 0.3 * t(0.65, -0.4, -0.2, 0))


# ---------------------------------------------------------------------------- § test 4: seeding
def test_mask_is_a_function_of_seed_task_and_name():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    first = [dare_mask((8, 16), 0.3, 5, 2, name) for name in names]
    again = [dare_mask((8, 16), 0.3, 5, 2, name) for name in reversed(names)][::-1]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])  # per tensor
    assert not torch.equal(first[0], dare_mask((8, 16), 0.3, 5, 3, names[0]))  # per task
    assert not torch.equal(first[0], dare_mask((8, 16), 0.3, 6, 2, names[0]))  # per seed
    # h is a fixed function (crc32, not Python's salted hash()): this value holds in every process.
    assert mask_seed(5, 2, "w") == 481_268_799  # 5·1000003 + 2·7919 + crc32(b"w") = 476252946


def test_batch_order_and_device_do_not_change_the_result():
    generator = torch.Generator().manual_seed(1)
    names = ["a.weight", "b.weight", "c.weight"]
    tau = torch.randn(3, 6, 5, generator=generator)
    strategy = DareTaskArithmetic(DareTaParams(density=0.4, seed=9))

    def run(order, device):
        index = [names.index(n) for n in order]
        x = tau[index].to(device)
        zeros = torch.zeros_like(x)
        batch = TensorBatch(order, True, 2, zeros, zeros, x, x, {}, {})
        return {n: strategy.merge(batch).state[i].cpu() for i, n in enumerate(order)}

    forward, backward = run(names, "cpu"), run(names[::-1], "cpu")
    for n in names:
        assert torch.equal(forward[n], backward[n])
        single = TensorBatch(
            [n],
            True,
            2,
            torch.zeros(1, 6, 5),
            torch.zeros(1, 6, 5),
            tau[[names.index(n)]],
            tau[[names.index(n)]],
            {},
            {},
        )
        assert torch.equal(strategy.merge(single).state[0], forward[n])
    if torch.cuda.is_available():
        on_gpu = run(names, "cuda")
        for n in names:
            torch.testing.assert_close(on_gpu[n], forward[n], rtol=0, atol=0)


# ---------------------------------------------------------------------------- § test 5: statistics
def test_statistics_on_a_large_gaussian_tensor():
    generator = torch.Generator().manual_seed(0)
    tau = torch.randn(1, 1000, 1000, generator=generator)
    mask = dare_mask((1000, 1000), 0.2, 0, 1, "big")[None]
    realized = float(mask.float().mean())
    assert abs(realized - 0.2) < 0.002
    _, r = dare_sparsify(tau, mask, 0.2, "l1")
    assert abs(float(r[0]) * 0.2 - 1) < 0.01


# ---------------------------------------------------------------------------- PEFT cross-checks
def test_inverse_rescale_equals_peft_random_pruning_given_the_same_mask(monkeypatch):
    """Same mask in, same tensor out: PEFT's ``random_pruning`` draws its mask with
    ``torch.bernoulli``; it is replaced here by cpt's seeded mask, so the comparison is exact."""
    generator = torch.Generator().manual_seed(3)
    tau = torch.randn(7, 9, generator=generator)
    mask = dare_mask((7, 9), 0.3, 1, 1, "x")
    monkeypatch.setattr(torch, "bernoulli", lambda probabilities: mask.to(probabilities.dtype))
    expected = merge_utils.random_pruning(tau, 0.3, rescale=True)
    torch.testing.assert_close(dare_sparsify(tau[None], mask[None], 0.3, "inverse")[0][0], expected, rtol=0, atol=0)
    expected = merge_utils.random_pruning(tau, 0.3, rescale=False)
    torch.testing.assert_close(dare_sparsify(tau[None], mask[None], 0.3, "none")[0][0], expected, rtol=0, atol=0)


def test_continual_step_equals_peft_dare_ties_given_the_same_masks(monkeypatch):
    """One ``dare_ties`` step is PEFT's ``dare_ties([M_{t−1}, τ_t])`` with M_{t−1} left
    unpruned: PEFT prunes every input, so its first draw is replaced by an all-ones mask
    (and M_{t−1} fed as ρ·M_{t−1}, which its 1/ρ rescale returns), its second by cpt's mask."""
    generator = torch.Generator().manual_seed(4)
    previous, task = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    density = 0.25
    mask = dare_mask((5, 6), density, 0, 2, "w")
    draws = iter([torch.ones(5, 6), mask.float()])
    monkeypatch.setattr(torch, "bernoulli", lambda probabilities: next(draws))
    expected = merge_utils.dare_ties([density * previous, task], torch.ones(2), density)
    sparsified, _ = dare_sparsify(task[None], mask[None], density, "inverse")
    merged, _ = ties_prime(previous[None], sparsified)
    torch.testing.assert_close(merged[0], expected, rtol=1e-6, atol=1e-7)


def test_same_expectation_as_peft_random_pruning():
    """Different generators, same law: over many draws both are unbiased (E[D(τ)] = τ) and
    keep ρ of the entries; compared entry by entry against τ at 5σ of the sample mean."""
    generator = torch.Generator().manual_seed(5)
    tau = torch.randn(64, generator=generator)
    draws, density = 4000, 0.2
    torch.manual_seed(0)
    peft_mean = torch.stack([merge_utils.random_pruning(tau, density, rescale=True) for _ in range(draws)]).mean(0)
    masks = torch.stack([dare_mask((64,), density, 0, step, "w") for step in range(draws)])
    ours = dare_sparsify(tau.expand(draws, 64), masks, density, "inverse")[0]
    sigma = tau.abs() * ((1 - density) / density / draws) ** 0.5  # std of the sample mean
    assert bool(((ours.mean(0) - tau).abs() <= 5 * sigma + 1e-7).all())
    assert bool(((peft_mean - tau).abs() <= 5 * sigma + 1e-7).all())
    assert abs(float(masks.float().mean()) - density) < 0.005


def test_density_one_is_task_arithmetic():
    generator = torch.Generator().manual_seed(6)
    tau = torch.randn(2, 4, 3, generator=generator)
    state = torch.randn(2, 4, 3, generator=generator)
    batch = TensorBatch(["a", "b"], True, 3, torch.zeros_like(state), state, tau, tau, {}, {})
    result = DareTaskArithmetic(DareTaParams(density=1.0)).merge(batch)
    torch.testing.assert_close(result.state, state + 0.3 * tau, rtol=0, atol=0)
    assert all(s["density"] == 1.0 and s["rescale"] == 1.0 for s in result.stats)
