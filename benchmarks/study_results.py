"""Write a study's table with intervals into ``benchmarks/RESULTS.md`` (any study folder).

    cpt study studies/quickstart_baselines.yaml
    python benchmarks/study_results.py studies/quickstart_baselines.yaml \\
        --section "Baselines on the quickstart tasks, 3 seeds (issue 18)"

The section gets the command, machine and date, then what ``benchmarks/continual.py`` writes
for the continual benchmark: per variant ACC / BWT / forgetting with their intervals, how
many pairs are distinguishable, the seconds the runs account for, experts trained vs reused,
and the cost against running each strategy alone (every reused expert and copied base row
charged at what it cost where it was made). The summary is rebuilt from the run directories
first (``cpt study --summary-only``), so the section shows every seed finished so far;
seeds still running are listed as pending.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from continual import alone_equivalent, results_section
from results import machine, replace_section

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study file")
    parser.add_argument("--section", required=True, help="the RESULTS.md heading (without ##)")
    parser.add_argument("--note", default="", help="a paragraph put before the table (what the study is for)")
    args = parser.parse_args(argv)

    from cpt.study.run import run_study
    from cpt.study.spec import load_study

    study = load_study(args.study)  # paths in a study file are relative to the current folder, as for `cpt study`
    run_study(study, summary_only=True)
    root = study.root
    summary = json.loads((root / "summary.json").read_text())
    sittings = json.loads((root / "sittings.json").read_text()) if (root / "sittings.json").exists() else []
    finished = list(summary["costs"]["runs"])
    costs = alone_equivalent(root / "runs", finished) if finished else None
    body = (
        (args.note.strip() + "\n\n" if args.note.strip() else "")
        + f"- command: `cpt study {args.study}`\n- machine: {machine()}\n"
        + f"- date: {datetime.date.today().isoformat()}\n\n"
        + results_section(summary, sittings, {}, costs)
    )
    replace_section(args.section, body)
    print(body)


if __name__ == "__main__":
    main()
