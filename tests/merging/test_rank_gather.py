"""The gather contract of merge strategies (``cpt.merging.contract.MergeStrategy``), in memory.

A strategy with whole-model quantities splits its step across ranks when every rank, from
its own share of the batches, ends the step with the one-process values: a pre-pass reduces
exact per-rank partials (:func:`~cpt.merging.contract.gather_shares`), and what ``merge``
accumulated is gathered before ``end_step`` (``rank_partials`` / ``absorb_rank_partials``).

Here the ranks are threads that exchange partials through a barrier — the protocol of
``cpt.merging.batch_io._run_merge_split`` without files or ``torch.distributed`` — so every
strategy's contract is checked against the one-process protocol of ``test_baselines`` in
milliseconds, for several splits of the batches. The real 2-process runs (torchrun, gloo,
files) are in ``tests/test_multirank_integration.py``.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import test_baselines
import torch
from test_baselines import merge_batches, run_steps

from cpt.merging.contract import gather_shares, ordered_union
from cpt.merging.magnitude import kth_largest_magnitudes
from cpt.strategies import get_strategy

TARGETS = {
    f"model.layers.{layer}.{module}.weight"
    for layer in range(3)
    for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj")
}


def tiny_model(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4)}
    for name in sorted(TARGETS):
        shapes[name] = (8, 4) if "up_proj" in name else (4, 4)
    for layer in range(3):
        shapes[f"model.layers.{layer}.input_layernorm.weight"] = (4,)
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


BASE = tiny_model(0)
EXPERTS = [
    {name: value + 0.1 * noise for (name, value), noise in zip(BASE.items(), tiny_model(s).values())} for s in (1, 2, 3)
]

CASES = {
    "gcwm": ("gcwm", {"iters": 3, "rank": 2, "bary_iters": 4, "history_rank": -1}),
    "gcwm_norm_all_history": (
        "gcwm",
        {"iters": 3, "rank": 2, "bary_iters": 4, "history_rank": -1, "step_coef": "norm", "memory": "all_history"},
    ),
    "opcm": ("opcm", {"alpha": 0.5}),
    "ties_running": ("ties", {"density": 0.5}),
    "ties_fusionbench": ("ties", {"form": "fusionbench", "density": 0.3}),
    "localize_stitch": ("localize_stitch", {"sparsity": 0.2, "non_target": "average"}),
    "localize_stitch_gt": ("localize_stitch", {"sparsity": 0.3, "threshold": "gt", "non_target": "task_arithmetic"}),
    "lines_ta": ("lines", {"num_layers": 3}),
    "lines_ties": ("lines", {"base": "ties", "num_layers": 3}),
}


class _RankSource:
    """One rank's view of a step: its share of the batches and a gather across the rank threads."""

    def __init__(self, share, rank: int, exchange: dict, barrier: threading.Barrier, context):
        self.share, self.rank, self.exchange, self.barrier, self.context = share, rank, exchange, barrier, context

    def iterate(self):
        yield from self.share

    def gather(self, compute):
        self.exchange[self.rank] = compute()
        self.barrier.wait()
        gathered = [self.exchange[rank] for rank in range(self.barrier.parties)]
        self.barrier.wait()  # everyone has read before the next gather writes
        return gathered


def batches_of(state: dict, expert: dict) -> list[tuple]:
    """Equal-shape batches of one kind, as ``BatchSource.groups`` makes them (one batch per shape here)."""
    grouped: dict[tuple, list[str]] = {}
    for name in BASE:
        grouped.setdefault((name in TARGETS, tuple(BASE[name].shape)), []).append(name)
    groups = []
    for (target, _shape), names in grouped.items():
        b, s, e = (torch.stack([tensors[n] for n in names]).float() for tensors in (BASE, state, expert))
        groups.append((target, names, None, b, s, e, e - b))
    return groups


def rank_step(strategy, scalars: dict, source: _RankSource, step: int, kept: dict, order: list[str]) -> dict:
    """One rank's step of ``_run_merge_split``: begin_step (its pre-pass gathers), merge its
    share, gather the partials, end_step, and rank 0's rescale applied to its own tensors."""
    keys = strategy.history_keys(step, scalars)
    strategy.begin_step(step, source, scalars)
    new_state, new_kept, step_stats = merge_batches(strategy, source.share, step, keys, kept, scalars)
    strategy.absorb_rank_partials(source.gather(strategy.rank_partials), order)
    summary = strategy.end_step(step, scalars)
    scale = source.gather(lambda: strategy.finalize_scale(step, scalars))[0]  # rank 0's
    if scale is not None:
        new_state = {n: BASE[n] + scale * (v - BASE[n]) for n, v in new_state.items()}
    return {"state": new_state, "kept": new_kept, "stats": step_stats, "summary": summary, "scalars": scalars}


