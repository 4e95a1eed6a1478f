"""Choice-evaluation speed: the plain prompt+choice path against the shared-prefix path.

Both paths of :func:`cpt.evaluation.choice_log_likelihoods` score the same examples in
one process, alternating (full, shared, full, shared, ...), so a machine shared with
other jobs slows both alike. Reported: each path's wall and process CPU seconds per
round (CPU seconds are what the process itself computed, so they move far less than wall
time when other jobs share the cores; run with ``--threads 1`` so idle OpenMP threads do
not spin into them), the median ratios full/shared, and the largest absolute score
difference between the paths (float rounding only) with whether the predictions agree.

Examples mimic the issue's measurement: ``--examples`` four-option examples with
prompts of about ``--prompt-tokens`` tokens (chat-rendered when the tokenizer has a chat
template) and choices of one to a few tokens.

Model: ``--model PATH`` (a local Hugging Face folder), else SmolLM2-135M-Instruct when
the ``smollm2-135m-instruct`` asset is already in cpt's cache (nothing is downloaded),
else a random Llama with SmolLM2-135M's shapes (vocabulary 49152, hidden 576, 30 layers,
9 heads, 3 kv heads, MLP 1536, tied head) and cpt's tiny tokenizer (token ids < 512; the
speed of a forward pass does not depend on the weights or on which ids are fed).

    python benchmarks/eval_speed.py                       # 40 examples, 3 rounds each
    python benchmarks/eval_speed.py --model /path/to/SmolLM2-135M-Instruct --examples 40
    python benchmarks/eval_speed.py --layers 4 --examples 8 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from cpt.evaluation import ChoiceExample, choice_log_likelihoods, tokenize_prompt

SMOLLM2_SHAPES = dict(
    vocab_size=49152,
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)

_SENTENCES = (
    "Learning continues after training: new tasks arrive, and the model should not forget the old ones.",
    "She said that the weather would be sunny tomorrow, but it rained all day and the game was cancelled.",
    "The user asks a question and the assistant gives a helpful, honest and short answer.",
)
_TEXT = " ".join(_SENTENCES).split()
_CHOICES = [" yes", " no", " the weather", " the game was cancelled", " sunny", " it rained all day", " a short answer"]


def load_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model
    if path is None:
        from cpt.assets import cache_dir
        from cpt.assets.gguf import model_ready

        cached = cache_dir() / "models" / "smollm2-135m-instruct"
        if model_ready(cached):
            path = str(cached)
    if path is not None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path), f"{path} (float32)"

    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.testing import build_tokenizer

    tokenizer = build_tokenizer()
    shapes = dict(SMOLLM2_SHAPES, num_hidden_layers=args.layers)
    config = LlamaConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **shapes,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    millions = model.num_parameters() / 1e6
    return model, tokenizer, f"random Llama, SmolLM2-135M shapes ({args.layers} layers, {millions:.1f}M params)"


def make_examples(tokenizer, count: int, prompt_tokens: int, seed: int) -> list[ChoiceExample]:
    import random

    rng = random.Random(seed)
    chat = getattr(tokenizer, "chat_template", None) is not None
    examples = []
    for _ in range(count):
        words: list[str] = []
        text = ""
        while True:  # grow the question until its tokens reach the target length
            words.append(rng.choice(_TEXT))
            text = "Question: " + " ".join(words) + "?\nAnswer:"
            prompt = [{"role": "user", "content": text}] if chat else text
            if len(tokenize_prompt(tokenizer, prompt)) >= prompt_tokens:
                break
        choices = rng.sample(_CHOICES, 4)
        examples.append(ChoiceExample(prompt, choices, rng.randrange(4)))
    return examples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="local Hugging Face folder (default: SmolLM2 asset if cached, else random)"
    )
    parser.add_argument("--layers", type=int, default=30, help="layers of the random SmolLM2-shaped model")
    parser.add_argument("--examples", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per path, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer, described = load_model(args)
    model.to(args.device).eval()
    examples = make_examples(tokenizer, args.examples, args.prompt_tokens, args.seed)
    lengths = [len(tokenize_prompt(tokenizer, ex.prompt)) for ex in examples]
    print(f"model: {described}")
    print(
        f"examples: {len(examples)} × 4 choices, prompt tokens {min(lengths)}–{max(lengths)} "
        f"(mean {statistics.mean(lengths):.0f}), batch size {args.batch_size}, {torch.get_num_threads()} torch threads"
    )
    accelerator = f", {torch.cuda.get_device_name(model.device)}" if model.device.type == "cuda" else ""
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs{accelerator}, torch {torch.__version__}, "
        f"load {os.getloadavg()}"
    )

    times = {"full": [], "shared_prefix": []}
    cpu = {"full": [], "shared_prefix": []}
    scores = {}
    for round_index in range(args.rounds):
        for method in ("full", "shared_prefix"):
            start, start_cpu = time.perf_counter(), time.process_time()
            scores[method] = choice_log_likelihoods(
                model, tokenizer, examples, batch_size=args.batch_size, method=method, progress=False
            )
            times[method].append(time.perf_counter() - start)
            cpu[method].append(time.process_time() - start_cpu)
        print(
            f"round {round_index + 1}: wall full {times['full'][-1]:.2f}s  "
            f"shared_prefix {times['shared_prefix'][-1]:.2f}s "
            f"(ratio {times['full'][-1] / times['shared_prefix'][-1]:.2f}×); "
            f"CPU full {cpu['full'][-1]:.2f}s  shared_prefix {cpu['shared_prefix'][-1]:.2f}s "
            f"(ratio {cpu['full'][-1] / cpu['shared_prefix'][-1]:.2f}×); load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    diff = max(abs(a - b) for ra, rb in zip(scores["full"], scores["shared_prefix"]) for a, b in zip(ra, rb))
    agree = all(
        max(range(4), key=lambda c, r=ra: (r[c], -c)) == max(range(4), key=lambda c, r=rb: (r[c], -c))
        for ra, rb in zip(scores["full"], scores["shared_prefix"])
    )
    for name, measured in (("wall", times), ("CPU", cpu)):
        ratios = [f / s for f, s in zip(measured["full"], measured["shared_prefix"])]
        print(
            f"median {name}: full {statistics.median(measured['full']):.2f}s  "
            f"shared_prefix {statistics.median(measured['shared_prefix']):.2f}s  "
            f"ratio {statistics.median(ratios):.2f}× (per-round {', '.join(f'{r:.2f}' for r in ratios)})"
        )
    print(f"max |score difference| {diff:.2e}; predictions agree: {agree}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
