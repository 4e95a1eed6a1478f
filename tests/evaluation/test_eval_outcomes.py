"""Per-example outcomes: carried by every EvalResult, written/read as JSON lines, wrong answers picked."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cpt.errors import CptError
from cpt.evaluation import (
    ChoiceExample,
    EvalResult,
    GenerationExample,
    evaluate_choice,
    evaluate_generation,
    format_wrong_answers,
    outcomes_path,
    read_outcomes,
    write_outcomes,
    wrong_answers,
)
from cpt.evaluation.outcomes import correct_vector, outcome_records
from cpt.testing import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny_outcomes"), seed=2)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


CHOICE = [
    ChoiceExample("Q: What is the capital of France? A:", [" Paris", " London"], 0),
    ChoiceExample([{"role": "user", "content": "Which is a fruit?"}], ["apple", "carrot", "a potato"], 2),
    ChoiceExample("The quick brown fox", [" jumps", " sleeps"], 1),
]


def test_choice_result_carries_outcomes(tiny, tmp_path):
    model, tokenizer = tiny
    result = evaluate_choice(model, tokenizer, CHOICE, progress=False)
    assert result.kind == "choice"
    assert result.example_ids == [0, 1, 2]
    assert result.prompts == [ex.prompt for ex in CHOICE]
    assert result.choices == [ex.choices for ex in CHOICE]
    assert result.correct == [p == ex.label for p, ex in zip(result.predictions, CHOICE)]
    assert sum(result.correct) / 3 == pytest.approx(result.score)

    path = write_outcomes(outcomes_path(tmp_path / "eval", 2, "qa"), result)
    assert path == tmp_path / "eval" / "2_qa.jsonl"
    assert sorted(p.name for p in path.parent.iterdir()) == ["2_qa.jsonl"]  # no temporary left behind
    records = read_outcomes(path)
    assert len(path.read_text().splitlines()) == 3
    for i, record in enumerate(records):
        assert record["id"] == i and record["kind"] == "choice"
        assert record["prompt"] == CHOICE[i].prompt
        assert record["prediction"] == result.predictions[i] and record["reference"] == CHOICE[i].label
        assert record["choices"] == CHOICE[i].choices
        assert record["scores"] == pytest.approx(result.scores[i])
        assert record["correct"] == (record["scores"].index(max(record["scores"])) == CHOICE[i].label)
    assert correct_vector(records) == result.correct


def test_generation_result_carries_outcomes(tiny, tmp_path):
    model, tokenizer = tiny
    prompts = ["Hello", "Q: What is the capital of France? A:", [{"role": "user", "content": "Hi"}]]
    placeholders = [GenerationExample(p, "x") for p in prompts]
    first = evaluate_generation(model, tokenizer, placeholders, max_new_tokens=4, progress=False)
    # make example 1 right: its target is what the model generates
    targets = ["never said", first.predictions[1], "nor this"]
    examples = [GenerationExample(p, t, id=f"src-{i}") for i, (p, t) in enumerate(zip(prompts, targets))]
    result = evaluate_generation(model, tokenizer, examples, max_new_tokens=4, progress=False)
    assert result.kind == "generation" and result.scores is None and result.choices is None
    assert result.example_ids == ["src-0", "src-1", "src-2"]
    assert result.correct == [False, True, False]
    assert result.score == pytest.approx(1 / 3)

    path = write_outcomes(tmp_path / "1_gen.jsonl", result)
    records = read_outcomes(path)
    assert [r["id"] for r in records] == ["src-0", "src-1", "src-2"]
    assert [r["reference"] for r in records] == targets
    assert [r["prediction"] for r in records] == result.predictions
    assert "scores" not in records[0]


def test_metric_matches_follow_normalization(tiny):
    model, tokenizer = tiny
    first = evaluate_generation(model, tokenizer, [GenerationExample("Hello", "x")], max_new_tokens=4, progress=False)
    target = first.predictions[0].upper() + "  "
    strict = evaluate_generation(
        model, tokenizer, [GenerationExample("Hello", target)], max_new_tokens=4, progress=False
    )
    loose = evaluate_generation(
        model,
        tokenizer,
        [GenerationExample("Hello", target)],
        max_new_tokens=4,
        progress=False,
        normalization={"ignore_case": True},
    )
    assert strict.correct == [first.predictions[0].upper().strip() == first.predictions[0].strip()]
    assert loose.correct == [True] and loose.score == 1.0


def test_duplicate_and_bad_ids_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(CptError, match="share the id 'a'"):
        same = [GenerationExample("Hi", "x", id="a"), GenerationExample("Yo", "y", id="a")]
        evaluate_generation(model, tokenizer, same)
    with pytest.raises(CptError, match="id must be"):
        evaluate_choice(model, tokenizer, [ChoiceExample("Hi", [" a", " b"], 0, id=1.5)])
    # a source id equal to another example's index is still a duplicate
    with pytest.raises(CptError, match="examples 0 and 1 share the id 0"):
        evaluate_generation(model, tokenizer, [GenerationExample("Hi", "x"), GenerationExample("Yo", "y", id=0)])


def choice_result(correct, kind="choice"):
    n = len(correct)
    return EvalResult(
        score=sum(correct) / n,
        num_examples=n,
        predictions=[0 if c else 1 for c in correct],
        references=[0] * n,
        scores=[[-1.0, -2.0] if c else [-2.0, float("-inf")] for c in correct],
        kind=kind,
        example_ids=list(range(n)),
        prompts=[f"prompt {i}" for i in range(n)],
        correct=list(correct),
        choices=[[" right", " wrong"]] * n,
    )


def test_wrong_answers_first_in_eval_order(tmp_path):
    eval_dir = tmp_path / "eval"
    write_outcomes(outcomes_path(eval_dir, 3, "arc"), choice_result([True, False, False, True, False, False]))
    write_outcomes(outcomes_path(eval_dir, 3, "all right"), choice_result([True, True]))
    write_outcomes(outcomes_path(eval_dir, 2, "arc"), choice_result([False] * 6))
    picked = wrong_answers(eval_dir, 3, ["arc", "all right", "never evaluated"], limit=3)
    assert list(picked) == ["arc", "all right"]
    assert [r["id"] for r in picked["arc"]] == [1, 2, 4]
    assert picked["all right"] == []
    assert [r["id"] for r in wrong_answers(eval_dir, 3, ["arc"], limit=1)["arc"]] == [1]
    # -inf scores are written as null (JSON has no infinity)
    assert picked["arc"][0]["scores"] == [-2.0, None]
    text = format_wrong_answers(picked)
    assert "**arc**" in text and "`1` 'prompt 1' → 'wrong' (expected 'right')" in text
    assert "**all right**: no wrong answers" in text


def test_paths_and_damaged_files(tmp_path):
    assert outcomes_path(tmp_path, 0, "qa").name == "0_qa.jsonl"
    assert outcomes_path(tmp_path, "expert", "a/b c").name == "expert_a_b_c.jsonl"
    for bad in (-1, "base", True, 1.0):
        with pytest.raises(CptError, match="outcome row"):
            outcomes_path(tmp_path, bad, "qa")
    with pytest.raises(CptError, match="no such outcomes file"):
        read_outcomes(tmp_path / "missing.jsonl")
    damaged = tmp_path / "1_qa.jsonl"
    good = {"id": 0, "kind": "choice", "prompt": "p", "prediction": 0, "reference": 0, "correct": True}
    damaged.write_text(json.dumps(good) + '\n{"id": 1, "kin')
    with pytest.raises(CptError, match=r"1_qa.jsonl:2: not a JSON line"):
        read_outcomes(damaged)
    damaged.write_text(json.dumps({"id": 0}) + "\n")
    with pytest.raises(CptError, match=r":1: an outcome needs"):
        read_outcomes(damaged)
    with pytest.raises(CptError, match="no per-example outcomes"):
        outcome_records(EvalResult(score=1.0, num_examples=1, predictions=["a"], references=["a"]))
