"""End-of-task work divided among ranks: 2 processes give the 1-process state and geometry.

The test launches this file under ``torch.distributed.run`` (gloo, CPU) with 1 and with
2 processes, once for all the cases (a launch is seconds of imports and process-group set-up;
the cases run one after another in it, each in its own folder). Each process drives a task
sequence by hand through the two callbacks, as
a trainer would at ``on_train_end``: the expert of task t is θ0 plus a seeded perturbation
(the same on every rank, as after a DDP/ZeRO step), the geometry callback measures it
against θ_{t−1} and the integration callback merges it. After every step rank 0 copies the
state and the kept history aside, and the 2-process run must leave, step by step, the same
state (atol 1e-5), history and geometry and integration JSON as the 1-process run; its
integration statistics say how the work was split. Every strategy with whole-model
quantities (the gather contract of ``cpt.merging.contract.MergeStrategy``) has a case.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

_GCWM_TINY = {"iters": 3, "rank": 4, "bary_iters": 5, "history_rank": -1}
#: case → (strategy, params, whether the geometry callback runs too)
CASES = {
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.7}, True),
    "gcwm": ("gcwm", _GCWM_TINY, True),
    # c_t = n̄_t/‖m_t‖ from gathered norms and a rescale of each rank's shards; τ_k kept as history
    "gcwm_norm_all_history": ("gcwm", {**_GCWM_TINY, "step_coef": "norm", "memory": "all_history"}, False),
    "opcm": ("opcm", {"alpha": 0.5}, False),  # ‖τ_t‖ pre-pass, λ_t, the global rescale
    "ties_fusionbench": ("ties", {"form": "fusionbench", "density": 0.3}, False),  # global thresholds, majority
    "localize_stitch": ("localize_stitch", {"sparsity": 0.2, "non_target": "average"}, False),  # global q
    "lines_ties": ("lines", {"base": "ties", "beta": 0.5}, False),  # ‖S_t‖₁/‖M_t‖₁ pre-pass, layer scales
}


# ---------------------------------------------------------------------- the worker (one rank)
def perturbed_expert(base: Path, step: int):
    """θ0 + a seeded perturbation of every parameter, identical on every rank."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    generator = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


#: what the worker writes to stderr before each case, so the test can read each case's log
CASE_MARKER = "=== multirank case: "


