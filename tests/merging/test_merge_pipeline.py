"""The streamed merge pipeline: exact results for simple rules, history across steps, atomicity."""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from merge_steps import context, perturbed, weights
from transformers import AutoModelForCausalLM, AutoTokenizer

import cpt.merging.batch_io as pipeline
from cpt.merging.average import Average, AverageParams
from cpt.merging.pipeline import MergeResult, MergeStrategy, run_merge
from cpt.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams


def test_task_arithmetic_two_steps_exact(tmp_path, base):
    theta0 = weights(base)
    experts = [perturbed(base, 1), perturbed(base, 2)]
    strategy = TaskArithmetic(TaskArithmeticParams(scaling=0.3))
    stats = run_merge(strategy, context(tmp_path, base, experts[0], 1))
    state1 = weights(tmp_path / "run" / "state")
    run_merge(strategy, context(tmp_path, base, experts[1], 2))
    state2 = weights(tmp_path / "run" / "state")
    e1, e2 = experts[0].state_dict(), experts[1].state_dict()
    for name, value in theta0.items():
        torch.testing.assert_close(state1[name], value + 0.3 * (e1[name] - value), rtol=0, atol=1e-6)
        torch.testing.assert_close(state2[name], state1[name] + 0.3 * (e2[name] - value), rtol=0, atol=1e-6)
    assert set(stats["per_tensor"]) >= {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"}
    assert stats["per_tensor"]["model.layers.0.self_attn.q_proj.weight"]["target"] is True
    assert stats["per_tensor"]["model.norm.weight"]["target"] is False
    marker = json.loads((tmp_path / "run" / "state" / "cpt_state.json").read_text())
    assert marker == {"step": 2, "task": "t2"}
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "state") is not None


