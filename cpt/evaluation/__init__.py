"""Task evaluation: generation exact match, choice log-likelihood, continual metrics (METHOD §5).

Importing this package is cheap (torch, transformers and evaluate load on first use).

- :func:`evaluate_generation` — greedy decoding of :class:`GenerationExample` prompts,
  scored with the shipped ``exact_match`` metric.
- :func:`evaluate_choice` — log-likelihood of each :class:`ChoiceExample` choice,
  scored with the shipped ``choice_accuracy`` metric.
- :func:`continual_metrics`, :func:`format_matrix_table` — ACC/BWT/FWT/forgetting of an
  accuracy matrix and a text table of it; :func:`needed_entries` — the entries they read.
- :func:`load_metric` — the metric modules cpt ships, loaded by path with ``evaluate``.
- :func:`write_outcomes`, :func:`read_outcomes`, :func:`wrong_answers` — per-example
  outcomes of an evaluation as JSON lines (``eval/<row>_<task>.jsonl``, METHOD §6).

Prompts are tokenised as TRL's ``SFTTrainer`` tokenises the prompt of prompt/completion
data (:func:`tokenize_prompt`), so evaluation sees the prompt tokens training saw.
"""

from cpt.evaluation.choice import (
    ChoiceExample,
    choice_log_likelihoods,
    encode_choice,
    evaluate_choice,
)
from cpt.evaluation.continual import (
    continual_metrics,
    format_general_ability,
    format_matrix_table,
    general_ability_kept,
    needed_entries,
)
from cpt.evaluation.generation import (
    EvalResult,
    GenerationExample,
    evaluate_generation,
    example_ids,
    generate_greedy,
    render_prompt,
    tokenize_prompt,
)
from cpt.evaluation.metrics import available_metrics, load_metric
from cpt.evaluation.outcomes import (
    format_wrong_answers,
    outcome_records,
    outcomes_path,
    read_outcomes,
    write_outcomes,
    wrong_answers,
)

__all__ = [
    "ChoiceExample",
    "EvalResult",
    "GenerationExample",
    "available_metrics",
    "choice_log_likelihoods",
    "continual_metrics",
    "encode_choice",
    "evaluate_choice",
    "evaluate_generation",
    "example_ids",
    "format_general_ability",
    "format_matrix_table",
    "format_wrong_answers",
    "general_ability_kept",
    "generate_greedy",
    "load_metric",
    "needed_entries",
    "outcome_records",
    "outcomes_path",
    "read_outcomes",
    "render_prompt",
    "tokenize_prompt",
    "write_outcomes",
    "wrong_answers",
]
