"""GCWM in a plain TRL ``SFTTrainer`` loop: two callbacks, one instance each for the whole sequence.

    python examples/gcwm_trl_script.py                                   # tiny offline model, seconds on CPU
    python examples/gcwm_trl_script.py --model HuggingFaceTB/SmolLM2-135M-Instruct --steps 50

Every task trains a fresh expert from the base θ0 (GCWM is a merge strategy). When a task
ends, ``GeometryConflictCallback`` measures how its update conflicts with the state so far
(METHOD §1) and ``IntegrationCallback("gcwm")`` merges the expert into ``<output-dir>/state``
(METHOD §2). Both read the task's step from the state folder's ``cpt_state.json`` and its
name from ``SFTConfig(run_name=...)``; nothing is passed per task.
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
    parser.add_argument("--steps", type=int, default=10, help="training steps per task")
    args = parser.parse_args()
    work = Path(args.output_dir or tempfile.mkdtemp(prefix="cpt-gcwm-"))
    base = args.model or str(build_tiny_model(work / "tiny-model"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    training = {
        **default_training_args(),
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "per_device_train_batch_size": 4,
    }

    # --- GCWM in a TRL loop: these lines are all it takes --------------------------------------
    geometry = GeometryConflictCallback(
        base=base, state_dir=work / "state", output_dir=work / "geometry", train_from="base"
    )
    gcwm = IntegrationCallback("gcwm", base=base, state_dir=work / "state", output_dir=work / "integration")
    for task, rows in TASKS.items():
        model = AutoModelForCausalLM.from_pretrained(base)  # GCWM merges experts trained from θ0
        config = SFTConfig(output_dir=str(work / "trainer" / task), run_name=task, seed=0, **training)
        trainer = SFTTrainer(
            model,
            config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[geometry, gcwm],
        )  # geometry first: it measures against θ_{t−1}
        geometry.bind_trainer(trainer)  # metrics go through trainer.log (TensorBoard, W&B, ...)
        gcwm.bind_trainer(trainer)
        trainer.train()
        # ---------------------------------------------------------------------------------------------

        conflict = geometry.report["aggregates"]["geometry_conflict"]["mean"]
        print(
            f"task {gcwm.step} {task}: merged in {gcwm.seconds:.1f}s; mean state-relative conflict "
            + ("undefined (the state was θ0)" if conflict is None else f"{conflict:.3f}")
        )
    marker = json.loads((work / "state" / "cpt_state.json").read_text())
    print(f"state: {work / 'state'} holds step {marker['step']} ({marker['task']})")


if __name__ == "__main__":
    main()
