"""AIMMerging (METHOD §4.B): the § hand-worked tests with injected losses, the memory, and a tiny two-task run."""

import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch
from task_contexts import task_context

from cpt.callbacks import AIMMergingCallback
from cpt.errors import CptError
from cpt.recipe import validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.strategies import get_strategy
from cpt.testing import build_tiny_model
from cpt.training.aim import (
    AIMMergingParams,
    AIMSchedule,
    adapt_interval,
    memory_indices,
    merge_tensor,
    merge_weights,
)

from tiny_recipes import strategy_recipe

CALIBRATION = [1.0, 1.2, 0.8, 1.0, 1.1, 0.9]  # §4.B test 2: mean 1.0, δ = 2.0


def run_schedule(schedule: AIMSchedule, losses: dict[int, float], steps: int, inner_l1: float = 8.0) -> list[dict]:
    """Drive the schedule for ``steps`` steps (loss 1.0 unless given), merging when it says; the merge records."""
    merges = []
    for step in range(1, steps + 1):
        schedule.observe(step, losses.get(step, 1.0))
        if schedule.should_merge(step):
            merges.append(schedule.finish_merge(step, inner_l1))
    return merges


def run_schedule_from(schedule: AIMSchedule, first: int, last: int) -> list[dict]:
    merges = []
    for step in range(first, last + 1):
        schedule.observe(step, 1.0)
        if schedule.should_merge(step):
            merges.append(schedule.finish_merge(step, 8.0))
    return merges


# ---------------------------------------------------------------------------- §4.B test 1: weights and arithmetic
@pytest.mark.parametrize(
    ("flags", "interval", "weights", "expected"),
    [(1, 8, (0.6, 0.4), 1.16), (2, 8, (0.5, 0.5), 1.10), (1, 96, (0.5, 0.5), 1.10), (2, 96, (0.4, 0.6), 1.04)],
)
def test_weight_table_and_merge_arithmetic(flags, interval, weights, expected):
    assert merge_weights(flags, interval) == weights
    merged = merge_tensor(torch.tensor([1.0]), torch.tensor([1.4]), torch.tensor([1.2]), *weights)
    assert merged.item() == pytest.approx(expected, abs=1e-6)
    # The table's edges: K = 70 is still "new task important"; f = 3 is "history important".
    assert (
        merge_weights(1, 70) == (0.6, 0.4) and merge_weights(1, 71) == (0.5, 0.5) and merge_weights(3, 71) == (0.4, 0.6)
    )


