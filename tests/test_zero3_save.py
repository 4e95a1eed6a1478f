"""A ZeRO-3 model's folder is laid out as ``save_pretrained`` lays it out; cpt's older layout stays readable.

The 2-rank DeepSpeed run that writes one is in tests/test_deepspeed.py
(``test_zero3_state_is_written_as_save_pretrained_writes_it``); these check, without
DeepSpeed, the two things it rests on — the order HF plans shards in, and the layout
computed from the model without gathering — and that run directories written before
(``model-0000i.safetensors`` shards) are still read and resumed.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cpt.merging.batch_io import StreamingShardWriter
from cpt.recipe import validate_recipe
from cpt.runner import TaskSequenceRunner
from cpt.tensors import SafetensorsWeights, read_marker, save_pretrained_order, zero3_tensor_layout
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe


def twelve_layer_model(tie_word_embeddings: bool) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=12,  # layers.10 and .11: a natural order differs from the alphabetical one
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("tie_word_embeddings", [False, True], ids=["untied", "tied"])
def test_layout_and_order_give_save_pretrained_plan(tmp_path, tie_word_embeddings):
    model = twelve_layer_model(tie_word_embeddings)
    model.save_pretrained(tmp_path / "hf", max_shard_size="3KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())

    layout = zero3_tensor_layout(model)  # a plain model: its shapes; under ZeRO-3, ds_shape
    state_dict = model.state_dict()
    assert list(layout) == [name for name in state_dict if name in layout], "state_dict order"
    assert ("lm_head.weight" in layout) is not tie_word_embeddings, "a tied lm_head is written once, as the embedding"
    assert all(layout[name] == (state_dict[name].shape, state_dict[name].dtype) for name in layout)

    order = save_pretrained_order(model, layout)
    assert order.index("model.layers.2.mlp.up_proj.weight") < order.index("model.layers.10.mlp.up_proj.weight")
    writer = StreamingShardWriter(tmp_path / "ours", {name: layout[name] for name in order}, "3KB")
    assert len(writer.plan.filename_to_tensors) > 10
    assert writer.plan.tensor_to_filename == index["weight_map"]
    assert writer.plan.metadata["total_size"] == index["metadata"]["total_size"]
    assert sorted(writer.plan.filename_to_tensors) == sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))


def write_old_zero3_layout(folder: Path, state_dict: dict[str, torch.Tensor], shard_bytes: int) -> None:
    """The files cpt wrote from ZeRO-3 models before: ``model-0000i.safetensors`` (flushed once a shard
    reached ``shard_bytes``, 512 MiB then) and an index with the total size only."""
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, size
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, folder / file)
            weight_map.update({name: file for name in shard})
        shard, size = {}, 0

    for name, tensor in state_dict.items():
        shard[name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        total += tensor.numel() * tensor.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def to_old_layout(folder: Path) -> None:
    """Rewrite an HF folder's weights as the old ZeRO-3 writer laid them out (the same tensors)."""
    weights = SafetensorsWeights(folder)
    state_dict = {name: weights[name].clone() for name in weights.names()}
    weights.release()
    for file in list(folder.glob("model*.safetensors*")):
        file.unlink()
    write_old_zero3_layout(folder, state_dict, shard_bytes=100_000)


def test_old_zero3_folder_is_read_by_every_loader(tmp_path):
    path = build_tiny_model(tmp_path / "tiny", seed=0)
    reference = AutoModelForCausalLM.from_pretrained(path).state_dict()
    to_old_layout(Path(path))
    files = sorted(p.name for p in Path(path).glob("model*.safetensors"))
    assert files[:2] == ["model-00001.safetensors", "model-00002.safetensors"], files

    lazy = SafetensorsWeights(path)
    assert sorted(lazy.names()) == sorted(reference)
    loaded = AutoModelForCausalLM.from_pretrained(path).state_dict()
    for name, tensor in reference.items():
        torch.testing.assert_close(lazy[name], tensor, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_run_directory_with_old_zero3_state_resumes(tmp_path):
    """A run killed during task 2 whose θ_1 is in the old ZeRO-3 layout resumes as if it were in HF's.

    The expert trains from the state (``from_pretrained``) and the merge reads it tensor by
    tensor (:class:`SafetensorsWeights`): both must read the old files, so the resumed θ_2
    is bit for bit the one resumed from the same tensors in HF's layout.
    """
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    data = make_recipe(
        tmp_path,
        model,
        steps=(1, 1),
        strategy={"name": "task_arithmetic", "train_from": "state"},
        geometry={"enabled": False},
        evaluation={"batch_size": 4, "max_new_tokens": 2, "evaluate_experts": False},
    )
    recipe = validate_recipe(data)
    TaskSequenceRunner(recipe).run()
    finished = tmp_path / "finished"
    shutil.copytree(recipe.run_dir, finished)

    def resume_task_2(old_layout: bool) -> dict[str, torch.Tensor]:
        shutil.rmtree(recipe.run_dir)
        shutil.copytree(finished, recipe.run_dir)
        state = recipe.run_dir / "state"
        if old_layout:
            to_old_layout(state)
            assert (state / "model-00001.safetensors").exists()
        # as a kill during task 2's training leaves it: the state holds step 1, task 2 is not done
        (state / "cpt_state.json").write_text(json.dumps({"step": 1, "task": "plural"}))
        manifest = json.loads((recipe.run_dir / "manifest.json").read_text())
        manifest["tasks"][1]["status"] = "training"
        manifest["status"] = "running"
        (recipe.run_dir / "manifest.json").write_text(json.dumps(manifest))
        TaskSequenceRunner(validate_recipe(yaml.safe_load(yaml.safe_dump(data)))).run()
        assert read_marker(state) == {"step": 2, "task": "upper"}
        assert not (state / "model-00001.safetensors").exists(), "θ_2 is written in HF's layout"
        weights = SafetensorsWeights(state)
        return {name: weights[name].clone() for name in weights.names()}

    from_old, from_hf = resume_task_2(old_layout=True), resume_task_2(old_layout=False)
    assert sorted(from_old) == sorted(from_hf)
    for name, tensor in from_hf.items():
        torch.testing.assert_close(from_old[name], tensor, rtol=0, atol=0, msg=name)
