"""Choice scoring from a shared, cached prompt equals the plain prompt+choice forward pass.

The plain path (``method="full"``) is the reference: one right-padded forward pass per
(example, choice) with logits everywhere, itself checked against a hand computation in
test_eval_choice.py. The shared-prefix path must give the same scores (to float rounding)
for every layout: left-padded prompts of different lengths, choices of one and of many
tokens, choices that merge with the prompt's last token, chat prompts, BOS tokenizers,
tied and untied heads, LoRA-wrapped models, both length normalisations, any batch size.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.errors import CptError
from cpt.evaluation import (
    ChoiceExample,
    choice_log_likelihoods,
    evaluate_choice,
    tokenize_prompt,
)
from cpt.evaluation.choice import _common_prefix_length, _prefix_model
from cpt.testing import build_tiny_model

EXAMPLES = [
    ("Q: What is the capital of France? A:", [" Paris", " London", " the city of Rome"], 0),
    ("The quick brown fox", [" jumps", " sleeps all day long", " runs"], 1),
    ([{"role": "user", "content": "Which is a fruit?"}], ["apple", "carrot", "a potato"], 2),
    ("Numbers: 1 2 3", [" 4", " 5 6 7 8"], 0),
    # the prompt ends mid-word or in a space: BPE merges its last token with a choice's first one
    ("Learnin", ["g", "g continues after training", "x"], 1),
    ("The cat sat on ", ["the", "the mat", "a floor, under the table by the door", "x"], 3),
    ("a", [" b", " c"], 0),
    (
        "Learning continues after training: new tasks arrive, and the model should not forget the old ones. "
        "She said that the weather would be sunny tomorrow, but it",
        [" rained", " did not", " was"],
        0,
    ),
]


def make_examples():
    return [ChoiceExample(prompt, choices, label) for prompt, choices, label in EXAMPLES]


@pytest.fixture(scope="module", params=[(False, False), (True, False), (False, True)], ids=["plain", "bos", "tied"])
def tiny(request, tmp_path_factory):
    add_bos, tied = request.param
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_prefix"), seed=3, add_bos=add_bos, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path)
    return model, AutoTokenizer.from_pretrained(path)


def max_difference(a, b):
    assert [len(row) for row in a] == [len(row) for row in b]
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


def test_examples_cover_boundary_merges(tiny):
    """The fixture really has choices whose first token merges into the prompt's last one."""
    _, tokenizer = tiny
    merged = 0
    for prompt, choices, _ in EXAMPLES:
        prompt_ids = tokenize_prompt(tokenizer, prompt)
        starts = [_common_prefix_length(prompt_ids, tokenize_prompt(tokenizer, prompt, c)) for c in choices]
        merged += sum(start < len(prompt_ids) for start in starts)
    assert merged >= 2


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_shared_prefix_equals_full(tiny, length_normalize, batch_size):
    model, tokenizer = tiny
    options = dict(batch_size=batch_size, length_normalize=length_normalize, progress=False)
    full = choice_log_likelihoods(model, tokenizer, make_examples(), method="full", **options)
    shared = choice_log_likelihoods(model, tokenizer, make_examples(), method="shared_prefix", **options)
    assert max_difference(full, shared) < 1e-4
    # "auto" takes the shared-prefix path for a transformers model
    assert choice_log_likelihoods(model, tokenizer, make_examples(), **options) == shared


def test_order_and_batching_do_not_change_scores(tiny):
    model, tokenizer = tiny
    examples = make_examples()
    reference = choice_log_likelihoods(model, tokenizer, examples, batch_size=3, progress=False)
    reversed_scores = choice_log_likelihoods(model, tokenizer, examples[::-1], batch_size=7, progress=False)
    assert max_difference(reference, reversed_scores[::-1]) < 1e-4


def test_evaluate_choice_predictions_agree(tiny):
    model, tokenizer = tiny
    full = evaluate_choice(model, tokenizer, make_examples(), method="full", progress=False)
    shared = evaluate_choice(model, tokenizer, make_examples(), progress=False)
    assert shared.predictions == full.predictions and shared.score == full.score
    assert shared.correct == full.correct


class LmHeadRows:
    """Counts the positions projected onto the vocabulary and the forward passes."""

    def __init__(self, model):
        self.rows = 0
        self.calls = 0
        head = model.get_output_embeddings()
        self.handle = head.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1
        self.rows += inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]


def test_single_token_choices_need_one_pass_and_one_position_per_prompt(tiny):
    model, tokenizer = tiny
    prompts = ("Q: one? A:", "Q: two, three? A:", "Hi")
    examples = [ChoiceExample(prompt, [" the", " and", " to", " of"], 0) for prompt in prompts]
    for ex in examples:  # each choice adds exactly one token after the whole prompt
        prompt_ids = tokenize_prompt(tokenizer, ex.prompt)
        for choice in ex.choices:
            ids = tokenize_prompt(tokenizer, ex.prompt, choice)
            assert len(ids) == len(prompt_ids) + 1 and ids[: len(prompt_ids)] == prompt_ids
    counter = LmHeadRows(model)
    try:
        shared = choice_log_likelihoods(model, tokenizer, examples, batch_size=16, progress=False)
        assert (counter.calls, counter.rows) == (1, len(examples))
        counter.calls = counter.rows = 0
        full = choice_log_likelihoods(model, tokenizer, examples, batch_size=16, method="full", progress=False)
        assert counter.rows > 4 * len(examples)
    finally:
        counter.handle.remove()
    assert max_difference(full, shared) < 1e-4


def test_lora_wrapped_model(tiny):
    peft = pytest.importorskip("peft")
    model, tokenizer = tiny
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    import copy

    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    runner = _prefix_model(wrapped)
    assert runner is not None and runner.model is wrapped.get_base_model()
    base_scores = choice_log_likelihoods(model, tokenizer, make_examples(), progress=False)
    full = choice_log_likelihoods(wrapped, tokenizer, make_examples(), method="full", progress=False)
    shared = choice_log_likelihoods(wrapped, tokenizer, make_examples(), method="shared_prefix", progress=False)
    assert max_difference(full, shared) < 1e-4
    assert max_difference(base_scores, shared) > 1e-3  # the adapter is applied on the shared path


def test_prompt_learning_peft_takes_the_full_path(tiny):
    peft = pytest.importorskip("peft")
    model, _ = tiny
    import copy

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    assert _prefix_model(peft.get_peft_model(copy.deepcopy(model), config)) is None


class PlainForward(torch.nn.Module):
    """A model whose forward takes only input_ids and attention_mask (no cache, no logits_to_keep)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_models_without_the_arguments_fall_back_to_full(tiny):
    model, tokenizer = tiny
    plain = PlainForward(model)
    assert _prefix_model(plain) is None
    auto = choice_log_likelihoods(plain, tokenizer, make_examples(), progress=False)
    full = choice_log_likelihoods(model, tokenizer, make_examples(), method="full", progress=False)
    assert auto == full
    with pytest.raises(CptError, match="shared_prefix"):
        choice_log_likelihoods(plain, tokenizer, make_examples(), method="shared_prefix", progress=False)
    with pytest.raises(CptError, match="unknown"):
        choice_log_likelihoods(model, tokenizer, make_examples(), method="fast", progress=False)
