"""Recipes over small local data files for end-to-end tests on the tiny model."""

import json
from pathlib import Path

import yaml

WORDS = ["cat", "dog", "tree", "house", "river", "stone", "bird", "cloud", "apple", "chair", "lamp", "door"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_recipe(tmp_path: Path, model: str, *, steps=(4, 4), **extra) -> dict:
    plural = write_jsonl(tmp_path / "plural.jsonl", [{"input": w, "target": w + "s"} for w in WORDS])
    upper = write_jsonl(
        tmp_path / "upper.csv.jsonl",
        [{"word": w, "answer": w.upper(), "choices": [w.upper(), w, w[::-1]]} for w in WORDS],
    )
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "seed": 3,
        "model": {"name_or_path": model},
        "training": {
            "max_steps": steps[0],
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "disable_tqdm": True,
        },
        "evaluation": {"batch_size": 4, "max_new_tokens": 4},
        "tasks": [
            {
                "name": "plural",
                "train": {"path": plural},
                "fields": {"prompt_template": "Plural of {prompt}:", "completion_template": " {completion}"},
                "eval": {"held_out": 4},
            },
            {
                "name": "upper",
                "train": {"path": upper},
                "fields": {"prompt": "word", "completion": "answer", "choices": "choices", "chat": True},
                "eval": {"kind": "choice", "held_out": 4},
                "training": {"max_steps": steps[1]},
            },
        ],
    }
    recipe.update(extra)
    return recipe


# The upper-case task's fields as plain templates (the strategy tests that check prompts in their memory use these).
UPPER_TEMPLATE_FIELDS = {
    "prompt": "word",
    "completion": "answer",
    "prompt_template": "Upper case of {prompt}:",
    "completion_template": " {completion}",
}


def strategy_recipe(
    tmp_path: Path,
    model: str,
    strategy: dict,
    *,
    max_steps: int = 2,
    upper_fields: dict = UPPER_TEMPLATE_FIELDS,
    **extra,
) -> dict:
    """Two tasks (plural, upper; 8 training and 4 held-out rows each) for one strategy's end-to-end run.

    No geometry and no base evaluation, so the run spends its time on what the strategy does; the recipe's name is
    the strategy's name.
    """
    plural = write_jsonl(tmp_path / "plural.jsonl", [{"input": w, "target": w + "s"} for w in WORDS])
    upper = write_jsonl(tmp_path / "upper.jsonl", [{"word": w, "answer": w.upper()} for w in WORDS])
    recipe = {
        "name": strategy["name"],
        "output_dir": str(tmp_path / "runs"),
        "seed": 3,
        "model": {"name_or_path": model},
        "strategy": strategy,
        "training": {
            "max_steps": max_steps,
            "learning_rate": 1e-3,
            "per_device_train_batch_size": 4,
            "logging_steps": 1,
            "disable_tqdm": True,
        },
        "evaluation": {"batch_size": 8, "max_new_tokens": 3, "evaluate_base": False},
        "geometry": {"enabled": False},
        "tasks": [
            {
                "name": "plural",
                "train": {"path": plural},
                "fields": {"prompt_template": "Plural of {prompt}:", "completion_template": " {completion}"},
                "eval": {"held_out": 4},
            },
            {"name": "upper", "train": {"path": upper}, "fields": dict(upper_fields), "eval": {"held_out": 4}},
        ],
    }
    recipe.update(extra)
    return recipe


def three_task_recipe(tmp_path: Path, model: str, *, steps=(2, 2, 2), **extra) -> dict:
    """make_recipe's two tasks (plural, upper) and a third, reversed words, trained ``steps[2]`` steps:
    the smallest sequence with a row 1..T−2 and an order to plan."""
    recipe = make_recipe(tmp_path, model, steps=steps[:2], **extra)
    reverse = write_jsonl(tmp_path / "reverse.jsonl", [{"input": w, "target": w[::-1]} for w in WORDS])
    recipe["tasks"].append(
        {
            "name": "reverse",
            "train": {"path": reverse},
            "fields": {"prompt_template": "Reverse {prompt}:", "completion_template": " {completion}"},
            "eval": {"held_out": 4},
            "training": {"max_steps": steps[2]},
        }
    )
    return recipe


def count_trainings(monkeypatch, fail_at: int | None = None) -> list[str]:
    """Wrap the trainer's train() to record every real training (an expert-cache hit never calls it);
    ``fail_at=n`` raises KeyboardInterrupt in the n-th training, as if the process were killed there."""
    from cpt.training.trainer import CptSFTTrainer

    calls = []
    original = CptSFTTrainer.train

    def counted(self, *args, **kwargs):
        calls.append(self.args.output_dir)
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CptSFTTrainer, "train", counted)
    return calls


#: GCWM with a short inner solve: both branches still run on the tiny model.
FAST_GCWM = {"strategy": "gcwm", "iters": 5, "rank": 4}


def study_recipe(tmp_path: Path, monkeypatch, *, steps=(2, 2, 2)) -> dict:
    """A fresh tiny model, its three-task recipe, and an expert cache of the test's own, offline."""
    from cpt.testing import build_tiny_model

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_tiny_model(tmp_path / "tiny", seed=0)
    return three_task_recipe(tmp_path, str(model), steps=steps)


def write_study(tmp_path: Path, recipe: dict, variants, *, name: str, seeds=(0, 1), resamples: int, **extra) -> Path:
    """``base.yaml`` (``recipe``) and ``study.yaml`` over it in ``tmp_path``, studies under ``tmp_path / "studies"``."""
    recipe_path = tmp_path / "base.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    study = {
        "recipe": str(recipe_path),
        "name": name,
        "output_dir": str(tmp_path / "studies"),
        "seeds": list(seeds),
        "variants": variants,
        "statistics": {"resamples": resamples},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path
