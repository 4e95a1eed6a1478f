"""Two tasks in sequence with a plain TRL loop and cpt's ``EWCCallback`` (METHOD §4).

    python examples/ewc_trl_script.py                       # tiny offline model, seconds on CPU
    python examples/ewc_trl_script.py --lora                # LoRA: EWC on the merged target weights
    python examples/ewc_trl_script.py --model Qwen/Qwen2.5-0.5B --ewc-lambda 100 --steps 200

Task 1 trains as usual; when it ends, the callback computes the diagonal empirical Fisher
F on 32 of its examples and anchors θ* to the trained weights. Task 2 then trains on
L = L_task + (λ/2) Σ F (θ − θ*)² — ``CptSFTTrainer`` adds the callback's ``loss_term`` to
the loss and logs it as ``ewc_penalty``. F and θ* are saved under ``<output-dir>/ewc``.
"""

import argparse
import tempfile
from pathlib import Path

import datasets
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from cpt.callbacks import EWCCallback
from cpt.recipe import (
    default_training_args,  # CPU-friendly SFTConfig defaults when there is no GPU
)
from cpt.testing import build_tiny_model
from cpt.training.trainer import CptSFTTrainer

WORDS = ["cat", "dog", "tree", "house", "river", "stone", "bird", "cloud", "apple", "chair", "lamp", "door"]
TASKS = {
    "plural": [{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in WORDS],
    "upper": [{"prompt": f"Upper case of {w}:", "completion": f" {w.upper()}"} for w in WORDS],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF model id or folder (default: a tiny random Llama built offline)")
    parser.add_argument("--output-dir", help="where checkpoints and the EWC files go (default: a temporary folder)")
    parser.add_argument("--ewc-lambda", type=float, default=100.0)
    parser.add_argument("--gamma", type=float, default=1.0, help="online-EWC decay of the earlier Fisher")
    parser.add_argument("--steps", type=int, default=10, help="training steps per task")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter per task and merge it after the task")
    args = parser.parse_args()

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="cpt-ewc-"))
    model_path = args.model or build_tiny_model(work / "tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)

    # One callback for the whole sequence: it counts the tasks (step 1, 2, ...) and keeps F and θ*.
    ewc = EWCCallback(ewc_lambda=args.ewc_lambda, gamma=args.gamma, fisher_examples=32, output_dir=work / "ewc", step=1)
    for name, rows in TASKS.items():
        config = SFTConfig(
            output_dir=str(work / name),
            **{
                **default_training_args(),
                "max_steps": args.steps,
                "learning_rate": 1e-3,
                "per_device_train_batch_size": 4,
                "logging_steps": 5,
                "seed": 0,
            },
        )
        trainer = CptSFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if args.lora else None,
            callbacks=[ewc],
        )
        trainer.train()
        # The next task starts from this task's weights (a LoRA adapter is merged into them).
        model = trainer.model.merge_and_unload() if args.lora else trainer.model
        print(f"{name}: done; F and θ* of {len(ewc.fisher)} tensors saved in {work / 'ewc'}")


if __name__ == "__main__":
    main()
