"""Continual benchmark: every strategy on four real BIG-bench tasks, 3 seeds, intervals — `cpt study` underneath.

    python benchmarks/continual.py                                  # studies/continual.yaml: 21 variants × 3 seeds
    python benchmarks/continual.py --seeds 0 --variants sequential gcwm     # a subset (same study folder)
    python benchmarks/continual.py --alone sequential gcwm          # also: each alone (`cpt run`, no cache), seed 0
    python benchmarks/continual.py --workers 2                      # two processes on the study (one per core/GPU)
    python benchmarks/continual.py --summary-only                   # rewrite the RESULTS.md section from the runs
    python benchmarks/continual.py --size gpu                       # ASSETS.md's full training size on one GPU

A thin driver over ``cpt study studies/continual.yaml`` (SmolLM2-135M-Instruct, plural → past
tense → negation → question formation; see the study file for what is shared and skipped).
Run it again to resume: finished runs are skipped, an interrupted one continues. Each sitting's
wall time is appended to ``<study folder>/sittings.json``, so the recorded wall time is the
sum over sittings. The section "Continual benchmark (<size>)" of ``benchmarks/RESULTS.md``
gets the study's ``summary.json``: ACC, BWT and forgetting with 95 % intervals per variant,
how many variant pairs are distinguishable, the wall time, where the seconds went, experts
trained vs reused, and the cost against running each strategy alone — estimated from the runs
(every reused expert and copied base row charged at what it cost where it was made) and, for
the variants given to ``--alone``, measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from results import machine, replace_section

REPO = Path(__file__).resolve().parent.parent
STUDY = "studies/continual.yaml"

#: ``--size gpu``: ASSETS.md's reference setting (600 train / 200 test a task, 3 epochs, lr 5e-5, bf16) as study overrides.
SIZES: dict[str, list[str]] = {
    "cpu": [],
    "gpu": [
        *(f"tasks.{index}.max_examples=600" for index in range(4)),
        *(f"tasks.{index}.eval.max_examples=200" for index in range(4)),
        "training.num_train_epochs=3",
        "training.learning_rate=5.0e-5",
        "training.bf16=true",
    ],
}

METRICS = (("acc", "ACC", ".3f"), ("bwt", "BWT", "+.3f"), ("forgetting", "forgetting", ".3f"))


# ---------------------------------------------------------------------- the study file this sitting runs
def variant_name(entry: Any) -> list[str]:
    """The variant names one entry of a study's ``variants:`` expands to (cpt.study.spec's rule)."""
    from cpt.study.spec import VariantSpec, expand_variants

    spec = VariantSpec.model_validate({"strategy": entry} if isinstance(entry, str) else entry)
    return [variant.name for variant in expand_variants([spec])]


def derived_study(
    study_path: Path, size: str, seeds: list[int] | None, variants: list[str] | None, output: Path
) -> Path:
    """``study_path`` with only the chosen seeds and variants and the size's overrides, written to ``output``.

    The study keeps its name (``continual``; ``continual-gpu`` for ``--size gpu``) and folder, so a subset
    reuses and resumes the same run directories as the whole study.
    """
    data = yaml.safe_load(study_path.read_text(encoding="utf-8"))
    data["name"] = data.get("name") or study_path.stem
    if size != "cpu":
        data["name"] += f"-{size}"
    data["set"] = [*data.get("set", []), *SIZES[size]]
    if seeds:
        data["seeds"] = list(seeds)
    if variants:
        known = {name: entry for entry in data["variants"] for name in variant_name(entry)}
        unknown = [name for name in variants if name not in known]
        if unknown:
            sys.exit(f"--variants: {', '.join(unknown)} not in {study_path}; choose from {', '.join(known)}")
        data["variants"] = [entry for entry in data["variants"] if set(variant_name(entry)) & set(variants)]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return output


def environment(expert_cache: bool | None = None) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if expert_cache is False:
        env.pop("CPT_EXPERT_CACHE", None)
    return env


def timed(command: list[str], env: dict[str, str], grace_seconds: float = 15.0) -> tuple[float, int]:
    """Run ``command`` from the repository root; (wall seconds, exit status), also when stopped.

    A Ctrl-C or SIGTERM to this process is passed on to ``command`` and waited for, so that it stops
    cleanly (``subprocess.run`` would kill it a quarter second later) and the sitting is recorded.
    """
    from cpt.stopping import pass_stop_on, sigterm_stops_cleanly

    print("+", " ".join(command), flush=True)
    started = time.perf_counter()
    with sigterm_stops_cleanly():
        process = subprocess.Popen(command, cwd=REPO, env=env)
        try:
            status = process.wait()
        except KeyboardInterrupt as stop:
            # The grace is longer than `cpt study --workers` gives its workers before passing a stop on.
            pass_stop_on([process], stop, grace_seconds)
            status = process.returncode
    return time.perf_counter() - started, status


def record_sitting(root: Path, seconds: float, status: int, command: str) -> None:
    path = root / "sittings.json"
    sittings = json.loads(path.read_text()) if path.exists() else []
    sittings.append(
        {
            # recorded when the sitting ends: its start is that many seconds earlier
            "started": (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)).isoformat(
                timespec="seconds"
            ),
            "seconds": round(seconds, 1),
            "status": status,
            "command": command,
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sittings, indent=2) + "\n")


# ---------------------------------------------------------------------- strategies alone
def run_alone(study, names: list[str], seed: int, root: Path) -> dict[str, dict]:
    """Each named variant of ``study`` as a plain ``cpt run`` of its recipe for ``seed``, without the expert cache,
    from scratch (its run directory under ``<root>/alone/`` is removed first); wall time and manifest costs go
    to ``<root>/alone.json``."""
    by_name = {variant.name: variant for variant in study.variants}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        sys.exit(f"--alone: {', '.join(unknown)} not in the study's variants ({', '.join(by_name)})")
    path = root / "alone.json"
    measured = json.loads(path.read_text()) if path.exists() else {}
    for name in names:
        recipe = study.recipe_for(by_name[name], seed).model_dump(mode="json")
        recipe["output_dir"] = str(root / "alone")
        recipe_path = root / "alone" / f"{recipe['name']}.yaml"
        recipe_path.parent.mkdir(parents=True, exist_ok=True)
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), encoding="utf-8")
        run_dir = root / "alone" / recipe["name"]
        shutil.rmtree(run_dir, ignore_errors=True)  # a timing: always the whole run
        seconds, status = timed([sys.executable, "-m", "cpt.cli", "run", str(recipe_path)], environment(False))
        if status != 0:
            sys.exit(f"--alone {name}: cpt run exited with status {status}")
        manifest = json.loads((run_dir / "manifest.json").read_text())
        measured[name] = {
            "seed": seed,
            "wall_seconds": round(seconds, 1),
            **run_seconds(manifest),
            "base_eval_seconds": round(manifest.get("base_eval_seconds", 0.0), 1),
        }
        path.write_text(json.dumps(measured, indent=2) + "\n")
    return measured


# ---------------------------------------------------------------------- costs from run directories
def run_seconds(manifest: dict) -> dict[str, float]:
    """Seconds a run's manifest accounts for (:func:`cpt.study.summary.manifest_seconds`), to 0.1 s."""
    from cpt.study.summary import manifest_seconds

    return {key: round(value, 1) for key, value in manifest_seconds(manifest).items()}


