"""Multiple-choice tasks: pick the choice the model finds most likely after the prompt.

Each choice is an exact continuation text. Its score is the sum of the log-probabilities
of its tokens given the prompt (the mean per token with ``length_normalize``), where the
pair is tokenised as prompt+continuation (as TRL's SFTTrainer tokenises prompt +
completion, see :mod:`cpt.evaluation.generation`) and the continuation tokens are those
after the prompt's tokens: after the longest common prefix of the tokenised prompt and
the tokenised prompt+continuation, which is the prompt's own tokens unless a token merges
across the boundary (the same rule TRL uses for the completion mask).

Two paths compute these scores (``method`` of :func:`choice_log_likelihoods`): the plain
one runs prompt+choice through the model once per choice with logits at every position;
the shared-prefix one (the default where the model supports it) runs each prompt once,
continues every choice from the prompt's cached keys/values and projects onto the
vocabulary only the positions that are scored. They feed the model the same tokens at
the same positions, so their scores agree to float rounding; the second costs about one
prompt pass per example instead of one per choice (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

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
    example_ids,
    tokenize_prompt,
)


@dataclass
class ChoiceExample:
    """One multiple-choice example: ``choices`` are continuation texts scored after ``prompt``.

    ``label`` is the index of the correct choice. ``prompt`` is a string (used as is) or a
    list of chat messages (rendered with the chat template and a generation prompt); each
    choice is appended to the rendered prompt text verbatim (include a leading space if
    the answer follows a word, e.g. ``" Paris"``). ``id`` names the example in its eval
    set (the source's id where it has one); ``None`` means its index in the eval set.
    """

    prompt: str | list[dict]
    choices: list[str]
    label: int
    id: str | int | None = None


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


#: ``method`` values of :func:`choice_log_likelihoods`.
CHOICE_METHODS = ("auto", "shared_prefix", "full")


@dataclass
class _Pair:
    """One (example, choice): its token ids and the index of its first scored token."""

    example: int
    choice: int
    ids: list[int]
    start: int


def _encode_pairs(tokenizer, examples: Sequence[ChoiceExample]) -> list[_Pair]:
    """Tokenise and validate every (example, choice) pair (see the module docstring for the rule)."""
    pairs: list[_Pair] = []
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
            pairs.append(_Pair(e, c, ids, start))
    return pairs


def _score(step_logits, targets: list[int], length_normalize: bool) -> float:
    """Summed (or mean) float32 log-probability of ``targets``; row ``i`` of ``step_logits`` predicts ``targets[i]``."""
    import torch

    target = torch.tensor(targets, dtype=torch.long, device=step_logits.device)
    token_lp = torch.log_softmax(step_logits.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1)
    total = float(token_lp.sum().item())
    return total / len(targets) if length_normalize else total


def _full_sequence_scores(model, pairs: list[_Pair], scores, *, pad_id, batch_size, length_normalize, progress, desc):
    """The plain path: one forward pass over prompt+choice per pair, logits at every position."""
    import torch

    device = _model_device(model)
    order = sorted(range(len(pairs)), key=lambda k: (-len(pairs[k].ids), k))
    batches = _batches(order, batch_size)
    for batch in _progress(batches, total=len(batches), progress=progress, desc=desc):
        width = max(len(pairs[k].ids) for k in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, k in enumerate(batch):  # right padding
            ids = pairs[k].ids
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for row, k in enumerate(batch):
            pair = pairs[k]
            # logits at position p predict token p+1: choice tokens ids[start:] ← logits[start-1 : len-1]
            step_logits = logits[row, pair.start - 1 : len(pair.ids) - 1]
            scores[pair.example][pair.choice] = _score(step_logits, pair.ids[pair.start :], length_normalize)


@dataclass
class _PrefixModel:
    """How to run a model with a key/value cache and logits at chosen positions only."""

    model: object  # the module to call (a PEFT LoRA wrapper is unwrapped to its base model)
    cache_arg: str  # the forward keyword of the cache: ``cache`` (transformers ≥ 5) or ``past_key_values``


def _prefix_model(model) -> _PrefixModel | None:
    """The model to call for the shared-prefix path, or ``None`` when it cannot be used.

    Needs a decoder-only model whose ``forward`` takes ``position_ids``, ``logits_to_keep``
    (transformers' own "project only these positions" argument, which also applies the
    model's tied or untied ``lm_head`` and any logit scaling or soft-capping) and a cache.
    A PEFT model with weight adapters (LoRA & co.) is unwrapped to its base model: the
    adapter layers sit inside it, so calling it computes the adapted model. PEFT prompt
    learning (prefix/prompt tuning) changes the inputs in the wrapper's ``forward``, so it
    takes the plain path.
    """
    import inspect

    inner = model
    peft_config = getattr(model, "peft_config", None)
    if peft_config is not None and hasattr(model, "get_base_model"):
        active = getattr(model, "active_peft_config", None)
        if active is None or getattr(active, "is_prompt_learning", True):
            return None
        inner = model.get_base_model()
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return None
    if "logits_to_keep" not in params or "position_ids" not in params:
        return None
    cache_arg = next((name for name in ("cache", "past_key_values") if name in params), None)
    if cache_arg is None:
        return None
    return _PrefixModel(model=inner, cache_arg=cache_arg)


class _NoPrefixSharing(Exception):
    """The model's forward pass did not give what the shared-prefix path needs."""


def _shared_prefix_scores(
    runner: _PrefixModel, pairs: list[_Pair], scores, *, pad_id, batch_size, length_normalize, progress, desc
):
    """Score each example's choices from one pass over its prompt.

    For example ``e`` the shared prefix is its first ``L = min_c start_c`` tokens — the
    prompt's tokens up to the earliest place a choice merges into it, so every choice's
    token ids start with it. The prefixes of a batch of examples run once, left-padded,
    keeping the cache and the logits of the last position only (``logits_to_keep=1``);
    then each choice's remaining tokens run on that cache (copied per choice with
    ``batch_select_indices``), right-padded, with explicit positions ``L, L+1, ...``.
    A choice's last token is never fed (its logits would predict past the choice), so
    every projected position but the padding is a scored one. A choice whose tokens
    after the prefix are a single token is scored from the prefix logits alone and gets
    no row in the second pass. Scores equal the plain path's up to float rounding.
    """
    import torch

    model = runner.model
    device = _model_device(model)
    by_example: dict[int, list[_Pair]] = {}
    for pair in pairs:
        by_example.setdefault(pair.example, []).append(pair)
    prefix_len = {e: min(p.start for p in group) for e, group in by_example.items()}
    # Examples longest prefix first; a batch holds at most batch_size prompts and batch_size choice rows
    # (more only when one example alone has more choices to continue).
    order = sorted(by_example, key=lambda e: (-prefix_len[e], e))
    batches: list[list[int]] = []
    current: list[int] = []
    rows = 0
    for e in order:
        need = sum(1 for p in by_example[e] if len(p.ids) - 1 > prefix_len[e])
        if current and (len(current) == batch_size or rows + need > batch_size):
            batches.append(current)
            current, rows = [], 0
        current.append(e)
        rows += need
    if current:
        batches.append(current)

    for batch in _progress(batches, total=len(batches), progress=progress, desc=desc):
        prefixes = [by_example[e][0].ids[: prefix_len[e]] for e in batch]
        width = max(len(ids) for ids in prefixes)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(prefixes):  # left padding: the last column is every prompt's last token
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        suffix_rows = [
            (row, pair) for row, e in enumerate(batch) for pair in by_example[e] if len(pair.ids) - 1 > prefix_len[e]
        ]
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=bool(suffix_rows),
            logits_to_keep=1,
        )
        if out.logits.shape[:2] != (len(batch), 1):
            raise _NoPrefixSharing(f"logits_to_keep=1 gave logits of shape {tuple(out.logits.shape)}")
        prefix_logits = out.logits[:, -1]  # (batch, vocab): predicts each example's token at position L

        suffix_logits = {}
        if suffix_rows:
            cache = getattr(out, runner.cache_arg, None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_select_indices"):
                raise _NoPrefixSharing(f"the model returned no selectable cache ({type(cache).__name__})")
            del out
            # One cache row per choice that has tokens to feed (the choice's own copy of its prompt's keys/values).
            cache.batch_select_indices(torch.tensor([row for row, _ in suffix_rows], dtype=torch.long, device=device))
            feeds = [pair.ids[prefix_len[pair.example] : len(pair.ids) - 1] for _, pair in suffix_rows]
            suffix_width = max(len(ids) for ids in feeds)
            suffix_ids = torch.full((len(feeds), suffix_width), pad_id, dtype=torch.long)
            suffix_mask = torch.zeros((len(feeds), suffix_width), dtype=torch.long)
            suffix_positions = torch.zeros((len(feeds), suffix_width), dtype=torch.long)
            for i, ((_, pair), ids) in enumerate(zip(suffix_rows, feeds)):  # right padding
                suffix_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                suffix_mask[i, : len(ids)] = 1
                suffix_positions[i] = prefix_len[pair.example] + torch.arange(suffix_width)
            rows_index = torch.tensor([row for row, _ in suffix_rows], dtype=torch.long)
            full_mask = torch.cat([attention_mask[rows_index], suffix_mask], dim=1)
            out = model(
                input_ids=suffix_ids.to(device),
                attention_mask=full_mask.to(device),
                position_ids=suffix_positions.to(device),
                use_cache=True,
                logits_to_keep=0,
                **{runner.cache_arg: cache},
            )
            if out.logits.shape[:2] != (len(feeds), suffix_width):
                raise _NoPrefixSharing(f"the cached pass gave logits of shape {tuple(out.logits.shape)}")
            for i, (_, pair) in enumerate(suffix_rows):
                suffix_logits[(pair.example, pair.choice)] = out.logits[i]
            del out, cache

        for row, e in enumerate(batch):
            length = prefix_len[e]
            for pair in by_example[e]:
                # Step logits of the choice: index 0 = prefix position L-1, index j = suffix position j-1
                # (absolute L+j-1); its tokens ids[start:] are predicted from absolute positions start-1 ... len-2.
                first, last = pair.start - length, len(pair.ids) - 1 - length
                steps = prefix_logits[row : row + 1]
                if last > 0:
                    steps = torch.cat([steps, suffix_logits[(pair.example, pair.choice)][:last]], dim=0)
                targets = pair.ids[pair.start :]
                scores[pair.example][pair.choice] = _score(steps[first : last + 1], targets, length_normalize)


def choice_log_likelihoods(
    model,
    tokenizer,
    examples: Sequence[ChoiceExample],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
    desc: str | None = None,
    method: str = "auto",
) -> list[list[float]]:
    """Per example, the score of each choice: summed (or per-token mean) log-likelihood.

    Args:
        method: ``"shared_prefix"`` runs each prompt once and scores its choices from the
            cached prompt, projecting onto the vocabulary only the positions that are
            scored (see :func:`_shared_prefix_scores`); ``"full"`` runs one forward pass
            over prompt+choice per pair, right-padded, with logits at every position (the
            reference implementation); ``"auto"`` (default) takes ``"shared_prefix"``
            where the model supports it (a decoder-only transformers model whose forward
            takes ``logits_to_keep``, ``position_ids`` and a cache; PEFT weight adapters
            included) and ``"full"`` otherwise (e.g. PEFT prompt learning, custom modules).
            Both score the same tokens; log-softmax is taken in float32; the scores agree
            to float rounding.
        batch_size: rows per forward pass (``"full"``: pairs; ``"shared_prefix"``: at most
            ``batch_size`` prompts and ``batch_size`` choice continuations, unless one example
            alone has more choices).
    """
    _check_batch_size(batch_size)
    if method not in CHOICE_METHODS:
        raise CptError(f"choice scoring method {method!r} is unknown; use one of {', '.join(CHOICE_METHODS)}")
    pairs = _encode_pairs(tokenizer, examples)
    scores: list[list[float]] = [[0.0] * len(ex.choices) for ex in examples]
    pad_id = _pad_id(model, tokenizer, _eos_ids(model, tokenizer))
    options = {
        "pad_id": pad_id,
        "batch_size": batch_size,
        "length_normalize": length_normalize,
        "progress": progress,
        "desc": desc or "choice",
    }
    runner = _prefix_model(model) if method != "full" else None
    if method == "shared_prefix" and runner is None:
        raise CptError(
            f"method='shared_prefix' needs a decoder-only model whose forward takes logits_to_keep, position_ids and a "
            f"cache; {type(model).__name__} does not; use method='auto' or 'full'"
        )
    with eval_mode(model):
        if runner is not None:
            try:
                _shared_prefix_scores(runner, pairs, scores, **options)
                return scores
            except _NoPrefixSharing as exc:
                if method == "shared_prefix":
                    raise CptError(
                        f"method='shared_prefix' cannot score with {type(model).__name__}: {exc}; use method='full'"
                    ) from None
        _full_sequence_scores(model, pairs, scores, **options)
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
    method: str = "auto",
) -> EvalResult:
    """Predict each example's choice by maximum log-likelihood; score with ``choice_accuracy``.

    Ties go to the lowest index. ``EvalResult.scores`` holds the per-choice scores and
    ``correct`` whether each prediction is the label; ``method`` is
    :func:`choice_log_likelihoods`'s.
    """
    from cpt.evaluation.metrics import load_metric

    examples = list(examples)
    if not examples:
        raise CptError("evaluate_choice got no examples; the task's eval set is empty")
    ids = example_ids(examples)
    scores = choice_log_likelihoods(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        length_normalize=length_normalize,
        progress=progress,
        desc=desc,
        method=method,
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
        kind="choice",
        example_ids=ids,
        prompts=[ex.prompt for ex in examples],
        correct=[prediction == reference for prediction, reference in zip(predictions, references)],
        choices=[list(ex.choices) for ex in examples],
    )


__all__ = ["CHOICE_METHODS", "ChoiceExample", "choice_log_likelihoods", "encode_choice", "evaluate_choice"]
