"""A merged state is written the way ``save_pretrained`` writes a model: HF's shard plan, streamed."""

import json
import struct
from pathlib import Path

import pytest
import torch
from merge_steps import perturbed
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.errors import CptError
from cpt.integration import IntegrationContext
from cpt.merging.batch_io import (
    StreamingShardWriter,
    default_max_shard_size,
    parse_max_shard_size,
    rewrite_in_place,
    run_merge,
)
from cpt.merging.task_arithmetic import TaskArithmetic, TaskArithmeticParams
from cpt.recipe import DEFAULT_TARGETS


def merge_once(run: Path, base: Path, expert, max_shard_size=None) -> Path:
    context = IntegrationContext(
        step=1,
        task_name="t1",
        model=expert,
        tokenizer=AutoTokenizer.from_pretrained(base),
        state_dir=run / "state",
        base_dir=base,
        previous_state_dir=None,
        history_dir=run / "history",
        target_patterns=DEFAULT_TARGETS,
        train_from="base",
        max_shard_size=max_shard_size,
    )
    run_merge(TaskArithmetic(TaskArithmeticParams(scaling=0.5)), context)
    return run / "state"


def test_default_is_save_pretrained_default():
    import inspect

    from transformers import PreTrainedModel

    expected = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert default_max_shard_size() == expected
    assert parse_max_shard_size(None) == parse_max_shard_size(expected) >= 10**9
    assert parse_max_shard_size("500MB") == 500_000_000
    with pytest.raises(CptError, match="max_shard_size"):
        parse_max_shard_size("lots")


def test_default_writes_one_model_safetensors_like_save_pretrained(tmp_path, base):
    expert = perturbed(base, 1)
    state = merge_once(tmp_path / "one", base, expert)
    files = sorted(path.name for path in state.glob("*.safetensors*"))
    assert files == ["model.safetensors"]  # a single shard: no index, as save_pretrained does
    theta0, e1 = AutoModelForCausalLM.from_pretrained(base).state_dict(), expert.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(state).state_dict()
    written = load_file(state / "model.safetensors")
    for name, value in written.items():
        torch.testing.assert_close(value, theta0[name] + 0.5 * (e1[name] - theta0[name]), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)


def test_small_max_shard_size_writes_hf_shards_and_index(tmp_path, base):
    expert = perturbed(base, 1)
    single = merge_once(tmp_path / "one", base, expert)
    total = (single / "model.safetensors").stat().st_size
    sharded = merge_once(tmp_path / "many", base, expert, max_shard_size=total // 3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) >= 3
    assert shard_files == [
        f"model-{i:05d}-of-{len(shard_files):05d}.safetensors" for i in range(1, len(shard_files) + 1)
    ]
    assert sorted(path.name for path in sharded.glob("model*.safetensors")) == shard_files
    assert not (sharded / "model.safetensors").exists()
    # save_pretrained's own plan for the same tensors gives the same files and metadata
    from huggingface_hub import split_torch_state_dict_into_shards

    reference = split_torch_state_dict_into_shards(load_file(single / "model.safetensors"), max_shard_size=total // 3)
    assert index["weight_map"] == reference.tensor_to_filename
    assert index["metadata"]["total_size"] == reference.metadata["total_size"]
    one = AutoModelForCausalLM.from_pretrained(single).state_dict()
    many = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert one.keys() == many.keys()
    for name in one:
        torch.testing.assert_close(many[name], one[name], rtol=0, atol=0)


def test_streaming_writer_row_blocks_any_order_and_dtypes(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=generator).to(torch.bfloat16),
        "b": torch.randn(3, generator=generator),
        "c": torch.randn(4, 4, generator=generator).to(torch.float16),
        "s": torch.tensor(2.5, dtype=torch.float64),
    }
    layout = {name: (value.shape, value.dtype) for name, value in tensors.items()}
    writer = StreamingShardWriter(tmp_path, layout, max_shard_size=40)
    writer.write({"s": tensors["s"], "c": tensors["c"]})
    for rows in (slice(4, 7), slice(0, 4)):  # row blocks, out of order
        writer.write_rows("a", rows, tensors["a"][rows], tensors["a"].shape)
    with pytest.raises(RuntimeError, match="b: 0 of its 12 bytes"):
        writer.close()  # a tensor never written is an error, not zeros
    writer.write({"b": tensors["b"]})
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for file in set(index["weight_map"].values()):
        with open(tmp_path / file, "rb") as handle:  # 8-byte aligned header, as safetensors writes it
            assert (8 + struct.unpack("<Q", handle.read(8))[0]) % 8 == 0
        with safe_open(tmp_path / file, framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            read.update({name: handle.get_tensor(name) for name in handle.keys()})
    assert read.keys() == tensors.keys()
    for name, value in tensors.items():
        assert read[name].dtype == value.dtype
        torch.testing.assert_close(read[name], value, rtol=0, atol=0)
    file = tmp_path / index["weight_map"]["a"]
    rewrite_in_place(file, "a", slice(2, 3), torch.zeros(1, 5, dtype=torch.bfloat16))
    expected = tensors["a"].clone()
    expected[2] = 0
    torch.testing.assert_close(load_file(file)["a"], expected, rtol=0, atol=0)


def test_recipe_and_cli_take_max_shard_size(tmp_path, base):
    from cpt.recipe import validate_recipe

    from tiny_recipes import make_recipe

    data = make_recipe(tmp_path, str(base))
    recipe = validate_recipe({**data, "max_shard_size": "500MB"})
    assert recipe.max_shard_size == "500MB"
    assert recipe.fingerprint() == validate_recipe(data).fingerprint()  # only how files are split
    with pytest.raises(CptError, match="max_shard_size"):
        validate_recipe({**data, "max_shard_size": "huge"})


def test_two_writers_fill_one_set_of_shards(tmp_path):
    """One writer creates the HF-planned files, another attaches; each writes its share (as ranks would)."""
    generator = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(6, 4, generator=generator).to(torch.bfloat16) for i in range(5)}
    layout = {name: (value.shape, value.dtype) for name, value in tensors.items()}
    first = StreamingShardWriter(tmp_path, layout, max_shard_size=100)
    second = StreamingShardWriter(tmp_path, layout, max_shard_size=100, create=False)
    first.write({name: tensors[name] for name in ("t0", "t3")})
    second.write({name: tensors[name] for name in ("t1", "t2", "t4")})
    assert first.written_complete(["t0", "t3"]) and second.written_complete(["t1", "t2", "t4"])
    assert not first.written_complete(["t1"])
    first.close(check=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    read = {}
    for file in set(index["weight_map"].values()):
        read.update(load_file(tmp_path / file))
    for name, value in tensors.items():
        torch.testing.assert_close(read[name], value, rtol=0, atol=0)