def test_merge_tensor_keeps_dtype():
    merged = merge_tensor(
        torch.ones(3, dtype=torch.bfloat16),
        torch.full((3,), 1.5, dtype=torch.bfloat16),
        torch.full((3,), 1.25, dtype=torch.bfloat16),
        0.5,
        0.5,
    )
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, torch.full((3,), 1.125, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------- §4.B test 2: threshold
def test_threshold_is_mean_of_n_c_plus_one_calibration_losses_times_factor():
    schedule = AIMSchedule(inner_iterations=8)
    assert schedule.calibration_count == 5
    phases = [schedule.observe(step, loss) for step, loss in enumerate(CALIBRATION, start=1)]
    assert phases == ["calibrating"] * 6 and len(schedule.calibration) == 6
    assert schedule.threshold == pytest.approx(2.0)
    assert schedule.observe(7, 1.0) == "monitoring" and schedule.flags == 0
    # The factor scales δ; the count follows calib_frac.
    other = AIMSchedule(inner_iterations=8, threshold_factor=3.0, calib_frac=0.5)
    for step, loss in enumerate(CALIBRATION[:5], start=1):
        other.observe(step, loss)
    assert other.calibration_count == 4 and other.threshold == pytest.approx(3.0 * sum(CALIBRATION[:5]) / 5)


# ---------------------------------------------------------------------------- §4.B test 3: timeline and flags
def test_timeline_without_signal_merges_every_2k_forced_and_adapts_from_the_fifth_merge():
    schedule = AIMSchedule(inner_iterations=8, outer_iterations=8)
    merges = run_schedule(schedule, {}, 80)
    assert [merge["step"] for merge in merges] == [16, 32, 48, 64, 80]
    for merge in merges[:4]:
        assert merge["flags"] == 1 and merge["forced"] and (merge["w_in"], merge["w_out"]) == (0.6, 0.4)
        assert merge["gamma"] is None and merge["next_interval"] == 8, "cold start: no adaptation"
    assert merges[0]["steps_since_previous_merge"] == 16 and merges[1]["steps_since_previous_merge"] == 16
    # The 5th merge adapts (Λ_list had 4 > cold_start_step = 3 values): equal Λ → γ = 1 → K stays 8.
    assert merges[4]["gamma"] == 1.0 and merges[4]["next_interval"] == 8
    # A task resumed at g = 100 restarts the schedule there: the first forced merge at 116.
    resumed = AIMSchedule(inner_iterations=8)
    resumed.reset(start_step=100)
    assert [merge["step"] for merge in run_schedule_from(resumed, 101, 132)] == [116, 132]
    # Monitoring starts at g = 7 (six calibration values at g = 1..6).
    fresh = AIMSchedule(inner_iterations=8)
    assert [fresh.observe(step, 1.0) for step in range(1, 8)] == ["calibrating"] * 6 + ["monitoring"]


def test_a_signalled_flag_merges_after_outer_begin():
    losses = dict(enumerate(CALIBRATION, start=1)) | {9: 2.1}
    merges = run_schedule(AIMSchedule(inner_iterations=8), losses, 9)
    assert [(merge["step"], merge["flags"], merge["forced"]) for merge in merges] == [(9, 1, False)]
    assert (merges[0]["w_in"], merges[0]["w_out"]) == (0.6, 0.4)


def test_two_flags_merge_at_outer_begin_with_history_weights():
    losses = dict(enumerate(CALIBRATION, start=1)) | {7: 2.0, 8: 5.0}  # L ≥ δ counts (equality included)
    schedule = AIMSchedule(inner_iterations=8)
    for step in range(1, 8):
        schedule.observe(step, losses[step])
        assert not schedule.should_merge(step), "g = 7 < outer_begin = 8 and f = 1 < 3"
    assert schedule.flags == 1
    schedule.observe(8, losses[8])
    assert schedule.should_merge(8) and schedule.flags == 2 and schedule.weights() == (0.5, 0.5)


def test_three_flags_merge_before_outer_begin():
    # K = 16: n_c = 10, monitoring from g = 12, outer_begin = 16; three flags at g = 12, 13, 14 merge at 14.
    schedule = AIMSchedule(inner_iterations=16)
    merges = run_schedule(schedule, {12: 9.0, 13: 9.0, 14: 9.0}, 14)
    assert [(merge["step"], merge["flags"]) for merge in merges] == [(14, 3)]
    assert (
        schedule.outer_begin == 14 + 16
        and schedule.flags == 0
        and schedule.calibration == []
        and schedule.threshold == 0
    )


def test_no_flag_can_grow_while_calibrating_after_a_merge():
    schedule = AIMSchedule(inner_iterations=8)
    merges = run_schedule(schedule, {17: 50.0, 18: 50.0, 19: 50.0, 20: 50.0, 21: 50.0, 22: 50.0}, 23)
    assert [merge["step"] for merge in merges] == [16], "g = 17..22 calibrate (even with large losses)"
    assert schedule.threshold == pytest.approx(2.0 * 50.0) and schedule.flags == 0


# ---------------------------------------------------------------------------- §4.B test 4: adaptation
def test_interval_adaptation_cases():
    assert adapt_interval(8, 1.0, 2.0) == (24, 3.0)  # ‖Δ_in‖₁ = 8, K = 8 → Λ = 1; Λ_prev = 2
    assert adapt_interval(24, 1.25, 1.0) == (19, 1.25)
    assert adapt_interval(100, 0.5, 1.0) == (128, 2.5)
    assert adapt_interval(128, 0.5, 0.5) == (64, 1.0)  # equal → 128 → halved
    assert adapt_interval(4, 100.0, 1.0) == (2, 100.0), "S_min"
    assert adapt_interval(8, 0.0, 1.0)[0] == 128 and adapt_interval(8, 1.0, 0.0) == (8, 1.0), "cpt's division guards"


def test_adaptation_in_the_schedule_sets_k_and_m_and_honours_cold_start():
    schedule = AIMSchedule(inner_iterations=8, outer_iterations=8)
    schedule.learning_signals = [2.0, 2.0, 2.0, 2.0]
    record = schedule.finish_merge(16, inner_l1=8.0)
    assert record["learning_signal"] == 1.0 and record["gamma"] == 3.0
    assert (schedule.interval, schedule.outer_steps) == (24, 24) and schedule.outer_begin == 16 + 24
    record = schedule.finish_merge(40, inner_l1=24 * 1.25)
    assert record["gamma"] == 1.25 and (schedule.interval, schedule.outer_steps) == (19, 19)
    # M = ⌊K·r⌋ with r = M0/K0.
    halved = AIMSchedule(inner_iterations=8, outer_iterations=4)
    halved.learning_signals = [2.0] * 4
    halved.finish_merge(16, inner_l1=8.0)
    assert (halved.interval, halved.outer_steps) == (24, 12)
    # Cold start: len(Λ_list) = 3 before the merge → K unchanged.
    cold = AIMSchedule(inner_iterations=8)
    cold.learning_signals = [2.0, 2.0, 2.0]
    record = cold.finish_merge(16, inner_l1=8.0)
    assert record["gamma"] is None and cold.interval == 8 and len(cold.learning_signals) == 4
    # adaptive: false never changes K.
    fixed = AIMSchedule(inner_iterations=8, adaptive=False)
    fixed.learning_signals = [2.0] * 4
    fixed.finish_merge(16, inner_l1=8.0)
    assert fixed.interval == 8 and fixed.outer_steps == 8


# ---------------------------------------------------------------------------- §4.B test 5: only P; no memory
class TinyLM(torch.nn.Module):
    """A model whose 'memory loss' is injected: a quadratic in the trainable weight, so outer steps move it."""

    def __init__(self):
        super().__init__()
        self.trainable = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        self.frozen = torch.nn.Parameter(torch.tensor([3.0]), requires_grad=False)
        self.register_buffer("buffer", torch.tensor([5.0]))


class InjectedLosses(AIMMergingCallback):
    """Probe losses from a table; outer losses a quadratic in the trainable weight (target 0)."""

    def __init__(self, probe_losses: dict[int, float], **kwargs):
        super().__init__(datasets.Dataset.from_list([{"input_ids": [1, 2]}] * 4), **kwargs)
        self.probe_losses = probe_losses
        self.current_step = 0

    def probe_loss(self, model, args):
        return self.probe_losses.get(self.current_step, 1.0)

    def memory_loss(self, model, rows):
        return (model.trainable**2).sum()

    def on_step_end(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        return super().on_step_end(args, state, control, **kwargs)


def drive(callback, model, optimizer, steps, task_update=0.1):
    """A stand-in trainer: each step moves the trainable weight by ``task_update`` (the 'task'), then on_step_end."""
    args = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=1.0, logging_steps=0)
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    callback.on_train_begin(args, state, None, model=model, train_dataloader=SimpleNamespace(collate_fn=list))
    trajectory = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.trainable += task_update
        state.global_step = step
        before = model.trainable.detach().clone()
        callback.on_step_end(args, state, None, model=model, optimizer=optimizer)
        trajectory.append((before, model.trainable.detach().clone()))
    callback.on_train_end(args, state, None, model=model)
    return trajectory, state


def test_merging_touches_only_the_trainable_set_and_follows_the_rule():
    model = TinyLM()
    optimizer = torch.optim.SGD([model.trainable], lr=0.1)
    callback = InjectedLosses({}, inner_iterations=2, outer_iterations=1)
    trajectory, state = drive(callback, model, optimizer, 4)
    # K = 2: n_c = 1, calibration at g = 1, 2, monitoring from g = 3, forced at g ≥ outer_begin + K = 4.
    assert [merge["step"] for merge in callback.merges] == [4]
    before, after = trajectory[3]
    anchor = torch.tensor([1.0, -1.0])
    # One outer SGD step on Σ w² (grad 2w, norm clipped to 1): θ_M = θ_k − 0.1 · clip(2θ_k).
    grad = 2 * before
    grad = grad * min(1.0, 1.0 / (float(grad.norm()) + 1e-6))
    outer = before - 0.1 * grad
    expected = anchor + 0.6 * (before - anchor) + 0.4 * (outer - before)
    assert torch.allclose(after, expected, atol=1e-6)
    merge = callback.merges[0]
    assert merge["inner_l1"] == pytest.approx(float((before - anchor).abs().sum()), abs=1e-6)
    assert merge["outer_l1"] == pytest.approx(float((outer - before).abs().sum()), abs=1e-6)
    assert merge["learning_signal"] == pytest.approx(merge["inner_l1"] / 2)
    assert model.frozen.item() == 3.0 and model.buffer.item() == 5.0, "only P changes"
    logged = [row for row in state.log_history if "aim/merge_step" in row]
    assert (
        len(logged) == 1
        and logged[0]["aim/w_in"] == 0.6
        and logged[0]["aim/outer_l1"] == pytest.approx(merge["outer_l1"])
    )


def test_anchor_moves_to_the_merged_weights():
    model = TinyLM()
    callback = InjectedLosses({}, inner_iterations=2, outer_iterations=0)
    trajectory, _ = drive(callback, model, torch.optim.SGD([model.trainable], lr=0.1), 8)
    # M = 0: Δ_out = 0, so P ← A + 0.6 Δ_in at each merge (g = 4, 8): the second Δ_in starts from the first merge.
    assert [merge["step"] for merge in callback.merges] == [4, 8]
    first = torch.tensor([1.0, -1.0]) + 0.6 * 0.4
    assert torch.allclose(trajectory[3][1], first, atol=1e-6)
    assert torch.allclose(trajectory[7][1], first + 0.6 * 0.4, atol=1e-6)
    assert callback.merges[1]["inner_l1"] == pytest.approx(0.8, abs=1e-6)


def test_signalled_merge_through_the_callback_uses_the_history_weights():
    model = TinyLM()
    probes = dict(enumerate(CALIBRATION, start=1)) | {7: 2.5, 8: 2.5}
    callback = InjectedLosses(probes, inner_iterations=8, outer_iterations=0)
    drive(callback, model, torch.optim.SGD([model.trainable], lr=0.1), 8)
    assert [(m["step"], m["flags"], m["forced"], m["w_in"]) for m in callback.merges] == [(8, 2, False, 0.5)]
    assert [row["phase"] for row in callback.steps] == ["calibrating"] * 6 + ["monitoring"] * 2
    assert callback.steps[-1]["threshold"] == pytest.approx(2.0)


def test_separate_outer_optimizer_leaves_the_task_optimizer_alone():
    model = TinyLM()
    task_optimizer = torch.optim.AdamW([model.trainable], lr=0.1)
    callback = InjectedLosses({}, inner_iterations=2, outer_iterations=3, outer_optimizer="separate", outer_lr=1e-3)
    drive(callback, model, task_optimizer, 4)
    assert task_optimizer.state == {} or not task_optimizer.state[model.trainable], "the task optimizer never stepped"
    assert callback.merges[0]["outer_l1"] == pytest.approx(2 * 3 * 1e-3, rel=2e-2), (
        "three AdamW steps of ≈ lr each entry"
    )


def test_lora_factors_are_merged_separately_and_the_base_is_untouched(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "tiny", seed=0, hidden_size=32))
    model = get_peft_model(
        base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    frozen = {name: param.detach().clone() for name, param in model.named_parameters() if not param.requires_grad}

    class LoraLosses(InjectedLosses):
        def memory_loss(self, model, rows):
            return sum((param**2).sum() for name, param in model.named_parameters() if param.requires_grad)

    callback = LoraLosses({}, inner_iterations=2, outer_iterations=1)
    args = SimpleNamespace(gradient_accumulation_steps=1, max_grad_norm=0.0, logging_steps=0)
    state = SimpleNamespace(global_step=0, log_history=[], is_world_process_zero=True)
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.1)
    callback.on_train_begin(args, state, None, model=model, train_dataloader=SimpleNamespace(collate_fn=list))
    names = [name for name, _ in callback._params]
    assert names and all("lora_A" in name or "lora_B" in name for name in names), (
        "P = the LoRA factors, A and B separately"
    )
    anchors = {name: param.detach().clone() for name, param in callback._params}
    for step in range(1, 5):
        with torch.no_grad():
            for _, param in callback._params:
                param += 0.01
        state.global_step = step
        inner = {name: param.detach().clone() for name, param in callback._params}
        callback.on_step_end(args, state, None, model=model, optimizer=optimizer)
    assert [merge["step"] for merge in callback.merges] == [4]
    for name, param in callback._params:  # one SGD step on Σ p²: θ_M = θ_k − 0.1 · 2 θ_k, per factor
        expected = anchors[name] + 0.6 * (inner[name] - anchors[name]) + 0.4 * (-0.2 * inner[name])
        assert torch.allclose(param.detach(), expected, atol=1e-6), name
    assert all(torch.equal(param, frozen[name]) for name, param in model.named_parameters() if name in frozen)


