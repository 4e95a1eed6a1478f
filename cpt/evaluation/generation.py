"""Generation tasks: greedy decoding scored by exact match.

Prompts are tokenised exactly as TRL's ``SFTTrainer`` (trl 1.16,
``SFTTrainer._prepare_dataset`` → ``trl.data_utils._tokenize``) tokenises the prompt of
prompt/completion data, so a model is evaluated on the same prompt tokens it was trained
after:

- a **string** prompt is tokenised with ``tokenizer(prompt)``: the tokenizer's default
  ``add_special_tokens=True``, so a tokenizer that prepends BOS (Llama) gets its BOS, one
  that adds nothing (Qwen, GPT-2) gets nothing;
- a **conversational** prompt (a list of ``{"role", "content"}`` messages) is rendered with
  ``apply_chat_template(messages, add_generation_prompt=True)`` and the rendered text is
  tokenised with ``add_special_tokens=False`` (the template writes its own special
  tokens; this is what ``apply_chat_template(..., tokenize=True)`` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cpt.errors import CptError

#: Options of the shipped ``exact_match`` metric, accepted as ``normalization`` keys.
EXACT_MATCH_OPTIONS = (
    "regexes_to_ignore",
    "ignore_case",
    "ignore_punctuation",
    "ignore_numbers",
    "strip",
    "collapse_whitespace",
    "first_line",
)


@dataclass
class GenerationExample:
    """One generation example: the model continues ``prompt``; the answer is compared to ``target``.

    ``prompt`` is a plain string (used as is) or a list of chat messages (rendered with the
    tokenizer's chat template and a generation prompt). ``id`` names the example in its
    eval set (the source's id where it has one); ``None`` means its index in the eval set.
    """

    prompt: str | list[dict]
    target: str
    id: str | int | None = None


@dataclass
class EvalResult:
    """The outcome of evaluating one task's eval set, overall and per example (METHOD §6).

    All per-example lists are in the input order of the examples.

    Attributes:
        score: the task's metric (exact match or choice accuracy), in [0, 1].
        num_examples: how many examples were evaluated.
        predictions: generated texts (generation) or chosen choice indices (choice).
        references: target texts (generation) or correct choice indices (choice).
        scores: per example, the log-likelihood score of each choice (choice tasks);
            ``None`` for generation.
        kind: ``"generation"`` or ``"choice"``.
        example_ids: per example, its ``id`` or, when it has none, its index in the eval set.
        prompts: per example, the prompt as given (a string or a list of chat messages).
        correct: per example, whether the prediction was right (its metric term: the
            mean of ``correct`` is ``score``).
        choices: per example, the choice texts (choice tasks); ``None`` for generation.

    :mod:`cpt.evaluation.outcomes` writes the per-example part as JSON lines.
    """

    score: float
    num_examples: int
    predictions: list
    references: list
    scores: list | None = None
    kind: str | None = None
    example_ids: list | None = None
    prompts: list | None = None
    correct: list[bool] | None = None
    choices: list[list[str]] | None = None

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "num_examples": self.num_examples,
            "predictions": list(self.predictions),
            "references": list(self.references),
            "scores": self.scores,
            "kind": self.kind,
            "example_ids": self.example_ids,
            "prompts": self.prompts,
            "correct": self.correct,
            "choices": self.choices,
        }


def example_ids(examples: Sequence) -> list:
    """Each example's ``id``, or its index in the eval set where it has none; :class:`CptError` on duplicates."""
    ids = [index if getattr(ex, "id", None) is None else ex.id for index, ex in enumerate(examples)]
    seen: dict = {}
    for index, value in enumerate(ids):
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise CptError(f"eval example {index}: id must be a string or an integer, got {type(value).__name__}")
        if value in seen:
            raise CptError(
                f"eval examples {seen[value]} and {index} share the id {value!r}; "
                "ids must be unique in a task's eval set"
            )
        seen[value] = index
    return ids


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt)


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The prompt as text: a string as is; a list of chat messages through the chat template.

    Messages are rendered with ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)``, as TRL renders the prompt of conversational
    prompt/completion data.
    """
    if isinstance(prompt, str):
        return prompt
    if _is_conversation(prompt):
        if not prompt:
            raise CptError("a conversational prompt has no messages; give at least one {'role', 'content'} message")
        if getattr(tokenizer, "chat_template", None) is None:
            raise CptError(
                "a conversational prompt (list of messages) needs a tokenizer with a chat template; "
                "set tokenizer.chat_template or give the prompt as a string"
            )
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    raise CptError(
        f"a prompt must be a string or a list of chat messages ({{'role', 'content'}} dicts), got {type(prompt).__name__}"
    )


def tokenize_prompt(tokenizer, prompt: str | list[dict], continuation: str = "") -> list[int]:
    """Token ids of ``render_prompt(prompt) + continuation``, tokenised the way TRL's SFTTrainer does.

    String prompts: ``tokenizer(text)`` (default special tokens, e.g. a Llama BOS).
    Conversational prompts: the rendered text with ``add_special_tokens=False``.
    """
    text = render_prompt(tokenizer, prompt) + continuation
    if isinstance(prompt, str):
        ids = tokenizer(text)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def _eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the tokenizer's eos plus the model's generation-config eos ids."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        for i in [gen_eos] if isinstance(gen_eos, int) else gen_eos:
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def _pad_id(model, tokenizer, eos_ids: Sequence[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    gen_pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if gen_pad is not None:
        return int(gen_pad)
    if eos_ids:
        return int(eos_ids[0])
    return 0


def _model_device(model):
    device = getattr(model, "device", None)
    if device is not None:
        return device
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model):
    """Model in eval mode under ``torch.inference_mode()``; the previous training mode is restored."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def _batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _progress(iterable: Iterable, *, total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not progress, leave=False)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CptError(f"batch_size must be a positive integer, got {batch_size!r}")


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    progress: bool = True,
    desc: str | None = None,
) -> list[str]:
    """Greedy completions of ``prompts`` (new text only, special tokens skipped), in input order.

    Batched with left padding over prompts sorted by token length (longest first, so an
    out-of-memory shows up on the first batch); stops at the tokenizer's eos and the
    model's generation-config eos ids.
    """
    import torch

    _check_batch_size(batch_size)
    if max_new_tokens < 1:
        raise CptError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
    encoded = [tokenize_prompt(tokenizer, p) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise CptError(f"prompt {i} tokenises to no tokens (an empty prompt and no BOS); give a non-empty prompt")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = _pad_id(model, tokenizer, eos_ids)
    device = _model_device(model)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    batches = _batches(order, batch_size)
    outputs: list[str | None] = [None] * len(encoded)
    gen_kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids or None,
        pad_token_id=pad_id,
        # Pure greedy: neutralise logits processors a model's generation config may set.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
    )
    with eval_mode(model):
        for batch in _progress(batches, total=len(batches), progress=progress, desc=desc or "generation"):
            width = max(len(encoded[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):  # left padding
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            sequences = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **gen_kwargs
            )
            new_tokens = sequences[:, width:].tolist()
            for row, i in enumerate(batch):
                tokens = new_tokens[row]
                for pos, tok in enumerate(tokens):  # cut at the first eos (generate pads after it)
                    if tok in eos_ids:
                        tokens = tokens[:pos]
                        break
                outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return outputs  # type: ignore[return-value]


def evaluate_generation(
    model,
    tokenizer,
    examples: Sequence[GenerationExample],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    normalization: dict | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> EvalResult:
    """Greedy-decode each example's prompt and score it against its target with ``exact_match``.

    ``normalization`` is passed to the shipped ``exact_match`` metric as its options
    (``ignore_case``, ``ignore_punctuation``, ``ignore_numbers``, ``regexes_to_ignore``,
    ``strip`` (default True), ``collapse_whitespace`` (default True), ``first_line``).
    """
    from cpt.evaluation.metrics import load_metric

    examples = list(examples)
    if not examples:
        raise CptError("evaluate_generation got no examples; the task's eval set is empty")
    options = dict(normalization or {})
    unknown = sorted(set(options) - set(EXACT_MATCH_OPTIONS))
    if unknown:
        raise CptError(
            f"unknown exact_match normalization option(s) {', '.join(unknown)}; known: {', '.join(EXACT_MATCH_OPTIONS)}"
        )
    for i, ex in enumerate(examples):
        if not isinstance(ex.target, str):
            raise CptError(f"generation example {i}: target must be a string, got {type(ex.target).__name__}")
    ids = example_ids(examples)
    predictions = generate_greedy(
        model,
        tokenizer,
        [ex.prompt for ex in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        progress=progress,
        desc=desc,
    )
    references = [ex.target for ex in examples]
    result = load_metric("exact_match").compute(
        predictions=predictions, references=references, return_matches=True, **options
    )
    return EvalResult(
        score=float(result["exact_match"]),
        num_examples=len(examples),
        predictions=predictions,
        references=references,
        kind="generation",
        example_ids=ids,
        prompts=[ex.prompt for ex in examples],
        correct=list(result["matches"]),
    )


__all__ = [
    "EXACT_MATCH_OPTIONS",
    "EvalResult",
    "GenerationExample",
    "eval_mode",
    "evaluate_generation",
    "example_ids",
    "generate_greedy",
    "render_prompt",
    "tokenize_prompt",
]
