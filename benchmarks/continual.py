"""Continual benchmark: every strategy on the same four real BIG-bench tasks, one table.

    python benchmarks/continual.py --size cpu                   # reduced: 2-core CPU, ~5 min a strategy
    python benchmarks/continual.py --size gpu                   # full size on one GPU
    python benchmarks/continual.py --strategies sequential gcwm --size cpu

SmolLM2-135M-Instruct (an offline asset) learns four linguistic mappings in sequence —
plural → past tense → negation → question formation — on which sequential fine-tuning
forgets. Each strategy runs from the same recipe (only `strategy:` differs) into
``<output>/<strategy>/``; ``cpt compare`` then writes one table and one plot, and the
table goes into ``benchmarks/RESULTS.md`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path

import yaml
from results import machine, replace_section

REPO = Path(__file__).resolve().parent.parent
ALL_STRATEGIES = [
    "sequential",
    "replay",
    "ewc",
    "gcwm",
    "task_arithmetic",
    "average",
    "ties",
    "magmax",
    "wudi",
    "opcm",
    "nufilt",
]

TASKS = [
    ("plural", "linguistic_mappings/plural_json", "Plural of {prompt}:"),
    ("past_tense", "linguistic_mappings/past_tense_json", "Past tense of {prompt}:"),
    ("negation", "linguistic_mappings/sentence_negation_json", "Negate: {prompt}\nNegated:"),
    ("question", "linguistic_mappings/question_formation_json", "Question: {prompt}\nAs a yes/no question:"),
]

SIZES = {
    # Reduced for the 2-core CPU: the quickstart's budget per task.
    "cpu": {
        "train": 192,
        "eval": 48,
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 16, "learning_rate": 1.0e-4},
    },
    # ASSETS.md's reference setting (600 train / 200 test, 3 epochs, lr 5e-5) on a GPU.
    "gpu": {
        "train": 600,
        "eval": 200,
        "training": {"num_train_epochs": 3, "per_device_train_batch_size": 16, "learning_rate": 5.0e-5, "bf16": True},
    },
}


def recipe(strategy: str, size: str, output: Path) -> dict:
    setting = SIZES[size]
    return {
        "name": strategy,
        "output_dir": str(output),
        "seed": 0,
        "model": {"name_or_path": "smollm2-135m-instruct", "dtype": "float32"},
        "training": {**setting["training"], "lr_scheduler_type": "constant", "max_length": 64, "logging_steps": 5},
        "strategy": {"name": strategy},
        "evaluation": {"batch_size": 32, "max_new_tokens": 16},
        "tasks": [
            {
                "name": name,
                "train": {"asset": f"bigbench:{path}"},
                "fields": {"prompt_template": template, "completion_template": " {completion}"},
                "max_examples": setting["train"],
                "eval": {"max_examples": setting["eval"]},
            }
            for name, path, template in TASKS
        ],
    }


def run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(
        command, check=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    )


def record(table: str, command: str, size: str) -> None:
    """Replace this benchmark's section of RESULTS.md (one section per size)."""
    # compare.md's own title and its plot live beside the runs, not in RESULTS.md
    table = "\n".join(line for line in table.splitlines() if not line.startswith(("# ", "!["))).strip()
    replace_section(
        f"Continual benchmark ({size})",
        f"SmolLM2-135M-Instruct, BIG-bench plural → past tense → negation → question formation, "
        f"every strategy from the same recipe.\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {datetime.date.today().isoformat()}\n\n{table}\n",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--strategies", nargs="+", default=ALL_STRATEGIES, choices=ALL_STRATEGIES)
    parser.add_argument("--output", default="runs/continual-benchmark", help="where the runs go")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    args = parser.parse_args()

    output = (REPO / args.output).resolve()
    recipes = output / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    for strategy in args.strategies:
        path = recipes / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(recipe(strategy, args.size, output), sort_keys=False))
        run([sys.executable, "-m", "cpt.cli", "run", str(path)])
    run(
        [
            sys.executable,
            "-m",
            "cpt.cli",
            "compare",
            *(str(output / s) for s in args.strategies),
            "--output",
            str(output),
        ]
    )
    table = (output / "compare.md").read_text()
    print(table)
    if not args.no_record:
        record(table, "python benchmarks/continual.py " + " ".join(sys.argv[1:]), args.size)


if __name__ == "__main__":
    main()