def test_probe_and_outer_losses_are_divided_by_gradient_accumulation():
    model = TinyLM()

    class ConstantLoss(InjectedLosses):
        grad_enabled: list[bool] = []

        def memory_loss(self, model, rows):
            self.grad_enabled.append(torch.is_grad_enabled())
            return 3.0 * model.trainable.sum()  # gradient 3 per entry

    callback = ConstantLoss({})
    callback.on_train_begin(
        SimpleNamespace(gradient_accumulation_steps=2),
        None,
        None,
        model=model,
        train_dataloader=SimpleNamespace(collate_fn=list),
    )
    args = SimpleNamespace(gradient_accumulation_steps=2, max_grad_norm=0.0)
    assert AIMMergingCallback.probe_loss(callback, model, args) == pytest.approx(3.0 * 0.0 / 2)
    with torch.no_grad():
        model.trainable.copy_(torch.tensor([1.0, 1.0]))
    assert AIMMergingCallback.probe_loss(callback, model, args) == pytest.approx(6.0 / 2)
    callback.outer_step(model, torch.optim.SGD([model.trainable], lr=0.1), args)
    assert torch.allclose(model.trainable.detach(), torch.tensor([1.0, 1.0]) - 0.1 * 3.0 / 2), "loss / GA, no clip"
    assert callback.grad_enabled == [False, False, True], "the probe runs without grad, the outer step with it"