def worker(base: Path, out_root: Path, cases: list[str], steps: list[int]) -> None:
    """Every case in turn, in ``out_root/<case>``, under one process group."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    for case in cases:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"{CASE_MARKER}{case}", file=sys.stderr, flush=True)
        if dist.is_initialized():  # ... and before every rank's log of this one
            dist.barrier()
        run_case(base, out_root / case, case, steps)
        if dist.is_initialized():  # the next case's marker comes after every rank's log of this one
            sys.stderr.flush()
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_case(base: Path, out: Path, case: str, steps: list[int]) -> None:
    import shutil

    import torch.distributed as dist
    from transformers import AutoTokenizer, TrainerControl, TrainerState

    from cpt.callbacks import GeometryConflictCallback, IntegrationCallback
    from cpt.diagnostics import GeometrySettings

    rank = dist.get_rank() if dist.is_initialized() else 0
    tokenizer = AutoTokenizer.from_pretrained(base)
    state_dir = out / "state"
    geometry = GeometryConflictCallback(
        base=base,
        output_dir=out / "geometry",
        state_dir=state_dir,
        train_from="base",
        settings=GeometrySettings(rank=4),
        keep_updates=True,
    )
    strategy, params, with_geometry = CASES[case]
    integration = IntegrationCallback(
        strategy, base=base, state_dir=state_dir, output_dir=out / "integration", params=params
    )
    callbacks = (geometry, integration) if with_geometry else (integration,)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    timings = []
    for step in steps:
        model = perturbed_expert(base, step)
        args = type("Args", (), {"run_name": f"task{step}"})()
        state = TrainerState(is_world_process_zero=rank == 0)
        control = TrainerControl()
        for callback in callbacks:
            callback.on_train_begin(args, state, control)
        assert integration.step == step, f"the state folder says step {integration.step}, expected {step}"
        wall, cpu = time.perf_counter(), time.process_time()
        if with_geometry:
            geometry.on_train_end(args, state, control, model=model)
        geometry_wall, geometry_cpu = time.perf_counter() - wall, time.process_time() - cpu
        wall, cpu = time.perf_counter(), time.process_time()
        integration.on_train_end(args, state, control, model=model, processing_class=tokenizer)
        if dist.is_initialized():  # as the runner does: the next task starts from the committed θ_t
            dist.barrier()
        timings.append(
            {
                "step": step,
                "processes": world_size,
                "geometry_wall_s": geometry_wall,
                "geometry_cpu_s": geometry_cpu,
                "integration_wall_s": time.perf_counter() - wall,
                "integration_cpu_s": time.process_time() - cpu,
            }
        )
        if rank == 0:  # the next step replaces the state and prunes this step's history
            shutil.copytree(state_dir, out / "snapshots" / f"step-{step}" / "state")
            shutil.copytree(out / "history" / f"step-{step}", out / "snapshots" / f"step-{step}" / "history")
    path = out / f"timings-{world_size}p-rank{rank}.json"
    path.write_text(json.dumps([*(json.loads(path.read_text()) if path.exists() else []), *timings]))


# ---------------------------------------------------------------------- the test
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(base: Path, out: Path, cases: list[str], processes: int, steps: tuple[int, ...] = (1, 2)) -> None:
    """Run ``cases`` in one launch of ``processes`` ranks, case c in ``out/c`` (its stderr in ``out/c/stderr.txt``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        __file__,
        str(base),
        str(out),
        ",".join(cases),
        ",".join(str(step) for step in steps),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    logs = dict.fromkeys(cases, "")
    for chunk in result.stderr.split(CASE_MARKER)[1:]:
        case, _, log = chunk.partition("\n")
        logs[case] += log
    for case, log in logs.items():
        with open(out / case / "stderr.txt", "a") as file:
            file.write(log)


def load_folder(folder: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / f"{prefix}.safetensors"
    if single.exists():  # one shard (HF's layout below the shard size): no index
        assert not (folder / f"{prefix}.safetensors.index.json").exists()
        return load_file(single)
    index = json.loads((folder / f"{prefix}.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(folder / file))
    assert sorted(tensors) == sorted(index["weight_map"]), f"{folder}: the index and the shards disagree"
    return tensors


def assert_same_json(one, two, path: str = "") -> None:
    """Equal structures (key order included); floats equal to 1e-6 relative (batch composition may
    change the last bits of a batched decomposition); the wall-clock ``seconds`` is left out."""
    if isinstance(one, dict):
        assert list(two) == list(one), f"{path}: keys differ"
        for key in one:
            if key != "seconds":
                assert_same_json(one[key], two[key], f"{path}/{key}")
    elif isinstance(one, list):
        assert len(one) == len(two), f"{path}: lengths differ"
        for index, (a, b) in enumerate(zip(one, two, strict=True)):
            assert_same_json(a, b, f"{path}[{index}]")
    elif isinstance(one, float) and isinstance(two, float):
        assert math.isclose(one, two, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {one} != {two}"
    else:
        assert one == two, f"{path}: {one!r} != {two!r}"


def test_assign_balanced_hand_worked():
    from cpt.ranks import assign_balanced

    # largest first, each to the least-loaded rank: 5→0, 4→1, 3→1 (4<5), 3→0 (5<7), 1→1 (7<8): 8 bytes each
    assert assign_balanced([5, 4, 3, 3, 1], 2) == [0, 1, 1, 0, 1]
    assert assign_balanced([2, 2], 2) == [0, 1]  # ties: the lower rank first
    assert assign_balanced([7, 7, 7], 1) == [0, 0, 0]
    assert assign_balanced([], 2) == []
    assert assign_balanced([1], 3) == [0]


def test_rank_shares_keep_a_tensors_row_blocks_together_and_balance_bytes():
    from cpt.merging.batch_io import rank_shares

    shapes = {
        "embed": torch.Size([64, 16]),
        "a": torch.Size([16, 16]),
        "b": torch.Size([16, 16]),
        "n": torch.Size([16]),
    }
    groups = [
        (False, ["embed"], slice(0, 16)),
        (False, ["embed"], slice(16, 32)),
        (False, ["embed"], slice(32, 64)),
        (True, ["a", "b"], None),
        (False, ["n"], None),
    ]
    owners = rank_shares(groups, shapes, 2)
    assert owners[0] == owners[1] == owners[2]  # embed (4096 B) on one rank ...
    assert owners[3] != owners[0]  # ... a+b (2048 B) on the other, with n (64 B): the lighter one
    assert owners[4] == owners[3]
    assert rank_shares(groups, shapes, 1) == [0] * len(groups)


@pytest.mark.parametrize("name", ["task_arithmetic", "dare_ta", "dare_ties", "magmax", "average", "wudi", "nufilt"])
def test_batch_local_strategies_split_across_ranks(name):
    from cpt.merging.batch_io import splits_across_ranks
    from cpt.strategies import get_strategy

    strategy = get_strategy(name).build({})
    assert type(strategy).rank_split is None  # decided from the hooks: none is overridden
    assert splits_across_ranks(strategy)


@pytest.mark.parametrize("name", ["gcwm", "opcm", "ties", "lines", "localize_stitch"])
def test_whole_model_strategies_split_by_the_gather_contract(name):
    from cpt.merging.batch_io import splits_across_ranks
    from cpt.merging.contract import MergeStrategy
    from cpt.strategies import get_strategy

    strategy = get_strategy(name).build({})
    assert type(strategy).rank_split is True and splits_across_ranks(strategy)
    if type(strategy).end_step is not MergeStrategy.end_step and name != "ties":  # ties' summary is its pre-pass'
        assert type(strategy).rank_partials is not MergeStrategy.rank_partials, "end_step's accumulators"
        assert type(strategy).absorb_rank_partials is not MergeStrategy.absorb_rank_partials


def test_a_whole_model_hook_without_the_contract_stays_on_one_rank():
    from cpt.merging.batch_io import splits_across_ranks
    from cpt.merging.contract import MergeResult, MergeStrategy

    class Rescaled(MergeStrategy):
        def merge(self, batch):
            return MergeResult(state=batch.expert)

        def finalize_scale(self, step, scalars):
            return 0.5

    class Declared(Rescaled):
        rank_split = True

    class Refused(MergeStrategy):
        rank_split = False

        def merge(self, batch):
            return MergeResult(state=batch.expert)

    assert not splits_across_ranks(Rescaled(None))
    assert splits_across_ranks(Declared(None))
    assert not splits_across_ranks(Refused(None))


def test_one_process_collectives_are_identities():
    from cpt import ranks

    assert ranks.world() == (0, 1)
    assert ranks.all_gather({"x": 1}) == [{"x": 1}]
    assert ranks.broadcast_from_main("path") == "path"
    ranks.barrier()
    with pytest.raises(RuntimeError, match="rank 1 failed: ValueError: boom"):
        ranks.raise_if_any_failed([(None, 1), ("ValueError: boom", None)], None, "merge")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from cpt.testing import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("multirank") / "tiny", seed=0))


def assert_same_folder(one: Path, two: Path, prefix: str) -> None:
    tensors_one, tensors_two = load_folder(one, prefix), load_folder(two, prefix)
    assert sorted(tensors_two) == sorted(tensors_one), f"{two}: other tensors"
    for name, value in tensors_one.items():
        assert tensors_two[name].dtype == value.dtype, name
        torch.testing.assert_close(tensors_two[name], value, rtol=0, atol=1e-5, msg=f"{two.name}/{name}")


def assert_same_step(one: Path, two: Path, step: int) -> None:
    """θ_t, the kept history and the carried scalars of step ``step`` (the snapshots rank 0 took)."""
    snap_one, snap_two = one / "snapshots" / f"step-{step}", two / "snapshots" / f"step-{step}"
    assert_same_folder(snap_one / "state", snap_two / "state", "model")
    assert not list((snap_two / "state").glob("*rank*.index.json")), "per-rank indexes must be joined and removed"
    assert json.loads((snap_two / "state" / "cpt_state.json").read_text()) == json.loads(
        (snap_one / "state" / "cpt_state.json").read_text()
    )
    keys_one = sorted(path.name for path in (snap_one / "history").iterdir() if path.is_dir())
    assert sorted(path.name for path in (snap_two / "history").iterdir() if path.is_dir()) == keys_one
    for key in keys_one:
        assert_same_folder(snap_one / "history" / key, snap_two / "history" / key, key)
        assert not list((snap_two / "history" / key).glob("*rank*.index.json"))
    assert_same_json(
        json.loads((snap_one / "history" / "scalars.json").read_text()),
        json.loads((snap_two / "history" / "scalars.json").read_text()),
    )


@pytest.fixture(scope="module")
def launched(base, tmp_path_factory) -> tuple[Path, Path]:
    """Every case run with 1 and with 2 processes: the two output roots."""
    root = tmp_path_factory.mktemp("launched")
    launch(base, root / "one", list(CASES), processes=1)
    launch(base, root / "two", list(CASES), processes=2)
    return root / "one", root / "two"


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_the_one_rank_state_and_geometry(launched, case):
    """Each rank merges a real share of every step; state, history, scalars and JSON are the one-process ones."""
    one, two = (root / case for root in launched)
    with_geometry = CASES[case][2]

    for step in (1, 2):
        assert_same_step(one, two, step)
        if with_geometry:
            geometry_one = json.loads((one / "geometry" / f"{step}_task{step}.json").read_text())
            geometry_two = json.loads((two / "geometry" / f"{step}_task{step}.json").read_text())
            assert geometry_one["num_tensors"] > 0
            assert_same_json(geometry_one, geometry_two)

        stats_one = json.loads((one / "integration" / f"{step}_task{step}.json").read_text())
        stats_two = json.loads((two / "integration" / f"{step}_task{step}.json").read_text())
        ranks_split = stats_two["summary"].pop("ranks", None)
        assert ranks_split is not None and len(ranks_split) == 2
        assert all(share["tensors"] > 0 for share in ranks_split)
        assert sum(share["tensors"] for share in ranks_split) == len(stats_one["per_tensor"])
        loads = [share["bytes"] for share in ranks_split]
        assert max(loads) <= 2 * min(loads)
        assert_same_json(stats_one["summary"], stats_two["summary"])
        assert_same_json(stats_one["per_tensor"], stats_two["per_tensor"])
    assert list((two / "snapshots" / "step-2" / "state").glob("model-rank00001-*.safetensors"))
    assert "runs on rank 0 only" not in (two / "stderr.txt").read_text()
    assert "integration of task 2 split over 2 ranks" in (two / "stderr.txt").read_text()
    if with_geometry:
        assert "geometry of task 2 split over 2 ranks" in (two / "stderr.txt").read_text()


@pytest.mark.slow
def test_a_history_two_ranks_wrote_resumes_in_one_process(base, tmp_path):
    """GCWM (all_history, step_coef norm) on 2 processes for tasks 1–2, then task 3 in one
    process from the per-rank shards: the state of the 3 tasks in one process throughout."""
    case = "gcwm_norm_all_history"
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    launch(base, one, [case], processes=1, steps=(1, 2, 3))
    launch(base, mixed, [case], processes=2, steps=(1, 2))
    assert list((mixed / case / "history" / "step-2" / "merged").glob("merged-rank00001-*.safetensors"))
    launch(base, mixed, [case], processes=1, steps=(3,))
    one, mixed = one / case, mixed / case
    for step in (1, 2, 3):
        assert_same_step(one, mixed, step)
    stats_one = json.loads((one / "integration" / "3_task3.json").read_text())
    stats_mixed = json.loads((mixed / "integration" / "3_task3.json").read_text())
    assert_same_json(stats_one, stats_mixed)


@pytest.mark.slow
def test_a_zero3_run_on_two_processes_splits_its_merge(tmp_path):
    """The runner under ``accelerate launch`` (ZeRO-3, 2 CPU processes): the merge is split (the
    expert gathered to a folder every rank reads) and the run's state is the plain run's."""
    pytest.importorskip("deepspeed")
    import yaml
    from test_deepspeed import assert_same_run, recipe_file

    from cpt.recipe import validate_recipe
    from cpt.runner import TaskSequenceRunner
    from cpt.testing import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny", seed=0)
    path = recipe_file(tmp_path, model, "zero3-2-ta", {"name": "task_arithmetic", "scaling": 0.5})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml"),
        *("--num_processes", "2", "--main_process_port", str(free_port()), "cpt/run.py", str(path)),
        *("--set", "training.per_device_train_batch_size=2"),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "integration of task 2 split over 2 ranks" in result.stderr
    run_dir = tmp_path / "runs" / "zero3-2-ta"
    for step, task in ((1, "plural"), (2, "upper")):
        stats = json.loads((run_dir / "integration" / f"{step}_{task}.json").read_text())
        shares = stats["summary"]["ranks"]
        assert len(shares) == 2 and all(share["tensors"] > 0 for share in shares)
        assert sum(share["tensors"] for share in shares) == len(stats["per_tensor"])
    plain = validate_recipe({**yaml.safe_load(path.read_text()), "name": "plain-zero3-2-ta"})
    plain.training["per_device_train_batch_size"] = 4  # the same global batch as 2 ranks × 2
    TaskSequenceRunner(plain).run()
    assert_same_run(plain.run_dir, run_dir)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(","), [int(step) for step in sys.argv[4].split(",")])
