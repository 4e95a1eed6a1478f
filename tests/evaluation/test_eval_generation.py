"""evaluate_generation on the tiny random model: batching, stopping, scoring, chat prompts."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.errors import CptError
from cpt.evaluation import GenerationExample, evaluate_generation, render_prompt, tokenize_prompt
from cpt.testing import build_tiny_model

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "Q: What is the capital of France? A:",
    [{"role": "user", "content": "What is two plus two?"}],
    "a",
    "Numbers: 1 2 3",
    [{"role": "system", "content": "Be short."}, {"role": "user", "content": "Name a fruit."}],
    "Once upon a time there was a little robot who wanted to learn everything",
]
MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_gen"), seed=0)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def unbatched_greedy(model, tokenizer, prompt, max_new_tokens=MAX_NEW):
    """One prompt, no padding, straight model.generate: the reference for batched decoding."""
    ids = torch.tensor([tokenize_prompt(tokenizer, prompt)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return out[0, ids.shape[1] :].tolist()


def test_batched_left_padded_equals_unbatched(tiny):
    model, tokenizer = tiny
    lengths = {len(tokenize_prompt(tokenizer, p)) for p in PROMPTS}
    assert len(lengths) >= 6  # a real mix of prompt lengths
    examples = [GenerationExample(p, "") for p in PROMPTS]
    batched = evaluate_generation(model, tokenizer, examples, batch_size=3, max_new_tokens=MAX_NEW, progress=False)
    one_by_one = evaluate_generation(model, tokenizer, examples, batch_size=1, max_new_tokens=MAX_NEW, progress=False)
    expected = [tokenizer.decode(unbatched_greedy(model, tokenizer, p), skip_special_tokens=True) for p in PROMPTS]
    assert batched.predictions == expected  # input order, same text
    assert one_by_one.predictions == expected
    assert len(set(expected)) == len(expected)  # distinct outputs: an order mix-up would show
    assert batched.num_examples == len(PROMPTS)


def test_exact_match_on_own_outputs(tiny):
    model, tokenizer = tiny
    preds = evaluate_generation(
        model, tokenizer, [GenerationExample(p, "") for p in PROMPTS], max_new_tokens=MAX_NEW, progress=False
    ).predictions

    def scored_against(references):
        examples = [GenerationExample(p, t) for p, t in zip(PROMPTS, references)]
        return evaluate_generation(model, tokenizer, examples, batch_size=4, max_new_tokens=MAX_NEW, progress=False)

    same = scored_against(preds)
    assert same.score == 1.0
    assert same.references == preds
    half = scored_against([t + " zz" if i % 2 == 0 else t for i, t in enumerate(preds)])
    assert half.score == pytest.approx(0.5)


def test_normalization_is_passed_to_the_metric(tiny):
    model, tokenizer = tiny
    preds = evaluate_generation(
        model, tokenizer, [GenerationExample(p, "") for p in PROMPTS[:3]], max_new_tokens=4, progress=False
    ).predictions
    padded = [GenerationExample(p, "  " + t + "  ") for p, t in zip(PROMPTS[:3], preds)]
    assert evaluate_generation(model, tokenizer, padded, max_new_tokens=4, progress=False).score == 1.0
    strict = {"strip": False, "collapse_whitespace": False}
    assert (
        evaluate_generation(model, tokenizer, padded, max_new_tokens=4, normalization=strict, progress=False).score
        == 0.0
    )
    with pytest.raises(CptError, match="ignore_cases"):
        evaluate_generation(model, tokenizer, padded, normalization={"ignore_cases": True}, progress=False)


def test_stops_at_generation_config_eos(tiny):
    model, tokenizer = tiny
    prompt = PROMPTS[2]
    tokens = unbatched_greedy(model, tokenizer, prompt, max_new_tokens=8)
    # the first position whose token did not appear before: make that token an eos id
    stop = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = list(saved) + [tokens[stop]]
    try:
        examples = [GenerationExample(prompt, ""), GenerationExample(PROMPTS[1], "")]
        result = evaluate_generation(model, tokenizer, examples, max_new_tokens=8, progress=False)
    finally:
        model.generation_config.eos_token_id = saved
    assert result.predictions[0] == tokenizer.decode(tokens[:stop], skip_special_tokens=True)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(result.predictions[0]) < len(full)


def test_modes_restored(tiny):
    model, tokenizer = tiny
    model.train()
    tokenizer.padding_side = "right"
    try:
        evaluate_generation(model, tokenizer, [GenerationExample("Hello", "x")], max_new_tokens=2, progress=False)
        assert model.training
        assert tokenizer.padding_side == "right"
    finally:
        model.eval()


def test_conversational_prompt_goes_through_chat_template(tiny):
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "What is two plus two?"}]
    rendered = render_prompt(tokenizer, messages)
    assert rendered == "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tokenizer, "plain text") == "plain text"
    expected_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert tokenize_prompt(tokenizer, messages) == list(expected_ids["input_ids"])
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenize_prompt(tokenizer, messages).count(im_start) == 2  # special tokens, not text
    # generating from the messages = generating from the rendered text (this tokenizer adds no BOS)
    chat = evaluate_generation(model, tokenizer, [GenerationExample(messages, "")], max_new_tokens=6, progress=False)
    text = evaluate_generation(model, tokenizer, [GenerationExample(rendered, "")], max_new_tokens=6, progress=False)
    raw = evaluate_generation(
        model, tokenizer, [GenerationExample(messages[0]["content"], "")], max_new_tokens=6, progress=False
    )
    assert chat.predictions == text.predictions
    assert chat.predictions != raw.predictions


def test_bad_inputs(tiny):
    model, tokenizer = tiny
    with pytest.raises(CptError, match="no examples"):
        evaluate_generation(model, tokenizer, [], progress=False)
    with pytest.raises(CptError, match="prompt must be"):
        evaluate_generation(model, tokenizer, [GenerationExample(42, "x")], progress=False)
    template = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(CptError, match="chat template"):
            render_prompt(tokenizer, [{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template


def test_greedy_even_when_the_model_config_samples(tiny):
    model, tokenizer = tiny
    from transformers import GenerationConfig

    examples = [GenerationExample(p, "") for p in PROMPTS[:3]]
    greedy = evaluate_generation(model, tokenizer, examples, max_new_tokens=6, progress=False).predictions
    saved = model.generation_config
    model.generation_config = GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        repetition_penalty=1.5,
        eos_token_id=saved.eos_token_id,
        pad_token_id=saved.pad_token_id,
    )
    try:
        torch.manual_seed(123)
        again = evaluate_generation(model, tokenizer, examples, max_new_tokens=6, progress=False).predictions
    finally:
        model.generation_config = saved
    assert again == greedy