def test_probe_on_a_real_model_is_the_collated_batch_loss_without_grad(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling

    path = build_tiny_model(tmp_path / "tiny", seed=0, hidden_size=32)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"input_ids": tokenizer(text)["input_ids"]} for text in ["cats are", "the dog runs home", "a tree"]]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    callback = AIMMergingCallback(datasets.Dataset.from_list(rows), outer_batch_size=8)
    args = SimpleNamespace(gradient_accumulation_steps=2)
    callback.on_train_begin(
        args, SimpleNamespace(global_step=0), None, model=model, train_dataloader=SimpleNamespace(collate_fn=collator)
    )
    model.config.attention_dropout = 0.0
    probe = callback.probe_loss(model, args)
    with torch.no_grad():  # the whole memory is one batch (3 < 8); the loss does not depend on the order here
        expected = model(**collator(rows)).loss.item() / 2
    assert probe == pytest.approx(expected, rel=1e-4)
    assert all(param.grad is None for param in model.parameters())


def test_no_memory_means_no_merges_and_plain_training():
    model = TinyLM()
    callback = AIMMergingCallback(None, inner_iterations=2, outer_iterations=1)
    trajectory, _ = drive(callback, model, torch.optim.SGD([model.trainable], lr=0.1), 6)
    assert callback.merges == [] and callback.steps == [] and not callback.enabled
    assert torch.allclose(model.trainable, torch.tensor([1.6, -0.4]))
    assert all(torch.equal(before, after) for before, after in trajectory)


