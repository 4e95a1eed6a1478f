"""Multiple-choice tasks: pick the choice the model finds most likely after the prompt.

Each choice is an exact continuation text. Its score is the sum of the log-probabilities
of its tokens given the prompt (the mean per token with ``length_normalize``), where the
pair is tokenised as prompt+continuation (as TRL's SFTTrainer tokenises prompt +
completion, see :mod:`cpt.evaluation.generation`) and the continuation tokens are those
after the prompt's tokens: after the longest common prefix of the tokenised prompt and
the tokenised prompt+continuation, which is the prompt's own tokens unless a token merges
across the boundary (the same rule TRL uses for the completion mask).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

from cpt.errors import CptError
from cpt.evaluation.generation import (
    EvalResult,
    _batches,
    _check_batch_size,
    _eos_ids,
    _model_device,
    _pad_id,
    _progress,
    eval_mode,
    tokenize_prompt,
)


@dataclass
class ChoiceExample:
    """One multiple-choice example: ``choices`` are continuation texts scored after ``prompt``.

    ``label`` is the index of the correct choice. ``prompt`` is a string (used as is) or a
    list of chat messages (rendered with the chat template and a generation prompt); each
    choice is appended to the rendered prompt text verbatim (include a leading space if
    the answer follows a word, e.g. ``" Paris"``).
    """

    prompt: str | list[dict]
    choices: list[str]
    label: int


def _is_index(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_choice(tokenizer, prompt: str | list[dict], choice: str) -> tuple[list[int], int]:
    """``(ids, start)``: token ids of prompt+choice, and the index of the first choice token."""
    prompt_ids = tokenize_prompt(tokenizer, prompt)
    ids = tokenize_prompt(tokenizer, prompt, choice)
    return ids, _common_prefix_length(prompt_ids, ids)


def choice_log_likelihoods(
    model,
    tokenizer,
    examples: Sequence[ChoiceExample],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> list[list[float]]:
    """Per example, the score of each choice: summed (or per-token mean) log-likelihood.

    All (example, choice) pairs are batched together (sorted by length, longest first),
    right-padded with attention masks; log-softmax is taken in float32.
    """
    import torch

    _check_batch_size(batch_size)
    pairs: list[tuple[int, int, list[int], int]] = []  # (example, choice, ids, start)
    for e, ex in enumerate(examples):
        if not ex.choices:
            raise CptError(f"choice example {e} has no choices")
        if not _is_index(ex.label) or not 0 <= int(ex.label) < len(ex.choices):
            raise CptError(f"choice example {e}: label {ex.label!r} is not an index into its {len(ex.choices)} choices")
        prompt_ids = tokenize_prompt(tokenizer, ex.prompt)
        for c, choice in enumerate(ex.choices):
            if not isinstance(choice, str):
                raise CptError(f"choice example {e}: choice {c} must be a string, got {type(choice).__name__}")
            ids = tokenize_prompt(tokenizer, ex.prompt, choice)
            start = _common_prefix_length(prompt_ids, ids)
            if start == len(ids):
                raise CptError(f"choice example {e}: choice {c} ({choice!r}) adds no tokens to the prompt")
            if start == 0:
                raise CptError(
                    f"choice example {e}: the prompt is empty (and the tokenizer adds no BOS), "
                    "so the first token of a choice has no context to be scored in; give a prompt"
                )
            pairs.append((e, c, ids, start))

    scores: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    pad_id = _pad_id(model, tokenizer, _eos_ids(model, tokenizer))
    device = _model_device(model)
    order = sorted(range(len(pairs)), key=lambda k: (-len(pairs[k][2]), k))
    batches = _batches(order, batch_size)
    with eval_mode(model):
        for batch in _progress(batches, total=len(batches), progress=progress, desc=desc or "choice"):
            width = max(len(pairs[k][2]) for k in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, k in enumerate(batch):  # right padding
                ids = pairs[k][2]
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            for row, k in enumerate(batch):
                e, c, ids, start = pairs[k]
                # logits at position p predict token p+1: choice tokens ids[start:] ← logits[start-1 : len-1]
                step_logits = logits[row, start - 1 : len(ids) - 1].float()
                targets = torch.tensor(ids[start:], dtype=torch.long, device=step_logits.device)
                token_lp = torch.log_softmax(step_logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
                total = float(token_lp.sum().item())
                scores[e][c] = total / len(targets) if length_normalize else total
    return scores


def evaluate_choice(
    model,
    tokenizer,
    examples: Sequence[ChoiceExample],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
    desc: str | None = None,
) -> EvalResult:
    """Predict each example's choice by maximum log-likelihood; score with ``choice_accuracy``.

    Ties go to the lowest index. ``EvalResult.scores`` holds the per-choice scores.
    """
    from cpt.evaluation.metrics import load_metric

    examples = list(examples)
    if not examples:
        raise CptError("evaluate_choice got no examples; the task's eval set is empty")
    scores = choice_log_likelihoods(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        length_normalize=length_normalize,
        progress=progress,
        desc=desc,
    )
    predictions = [max(range(len(s)), key=lambda c, s=s: (s[c], -c)) for s in scores]
    references = [int(ex.label) for ex in examples]
    result = load_metric("choice_accuracy").compute(predictions=predictions, references=references)
    return EvalResult(
        score=float(result["accuracy"]),
        num_examples=len(examples),
        predictions=predictions,
        references=references,
        scores=scores,
    )


__all__ = ["ChoiceExample", "choice_log_likelihoods", "encode_choice", "evaluate_choice"]
