"""General-capability probes: eval-only tasks scored for the base and after every task, never trained."""

import hashlib
import json
from pathlib import Path

import pytest

from cpt.errors import CptError
from cpt.evaluation import continual_metrics, format_matrix_table, general_ability_kept
from cpt.recipe import validate_recipe
from cpt.testing import build_tiny_model

from tiny_recipes import WORDS, make_recipe, write_jsonl


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def probe_file(tmp_path: Path) -> str:
    """A choice probe the tasks never train on: the reversed word among three spellings."""
    rows = [{"word": w, "answer": w[::-1], "options": [w, w[::-1], w.upper()]} for w in WORDS]
    return write_jsonl(tmp_path / "reverse.jsonl", rows)


def reverse_probe(tmp_path: Path) -> dict:
    return {
        "name": "reverse",
        "data": {"path": probe_file(tmp_path)},
        "fields": {
            "prompt": "word",
            "completion": "answer",
            "choices": "options",
            "prompt_template": "Reverse {prompt}:",
        },
        "eval": {"kind": "choice", "max_examples": 6},
    }


# ---------------------------------------------------------------------- the figure
def test_general_ability_kept_hand_worked():
    kept = general_ability_kept([[0.5, 0.8, 0.0], [0.4, 0.8, 0.2], None, [0.25, 0.4, 0.1]], ["a", "b", "c"])
    # The last row present is row 3 (row 2 not evaluated): 0.25/0.5 and 0.4/0.8; c's base is 0 (undefined).
    assert kept["per_probe"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.5), "c": None}
    assert kept["mean"] == pytest.approx(0.5) and kept["last_row"] == 3
    only_base = general_ability_kept([[0.5], None, None], ["a"])
    assert only_base["per_probe"] == {"a": None} and only_base["mean"] is None
    with pytest.raises(CptError, match="probe row 1 has 2 entries for 1 probes"):
        general_ability_kept([[0.5], [0.1, 0.2]], ["a"])


def test_matrix_table_shows_probe_columns_outside_the_metrics():
    rows = [[0.1, 0.2], [0.5, 0.1], [0.3, 0.6]]
    table = format_matrix_table(rows, ["a", "b"], probe_rows=[[0.4], [0.3], [0.2]], probe_names=["gen"])
    lines = table.splitlines()
    assert lines[0].split() == ["state", "a", "b", "probe:gen"]
    assert lines[2].split() == ["base", "0.100", "0.200", "0.400"]
    assert lines[4].split() == ["after", "b", "0.300", "0.600", "0.200"]
    assert lines[-1] == "general ability kept (probe after last task / base): gen 0.500 (mean 0.500)"
    # The metrics line is the table's without probes: probes never enter ACC/BWT/FWT/forgetting.
    assert lines[-2] == format_matrix_table(rows, ["a", "b"]).splitlines()[-1]


# ---------------------------------------------------------------------- the recipe
def test_probe_recipe_validation(tmp_path, tiny_model):
    base = make_recipe(tmp_path, tiny_model)
    with pytest.raises(CptError, match=r"probes\[0\]: .*exactly one of 'data' .* or 'lm_eval'"):
        validate_recipe({**base, "probes": [{"name": "x"}]})
    with pytest.raises(CptError, match=r"probes\[0\]: eval.data and eval.held_out do not apply"):
        validate_recipe({**base, "probes": [{**reverse_probe(tmp_path), "eval": {"held_out": 2}}]})
    with pytest.raises(CptError, match="probe name 'reverse' is used twice"):
        validate_recipe({**base, "probes": [reverse_probe(tmp_path)] * 2})
    with pytest.raises(CptError, match=r"probes\[0\].lm_eval: .*exactly one of 'task' or 'yaml'"):
        validate_recipe({**base, "probes": [{"name": "x", "lm_eval": {"num_fewshot": 0}}]})