# ---------------------------------------------------------------------------- memory
def test_memory_is_label_stratified_and_seeded():
    labels = ["pos"] * 90 + ["neg"] * 10 + ["neu"] * 100
    kept = memory_indices(labels, 2.0, "seed")
    assert len(kept) == 4 and len(set(kept)) == 4  # ⌊2 % · 200⌋
    # max(1, 4 // 3) = 1 per class, then one more uniformly from the rest.
    assert {labels[index] for index in kept} == {"pos", "neg", "neu"}
    assert kept == memory_indices(labels, 2.0, "seed") and kept != memory_indices(labels, 2.0, "other")
    # Per class ⌊wanted/classes⌋: 10 % of 200 = 20, two classes of ≥ 10 → exactly 10 each.
    two = ["a"] * 100 + ["b"] * 100
    assert sorted(two[index] for index in memory_indices(two, 10.0, 1)) == ["a"] * 10 + ["b"] * 10


def test_memory_of_a_generative_task_is_capped_and_never_empty():
    distinct = [f"out{i}" for i in range(192)]
    assert len(memory_indices(distinct, 2.0, 0)) == 3, "⌊2 % · 192⌋, not one per distinct output"
    assert len(memory_indices(distinct[:20], 2.0, 0)) == 1, "at least one example"
    assert memory_indices([], 2.0, 0) == []


