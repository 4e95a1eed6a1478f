"""The shipped evaluate metric modules (loaded by path, offline) on hand cases."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from cpt.errors import CptError
from cpt.evaluation import available_metrics, load_metric
from cpt.evaluation.metrics import METRICS_DIR


@pytest.fixture(scope="module")
def em():
    return load_metric("exact_match")


def score(em, preds, refs, **options):
    return em.compute(predictions=preds, references=refs, **options)["exact_match"]


def test_loaded_by_path_and_cached(em):
    assert load_metric("exact_match") is em
    assert set(available_metrics()) >= {"exact_match", "choice_accuracy"}
    assert (METRICS_DIR / "exact_match" / "exact_match.py").is_file()


def test_unknown_metric_lists_known():
    with pytest.raises(CptError) as err:
        load_metric("bleu")
    message = str(err.value)
    assert "'bleu'" in message and "exact_match" in message and "choice_accuracy" in message
    assert "\n" not in message


def test_exact_match_defaults(em):
    preds = ["  Paris ", "Paris\n", "paris", "New   York", "New\nYork"]
    refs = ["Paris", "Paris", "Paris", "New York", "New York"]
    # strip, strip, case differs, whitespace collapsed, newline collapsed -> 4 / 5
    assert score(em, preds, refs) == pytest.approx(0.8)


def test_exact_match_strip_and_collapse_off(em):
    assert score(em, [" Paris "], ["Paris"], strip=False) == 0.0
    assert score(em, ["New  York"], ["New York"], collapse_whitespace=False) == 0.0
    assert score(em, ["New  York"], ["New York"]) == 1.0


def test_exact_match_case_punctuation_numbers(em):
    assert score(em, ["PARIS"], ["paris"]) == 0.0
    assert score(em, ["PARIS"], ["paris"], ignore_case=True) == 1.0
    assert score(em, ["It's Paris!"], ["Its Paris"]) == 0.0
    assert score(em, ["It's Paris!"], ["Its Paris"], ignore_punctuation=True) == 1.0
    assert score(em, ["abc123"], ["abc"]) == 0.0
    assert score(em, ["abc123"], ["abc"], ignore_numbers=True) == 1.0


def test_exact_match_regexes(em):
    assert score(em, ["The answer is 42"], ["42"]) == 0.0
    assert score(em, ["The answer is 42"], ["42"], regexes_to_ignore=["^The answer is "]) == 1.0
    # applied to references too
    assert score(em, ["42"], ["Answer: 42"], regexes_to_ignore=["Answer:"]) == 1.0


def test_exact_match_first_line(em):
    assert score(em, ["42\nbecause six times seven"], ["42"]) == 0.0
    assert score(em, ["42\nbecause six times seven"], ["42"], first_line=True) == 1.0
    # leading whitespace is stripped first (strip=True) ...
    assert score(em, ["\n 42\nmore"], ["42"], first_line=True) == 1.0
    # ... but not with strip=False: the first line is then empty
    assert score(em, ["\n42\nmore"], ["42"], first_line=True, strip=False) == 0.0
    # only the prediction is cut
    assert score(em, ["a"], ["a\nb"], first_line=True) == 0.0


def test_exact_match_mean(em):
    assert score(em, ["a", "b", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)


def test_choice_accuracy():
    acc = load_metric("choice_accuracy")
    assert acc.compute(predictions=[0, 2, 1], references=[0, 1, 1])["accuracy"] == pytest.approx(2 / 3)
    assert acc.compute(predictions=[3], references=[3])["accuracy"] == 1.0