def test_fingerprint_unchanged_without_probes_and_changed_with_them(tmp_path, tiny_model):
    plain = validate_recipe(make_recipe(tmp_path, tiny_model))
    # The hash as computed before probes (and max_shard_size and evaluation.rows, also left out) existed: old run
    # directories resume.
    dumped = plain.model_dump(
        mode="json", exclude={"divergence": True, "probes": True, "max_shard_size": True, "evaluation": {"rows"}}
    )
    assert plain.fingerprint() == hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()[:16]
    probed = validate_recipe({**make_recipe(tmp_path, tiny_model), "probes": [reverse_probe(tmp_path)]})
    assert probed.fingerprint() != plain.fingerprint()  # like the evaluation settings, probes are in the hash


# ---------------------------------------------------------------------- a run
def test_tiny_run_scores_probes_for_base_and_every_task(tmp_path, tiny_model, capsys):
    from cpt.evaluation.outcomes import outcomes_path, read_outcomes
    from cpt.report import write_report
    from cpt.runner import TaskSequenceRunner

    recipe = validate_recipe(make_recipe(tmp_path, tiny_model, steps=(2, 2), probes=[reverse_probe(tmp_path)]))
    result = TaskSequenceRunner(recipe).run()
    run_dir = recipe.run_dir
    matrix = json.loads((run_dir / "eval" / "matrix.json").read_text())

    assert matrix["tasks"] == ["plural", "upper"] and matrix["probes"] == ["reverse"]
    assert len(matrix["probe_rows"]) == len(matrix["rows"]) == 3
    assert all(len(row) == 1 and 0.0 <= row[0] <= 1.0 for row in matrix["probe_rows"])
    # Each probe score is the fraction right of its own outcomes file; the probe saw 6 examples per row.
    for row in range(3):
        records = read_outcomes(outcomes_path(run_dir / "eval", row, "probe-reverse"))
        assert len(records) == 6 and all(record["kind"] == "choice" for record in records)
        assert sum(record["correct"] for record in records) / 6 == pytest.approx(matrix["probe_rows"][row][0])

    base, last = matrix["probe_rows"][0][0], matrix["probe_rows"][2][0]
    expected = last / base if base > 0 else None
    assert result.general_ability["per_probe"]["reverse"] == pytest.approx(expected)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["general_ability_kept"]["per_probe"]["reverse"] == pytest.approx(expected)
    # Probes are absent from the continual metrics: they are those of the task matrix alone.
    assert result.metrics == continual_metrics(matrix["rows"], matrix["expert_scores"])
    assert result.metrics["acc"] == pytest.approx(sum(matrix["rows"][2]) / 2)
    assert matrix["metrics"] == result.metrics

    printed = capsys.readouterr().out
    assert "probe:reverse" in printed and "general ability kept (probe after last task / base): reverse" in printed

    report = (run_dir / "report.md").read_text()
    assert "## General ability (probes)" in report and "probe:reverse" in report
    kept_text = "-" if expected is None else f"{expected:.3f}"
    assert f"| reverse | {base:.3f} | {last:.3f} | {kept_text} |" in report

    # A study variant given this run's base row gets its probe scores too; one given a base row
    # without them (copied by an older cpt) scores the base on the probes at setup.
    from cpt.study.run import _share_base_row

    variant = validate_recipe({**recipe.model_dump(mode="json"), "name": "tiny-variant"})
    assert _share_base_row(TaskSequenceRunner(variant), run_dir)
    shared = json.loads((variant.run_dir / "eval" / "matrix.json").read_text())
    assert shared["probes"] == ["reverse"] and shared["probe_rows"] == [matrix["probe_rows"][0], None, None]
    assert (variant.run_dir / "eval" / "0_probe-reverse.jsonl").is_file()
    del shared["probes"], shared["probe_rows"]
    (variant.run_dir / "eval" / "matrix.json").write_text(json.dumps(shared))
    again = TaskSequenceRunner(variant)
    again.setup()
    assert again.matrix["probe_rows"][0] == pytest.approx(matrix["probe_rows"][0])
    assert again.matrix["rows"][0] == matrix["rows"][0]

    # A matrix.json from before probes (no probes keys) still loads and reports, without the section.
    del matrix["probes"], matrix["probe_rows"]
    (run_dir / "eval" / "matrix.json").write_text(json.dumps(matrix))
    write_report(run_dir)
    old = (run_dir / "report.md").read_text()
    assert "General ability" not in old and "probe:" not in old and "## Accuracy matrix" in old