def run_steps_split(make_strategy, owners_of, world_size: int, context):
    """``run_steps`` with the batches of every step divided among ``world_size`` rank threads.

    ``owners_of(groups)`` gives each batch's rank. Returns (states, per-tensor stats, rank 0's
    summaries); checks that every rank ends each step with the same summary and scalars."""
    strategies = [make_strategy() for _ in range(world_size)]
    state = {name: value.clone() for name, value in BASE.items()}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    scalars = [{} for _ in range(world_size)]
    states, stats, summaries = [], [], []
    for step, expert in enumerate(EXPERTS, start=1):
        groups = batches_of(state, expert)
        owners = owners_of(groups)
        order = [name for _, names, *_ in groups for name in names]
        barrier, exchange = threading.Barrier(world_size), {}
        results: list[dict | None] = [None] * world_size
        errors: list[BaseException] = []

        def run(rank: int, barrier=barrier, exchange=exchange, results=results, errors=errors, **arguments) -> None:
            try:
                results[rank] = rank_step(**arguments)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                barrier.abort()

        threads = []
        for rank in range(world_size):
            share = [group for group, owner in zip(groups, owners, strict=True) if owner == rank]
            arguments = {
                "strategy": strategies[rank],
                "scalars": json.loads(json.dumps(scalars[rank])),  # as read back from scalars.json
                "source": _RankSource(share, rank, exchange, barrier, context),
                "step": step,
                "kept": kept,
                "order": order,
            }
            threads.append(threading.Thread(target=run, args=(rank,), kwargs=arguments))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for rank in range(1, world_size):  # every rank ends the step with the same summary and scalars
            assert_same(results[rank]["scalars"], results[0]["scalars"], rel=0)
            assert_same(results[rank]["summary"], results[0]["summary"], rel=0)
        scalars = [result["scalars"] for result in results]
        state = {name: value for result in results for name, value in result["state"].items()}
        kept = {}
        for result in results:
            for key, tensors in result["kept"].items():
                kept.setdefault(key, {}).update(tensors)
        states.append(state)
        stats.append({name: value for result in results for name, value in result["stats"].items()})
        summaries.append(results[0]["summary"])
    return states, stats, summaries


def assert_same(one, two, path: str = "", rel: float = 1e-9) -> None:
    """Equal structures, key order included; floats to ``rel`` (only the order of float64 sums differs)."""
    if isinstance(one, dict):
        assert list(two) == list(one), f"{path}: keys {list(one)} != {list(two)}"
        for key in one:
            assert_same(one[key], two[key], f"{path}/{key}", rel)
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), path
        for index, (a, b) in enumerate(zip(one, two, strict=True)):
            assert_same(a, b, f"{path}[{index}]", rel)
    elif isinstance(one, float) and isinstance(two, float) and not (math.isnan(one) and math.isnan(two)):
        assert math.isclose(one, two, rel_tol=rel, abs_tol=1e-12), f"{path}: {one} != {two}"
    elif not (isinstance(one, float) and math.isnan(one)):
        assert one == two, f"{path}: {one!r} != {two!r}"


def round_robin(world_size: int):
    return lambda groups: [index % world_size for index in range(len(groups))]


def targets_on_one_rank(groups):
    """Every target batch on rank 1, the rest on rank 0 (rank 0 has no target tensor)."""
    return [1 if target else 0 for target, *_ in groups]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "split",
    [("two ranks", 2, round_robin(2)), ("three ranks", 3, round_robin(3)), ("targets apart", 2, targets_on_one_rank)],
)
def test_split_step_gives_the_one_process_step(case, split, tmp_path, monkeypatch, one_thread):
    """3 steps: every rank's summary and carried scalars, the states and per-tensor stats are the one-process ones."""
    name, params = CASES[case]
    _, world_size, owners_of = split
    context = SimpleNamespace(history_dir=tmp_path / "history", base_dir=tmp_path, step=1)  # LiNeS ties' pre-pass
    plain_source = test_baselines._Source

    def one_process_source(groups):  # test_baselines' source, with the context LiNeS' pre-pass reads
        source = plain_source(groups)
        source.context = context
        return source

    monkeypatch.setattr(test_baselines, "_Source", one_process_source)
    states_one, stats_one, summaries_one = run_steps(get_strategy(name).build(params), BASE, EXPERTS, TARGETS)
    states, stats, summaries = run_steps_split(lambda: get_strategy(name).build(params), owners_of, world_size, context)

    for step in range(len(EXPERTS)):
        assert sorted(states[step]) == sorted(states_one[step])
        for tensor_name, value in states_one[step].items():
            torch.testing.assert_close(states[step][tensor_name], value, rtol=0, atol=1e-6, msg=tensor_name)
        assert_same(stats_one[step], {tensor_name: stats[step][tensor_name] for tensor_name in stats_one[step]})
        assert_same(summaries_one[step], summaries[step])


