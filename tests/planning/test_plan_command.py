"""``cpt plan`` end to end on a tiny model: experts through the cache, the printed plan, the reordered recipe."""

import pytest
import yaml

from cpt.cli import main
from cpt.diagnostics import checkpoint_geometry
from cpt.recipe import load_recipe
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe, three_task_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.mark.slow
def test_plan_prints_the_plan_and_writes_a_reordered_recipe(tmp_path, tiny_model, monkeypatch, capsys):
    from cpt.planning.plan import plan_recipe
    from cpt.study.expert_cache import ExpertCache

    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(
        yaml.safe_dump(
            three_task_recipe(tmp_path, tiny_model, steps=(3, 3, 3), strategy="task_arithmetic"), sort_keys=False
        )
    )
    out = tmp_path / "planned.yaml"

    assert main(["plan", str(recipe_path), "--write", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "planned order (exact, 9 step conflicts measured" in printed  # T·2^(T−1) − T = 9 for T = 3
    assert "given order:" in printed and "cost of planning:" in printed and "(0/3 from the cache)" in printed
    lines = printed.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("planned order ("))
    planned = [line.split()[1] for line in lines[start + 1 : start + 4]]
    assert sorted(planned) == ["plural", "reverse", "upper"]

    # The written recipe: the same recipe with its tasks in the planned order, accepted by `cpt check`.
    original, written = yaml.safe_load(recipe_path.read_text()), yaml.safe_load(out.read_text())
    assert [task["name"] for task in written["tasks"]] == planned
    assert {k: v for k, v in written.items() if k != "tasks"} == {k: v for k, v in original.items() if k != "tasks"}
    assert sorted(written["tasks"], key=lambda t: t["name"]) == sorted(original["tasks"], key=lambda t: t["name"])
    assert out.read_text().startswith(f"# {recipe_path} with its tasks in the order")
    assert main(["check", str(out)]) == 0

    # Planning again trains nothing (every expert from the cache) and finds the same plan.
    cache = ExpertCache(tmp_path / "cache" / "experts")
    result = plan_recipe(load_recipe(recipe_path), cache=cache)
    assert [expert.cache_hit for expert in result.experts] == [True, True, True]
    assert result.planned_tasks == planned
    plan = result.plan
    assert plan.cost <= plan.given_cost
    assert all(0.0 <= value <= 1.0 for value in plan.step_conflicts + plan.given_step_conflicts)
    assert set(result.seconds) == {"experts", "geometry", "search", "total"}

    # Cross-check the first step of the given order with `cpt geometry`'s independent pairwise path:
    # c({plural}, upper) = mean over target tensors of GC(τ_plural, τ_upper).
    folders = [str(expert.folder) for expert in result.experts]
    pairwise = checkpoint_geometry(tiny_model, folders[:2])
    assert plan.given_step_conflicts[0] == pytest.approx(pairwise["pairs"][0]["mean_geometry_conflict"], abs=1e-6)


@pytest.mark.slow
def test_plan_of_lora_experts(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("CPT_CACHE_DIR", str(tmp_path / "cache"))
    recipe = three_task_recipe(tmp_path, tiny_model, steps=(3, 3, 3), strategy="task_arithmetic")
    recipe["peft"] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["plan", str(recipe_path)]) == 0
    printed = capsys.readouterr().out
    assert "planned order (exact" in printed
    values = [float(line.split("conflict ")[1]) for line in printed.splitlines() if " conflict 0." in line]
    assert len(values) == 4 and all(0.0 < value < 1.0 for value in values)


def test_plan_refuses_a_write_path_that_is_a_folder(tmp_path, tiny_model, capsys):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(make_recipe(tmp_path, tiny_model), sort_keys=False))
    assert main(["plan", str(recipe_path), "--write", str(tmp_path)]) == 2
    assert "--write" in capsys.readouterr().err