def test_study_summary_lists_general_ability_kept(tmp_path):
    """The study summary adds the kept figure per variant, averaged over its finished seeds."""
    from types import SimpleNamespace

    from cpt.study.summary import _general_ability_by_variant, format_summary

    runs = tmp_path / "runs"
    variants = [SimpleNamespace(name="seq"), SimpleNamespace(name="avg")]
    probe_rows = {
        ("seq", 0): [[0.5], [0.4], [0.25]],
        ("seq", 1): [[0.5], [0.5], [0.5]],
        ("avg", 0): [[0.5], None, None],
    }
    for (variant, seed), rows in probe_rows.items():
        folder = runs / f"{variant}-{seed}" / "eval"
        folder.mkdir(parents=True)
        (folder / "matrix.json").write_text(json.dumps({"probes": ["gen"], "probe_rows": rows}))
    study = SimpleNamespace(
        variants=variants,
        spec=SimpleNamespace(seeds=[0, 1]),
        runs_dir=runs,
        run_name=lambda variant, seed: f"{variant.name}-{seed}",
    )
    finished = {("seq", 0): True, ("seq", 1): True, ("avg", 0): True, ("avg", 1): False}
    kept = _general_ability_by_variant(study, finished)
    assert kept["seq"] == {"mean": pytest.approx(0.75), "per_probe": {"gen": pytest.approx(0.75)}, "seeds": 2}
    assert kept["avg"] == {"mean": None, "per_probe": {"gen": None}, "seeds": 1}
    summary = {
        "study": "s",
        "recipe": "r.yaml",
        "seeds": [0, 1],
        "pending_runs": [],
        "statistics": {"confidence": 0.95, "seeds": [0], "resamples": 10, "variants": {}, "pairs": []},
        "note": "n",
        "variants": [],
        "costs": {
            "train_seconds": 0,
            "eval_seconds": 0,
            "integration_seconds": 0,
            "experts_trained": 0,
            "experts_reused": 0,
        },
        "general_ability_kept": kept,
    }
    text = format_summary(summary)
    assert "| seq | 0.750 | gen 0.750 |" in text and "| avg | - | gen - |" in text


