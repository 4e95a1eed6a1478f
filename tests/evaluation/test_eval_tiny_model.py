"""cpt.testing.build_tiny_model: deterministic, fast, a real tokenizer, trainable with TRL."""

import hashlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpt.testing import build_tiny_model


def digest(path):
    return {
        name: hashlib.sha256((path / name).read_bytes()).hexdigest()
        for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json")
    }


def test_deterministic_and_fast(tmp_path):
    build_tiny_model(tmp_path / "warmup")  # imports
    start = time.perf_counter()
    a = build_tiny_model(tmp_path / "a", seed=3)
    assert time.perf_counter() - start < 2.0
    build_tiny_model(tmp_path / "b", seed=3)
    build_tiny_model(tmp_path / "c", seed=4)
    assert a == str(tmp_path / "a")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    da, dc = digest(tmp_path / "a"), digest(tmp_path / "c")
    assert da["model.safetensors"] != dc["model.safetensors"]
    assert da["tokenizer.json"] == dc["tokenizer.json"]
    # building does not disturb the caller's RNG
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    build_tiny_model(tmp_path / "d")
    assert torch.equal(torch.rand(3), x)


def test_model_and_tokenizer_are_consistent(tmp_path):
    path = build_tiny_model(tmp_path / "m", hidden_size=32, layers=3)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (32, 3, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert model.dtype == torch.float32
    assert cfg.vocab_size == len(tok) == 512
    eos, im_end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == cfg.pad_token_id == cfg.bos_token_id == tok.eos_token_id == eos
    assert model.generation_config.eos_token_id == [eos, im_end]
    for text in ["Hello, world!", "naïve café – 東京 🙂", "\x00\ttabs\nand lines\r\n", ""]:
        ids = tok(text)["input_ids"]
        assert max(ids, default=0) < len(tok)
        assert tok.decode(ids) == text  # byte-level: any text round-trips
    # the BPE merges make common English cheaper than bytes
    assert len(tok("The quick brown fox")["input_ids"]) < len("The quick brown fox") / 2
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)


def test_chat_template_generation_markers(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m"))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Yo<|im_end|>"


def sft_train(path, rows, out, **extra):
    model = AutoModelForCausalLM.from_pretrained(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        **extra,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    result = trainer.train()
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    return result.training_loss, changed


@pytest.mark.parametrize("kind", ["string", "conversational", "messages_assistant_only"])
def test_sft_trainer_trains(tmp_path, kind):
    path = build_tiny_model(tmp_path / "m")
    if kind == "string":
        rows = [{"prompt": f"Q: {i} + {i} =", "completion": f" {2 * i}"} for i in range(6)]
        extra = {}
    elif kind == "conversational":
        rows = [
            {
                "prompt": [{"role": "user", "content": f"{i} + {i}?"}],
                "completion": [{"role": "assistant", "content": str(2 * i)}],
            }
            for i in range(6)
        ]
        extra = {}
    else:
        rows = [
            {"messages": [{"role": "user", "content": f"{i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(6)
        ]
        extra = {"assistant_only_loss": True}
    loss, changed = sft_train(path, rows, tmp_path / "out", **extra)
    assert loss == loss and 0 < loss < 20  # finite, about ln(512) ≈ 6.2 for a random model
    assert changed
