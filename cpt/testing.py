"""Test utilities: a tiny, offline, deterministic causal LM.

:func:`build_tiny_model` writes a complete Hugging Face model folder (a random
``LlamaForCausalLM``, a real byte-level BPE fast tokenizer trained in-process, a ChatML
chat template with ``{% generation %}`` markers, a generation config) in well under a
second, without the network. It is public so users can test their own callbacks and
recipes the way cpt's tests do::

    from cpt.testing import build_tiny_model
    path = build_tiny_model(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

The tokenizer is byte-level, so any text (any language, emoji, control characters)
tokenizes; its special tokens are ``<|endoftext|>`` (eos, pad and bos), ``<|im_start|>``
and ``<|im_end|>``. By default no special token is added by ``tokenizer(text)`` (as in
Qwen/GPT-2); ``add_bos=True`` adds a post-processor that prepends ``<|endoftext|>`` (as
in Llama), which is how tests check that code treats both kinds of tokenizer correctly.
The generation config stops at ``<|endoftext|>`` and at ``<|im_end|>`` (end of a chat
turn).
"""

from __future__ import annotations

import os
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]

# ChatML, with {% generation %} around the assistant's content and its end-of-turn token
# so that ``return_assistant_tokens_mask`` (TRL's ``assistant_only_loss``) works.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# A small built-in English corpus for the BPE merges (byte-level: the merges only make
# common English cheaper; every byte is in the base vocabulary).
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Question: What is the capital of France? Answer: Paris. Question: What is two plus two? Answer: four.
The model reads the prompt and writes the answer. Translate the sentence into French. Summarize the text.
Once upon a time there was a little robot who wanted to learn everything about the world around it.
It asked the sun why it was bright, and it asked the river where it was going in such a hurry.
Every morning the baker opens the shop, and the smell of fresh bread fills the whole street.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 1000. Dates: 2024-01-31, 1999-12-31.
def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(i)\n
Which of the following is a fruit? (A) carrot (B) apple (C) potato (D) onion. The answer is (B).
The user asks a question and the assistant gives a helpful, honest and short answer.
Please solve the problem step by step, then give the final answer on the last line.
She said that the weather would be sunny tomorrow, but it rained all day and the game was cancelled.
Learning continues after training: new tasks arrive, and the model should not forget the old ones.
"""

# Llama architecture defaults for the tiny model (overridable through **config_overrides).
_MODEL_DEFAULTS = dict(
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
    use_cache=True,
)


def build_tokenizer(*, vocab_size: int = 512, add_bos: bool = False):
    """Train the tiny byte-level BPE tokenizer in-process; returns a ``PreTrainedTokenizerFast``.

    Deterministic: the same arguments give the same vocabulary, merges and ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    eos_id = tok.token_to_id(EOS_TOKEN)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{EOS_TOKEN} $A",
            pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
            special_tokens=[(EOS_TOKEN, eos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END],
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=_MODEL_DEFAULTS["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    vocab_size: int = 512,
    add_bos: bool = False,
    **config_overrides,
) -> str:
    """Write a tiny random ``LlamaForCausalLM`` + fast tokenizer to ``path``; return the path.

    Args:
        path: folder to write (created if needed; existing files are overwritten).
        seed: seeds the weight initialisation; the same seed gives identical weights.
        hidden_size, layers: model width and depth (4 heads, 2 kv heads, MLP 2×hidden
            unless overridden).
        vocab_size: BPE vocabulary size target (special tokens and the 256 bytes
            included); the model's vocabulary is the tokenizer's.
        add_bos: make ``tokenizer(text)`` prepend ``<|endoftext|>`` as a BOS token.
        **config_overrides: any other ``LlamaConfig`` field (e.g. ``num_attention_heads``,
            ``intermediate_size``, ``initializer_range``, ``tie_word_embeddings``).

    The model is float32; ``config.eos/pad/bos_token_id`` are the tokenizer's
    ``<|endoftext|>``; ``generation_config.eos_token_id`` is ``[<|endoftext|>, <|im_end|>]``.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size=vocab_size, add_bos=add_bos)
    eos_id = tokenizer.eos_token_id
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)

    fields = dict(_MODEL_DEFAULTS, intermediate_size=2 * hidden_size)
    fields.update(config_overrides)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        **fields,
    )
    # Seed a private generator state so building a model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[eos_id, im_end_id],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


__all__ = ["build_tiny_model", "build_tokenizer", "CHAT_TEMPLATE", "EOS_TOKEN", "IM_START", "IM_END"]
