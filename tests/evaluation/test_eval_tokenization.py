"""Evaluation tokenises prompts exactly as TRL's SFTTrainer tokenises prompt/completion data.

The reference is the real thing: the ``input_ids``/``labels`` of the dataset SFTTrainer
prepares (its prompt tokens are the leading ``-100`` labels), for string and
conversational prompts, with a tokenizer that adds a BOS and one that does not.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpt.evaluation import encode_choice, tokenize_prompt
from cpt.testing import build_tiny_model

STRING_DATA = [
    {"prompt": "Q: What is the capital of France? A:", "completion": " Paris"},
    {"prompt": "Translate to French: cat\n", "completion": "chat"},
    {"prompt": "2 + 2 =", "completion": " 4"},
]
CHAT_DATA = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "completion": [{"role": "assistant", "content": "Paris"}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Translate to French: cat"},
        ],
        "completion": [{"role": "assistant", "content": "chat"}],
    },
]


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def add_bos(request):
    return request.param


@pytest.fixture(scope="module")
def tiny_path(add_bos, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_tok"), add_bos=add_bos)


def trl_prepared(path, rows, tmp_path):
    """SFTTrainer's own tokenisation of ``rows`` (dataset preparation only, no training)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    args = SFTConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False, max_steps=1, dataset_num_proc=None
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(path),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    prepared = []
    for row in trainer.train_dataset:
        n_prompt = next(i for i, y in enumerate(row["labels"]) if y != -100)
        prepared.append((row["input_ids"][:n_prompt], row["input_ids"][n_prompt:]))
    return tokenizer, prepared


def test_string_prompts_match_trl(tiny_path, add_bos, tmp_path):
    tokenizer, prepared = trl_prepared(tiny_path, STRING_DATA, tmp_path)
    for row, (trl_prompt, trl_completion) in zip(STRING_DATA, prepared):
        ours = tokenize_prompt(tokenizer, row["prompt"])
        assert ours == trl_prompt
        # a tokenizer that adds BOS gets it for string prompts, as in training
        assert (ours[0] == tokenizer.bos_token_id) == add_bos
        # the continuation tokens a choice is scored on = TRL's completion tokens (TRL appends eos)
        ids, start = encode_choice(tokenizer, row["prompt"], row["completion"] + tokenizer.eos_token)
        assert ids[:start] == trl_prompt
        assert ids[start:] == trl_completion


def test_conversational_prompts_match_trl(tiny_path, tmp_path):
    tokenizer, prepared = trl_prepared(tiny_path, CHAT_DATA, tmp_path)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row, (trl_prompt, trl_completion) in zip(CHAT_DATA, prepared):
        ours = tokenize_prompt(tokenizer, row["prompt"])
        assert ours == trl_prompt
        assert ours[0] == im_start  # no BOS in front of a chat template, even for a BOS tokenizer
        # a choice on a chat prompt is a continuation of the rendered text: the assistant turn
        continuation = row["completion"][0]["content"] + "<|im_end|>\n"
        ids, start = encode_choice(tokenizer, row["prompt"], continuation)
        assert ids[:start] == trl_prompt
        assert ids[start:] == trl_completion