def alone_equivalent(runs_dir: Path, run_names: list[str], cache_dir: Path | None = None) -> dict[str, Any]:
    """What the study's runs account for, and what they would have cost alone: every expert taken from the
    cache charged at the training seconds of the run that trained it (same cache key), every copied base row at
    the base evaluation of the run it came from, every GCWM step that read shared merges at the merge seconds
    recorded in the entries it read (``gcwm_merge_cache.seconds_saved``).

    An expert trained outside these runs (an earlier study on the same recipe left it in the expert cache at
    ``cache_dir``, default ``~/.cache/cpt/experts``) is charged at the ``train_seconds`` its cache entry
    recorded: once to the study (a fresh study trains it once) and at every reuse alone. Keys found nowhere are
    counted in ``uncharged_experts``; steps that read merges stored without their seconds (written before
    entries carried them) in ``unpriced_merge_steps``."""
    from cpt.io import read_json
    from cpt.study.expert_cache import ExpertCache

    cache = ExpertCache(cache_dir)
    manifests = {name: json.loads((runs_dir / name / "manifest.json").read_text()) for name in run_names}
    trained_at: dict[str, float] = {}
    for manifest in manifests.values():
        for task in manifest.get("tasks", []):
            entry = task.get("expert_cache") or {}
            if entry.get("key") and not entry.get("hit"):
                trained_at[entry["key"]] = task.get("train_seconds", 0.0)
    trained_before: dict[str, float] = {}  # key → the seconds its cache entry recorded

    def training_seconds(key: str) -> float | None:
        if key in trained_at:
            return trained_at[key]
        if key not in trained_before:
            recorded = read_json(cache.entry_dir(key) / "manifest.json", {}).get("train_seconds")
            if recorded is None:
                return None
            trained_before[key] = float(recorded)
        return trained_before[key]

    study = alone = merges_charged = 0.0
    uncharged = unpriced = 0
    for manifest in manifests.values():
        seconds = sum(run_seconds(manifest).values())
        study += seconds
        alone += seconds
        for task in manifest.get("tasks", []):
            merges = task.get("gcwm_merge_cache") or {}
            merges_charged += merges.get("seconds_saved", 0.0)
            unpriced += bool(merges.get("unpriced"))
            entry = task.get("expert_cache") or {}
            if entry.get("hit"):
                charged = training_seconds(entry.get("key", ""))
                if charged is None:
                    uncharged += 1
                else:
                    alone += charged
        source = manifest.get("base_row_from")
        if source in manifests:
            alone += manifests[source].get("base_eval_seconds", 0.0)
    before = sum(trained_before.values())
    return {
        "study_seconds": round(study + before, 1),
        "alone_seconds": round(alone + merges_charged, 1),
        "uncharged_experts": uncharged,
        "experts_trained_before": len(trained_before),
        "expert_seconds_before": round(before, 1),
        "merge_seconds_charged": round(merges_charged, 1),
        "unpriced_merge_steps": unpriced,
    }