def test_average_and_small_batches_give_same_result(tmp_path, base, monkeypatch):
    experts = [perturbed(base, 3), perturbed(base, 4), perturbed(base, 5)]
    for step, expert in enumerate(experts, start=1):
        run_merge(Average(AverageParams()), context(tmp_path / "big", base, expert, step))
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 4096)  # one tensor per batch
    for step, expert in enumerate(experts, start=1):
        run_merge(Average(AverageParams()), context(tmp_path / "small", base, expert, step))
    big, small = weights(tmp_path / "big" / "run" / "state"), weights(tmp_path / "small" / "run" / "state")
    mean = {name: sum(e.state_dict()[name] for e in experts) / 3 for name in big}
    for name in big:
        torch.testing.assert_close(big[name], mean[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(small[name], big[name], rtol=0, atol=0)
    # however small the batches, the state is save_pretrained's one file (tests/merging/test_shards.py)
    assert [path.name for path in (tmp_path / "small" / "run" / "state").glob("*.safetensors*")] == [
        "model.safetensors"
    ]


@dataclass
class _Params:
    pass


class KeepsTaskVectors(MergeStrategy):
    """Test strategy: θ_t = θ0 + Σ_k τ_k, carried as a kept tensor ("sum") and a scalar."""

    def history_keys(self, step, scalars):
        return ["sum"]

    def merge(self, batch):
        previous = batch.history["sum"]
        running = batch.task_vector if previous is None else previous + batch.task_vector
        return MergeResult(state=batch.base + running, history={"sum": running})

    def end_step(self, step, scalars):
        scalars["steps_seen"] = scalars.get("steps_seen", 0) + 1
        return {"steps_seen": scalars["steps_seen"]}


def test_history_carried_and_pruned(tmp_path, base):
    experts = [perturbed(base, 6), perturbed(base, 7)]
    strategy = KeepsTaskVectors(_Params())
    run_merge(strategy, context(tmp_path, base, experts[0], 1))
    result = run_merge(strategy, context(tmp_path, base, experts[1], 2))
    assert result["summary"]["steps_seen"] == 2
    history = tmp_path / "run" / "history"
    assert sorted(p.name for p in history.iterdir()) == ["step-2"], "older history is dropped after the commit"
    theta0, state = weights(base), weights(tmp_path / "run" / "state")
    for name, value in theta0.items():
        expected = value + (experts[0].state_dict()[name] - value) + (experts[1].state_dict()[name] - value)
        torch.testing.assert_close(state[name], expected, rtol=0, atol=1e-6)


class FailsHalfway(MergeStrategy):
    def __init__(self):
        super().__init__(None)
        self.calls = 0

    def merge(self, batch):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("boom")
        return MergeResult(state=batch.base)


def test_failure_leaves_previous_state_untouched(tmp_path, base):
    run_merge(TaskArithmetic(TaskArithmeticParams()), context(tmp_path, base, perturbed(base, 8), 1))
    before = weights(tmp_path / "run" / "state")
    with pytest.raises(RuntimeError, match="boom"):
        run_merge(FailsHalfway(), context(tmp_path, base, perturbed(base, 9), 2))
    after = weights(tmp_path / "run" / "state")
    assert all(torch.equal(before[name], after[name]) for name in before)
    leftovers = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "staging folders are removed"
    assert json.loads((tmp_path / "run" / "state" / "cpt_state.json").read_text())["step"] == 1


def test_runner_with_task_arithmetic(tmp_path, base):
    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner

    from tiny_recipes import make_recipe

    data = make_recipe(tmp_path, str(base), steps=(3, 3))
    data["strategy"] = {"name": "task_arithmetic", "scaling": 0.5}
    recipe = validate_recipe(data)
    result = TaskSequenceRunner(recipe).run()
    assert len(result.matrix) == 3 and None not in result.expert_scores
    stats = json.loads((recipe.run_dir / "integration" / "2_upper.json").read_text())
    assert stats["step"] == 2 and "per_tensor" in stats
    geometry = json.loads((recipe.run_dir / "geometry" / "2_upper.json").read_text())
    assert geometry["update_from"] == "base"
    assert (recipe.run_dir / "state" / "model.safetensors").exists()


def test_cpt_merge_command(tmp_path, base):
    """`cpt merge` integrates checkpoints in order, lazily, like the runner would."""
    import os
    import subprocess
    import sys

    experts = []
    for seed in (11, 12):
        model = perturbed(base, seed)
        model.save_pretrained(tmp_path / f"e{seed}")
        experts.append(tmp_path / f"e{seed}")
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def cpt_merge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cpt.cli", "merge", *args], capture_output=True, text=True, env=env
        )

    task_arithmetic = ["--method", "task_arithmetic", str(base)]
    result = cpt_merge(
        *task_arithmetic, *map(str, experts), "--output", str(out), "--set", "scaling=0.5", "--save-steps"
    )
    assert result.returncode == 0, result.stderr
    theta0 = weights(base)
    e1, e2 = weights(experts[0]), weights(experts[1])
    merged, step1 = weights(out), weights(out / "step-1")
    for name, value in theta0.items():
        torch.testing.assert_close(step1[name], value + 0.5 * (e1[name] - value), rtol=0, atol=1e-6)
        torch.testing.assert_close(
            merged[name], value + 0.5 * (e1[name] - value) + 0.5 * (e2[name] - value), rtol=0, atol=1e-6
        )
    stats = json.loads((out / "merge_stats.json").read_text())
    assert stats["params"] == {"scaling": 0.5} and [s["step"] for s in stats["steps"]] == [1, 2]
    assert AutoTokenizer.from_pretrained(out) is not None
    assert not list(tmp_path.glob(".merged*")), "the work folder is removed"

    bad = cpt_merge("--method", "sequential", str(base), str(experts[0]), "--output", str(out))
    assert bad.returncode == 2 and "not a data-free merge strategy" in bad.stderr and "Traceback" not in bad.stderr
    bad = cpt_merge(*task_arithmetic, str(experts[0]), "--output", str(out), "--set", "scalin=1")
    assert (
        bad.returncode == 2
        and "scalin: unknown parameter of strategy 'task_arithmetic' (did you mean 'scaling'?)" in bad.stderr
    )


def test_get_rows_reads_a_row_block(base):
    from cpt.tensors import SafetensorsWeights

    weights_on_disk = SafetensorsWeights(base)
    name = "model.embed_tokens.weight"
    whole = weights_on_disk.get(name)
    torch.testing.assert_close(weights_on_disk.get_rows(name, slice(3, 9)), whole[3:9], rtol=0, atol=0)


def test_model_weights_of_a_live_model(base):
    """Plain weights are the module's own storage; LoRA weights equal peft's merge, computed per access."""
    from peft import LoraConfig, get_peft_model

    from cpt.tensors import ModelWeights, SafetensorsWeights

    model = AutoModelForCausalLM.from_pretrained(base)
    plain = ModelWeights(model)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert plain[name].data_ptr() == model.get_parameter(name).data_ptr(), "a reference, not a copy"
    assert set(plain.names()) >= set(SafetensorsWeights(base).names())

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights="gaussian")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora)
    for param in peft_model.parameters():  # non-zero B, so the adapter changes the weights
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.05)
    weights = ModelWeights(peft_model)
    assert weights.dtype(name) == torch.float32 and weights.shape(name) == model.get_parameter(name).shape
    merged_by_peft = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(weights.names()) == set(merged_by_peft)
    for key, expected in merged_by_peft.items():
        torch.testing.assert_close(weights[key], expected, rtol=1e-6, atol=1e-7, msg=key)
    assert (
        peft_model.active_adapters == ["default"]
        and not peft_model.base_model.model.model.layers[0].self_attn.q_proj.merged
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
def test_release_freed_host_memory_returns_freed_buffers(tmp_path):
    """The measured cause of merge memory growing with every tensor read: glibc keeps freed
    multi-MB buffers once interleaved with live allocations; release_freed_host_memory gives them back."""
    from safetensors.torch import save_file

    from cpt.tensors import _malloc_trim, release_freed_host_memory

    if _malloc_trim() is None:
        pytest.skip("no glibc malloc_trim on this platform")

    def anonymous_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    for i in range(24):
        save_file({"w": torch.full((512, 1024), float(i))}, tmp_path / f"{i}.safetensors")
    from safetensors import safe_open

    release_freed_host_memory()
    before = anonymous_mib()
    handles = []
    for i in range(24):  # 2 MiB tensors read, stacked and freed, with small live handles between
        handles.append(safe_open(tmp_path / f"{i}.safetensors", framework="pt"))
        stacked = torch.stack([handles[-1].get_tensor("w")] * 2)
        del stacked
    grown = anonymous_mib() - before
    release_freed_host_memory()
    kept = anonymous_mib() - before
    assert kept < 16, f"{kept:.0f} MiB still held after release (grew {grown:.0f} MiB)"
