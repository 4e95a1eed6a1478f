"""Reports of continual runs: ``RUN_DIR/report.md`` + ``RUN_DIR/plots/*.png``, and run comparisons.

:func:`write_report` reads a run directory (DESIGN.md) — ``manifest.json``,
``eval/matrix.json``, ``geometry/<t>_<task>.json``, ``integration/<t>_<task>.json`` — and
writes what exists: a run in progress gets a report of its completed tasks, a run without
geometry files gets one without the conflict sections. :func:`compare_runs` puts several
runs in one table (``compare.md``) and one bar chart (``compare.png``: ACC and forgetting per
run). Every file is written atomically.

Where each piece lives:

* :mod:`~cpt.report.loading` — reading a run directory into a :class:`RunData` (:func:`load_run`);
* :mod:`~cpt.report.statistics` — the conflict-vs-forgetting pairs (the claim of METHOD §1)
  and their Spearman correlations (:func:`forgetting_pairs`, :func:`correlations`);
* :mod:`~cpt.report.plots` — the figures (matplotlib object API, Agg canvas; no pyplot, no
  global backend change) and the tensor order of the conflict heatmap;
* :mod:`~cpt.report.markdown` — the text of ``report.md`` (:func:`render_report`) and
  :func:`write_report`;
* :mod:`~cpt.report.merge_effect` — what each step's merge did (METHOD §2.10), its verdict
  (:func:`merge_effects`, :func:`merge_verdict`);
* :mod:`~cpt.report.comparison` — ``cpt compare`` (:func:`compare_runs`).
"""

from __future__ import annotations

from cpt.naming import tensor_family
from cpt.report.comparison import compare_runs
from cpt.report.loading import TOP_K, RunData, StepGeometry, load_run
from cpt.report.markdown import render_report, write_report
from cpt.report.merge_effect import MergeEffect, merge_effects, merge_verdict
from cpt.report.plots import (
    MATRIX_PLOT,
    MERGE_PLOT,
    PLOTS,
    REPORT_PLOTS,
    SCATTER_PLOT,
    SCORES_PLOT,
    TENSOR_PLOT,
    plot_accuracy_matrix,
    plot_conflict_vs_forgetting,
    plot_merge_effect,
    plot_run_comparison,
    plot_task_scores,
    plot_tensor_conflict,
    short_tensor_name,
    tensor_order_key,
)
from cpt.report.statistics import MIN_PAIRS, Correlation, ForgettingPair, correlations, forgetting_pairs, spearman

__all__ = [
    "Correlation",
    "ForgettingPair",
    "MergeEffect",
    "RunData",
    "StepGeometry",
    "compare_runs",
    "correlations",
    "forgetting_pairs",
    "load_run",
    "merge_effects",
    "merge_verdict",
    "render_report",
    "spearman",
    "tensor_family",
    "write_report",
]
