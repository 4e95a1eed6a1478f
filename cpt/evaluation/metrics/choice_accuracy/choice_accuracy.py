"""Accuracy of multiple-choice predictions (indices of the chosen answer).

An ``evaluate`` metric module shipped with cpt and loaded by path
(``cpt.evaluation.metrics.load_metric("choice_accuracy")``), so it works offline.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of examples whose predicted choice index equals the reference index."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): the index of the choice the model picked.
    references (list of int): the index of the correct choice.
Returns:
    accuracy (float): mean of per-example matches, in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/choice_accuracy")
    >>> m.compute(predictions=[0, 2, 1], references=[0, 1, 1])
    {'accuracy': 0.6666666666666666}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ChoiceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=[],
        )

    def _compute(self, predictions, references):
        matches = [int(p) == int(r) for p, r in zip(predictions, references)]
        return {"accuracy": float(sum(matches) / len(matches)) if matches else 0.0}
