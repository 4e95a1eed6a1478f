"""evaluate_choice: batched, right-padded log-likelihoods against a hand computation."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.errors import CptError
from cpt.evaluation import ChoiceExample, choice_log_likelihoods, evaluate_choice, render_prompt
from cpt.testing import build_tiny_model

EXAMPLES = [
    ("Q: What is the capital of France? A:", [" Paris", " London", " the city of Rome"]),
    ("The quick brown fox", [" jumps", " sleeps all day long", " runs"]),
    ([{"role": "user", "content": "Which is a fruit?"}], ["apple", "carrot", "a potato"]),
    ("Numbers: 1 2 3", [" 4", " 5 6 7 8"]),
]


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos"])
def add_bos(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(add_bos, tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_choice"), seed=1, add_bos=add_bos)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def hand_log_likelihood(model, tokenizer, prompt, choice):
    """One unpadded forward pass of prompt+choice; sum of log p(choice tokens)."""
    text = render_prompt(tokenizer, prompt)
    special = isinstance(prompt, str)  # chat-rendered text carries its own special tokens
    prompt_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    full = tokenizer(text + choice, add_special_tokens=special)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids  # the choices start on a token boundary
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
    terms = [logp[t - 1, full[t]].item() for t in range(len(prompt_ids), len(full))]
    return sum(terms), len(terms)


def test_log_likelihoods_match_hand_computation(tiny):
    model, tokenizer = tiny
    examples = [ChoiceExample(p, c, 0) for p, c in EXAMPLES]
    sums = choice_log_likelihoods(model, tokenizer, examples, batch_size=3, progress=False)
    means = choice_log_likelihoods(model, tokenizer, examples, batch_size=5, length_normalize=True, progress=False)
    for (prompt, choices), got_sum, got_mean in zip(EXAMPLES, sums, means):
        for choice, s, m in zip(choices, got_sum, got_mean):
            total, n = hand_log_likelihood(model, tokenizer, prompt, choice)
            assert s == pytest.approx(total, abs=1e-4)
            assert m == pytest.approx(total / n, abs=1e-4)


def test_bos_tokenizer_scores_after_bos(tiny, add_bos):
    model, tokenizer = tiny
    # with a BOS-adding tokenizer the string prompt "a" is [bos, a]: its choice is scored given both
    ids = tokenizer("a")["input_ids"]
    assert len(ids) == (2 if add_bos else 1)
    assert (ids[0] == tokenizer.bos_token_id) == add_bos
    [[s]] = choice_log_likelihoods(model, tokenizer, [ChoiceExample("a", [" b"], 0)], progress=False)
    total, _ = hand_log_likelihood(model, tokenizer, "a", " b")
    assert s == pytest.approx(total, abs=1e-4)


def test_accuracy_from_argmax(tiny):
    model, tokenizer = tiny
    hand = [[hand_log_likelihood(model, tokenizer, p, c)[0] for c in choices] for p, choices in EXAMPLES]
    best = [max(range(len(h)), key=h.__getitem__) for h in hand]
    # right label for examples 0 and 1, wrong for 2 and 3 -> accuracy 0.5
    labels = [best[0], best[1], (best[2] + 1) % 3, (best[3] + 1) % 2]
    examples = [ChoiceExample(p, c, y) for (p, c), y in zip(EXAMPLES, labels)]
    result = evaluate_choice(model, tokenizer, examples, batch_size=4, progress=False)
    assert result.predictions == best
    assert result.references == labels
    assert result.score == pytest.approx(0.5)
    assert result.num_examples == 4
    assert len(result.scores) == 4 and len(result.scores[0]) == 3


def test_modes_restored(tiny):
    model, tokenizer = tiny
    model.train()
    try:
        evaluate_choice(model, tokenizer, [ChoiceExample("Hi", [" a", " b"], 0)], progress=False)
        assert model.training
    finally:
        model.eval()


def test_bad_choice_examples(tiny):
    model, tokenizer = tiny
    with pytest.raises(CptError, match="label"):
        evaluate_choice(model, tokenizer, [ChoiceExample("Hi", [" a", " b"], 2)], progress=False)
    with pytest.raises(CptError, match="no choices"):
        evaluate_choice(model, tokenizer, [ChoiceExample("Hi", [], 0)], progress=False)
    with pytest.raises(CptError, match="adds no tokens"):
        evaluate_choice(model, tokenizer, [ChoiceExample("Hi", ["", " b"], 0)], progress=False)
    with pytest.raises(CptError, match="no examples"):
        evaluate_choice(model, tokenizer, [], progress=False)
