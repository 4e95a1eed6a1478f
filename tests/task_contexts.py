"""The context a training-time strategy is handed when a task is prepared, for tests without a run."""

import datasets

from cpt.integration import TaskContext


def task_context(step: int, task_names: list[str], rows: list[dict], strategy_dir, seed: int) -> TaskContext:
    """Task ``step`` (1-based) of ``task_names``, training on ``rows``; the strategy keeps its files in
    ``strategy_dir``."""
    return TaskContext(
        step=step,
        task_name=task_names[step - 1],
        task_names=task_names,
        train_dataset=datasets.Dataset.from_list(rows),
        strategy_dir=strategy_dir,
        seed=seed,
    )
