"""Run ``cpt/run.py`` as ``accelerate launch`` would, counting the DeepSpeed objects left alive.

For tests/test_deepspeed.py: a run trains one model per task in one process, so once a
task has been trained and integrated, its engine, ZeRO optimizer and partitioned model
(and every earlier task's) must be gone. The counts are taken after each task's
training and integration and at the end of the run; each rank writes the largest ones,
``{"engines": n, "optimizers": n, "partitioned_models": n}``, to
``$CPT_LIVE_OBJECTS_DIR/rank<r>.json``.
"""

import gc
import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def live_deepspeed_objects() -> dict[str, int]:
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    gc.collect()
    objects = gc.get_objects()
    return {
        "engines": sum(isinstance(obj, DeepSpeedEngine) for obj in objects),
        "optimizers": sum(isinstance(obj, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)) for obj in objects),
        "partitioned_models": sum(
            isinstance(obj, torch.nn.Module) and any(hasattr(param, "ds_id") for param in obj.parameters(recurse=False))
            for obj in objects
        ),
    }


def record_live_objects(largest: dict[str, int]) -> None:
    for key, value in live_deepspeed_objects().items():
        largest[key] = max(largest.get(key, 0), value)


def count_after_each_task(largest: dict[str, int]) -> None:
    from cpt.runner import TaskSequenceRunner

    train_task = TaskSequenceRunner.train_task

    def counted(self, *args, **kwargs):
        live_state = train_task(self, *args, **kwargs)
        record_live_objects(largest)
        return live_state

    TaskSequenceRunner.train_task = counted


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    largest: dict[str, int] = {}
    count_after_each_task(largest)
    sys.argv = [str(REPO / "cpt" / "run.py"), *sys.argv[1:]]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise
    out = Path(os.environ["CPT_LIVE_OBJECTS_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    record_live_objects(largest)
    out.write_text(json.dumps(largest))
