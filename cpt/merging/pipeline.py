"""Former home of the merge pipeline, kept so existing imports keep working.

The pure contract (a strategy's per-batch rule) is :mod:`cpt.merging.contract`; the file
side (streaming batches, shard writer, kept history, :func:`run_merge`) is
:mod:`cpt.merging.batch_io`. Import from those in new code.
"""

from cpt.merging.batch_io import (  # noqa: F401
    BATCH_BYTES,
    BATCH_MODEL_FRACTION,
    BatchSource,
    batch_limit,
    read_rows,
    row_blocks,
    run_merge,
)
from cpt.merging.contract import (  # noqa: F401
    MergeResult,
    MergeStrategy,
    RunningMergeStrategy,
    TensorBatch,
    combine_row_stats,
)

__all__ = [
    "BATCH_BYTES",
    "BATCH_MODEL_FRACTION",
    "BatchSource",
    "MergeResult",
    "MergeStrategy",
    "RunningMergeStrategy",
    "TensorBatch",
    "batch_limit",
    "combine_row_stats",
    "read_rows",
    "row_blocks",
    "run_merge",
]
