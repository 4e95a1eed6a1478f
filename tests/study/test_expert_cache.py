"""The expert cache (cpt.study.expert_cache): exact keys, locking, verification, and the runner hook."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cache_writer import write_entry as _write_entry
from trl import SFTConfig

from cpt.data import build_task_data
from cpt.recipe import validate_recipe
from cpt.study.expert_cache import (
    ExpertCache,
    expert_key,
    expert_key_inputs,
    model_folder_identity,
)
from cpt.testing import build_tiny_model

from tiny_recipes import count_trainings, make_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def recipe_key(recipe_data: dict, base_folder: str, tmp_path: Path, step: int = 1, device: str = "cpu") -> str:
    """The key the runner computes for task `step` of a recipe (same data and SFTConfig construction)."""
    recipe = validate_recipe(recipe_data)
    task = recipe.tasks[step - 1]
    data = build_task_data(task, step - 1, recipe.seed)
    args = SFTConfig(
        output_dir=str(recipe.run_dir / "work" / task.name), seed=recipe.seed + step, **recipe.training_args(task)
    )
    inputs = expert_key_inputs(
        base_folder=base_folder,
        model_settings={"dtype": recipe.model.dtype, "attn_implementation": recipe.model.attn_implementation},
        train_dataset=data.train,
        args=args,
        lora=recipe.peft.model_dump(mode="json") if recipe.peft else None,
        device=device,
        memo_path=tmp_path / "hashes.json",
    )
    return expert_key(inputs)


def test_key_ignores_what_cannot_change_the_expert(tmp_path, tiny_model):
    base = make_recipe(tmp_path, tiny_model)
    reference = recipe_key(base, tiny_model, tmp_path)
    unchanged = [
        {"name": "another-run"},
        {"output_dir": str(tmp_path / "elsewhere")},
        {"strategy": {"name": "ties", "scaling": 0.5}},
        {"strategy": {"name": "task_arithmetic", "train_from": "base"}},
        {"evaluation": {"batch_size": 2, "max_new_tokens": 9, "evaluate_base": False}},
        {"geometry": {"enabled": False}},
    ]
    for change in unchanged:
        assert recipe_key({**base, **change}, tiny_model, tmp_path) == reference, change
    # Logging and output settings of the trainer do not change the weights either.
    logged = json.loads(json.dumps(base))
    logged["training"].update(logging_steps=3, disable_tqdm=False, report_to="none")
    assert recipe_key(logged, tiny_model, tmp_path) == reference
    # Nor do the eval set's size of a task with a separate eval file... here: the other task's settings.
    other_task = json.loads(json.dumps(base))
    other_task["tasks"][1]["eval"]["held_out"] = 5
    other_task["tasks"][1]["training"]["max_steps"] = 9
    assert recipe_key(other_task, tiny_model, tmp_path) == reference


def test_key_changes_with_each_input_of_the_expert(tmp_path, tiny_model):
    base = make_recipe(tmp_path, tiny_model)
    reference = recipe_key(base, tiny_model, tmp_path)
    keys = {}

    def variant(name, mutate, **kwargs):
        data = json.loads(json.dumps(base))
        mutate(data)
        keys[name] = recipe_key(data, kwargs.pop("base_folder", tiny_model), tmp_path, **kwargs)

    variant("learning rate", lambda d: d["training"].update(learning_rate=5e-4))
    variant("max_steps", lambda d: d["training"].update(max_steps=5))
    variant("seed (data shuffle and training seed)", lambda d: d.update(seed=4))
    variant("dtype", lambda d: d["model"].update(dtype="bfloat16"))
    variant("lora", lambda d: d.update(peft={"r": 4}))
    variant("held-out split (changes the training rows)", lambda d: d["tasks"][0]["eval"].update(held_out=5))
    variant("max_examples", lambda d: d["tasks"][0].update(max_examples=5))
    variant("prompt template", lambda d: d["tasks"][0]["fields"].update(prompt_template="Plural: {prompt} ->"))
    variant("task position (training seed is seed + step)", lambda d: d["tasks"].reverse(), step=2)
    variant("device", lambda d: None, device="cuda")
    # The data file's content (same path, one example changed).
    plural = Path(base["tasks"][0]["train"]["path"])
    original = plural.read_text()
    plural.write_text(original.replace('s"}', 'es"}'))  # every target changes
    variant("data content", lambda d: None)
    plural.write_text(original)
    # The base model's content: the same folder with one weight changed.
    other = Path(build_tiny_model(tmp_path / "other-base", seed=1))
    variant("base weights", lambda d: d["model"].update(name_or_path=str(other)), base_folder=str(other))
    (other / "config.json").write_text((Path(tiny_model) / "config.json").read_text())
    shutil.copy(Path(tiny_model) / "model.safetensors", other / "model.safetensors")
    variant(
        "same base content in another folder",
        lambda d: d["model"].update(name_or_path=str(other)),
        base_folder=str(other),
    )

    same_content = keys.pop("same base content in another folder")
    assert same_content == reference, "a copy of the base model is the same base model"
    assert reference not in keys.values(), [name for name, key in keys.items() if key == reference]
    assert len(set(keys.values())) == len(keys), keys


def test_hf_cache_blobs_are_identified_without_reading(tmp_path):
    blobs = tmp_path / "models--x" / "blobs"
    snapshot = tmp_path / "models--x" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    digest = "a" * 64
    (blobs / digest).write_bytes(b"not really the weights")  # the blob name is trusted: it is the content hash
    (snapshot / "model.safetensors").symlink_to(blobs / digest)
    (snapshot / "config.json").write_text("{}")
    identity = model_folder_identity(snapshot)
    assert identity["model.safetensors"] == f"sha256:{digest}"
    assert identity["config.json"] == "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_two_processes_train_an_expert_once(tmp_path):
    log = tmp_path / "trainings.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")])),
    }
    command = [
        sys.executable,
        str(Path(__file__).with_name("cache_writer.py")),
        str(tmp_path / "experts"),
        "k1",
        str(log),
        "1.5",
    ]
    workers = [subprocess.Popen(command, env=env) for _ in range(2)]
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    cache = ExpertCache(tmp_path / "experts")
    assert cache.verify("k1") is not None
    assert [entry["key"] for entry in cache.entries()] == ["k1"]
    assert not list((tmp_path / "experts").glob(".*.tmp")), "no staging folder is left behind"


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_damaged_entry_is_removed_and_reproduced(tmp_path, damage):
    cache = ExpertCache(tmp_path / "experts")
    log = tmp_path / "log"
    _write_entry(str(cache.root), "k", str(log), 0)
    weights = cache.entry_dir("k") / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[7] ^= 1
        weights.write_bytes(bytes(data))  # same size, different content: caught by the sha256
    else:
        (cache.entry_dir("k") / "manifest.json").unlink()
    assert cache.verify("k") is None
    with cache.claim("k") as entry:
        assert entry is None and not cache.entry_dir("k").exists()
    _write_entry(str(cache.root), "k", str(log), 0)
    assert len(log.read_text().splitlines()) == 2 and cache.verify("k") is not None


def test_info_and_clear(tmp_path):
    cache = ExpertCache(tmp_path / "experts")
    _write_entry(str(cache.root), "a", str(tmp_path / "log"), 0)
    _write_entry(str(cache.root), "b", str(tmp_path / "log"), 0)
    entries = cache.entries()
    assert [e["key"] for e in entries] == ["a", "b"] and all(e["bytes"] > 4096 for e in entries)
    assert cache.size_bytes() >= sum(e["bytes"] for e in entries)
    assert cache.clear() == 2 and cache.entries() == [] and cache.size_bytes() == 0


# ---------------------------------------------------------------------- the runner hook, real tiny runs
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_runner_reuses_cached_experts_across_strategies(tmp_path, tiny_model, monkeypatch, lora):
    from cpt.runner import TaskSequenceRunner

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CPT_EXPERT_CACHE", "1")
    trainings = count_trainings(monkeypatch)
    extra = {"peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}} if lora else {}

    first = validate_recipe(
        make_recipe(tmp_path, tiny_model, steps=(2, 2), name="ta", strategy="task_arithmetic", **extra)
    )
    first_result = TaskSequenceRunner(first).run()
    assert len(trainings) == 2
    cache = ExpertCache(tmp_path / "cache" / "experts")
    entries = cache.entries()
    assert len(entries) == 2 and {e["kind"] for e in entries} == {"lora" if lora else "full"}
    if lora:
        assert all(e["bytes"] < 200_000 for e in entries), "a LoRA expert is stored as its adapter"

    second = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 2), name="avg", strategy="average", **extra))
    second_result = TaskSequenceRunner(second).run()
    assert len(trainings) == 2, "the second θ0-based strategy trains nothing"
    manifest = json.loads((second.run_dir / "manifest.json").read_text())
    assert [t["expert_cache"]["hit"] for t in manifest["tasks"]] == [True, True]
    assert [t["status"] for t in manifest["tasks"]] == ["done", "done"]
    # The same experts: their own scores agree, and the first task's state (average of one expert) too.
    assert second_result.expert_scores == first_result.expert_scores
    assert (second.run_dir / "geometry" / "2_upper.json").exists() and (
        second.run_dir / "integration" / "2_upper.json"
    ).exists()
    assert (
        manifest["tasks"][0]["final_loss"]
        == json.loads((first.run_dir / "manifest.json").read_text())["tasks"][0]["final_loss"]
    )

    # A state-trained strategy never uses the cache.
    sequential = validate_recipe(
        make_recipe(tmp_path, tiny_model, steps=(2, 2), name="seq", strategy="sequential", **extra)
    )
    TaskSequenceRunner(sequential).run()
    assert len(trainings) == 4
    assert "expert_cache" not in json.loads((sequential.run_dir / "manifest.json").read_text())["tasks"][0]


@pytest.mark.slow
def test_runner_retrains_a_corrupted_entry(tmp_path, tiny_model, monkeypatch):
    from cpt.runner import TaskSequenceRunner

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CPT_EXPERT_CACHE", "1")
    trainings = count_trainings(monkeypatch)
    first = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 2), name="a", strategy="task_arithmetic"))
    first_result = TaskSequenceRunner(first).run()
    cache = ExpertCache(tmp_path / "cache" / "experts")
    key = json.loads((first.run_dir / "manifest.json").read_text())["tasks"][0]["expert_cache"]["key"]
    weights = cache.entry_dir(key) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated

    second = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 2), name="b", strategy="task_arithmetic"))
    second_result = TaskSequenceRunner(second).run()
    manifest = json.loads((second.run_dir / "manifest.json").read_text())
    assert [t["expert_cache"]["hit"] for t in manifest["tasks"]] == [False, True]
    assert len(trainings) == 3, "the damaged expert is trained again, the intact one reused"
    assert cache.verify(key) is not None
    assert second_result.matrix == first_result.matrix, "retraining reproduces the same expert"
