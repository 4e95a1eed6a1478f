"""Trainer settings shared by the tests that drive TRL's SFTTrainer directly on the tiny model."""

from pathlib import Path

from trl import SFTConfig


def quiet_cpu_sft_config(output_dir: Path, *, max_steps: int, **overrides) -> SFTConfig:
    """A few CPU steps that move the tiny model visibly (lr 5e-3, batch 2, seed 0), with no reports, checkpoints or
    progress bars; ``overrides`` go to `SFTConfig` as they are (e.g. ``run_name``)."""
    return SFTConfig(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        max_steps=max_steps,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **overrides,
    )
