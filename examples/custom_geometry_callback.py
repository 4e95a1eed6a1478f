"""Subclassing ``GeometryConflictCallback``: measure only MLP tensors, add a metric, log less.

    python examples/custom_geometry_callback.py

The callback's small hooks — ``select_targets``, ``measure``, ``aggregate``, ``write``,
``log_metrics`` — are the places to change what is measured and where it goes.
"""

import tempfile
from pathlib import Path

import datasets
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from cpt.callbacks import GeometryConflictCallback
from cpt.recipe import default_training_args
from cpt.testing import build_tiny_model


class MlpGeometry(GeometryConflictCallback):
    """Only the MLP projections; adds the fraction of tensors above a conflict threshold."""

    threshold = 0.5

    def select_targets(self, names, shapes):
        return [name for name in super().select_targets(names, shapes) if ".mlp." in name]

    def aggregate(self, per_tensor):
        aggregates = super().aggregate(per_tensor)
        values = [row["geometry_conflict"] for row in per_tensor.values() if row["geometry_conflict"] is not None]
        aggregates["fraction_above_threshold"] = (
            sum(v > self.threshold for v in values) / len(values) if values else None
        )
        return aggregates

    def log_metrics(self, report):
        value = report["aggregates"]["fraction_above_threshold"]
        return {} if value is None else {"geometry/mlp_fraction_conflicting": value}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cpt-custom-"))
    base = build_tiny_model(work / "tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    # A "previous state": the base after one short fine-tune on another task.
    state = AutoModelForCausalLM.from_pretrained(base)
    rows = [{"prompt": f"Plural of {w}:", "completion": f" {w}s"} for w in ("cat", "dog", "tree", "house")]
    args = {**default_training_args(), "max_steps": 5, "learning_rate": 1e-3, "per_device_train_batch_size": 2}
    SFTTrainer(
        state,
        SFTConfig(output_dir=str(work / "t1"), **args),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    ).train()
    state.save_pretrained(work / "state")

    # The state was saved without cpt's step marker, so the step is given explicitly.
    callback = MlpGeometry(base=base, state_dir=work / "state", output_dir=work / "geometry", step=2, task_name="upper")
    upper = [{"prompt": f"Upper case of {w}:", "completion": f" {w.upper()}"} for w in ("cat", "dog", "tree", "house")]
    model = AutoModelForCausalLM.from_pretrained(work / "state")
    trainer = SFTTrainer(
        model,
        SFTConfig(output_dir=str(work / "t2"), **args),
        train_dataset=datasets.Dataset.from_list(upper),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    print(
        f"{callback.report['num_tensors']} MLP tensors measured; "
        f"fraction above {callback.threshold}: {callback.report['aggregates']['fraction_above_threshold']}"
    )


if __name__ == "__main__":
    main()