# ---------------------------------------------------------------------- the RESULTS.md section
def interval(values: dict | None, spec: str) -> str:
    if not values or values.get("estimate") is None:
        return "—"
    return f"{values['estimate']:{spec}} [{values['low']:{spec}}, {values['high']:{spec}}]"


def hours(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 3600:.2f} h)"


def results_section(summary: dict, sittings: list[dict], alone: dict[str, dict], costs: dict | None) -> str:
    """The markdown body of the RESULTS.md section from a study's ``summary.json`` (and the driver's records)."""
    stats = summary.get("statistics")
    out: list[str] = []
    if summary.get("pending_runs"):
        out += [f"Pending runs (not in the table): {', '.join(summary['pending_runs'])}.", ""]
    if stats is None:
        return "\n".join(out + [summary.get("note", "no statistics yet"), ""])
    confidence = round(100 * stats["confidence"])
    out += [
        f"Seeds {stats['seeds']}; {stats['resamples']} resamples of the paired cluster bootstrap over seeds "
        f"{'and eval examples' if stats['example_level'] else '(no per-example outcomes)'} (METHOD §6); "
        f"{confidence} % intervals.",
        "",
        f"| variant | strategy | parameters | ACC [{confidence} % CI] | BWT | forgetting |",
        "|---|---|---|---|---|---|",
    ]
    for variant in summary["variants"]:
        metrics = stats["variants"][variant["name"]]
        params = ", ".join(f"{key}={value}" for key, value in variant["params"].items()) or "—"
        cells = [interval(metrics.get(key), spec) for key, _, spec in METRICS]
        out.append(f"| {variant['name']} | {variant['strategy']} | {params} | " + " | ".join(cells) + " |")
    pairs = stats["pairs"]
    counts = {key: sum(bool(pair[key]["distinguishable"]) for pair in pairs) for key, _, _ in METRICS}
    any_metric = sum(any(pair[key]["distinguishable"] for key, _, _ in METRICS) for pair in pairs)
    out += [
        "",
        f"Distinguishable pairs (the {confidence} % interval of the paired difference excludes 0), of "
        f"{len(pairs)}: ACC {counts['acc']}, BWT {counts['bwt']}, forgetting {counts['forgetting']}; "
        f"on at least one of them {any_metric}. Every pair's interval: `summary.md` in the study folder.",
        "",
    ]
    run_costs = summary["costs"]
    wall = sum(sitting["seconds"] for sitting in sittings)
    out += [
        f"- wall time: {hours(wall)} over {len(sittings)} sitting(s) (`sittings.json`)"
        if sittings
        else "- wall time: not recorded (the study was not run through this driver)",
        f"- seconds the runs account for: training {run_costs['train_seconds']:.0f}, evaluation "
        f"{run_costs['eval_seconds']:.0f}, integration {run_costs['integration_seconds']:.0f} "
        f"(the rest: model loading, geometry diagnostics, start-up)",
        f"- experts: {run_costs['experts_trained']} trained, {run_costs['experts_reused']} reused from the cache",
    ]
    if costs:
        ratio = costs["study_seconds"] / costs["alone_seconds"] if costs["alone_seconds"] else float("nan")
        caveats = (
            f"; {costs['experts_trained_before']} experts were trained before this study (an earlier study on the "
            f"same recipe left them in the expert cache): each is charged once to the study and at every reuse "
            f"alone, at the training seconds its cache entry recorded ({costs['expert_seconds_before']:.0f} s "
            "together)"
            if costs.get("experts_trained_before")
            else ""
        )
        if costs["uncharged_experts"]:
            caveats += (
                f"; {costs['uncharged_experts']} reuses of experts trained outside this study and no longer in the "
                "cache are not charged"
            )
        if costs.get("unpriced_merge_steps"):
            caveats += (
                f"; {costs['unpriced_merge_steps']} GCWM steps read shared merges stored without their seconds "
                "(by an older cpt) and are not charged for them"
            )
        merges = (
            f", and {costs['merge_seconds_charged']:.0f} s of GCWM merges read from a variant that shares m_t"
            if costs.get("merge_seconds_charged")
            else ""
        )
        out.append(
            f"- cost vs each strategy alone (from the runs): {costs['study_seconds']:.0f} s in the study against "
            f"{costs['alone_seconds']:.0f} s alone — every reused expert and copied base row charged at what it "
            f"cost where it was made{merges} — so the study costs {ratio:.2f}× running each strategy alone"
            f"{caveats}"
        )
    out.append("")
    if alone:
        out += [
            "Measured alone (`--alone`: `cpt run` of the variant's recipe for one seed, no expert cache) against "
            "the same run in the study:",
            "",
            "| variant | seed | alone: wall s | alone: train / eval / integration s | alone: what the study "
            "shares s | in the study: train / eval / integration s |",
            "|---|---|---|---|---|---|",
        ]
        study_runs = run_costs.get("runs", {})
        for name, measured in alone.items():
            in_study = study_runs.get(f"{name}-seed{measured['seed']}")
            study_cells = (
                f"{in_study['train_seconds']:.0f} / {in_study['eval_seconds']:.0f} / "
                f"{in_study['integration_seconds']:.0f}"
                if in_study
                else "—"
            )
            # Alone, a run evaluates the base row and trains its own experts; the study does the base row once a
            # seed and, for the variants that reuse experts trained from θ0, their training once a seed.
            shared = measured.get("base_eval_seconds")
            if shared is not None and in_study and in_study.get("experts_reused"):
                shared += measured["train_seconds"]
            out.append(
                f"| {name} | {measured['seed']} | {measured['wall_seconds']:.0f} | "
                f"{measured['train_seconds']:.0f} / {measured['eval_seconds']:.0f} / "
                f"{measured['integration_seconds']:.0f} | {'—' if shared is None else f'{shared:.0f}'} | "
                f"{study_cells} |"
            )
        out += [
            "",
            "What the study shares: the base row (scored once a seed, copied to the seed's other runs) and, for a "
            "variant that integrates experts trained from θ0, their training (once a seed, reused by every such "
            "variant): seconds its run alone spends on work the study does once for all of the seed's variants.",
            "",
        ]
    return "\n".join(out)


