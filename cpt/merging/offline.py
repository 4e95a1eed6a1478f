"""``cpt merge``: apply a merge strategy to existing checkpoints, in order, offline.

Like the reference's continual merge: E_1, E_2, … (fine-tunes of BASE) are integrated one
after another, exactly as the runner would at the end of each task (task vectors against
BASE), with every tensor read lazily from safetensors. An expert may be a PEFT LoRA adapter
folder over BASE (``adapter_config.json``): its dense update is formed one tensor at a time.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from cpt.errors import CptError
from cpt.integration import IntegrationContext
from cpt.io import atomic_write_json, staged_dir, staging_dir
from cpt.merging.contract import MergeStrategy
from cpt.recipe import DEFAULT_TARGETS, parse_overrides
from cpt.strategies import get_strategy


def merge_checkpoints(
    method: str,
    base: str,
    experts: list[str],
    output: str | Path,
    overrides: list[str] | None = None,
    save_steps: bool = False,
    targets: list[str] | None = None,
    max_shard_size: int | str | None = None,
) -> dict[str, Any]:
    """Integrate ``experts`` into ``base`` in order with ``method``; the final state goes to ``output``.

    An expert is an HF folder or a PEFT LoRA adapter folder (``adapter_config.json``) over
    ``base``; an adapter's dense delta is formed one tensor at a time. The state is written
    in shards of at most ``max_shard_size`` (default: ``save_pretrained``'s).
    """
    from transformers import AutoTokenizer

    from cpt.diagnostics import checkpoint_folder
    from cpt.merging.batch_io import parse_max_shard_size

    info = get_strategy(method)
    if not issubclass(info.integrator_class, MergeStrategy):
        raise CptError(
            f"--method {method}: not a data-free merge strategy (it needs training); pick one of "
            + ", ".join(name for name, i in _merge_strategies().items())
        )
    params = {}
    for path, value in parse_overrides(overrides or []):
        if len(path) != 1:
            raise CptError(f"--set {'.'.join(path)}: strategy parameters are plain names, e.g. --set step_coef=0.2")
        params[path[0]] = value
    try:
        strategy = info.build(params)
    except CptError as exc:
        raise CptError(f"--set: {exc}") from None

    parse_max_shard_size(max_shard_size, "--max-shard-size")  # a bad size fails before any work
    base_dir = Path(checkpoint_folder(base))
    expert_dirs = [Path(checkpoint_folder(expert)) for expert in experts]
    output = Path(output)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError):
        tokenizer = None
    work = staging_dir(output.with_name(output.name + ".work"))
    steps = []
    try:
        state_dir = work / "state"
        for step, (name, expert_dir) in enumerate(zip(experts, expert_dirs), start=1):
            started = time.perf_counter()
            context = IntegrationContext(
                step=step,
                task_name=f"expert{step}",
                model=None,
                tokenizer=tokenizer,
                state_dir=state_dir,
                base_dir=base_dir,
                previous_state_dir=state_dir if step > 1 else None,
                history_dir=work / "history",
                target_patterns=targets or list(DEFAULT_TARGETS),
                train_from="base",
                expert_dir=expert_dir,
                max_shard_size=max_shard_size,
            )
            stats = strategy.integrate(context)
            seconds = time.perf_counter() - started
            steps.append({"step": step, "expert": name, "seconds": round(seconds, 3), **stats})
            print(f"[cpt] merged {name} (step {step}/{len(experts)}) in {seconds:.1f}s")
            if save_steps:
                with staged_dir(output / f"step-{step}") as staged:
                    shutil.copytree(state_dir, staged, dirs_exist_ok=True)
        output.mkdir(parents=True, exist_ok=True)
        for file in state_dir.iterdir():
            shutil.copy2(file, output / file.name)
        report = {"method": method, "params": params, "base": base, "experts": experts, "steps": steps}
        atomic_write_json(output / "merge_stats.json", report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _merge_strategies() -> dict:
    from cpt.strategies import known_strategies

    return {name: info for name, info in known_strategies().items() if issubclass(info.integrator_class, MergeStrategy)}
