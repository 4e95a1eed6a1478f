"""GCWMMergeCache: a cached merge is the computed merge bit for bit, keyed on exactly what changes ``m``.

Plus the study wiring: GCWM variants whose ``m_t`` agree (``step_coef`` 0.2 and ``norm``) read
each other's merges, and the run that read them equals the same run computed from scratch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cpt.merging.gcwm import GCWMMergeCache, GCWMParams, gcwm_continual_step, gcwm_merge, shares_merges
from cpt.merging.gcwm.cache import AFTER_MERGE_FIELDS, merge_fields

PARAMS = GCWMParams(rank=4, energy=0.9, iters=5, lr=1e-3, gate_threshold=2.0)  # α low: both branches solve


def deltas(seed: int, batch: int = 3, shape=(12, 10)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator) * 0.01


def assert_same(first, second):
    merged, stats = first
    other_merged, other_stats = second
    assert torch.equal(merged, other_merged)
    assert stats.keys() == other_stats.keys()
    for name in stats:
        assert stats[name].dtype == other_stats[name].dtype and stats[name].shape == other_stats[name].shape
        assert torch.equal(stats[name].nan_to_num(-7.0), other_stats[name].nan_to_num(-7.0)), name


def test_a_cached_merge_is_the_computed_one_bit_for_bit(tmp_path):
    previous, task = deltas(0), deltas(1)
    direct = gcwm_merge([previous, task], [1.0, 1.0], PARAMS, diagnostics=True)
    cache = GCWMMergeCache(tmp_path)
    first = cache([previous, task], [1.0, 1.0], PARAMS, diagnostics=True)
    assert (cache.hits, cache.misses) == (0, 3) and len(list(tmp_path.glob("*.safetensors"))) == 3
    assert_same(first, direct)
    assert bool((direct[1]["branch"] == 2).all()), "both inner solves ran"
    second = cache([previous, task], [1.0, 1.0], PARAMS, diagnostics=True)
    assert (cache.hits, cache.misses) == (3, 3)
    assert_same(second, direct)
    # Each entry carries its share of the batch's merge seconds; a read adds up exactly those.
    recorded = []
    for path in tmp_path.glob("*.safetensors"):
        with safe_open(path, "pt") as handle:
            recorded.append(float(handle.metadata()["seconds"]))
    assert len(set(recorded)) == 1 and recorded[0] > 0, "a batch's tensors share its solve"
    assert cache.seconds_read == pytest.approx(sum(recorded)) and cache.unpriced == 0
    assert cache.counts() == {"read": 3, "merged": 3, "seconds_saved": round(sum(recorded), 3), "unpriced": 0}
    # Another instance on the same folder (the next run of a study) reads the same entries.
    assert_same(GCWMMergeCache(tmp_path)([previous, task], [1.0, 1.0], PARAMS, diagnostics=True), direct)


def test_the_key_changes_with_what_changes_m_and_only_with_it(tmp_path):
    cache = GCWMMergeCache(tmp_path)
    previous, task = deltas(0)[0], deltas(1)[0]
    settings = {"adam_dtype": "torch.float32"}
    key = cache.key([previous, task], [1.0, 1.0], PARAMS, settings)
    after_merge = GCWMParams(**{**merge_fields(PARAMS), "step_coef": "norm", "decay": 1.0, "non_target": "base"})
    assert cache.key([previous, task], [1.0, 1.0], after_merge, settings) == key
    assert AFTER_MERGE_FIELDS == {"step_coef", "decay", "non_target"}
    assert shares_merges(PARAMS, after_merge) and not shares_merges(PARAMS, GCWMParams(rank=5))
    nudged = task.clone()
    nudged[3, 4] = torch.nextafter(nudged[3, 4], torch.tensor(1.0))  # one ulp of one entry
    changed = [
        cache.key([previous, nudged], [1.0, 1.0], PARAMS, settings),
        cache.key([task, previous], [1.0, 1.0], PARAMS, settings),  # order of the active set
        cache.key([previous, task], [0.5, 1.0], PARAMS, settings),
        cache.key([previous, task], [1.0, 1.0], GCWMParams(**{**merge_fields(PARAMS), "lr": 2e-3}), settings),
        cache.key([previous, task], [1.0, 1.0], GCWMParams(**{**merge_fields(PARAMS), "gate": "none"}), settings),
        cache.key([previous, task], [1.0, 1.0], PARAMS, {"adam_dtype": "torch.float64"}),
        cache.key([previous.double(), task.double()], [1.0, 1.0], PARAMS, settings),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_a_corrupted_or_truncated_entry_is_recomputed_never_used(tmp_path):
    previous, task = deltas(2), deltas(3)
    cache = GCWMMergeCache(tmp_path)
    direct = cache([previous, task], [1.0, 1.0], PARAMS)
    entries = sorted(tmp_path.glob("*.safetensors"))
    # flip one byte of the first entry's merged tensor (its last bytes), truncate the second
    data = bytearray(entries[0].read_bytes())
    data[-3] ^= 0x40
    entries[0].write_bytes(bytes(data))
    entries[1].write_bytes(entries[1].read_bytes()[:-100])
    again = GCWMMergeCache(tmp_path)
    assert_same(again([previous, task], [1.0, 1.0], PARAMS), direct)
    assert (again.hits, again.misses) == (0, 3), "a batch with a bad entry is merged again"
    assert all(set(load_file(entry)) >= {"merged"} for entry in entries)  # replaced by good entries
    assert_same(GCWMMergeCache(tmp_path)([previous, task], [1.0, 1.0], PARAMS), direct)


def test_entries_without_recorded_seconds_are_read_and_counted_unpriced(tmp_path):
    previous, task = deltas(4), deltas(5)
    cache = GCWMMergeCache(tmp_path)
    direct = cache([previous, task], [1.0, 1.0], PARAMS)
    for path in tmp_path.glob("*.safetensors"):  # as an entry written before merges carried their seconds
        with safe_open(path, "pt") as handle:
            metadata = {key: value for key, value in handle.metadata().items() if key != "seconds"}
        save_file(load_file(path), path, metadata=metadata)
    reader = GCWMMergeCache(tmp_path)
    assert_same(reader([previous, task], [1.0, 1.0], PARAMS), direct)
    assert reader.counts() == {"read": 3, "merged": 0, "seconds_saved": 0.0, "unpriced": 3}


def test_a_cache_that_cannot_store_never_fails_the_merge(tmp_path, monkeypatch):
    import cpt.merging.gcwm.cache as cache_module

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", disk_full)
    previous, task = deltas(6), deltas(7)
    cache = GCWMMergeCache(tmp_path)
    with pytest.warns(UserWarning, match="cannot store a merge"):
        merged = cache([previous, task], [1.0, 1.0], PARAMS)
    assert_same(merged, gcwm_merge([previous, task], [1.0, 1.0], PARAMS))
    assert cache.write_failed and not any(tmp_path.iterdir()), "no entry and no temporary file left"


def test_one_delta_merges_are_not_stored_and_the_continual_step_takes_the_cache(tmp_path):
    cache = GCWMMergeCache(tmp_path)
    task_1, task_2 = deltas(4), deltas(5)
    params = GCWMParams(**{**merge_fields(PARAMS), "step_coef": 0.2})
    m_1, increment_1, _ = gcwm_continual_step(1, task_1, None, None, params, merge_fn=cache)
    assert torch.equal(m_1, task_1) and not any(tmp_path.iterdir()), "m_1 = τ_1: nothing to store"
    computed = gcwm_continual_step(2, task_2, m_1, None, params, diagnostics=True)
    cached = gcwm_continual_step(2, task_2, m_1, None, params, diagnostics=True, merge_fn=cache)
    for one, other in zip(computed[:2], cached[:2], strict=True):
        assert torch.equal(one, other)
    norm_params = GCWMParams(**{**merge_fields(PARAMS), "step_coef": "norm"})
    read = gcwm_continual_step(2, task_2, m_1, None, norm_params, coefficient=1.0, diagnostics=True, merge_fn=cache)
    assert cache.hits == 3 and torch.equal(read[0], computed[0])
    assert torch.equal(read[1], computed[0] - m_1), "the increment still follows the run's own c_t"


@pytest.mark.slow
def test_study_variants_that_share_m_t_read_each_others_merges(tmp_path, monkeypatch):
    """gcwm at step_coef 0.2 and 'norm' on the same experts: the second reads every merge the first
    stored, and its run equals the same run computed from scratch (state, history, records)."""
    from cpt.cli import main
    from cpt.study.run import run_study
    from cpt.study.spec import load_study

    from tiny_recipes import FAST_GCWM as gcwm
    from tiny_recipes import study_recipe, write_study

    recipe = study_recipe(tmp_path, monkeypatch)
    path = write_study(
        tmp_path,
        recipe,
        [{**gcwm, "step_coef": [0.2, "norm"]}, {**gcwm, "name": "gcwm-lr", "lr": 2e-5}],
        name="shared",
        seeds=[0],
        resamples=200,
        keep_weights=True,  # compared with the run alone below
    )
    study = load_study(path)
    logs = []
    monkeypatch.setattr("cpt.study.run.log", logs.append)
    run_study(study)
    shared = [line for line in logs if "GCWM merges shared" in line]
    assert len(shared) == 2, logs  # the lr variant computes another m_t: no cache
    first, second = shared
    assert first.startswith("gcwm-step_coef0.2-seed0") and " 0 tensors read" in first
    assert second.startswith("gcwm-step_coefnorm-seed0") and " 0 merged" in second
    assert not (study.root / "merges").exists(), "a seed's merges are removed once its variants are done"
    # Each task's share is in the manifests: the reader saved, step by step, what the first run's merges cost.
    tasks = {
        name: json.loads((study.runs_dir / name / "manifest.json").read_text())["tasks"]
        for name in ("gcwm-step_coef0.2-seed0", "gcwm-step_coefnorm-seed0")
    }
    made, read = tasks["gcwm-step_coef0.2-seed0"], tasks["gcwm-step_coefnorm-seed0"]
    nothing = {"read": 0, "merged": 0, "seconds_saved": 0.0, "unpriced": 0}
    assert made[0]["gcwm_merge_cache"] == read[0]["gcwm_merge_cache"] == nothing  # step 1: m = τ_1, not stored
    for producer, reader in zip(made[1:], read[1:]):
        produced, taken = producer["gcwm_merge_cache"], reader["gcwm_merge_cache"]
        assert produced["read"] == 0 and produced["merged"] > 0 and produced["seconds_saved"] == 0.0
        assert taken["merged"] == 0 and taken["read"] == produced["merged"] and taken["unpriced"] == 0
        assert 0 < taken["seconds_saved"] <= producer["integration_seconds"], "the merges are part of the step"

    # The same run from scratch, without a cache: the same files, bit for bit.
    alone = yaml_recipe(tmp_path, path, study, "gcwm-step_coefnorm-seed0")
    assert main(["run", str(alone)]) == 0
    shared_run = study.runs_dir / "gcwm-step_coefnorm-seed0"
    fresh_run = tmp_path / "alone" / "gcwm-step_coefnorm-seed0"
    for relative in ("state/model.safetensors", "history/step-3/merged"):
        assert_files_equal(shared_run / relative, fresh_run / relative)
    for relative in ("eval/matrix.json",):
        assert (
            json.loads((shared_run / relative).read_text())["rows"]
            == json.loads((fresh_run / relative).read_text())["rows"]
        )


def yaml_recipe(tmp_path: Path, study_path: Path, study, run_name: str) -> Path:
    """The resolved recipe of one study run, written to run alone under ``tmp_path / "alone"``."""
    import yaml

    recipe = yaml.safe_load((study.runs_dir / run_name / "recipe.yaml").read_text())
    recipe["output_dir"] = str(tmp_path / "alone")
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or every tensor of the safetensors files in a folder."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {name: value for file in files for name, value in load_file(file).items()}


def assert_files_equal(first: Path, second: Path) -> None:
    first_tensors, second_tensors = tensors_of(first), tensors_of(second)
    assert first_tensors.keys() == second_tensors.keys() and first_tensors
    for name in first_tensors:
        assert torch.equal(first_tensors[name], second_tensors[name]), name
