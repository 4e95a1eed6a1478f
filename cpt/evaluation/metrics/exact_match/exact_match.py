"""Exact match, with the normalisations generative task evaluation needs.

An ``evaluate`` metric module shipped with cpt and loaded by path
(``cpt.evaluation.metrics.load_metric("exact_match")``), so it works offline.
Options follow the Hugging Face ``exact_match`` metric (``regexes_to_ignore``,
``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``) plus ``strip``,
``collapse_whitespace`` and ``first_line``.
"""

import re
import string

import datasets
import evaluate

_DESCRIPTION = """
Fraction of predictions that equal their reference string after normalisation.
Normalisation, applied in this order (``first_line`` to the prediction only, the rest to
both the prediction and the reference):
  1. first_line: keep the prediction up to its first newline (after removing leading
     whitespace when ``strip`` is on);
  2. regexes_to_ignore: remove every match of each regex;
  3. ignore_case: lower-case;
  4. ignore_punctuation: remove ``string.punctuation`` characters;
  5. ignore_numbers: remove the digits 0-9;
  6. collapse_whitespace: replace each run of whitespace by one space;
  7. strip: remove leading and trailing whitespace.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the generated texts.
    references (list of str): the target texts, one per prediction.
    regexes_to_ignore (list of str or None): regexes whose matches are removed. Default None.
    ignore_case (bool): lower-case before comparing. Default False.
    ignore_punctuation (bool): remove punctuation before comparing. Default False.
    ignore_numbers (bool): remove digits before comparing. Default False.
    strip (bool): strip leading/trailing whitespace. Default True.
    collapse_whitespace (bool): collapse whitespace runs into one space. Default True.
    first_line (bool): compare only the prediction's first line. Default False.
    return_matches (bool): also return the per-example matches. Default False.
Returns:
    exact_match (float): mean of per-example matches, in [0, 1].
    matches (list of bool): whether each prediction matched (only with ``return_matches``).
Examples:
    >>> m = evaluate.load("path/to/exact_match")
    >>> m.compute(predictions=[" Paris\\nmore", "4"], references=["paris", "5"], ignore_case=True, first_line=True)
    {'exact_match': 0.5}
"""

_CITATION = ""


def _normalize(text, *, regexes_to_ignore, ignore_case, ignore_punctuation, ignore_numbers, strip, collapse_whitespace):
    for pattern in regexes_to_ignore or ():
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    if collapse_whitespace:
        text = re.sub(r"\s+", " ", text)
    if strip:
        text = text.strip()
    return text


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            reference_urls=[],
        )

    def _compute(
        self,
        predictions,
        references,
        regexes_to_ignore=None,
        ignore_case=False,
        ignore_punctuation=False,
        ignore_numbers=False,
        strip=True,
        collapse_whitespace=True,
        first_line=False,
        return_matches=False,
    ):
        if isinstance(regexes_to_ignore, str):
            regexes_to_ignore = [regexes_to_ignore]
        options = dict(
            regexes_to_ignore=regexes_to_ignore,
            ignore_case=ignore_case,
            ignore_punctuation=ignore_punctuation,
            ignore_numbers=ignore_numbers,
            strip=strip,
            collapse_whitespace=collapse_whitespace,
        )
        matches = []
        for prediction, reference in zip(predictions, references):
            if first_line:
                if strip:
                    prediction = prediction.lstrip()
                prediction = prediction.split("\n", 1)[0]
            matches.append(_normalize(prediction, **options) == _normalize(reference, **options))
        result = {"exact_match": float(sum(matches) / len(matches)) if matches else 0.0}
        if return_matches:
            result["matches"] = [bool(match) for match in matches]
        return result