# ---------------------------------------------------------------------- lm-evaluation-harness
LM_EVAL_YAML = """task: cpt_reverse_probe
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Reverse {{{{word}}}}:"
doc_to_choice: options
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_task(tmp_path: Path) -> Path:
    rows = [{"word": w, "options": [w, w[::-1], w.upper()], "label": 1} for w in WORDS[:6]]
    data = write_jsonl(tmp_path / "lm_eval_reverse.jsonl", rows)
    path = tmp_path / "lm_eval_probe" / "reverse.yaml"
    path.parent.mkdir()
    path.write_text(LM_EVAL_YAML.format(data=data))
    return path


def test_lm_eval_probe_scores_a_local_task_yaml(tmp_path, tiny_model):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra 'lm-eval' (not installed)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.evaluation import ChoiceExample, evaluate_choice
    from cpt.evaluation.lm_eval_probe import evaluate_lm_eval
    from cpt.evaluation.outcomes import read_outcomes
    from cpt.recipe import LmEvalSpec

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    outcomes = tmp_path / "0_probe-reverse.jsonl"
    spec = LmEvalSpec(yaml=str(lm_eval_task(tmp_path)), num_fewshot=0)
    score = evaluate_lm_eval(model, tokenizer, spec, batch_size=4, outcomes_file=outcomes)

    records = read_outcomes(outcomes)
    assert [record["id"] for record in records] == list(range(6))
    assert score == pytest.approx(sum(record["correct"] for record in records) / 6)
    assert records[0]["prompt"] == "Reverse cat:" and records[0]["reference"] == 1
    # Cross-check with cpt's own log-likelihood choice scorer on the same prompts and options
    # (lm-eval puts the target delimiter " " before each option).
    examples = [
        ChoiceExample(prompt=f"Reverse {w}:", choices=[f" {o}" for o in (w, w[::-1], w.upper())], label=1)
        for w in WORDS[:6]
    ]
    own = evaluate_choice(model, tokenizer, examples, batch_size=4)
    assert score == pytest.approx(own.score)

    with pytest.raises(CptError, match="'f1' is not a metric of the task; it reports: acc"):
        evaluate_lm_eval(model, tokenizer, LmEvalSpec(yaml=spec.yaml, metric="f1", limit=2))


def test_lm_eval_probe_missing_extra_is_one_line(monkeypatch, tmp_path):
    import builtins

    from cpt.evaluation.lm_eval_probe import evaluate_lm_eval
    from cpt.recipe import LmEvalSpec

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(CptError, match=r"pip install 'cpt\[lm-eval\]'"):
        evaluate_lm_eval(None, None, LmEvalSpec(task="arc_easy"))


def test_run_with_an_lm_eval_probe(tmp_path, tiny_model):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra 'lm-eval' (not installed)")
    from cpt.evaluation.outcomes import outcomes_path, read_outcomes
    from cpt.runner import TaskSequenceRunner

    data = make_recipe(tmp_path, tiny_model, steps=(1, 1))
    data["tasks"] = data["tasks"][:1]
    data["geometry"] = {"enabled": False}
    data["evaluation"]["evaluate_experts"] = False
    data["probes"] = [{"name": "lm-reverse", "lm_eval": {"yaml": str(lm_eval_task(tmp_path)), "limit": 4}}]
    recipe = validate_recipe(data)
    result = TaskSequenceRunner(recipe).run()
    matrix = json.loads((recipe.run_dir / "eval" / "matrix.json").read_text())
    assert matrix["probes"] == ["lm-reverse"] and len(matrix["probe_rows"]) == 2
    for row in range(2):
        records = read_outcomes(outcomes_path(recipe.run_dir / "eval", row, "probe-lm-reverse"))
        assert len(records) == 4 and all(record["kind"] == "lm-eval" for record in records)
        assert matrix["probe_rows"][row][0] == pytest.approx(sum(record["correct"] for record in records) / 4)
    base, last = matrix["probe_rows"][0][0], matrix["probe_rows"][1][0]
    assert result.general_ability["per_probe"]["lm-reverse"] == (pytest.approx(last / base) if base > 0 else None)


def test_probe_data_errors_name_the_probe(tmp_path, tiny_model):
    from cpt.runner import TaskSequenceRunner

    missing = {**reverse_probe(tmp_path), "data": {"path": str(tmp_path / "missing.jsonl")}}
    recipe = validate_recipe(make_recipe(tmp_path, tiny_model, probes=[missing]))
    with pytest.raises(CptError, match=r"probes\[0\].data.path: file .*missing.jsonl' not found"):
        TaskSequenceRunner(recipe)._build_probe_data()
    wrong_column = {
        **reverse_probe(tmp_path),
        "fields": {"prompt": "nope", "completion": "answer", "choices": "options"},
    }
    recipe = validate_recipe(make_recipe(tmp_path, tiny_model, probes=[wrong_column]))
    with pytest.raises(CptError, match=r"probes\[0\].fields.prompt: column 'nope' not in the data"):
        TaskSequenceRunner(recipe)._build_probe_data()