# ---------------------------------------------------------------------- the pieces
def test_kth_largest_over_shares_is_the_whole_model_value():
    """Histograms of every share added after each pass: the exact value of one stream over all chunks."""
    generator = torch.Generator().manual_seed(5)
    chunks = [
        torch.randn(n, generator=generator) * scale for n, scale in ((50, 1.0), (7, 30.0), (200, 1e-3), (33, 2.0))
    ]
    chunks.append(chunks[0][:5].clone())  # ties across shares
    shares = [[chunks[0], chunks[3]], [chunks[1], chunks[2], chunks[4]], []]  # one rank holds nothing
    current: list[list[torch.Tensor]] = [[]]

    def stream():
        return ((chunk, 2 * chunk) for chunk in current[0])

    def gather(compute):  # the ranks, one after the other
        results = []
        for share in shares:
            current[0] = share
            results.append(compute())
        return results

    everything = torch.cat(chunks).abs()
    k = int(0.2 * everything.numel())
    for ranks, expected in (
        ([1, 17], [float(everything.max()), 2 * float(everything.topk(17).values[-1])]),
        (
            [everything.numel(), lambda size: int(0.2 * size)],
            [float(everything.min()), 2 * float(everything.topk(k).values[-1])],
        ),
        ([0, everything.numel() + 1], [float("inf"), 0.0]),
        ([5, 0], [float(everything.topk(5).values[-1]), float("inf")]),
    ):
        split = kth_largest_magnitudes(stream, ranks, gather=gather)
        current[0] = chunks
        assert split == kth_largest_magnitudes(stream, ranks) == expected


def test_ordered_union_follows_the_one_process_order():
    parts = [{"b": 2, "d": 4}, {"a": 1, "x": 9}, {"c": 3}]
    merged = ordered_union(parts, ["a", "b", "c", "d"])
    assert list(merged.items()) == [("a", 1), ("b", 2), ("c", 3), ("d", 4), ("x", 9)]
    with pytest.raises(ValueError, match="b was merged on two ranks"):
        ordered_union([{"b": 1}, {"b": 2}], ["b"])


def test_gather_shares_in_one_process():
    class Plain:  # a source without gather (unit tests): the partial itself
        pass

    assert gather_shares(Plain(), lambda: 7) == [7]
    from cpt import ranks

    assert ranks.gather_guarded(lambda: {"x": 1}, "phase") == [{"x": 1}]
    with pytest.raises(ZeroDivisionError):  # one process: the exception itself, unwrapped
        ranks.gather_guarded(lambda: 1 / 0, "phase")


# ---------------------------------------------------------------------- real processes (gloo)
def gloo_worker(out: Path) -> None:
    """One rank of :func:`test_guarded_gathers_over_two_processes` (run under torch.distributed.run)."""
    import torch.distributed as dist

    from cpt import ranks

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report: dict = {}
    try:  # rank 1 fails inside the phase: every rank raises at the same collective, none hangs
        ranks.gather_guarded(lambda: 1 / 0 if rank == 1 else rank, "phase one")
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        report["failure"] = f"{type(exc).__name__}: {exc}"
    report["next"] = ranks.gather_guarded(lambda: 10 * rank, "phase two")  # the ranks are still in step
    generator = torch.Generator().manual_seed(3)
    chunks = [torch.randn(40 + 13 * index, generator=generator) for index in range(5)]
    share = chunks[rank::2]  # each rank streams its own chunks
    threshold = kth_largest_magnitudes(
        lambda: ((chunk,) for chunk in share),
        [lambda size: int(0.3 * size)],
        gather=lambda compute: ranks.gather_guarded(compute, "threshold"),
    )[0]
    everything = torch.cat(chunks).abs()
    report["threshold"] = [threshold, float(everything.topk(int(0.3 * everything.numel())).values[-1])]
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.mark.slow
def test_guarded_gathers_over_two_processes(tmp_path):
    import os
    import subprocess

    from test_multirank_integration import REPO, free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    command += ["--master_port", str(free_port()), __file__, str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports[0]["failure"] == "RuntimeError: phase one: rank 1 failed: ZeroDivisionError: division by zero"
    assert reports[1]["failure"] == "ZeroDivisionError: division by zero"  # its own error, unwrapped
    for report in reports:
        assert report["next"] == [0, 10]
        assert report["threshold"][0] == report["threshold"][1]  # exact, bit for bit


if __name__ == "__main__":
    gloo_worker(Path(sys.argv[1]))
