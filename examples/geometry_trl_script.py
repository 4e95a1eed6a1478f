"""A plain TRL loop over two tasks with cpt's geometry and integration callbacks.

    python examples/geometry_trl_script.py                          # tiny offline model, seconds on CPU
    python examples/geometry_trl_script.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 50

Each task trains with TRL's own ``SFTTrainer``. When it ends, ``GeometryConflictCallback``
measures where the task's update conflicts with what earlier tasks changed (METHOD §1)
and writes ``<output-dir>/geometry/<t>_<task>.json``; ``IntegrationCallback`` then folds
the expert into ``<output-dir>/state`` with the chosen strategy (sequential by default:
the state becomes the expert; try ``--strategy task_arithmetic``) and writes its statistics
to ``<output-dir>/integration/<t>_<task>.json``.
"""

import argparse
import json
import tempfile
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpt.callbacks import GeometryConflictCallback, IntegrationCallback
from cpt.recipe import default_training_args  # CPU-friendly SFTConfig defaults when there is no GPU
from cpt.strategies import get_strategy
from cpt.testing import build_tiny_model

WORDS = ["cat", "dog", "tree", "house", "river", "stone", "bird", "cloud", "apple", "chair", "lamp", "door"]
TASKS = {
    "plural": [{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in WORDS],
    "upper": [{"prompt": f"Upper case of {w}:", "completion": f" {w.upper()}"} for w in WORDS],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local HF folder or hub id (default: a tiny random Llama built offline)")
    parser.add_argument("--output-dir", help="default: a temporary folder")
    parser.add_argument("--strategy", default="sequential", help="any strategy of `cpt strategies`")
    parser.add_argument("--steps", type=int, default=10, help="training steps per task")
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="cpt-geometry-"))
    base = args.model or build_tiny_model(work / "tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    train_from = get_strategy(args.strategy).train_from  # merge strategies train each expert from θ0
    state_dir = work / "state"

    # One instance of each callback for the whole sequence: both read the task's step from the
    # state folder's cpt_state.json and its name from SFTConfig(run_name=...).
    geometry = GeometryConflictCallback(
        base=base, state_dir=state_dir, output_dir=work / "geometry", train_from=train_from
    )
    integration = IntegrationCallback(args.strategy, base=base, state_dir=state_dir, output_dir=work / "integration")
    for step, (task, rows) in enumerate(TASKS.items(), start=1):
        start = state_dir if (step > 1 and train_from == "state") else base
        model = AutoModelForCausalLM.from_pretrained(start)
        config = SFTConfig(
            output_dir=str(work / "trainer" / task),
            run_name=task,
            **{
                **default_training_args(),
                "max_steps": args.steps,
                "learning_rate": 1e-3,
                "per_device_train_batch_size": 4,
                "logging_steps": 5,
                "seed": step,
            },
        )
        trainer = SFTTrainer(
            model,
            config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[geometry, integration],
        )  # geometry first: it measures against θ_{t−1}
        geometry.bind_trainer(trainer)  # the aggregates go through trainer.log (TensorBoard, W&B, ...)
        integration.bind_trainer(trainer)  # and the strategy's statistics
        trainer.train()

        summary = geometry.report["aggregates"]["geometry_conflict"]
        mean = "undefined (the state is still θ0)" if summary["mean"] is None else f"{summary['mean']:.3f}"
        print(f"task {step} {task}: mean state-relative conflict {mean}; by family {json.dumps(summary['by_family'])}")
    print(f"state: {state_dir}\ngeometry: {work / 'geometry'}")


if __name__ == "__main__":
    main()