def test_strategy_persists_memories_and_builds_the_callback(tmp_path):
    names = ["a", "b", "c"]

    def context(step):
        rows = [{"prompt": f"{names[step - 1]}-{i}:", "completion": f" {i % 2}"} for i in range(100)]
        return task_context(step, names, rows, tmp_path, seed=5)

    strategy = get_strategy("aim_merging").build({"memory_ratio": 4})
    [first] = strategy.training_callbacks(context(1))
    assert first.memory is None, "task 1: no memory"
    memory_a = (tmp_path / "aim_memory" / "a.jsonl").read_text()
    assert sorted(json.loads(line)["completion"] for line in memory_a.splitlines()) == [" 0", " 0", " 1", " 1"]
    [second] = get_strategy("aim_merging").build({"memory_ratio": 4}).training_callbacks(context(2))
    assert len(second.memory) == 4 and all(row["prompt"].startswith("a-") for row in second.memory)
    # Resume: a new instance finds the files; they are what is used.
    [third] = get_strategy("aim_merging").build({"memory_ratio": 4}).training_callbacks(context(3))
    assert [row["prompt"][0] for row in third.memory] == ["a"] * 4 + ["b"] * 4
    assert (tmp_path / "aim_memory" / "a.jsonl").read_text() == memory_a
    assert third.schedule.inner_iterations == 8 and third.outer_batch_size == 32


def test_parameters_defaults_and_bad_values():
    params = get_strategy("aim_merging").make_params({})
    assert params == AIMMergingParams()
    assert (params.inner_iterations, params.outer_iterations, params.cold_start_step) == (8, 8, 3)
    assert (params.max_step_len, params.min_step_len, params.threshold_factor) == (128, 2, 2.0)
    assert math.isclose(params.calib_frac, 2 / 3) and params.memory_ratio == 2.0 and params.outer_batch_size == 32
    assert get_strategy("aim_merging").train_from == "state"
    for bad, message in [
        ({"inner_iterations": 0}, "inner_iterations"),
        ({"outer_optimizer": "sgd"}, "outer_optimizer"),
        ({"memory_ratio": 0}, "memory_ratio"),
        ({"inner_iteration": 4}, "did you mean 'inner_iterations'"),
    ]:
        with pytest.raises(CptError, match=message):
            get_strategy("aim_merging").make_params(bad)
    with pytest.raises(ValueError, match="inner_iterations"):  # direct construction validates too
        AIMMergingParams(inner_iterations=0)


# ---------------------------------------------------------------------------- a real run
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_task_aim_run_merges_with_outer_steps(tmp_path, lora):
    tiny = build_tiny_model(tmp_path / "tiny", seed=0, hidden_size=32)
    strategy = {
        "name": "aim_merging",
        "inner_iterations": 2,
        "outer_iterations": 2,
        "memory_ratio": 50,
        "outer_batch_size": 2,
    }
    lora_config = {"peft": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}} if lora else {}
    recipe = validate_recipe(strategy_recipe(tmp_path, tiny, strategy, max_steps=9, **lora_config))
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) == 3
    strategy_dir = recipe.run_dir / "strategy"
    memory = [json.loads(line) for line in (strategy_dir / "aim_memory" / "plural.jsonl").read_text().splitlines()]
    assert len(memory) == 4 and all(row["prompt"].startswith("Plural of ") for row in memory)  # 50 % of 8

    first = json.loads((recipe.run_dir / "integration" / "1_plural.json").read_text())
    assert first["aim_merges"] == 0 and first["aim_memory_examples"] == 0, "task 1 trains plainly"
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["aim_memory_examples"] == 4
    record = json.loads((strategy_dir / "aim" / "2_upper.json").read_text())
    assert len(record["steps"]) == 9 and all(math.isfinite(row["probe_loss"]) for row in record["steps"])
    assert all(math.isfinite(row["train_loss"]) for row in record["steps"]), "logging_steps = 1: every step's loss"
    assert stats["aim_merges"] == len(record["merges"]) >= 2 and stats["aim_merge_steps"][0] in (3, 4)
    for merge in record["merges"]:
        assert merge["outer_steps"] == 2 and math.isfinite(merge["outer_loss"])
        assert merge["inner_l1"] > 0 and merge["outer_l1"] > 0, "both the task and the outer steps moved P"
        assert merge["learning_signal"] == pytest.approx(merge["inner_l1"] / merge["interval"])
    history = json.loads((recipe.run_dir / "manifest.json").read_text())
    assert [task["status"] for task in history["tasks"]] == ["done", "done"]
    # AIM's metrics wait for the trainer's own log: logging from on_step_end would cancel that step's log line.
    assert math.isfinite(history["tasks"][1]["final_loss"]), "the trainer's own training log is intact"