def record(root: Path, size: str, command: str) -> str:
    """Write the "Continual benchmark (<size>)" section of RESULTS.md from the study folder ``root``."""
    summary = json.loads((root / "summary.json").read_text())
    sittings = json.loads((root / "sittings.json").read_text()) if (root / "sittings.json").exists() else []
    alone = json.loads((root / "alone.json").read_text()) if (root / "alone.json").exists() else {}
    finished = [name for name in summary["costs"]["runs"]]
    costs = alone_equivalent(root / "runs", finished) if finished else None
    body = (
        "SmolLM2-135M-Instruct, BIG-bench plural → past tense → negation → question formation "
        f"(`recipes/continual_cpu.yaml`: 192 training examples a task, 150 eval examples a task from its test "
        f"split), every strategy of `{STUDY}` at its recipe defaults plus the GCWM control rows.\n\n"
        f"- command: `{command}`\n- machine: {machine()}\n- date: {datetime.date.today().isoformat()}\n\n"
        + results_section(summary, sittings, alone, costs)
    )
    replace_section(f"Continual benchmark ({size})", body)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default=STUDY, help="the study file (default: %(default)s)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the study's)")
    parser.add_argument("--variants", nargs="+", help="only these variants (default: all of the study's)")
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: the study as it is; gpu: ASSETS.md")
    parser.add_argument("--alone", nargs="+", default=[], metavar="VARIANT", help="also time these variants alone")
    parser.add_argument("--summary-only", action="store_true", help="run nothing; rebuild the summary and the section")
    parser.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    parser.add_argument(
        "--workers", type=int, default=1, help="cpt study --workers: processes on the study at once (2 on a 2-core CPU)"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/continual.py " + " ".join(sys.argv[1:] if argv is None else argv)

    sys.path.insert(0, str(REPO))
    os.chdir(REPO)  # the study's paths are relative to the repository root
    from cpt.study.spec import load_study

    original = load_study(args.study)  # validates every variant before anything runs
    derived = derived_study(
        Path(args.study),
        args.size,
        args.seeds,
        args.variants,
        original.root.parent / f".{original.name}-benchmark.yaml",
    )
    study = load_study(derived)
    study_command = [sys.executable, "-m", "cpt.cli", "study", str(derived)]
    if args.summary_only:
        study_command.append("--summary-only")
    elif args.workers != 1:
        study_command += ["--workers", str(args.workers)]
    seconds, status = timed(study_command, environment())
    if not args.summary_only:
        record_sitting(study.root, seconds, status, command)
    if status != 0:
        sys.exit(f"cpt study exited with status {status}; run the same command again to resume")
    if args.alone:  # any variant of the study file, at this sitting's size, for its first seed
        sized = load_study(args.study, SIZES[args.size])
        run_alone(sized, args.alone, study.spec.seeds[0], study.root)
    if not args.no_record:
        print(record(study.root, args.size, command))


if __name__ == "__main__":
    main()
