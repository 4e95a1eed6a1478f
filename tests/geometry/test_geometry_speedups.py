"""The geometry's CPU speed-ups (issue 19, item 6) leave its results where they were (METHOD §1).

- concurrent Gram eigensolves equal the serial loop bit for bit;
- ``method="auto"`` on the CPU takes the exact Gram path up to ``GRAM_AUTO_MAX_SIDE_CPU`` and
  matches a dense SVD there; against the earlier randomized path on a slowly decaying
  (fine-tuning-like) spectrum, conflicts and SAR move by less than that path's own certified
  error;
- small factorizations on one thread: the process's thread count is restored, results move
  by rounding only.
"""

from __future__ import annotations

import numpy
import pytest
import torch

from cpt.diagnostics import GeometrySettings, _split, pair_geometry
from cpt.geometry import LowRankDelta, lapack, right_basis, state_relative_geometry, union_basis
from cpt.geometry import bases as geometry_bases

F64 = torch.float64


def slow_decay(batch: int, m: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Deltas shaped like a full fine-tune's update: singular values ``∝ i^-0.6`` (r_E far past 32,
    ``s_32/s_65`` ≈ 1.5, as measured on SmolLM2-135M's quickstart state) plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    k = min(m, n)
    values = torch.arange(1, k + 1, dtype=F64) ** -0.6
    out = []
    for _ in range(batch):
        u = torch.linalg.qr(torch.randn(m, k, generator=generator, dtype=F64)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=F64)).Q
        noise = 1e-3 * torch.randn(m, n, generator=generator, dtype=F64)
        out.append(1e-2 * ((u * values) @ v.T + noise))
    return torch.stack(out).to(dtype)


@pytest.fixture
def restore_switches():
    saved = {
        name: getattr(geometry_bases, name)
        for name in (
            "GRAM_AUTO_MAX_SIDE_CPU",
            "GRAM_SOLVER_THREADS",
            "SMALL_LINALG_ONE_THREAD",
            "GRAM_SUBSET_EIGH",
            "GRAM_WORKING_PRECISION",
            "GRAM_WORKING_FLOOR",
        )
    }
    threads = torch.get_num_threads()
    yield
    for name, value in saved.items():
        setattr(geometry_bases, name, value)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])  # the Gram of the right side, and of the left (wide)
def test_concurrent_gram_eigensolves_equal_the_serial_loop_bit_for_bit(shape, restore_switches):
    deltas = slow_decay(5, *shape, seed=1, dtype=F64)
    geometry_bases.GRAM_SOLVER_THREADS = 1
    serial = geometry_bases._gram_right_basis(deltas, 12)
    geometry_bases.GRAM_SOLVER_THREADS = 3
    concurrent = geometry_bases._gram_right_basis(deltas, 12)
    for one, other in zip(serial, concurrent, strict=True):
        assert torch.equal(one, other)
    # ... and each element equals its own solve (nothing depends on the batch or the threads)
    alone = geometry_bases._gram_right_basis(deltas[3:4], 12)
    assert torch.equal(alone[1][0], concurrent[1][3])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_auto_takes_the_exact_gram_path_up_to_the_cpu_limit_and_matches_a_dense_svd(dtype, restore_switches):
    deltas = slow_decay(2, 264, 300, seed=2, dtype=dtype)  # smaller side 264: past max(256, 4·64), within 768
    auto = right_basis(deltas, 32, 0.95)
    gram = right_basis(deltas, 32, 0.95, method="gram")
    assert torch.equal(auto.basis, gram.basis) and torch.equal(auto.singular_values, gram.singular_values)
    # float64 deltas: float64 throughout, exact to rounding; float32 ones: a float32 subspace and a
    # float64 Rayleigh–Ritz step (GRAM_WORKING_PRECISION), ~1e-7 relative, the delta's own precision.
    rtol, atol = (1e-12, 1e-10) if dtype == F64 else (1e-6, 1e-5)
    for index in range(2):
        _, s, vh = torch.linalg.svd(deltas[index].to(F64), full_matrices=False)
        r = int(auto.ranks[index])
        assert r == 32
        torch.testing.assert_close(auto.singular_values[index, :r], s[:r], rtol=rtol, atol=0)
        projector = auto.basis[index] @ auto.basis[index].mT
        torch.testing.assert_close(projector, vh[:r].T @ vh[:r], rtol=0, atol=atol)
    geometry_bases.GRAM_AUTO_MAX_SIDE_CPU = 0  # the earlier rule: randomized past 256
    randomized = right_basis(deltas, 32, 0.95)
    assert not torch.equal(randomized.basis, gram.basis)  # it really took the other path


@pytest.mark.parametrize("shape", [(300, 264), (264, 300)])
def test_gram_subspace_in_working_precision(shape, restore_switches):
    for dtype in (F64, torch.float32):
        deltas = slow_decay(2, *shape, seed=8, dtype=dtype)
        working = right_basis(deltas, 32, 0.95, method="gram")
        geometry_bases.GRAM_WORKING_PRECISION = False
        float64 = right_basis(deltas, 32, 0.95, method="gram")
        geometry_bases.GRAM_WORKING_PRECISION = True
        if dtype == F64:  # float64 deltas: the very same float64 computation
            assert torch.equal(working.basis, float64.basis)
            assert torch.equal(working.singular_values, float64.singular_values)
            continue
        assert torch.equal(working.ranks, float64.ranks)
        torch.testing.assert_close(working.singular_values, float64.singular_values, rtol=1e-6, atol=0)
        for index in range(2):
            p_working = working.basis[index] @ working.basis[index].mT
            p_float64 = float64.basis[index] @ float64.basis[index].mT
            torch.testing.assert_close(p_working, p_float64, rtol=0, atol=1e-5)


def test_new_path_agrees_with_the_earlier_one_within_its_certificate(restore_switches):
    state, update = slow_decay(2, 300, 264, seed=3), slow_decay(2, 300, 264, seed=4)
    new = state_relative_geometry(state, update)
    geometry_bases.GRAM_AUTO_MAX_SIDE_CPU = 0
    geometry_bases.GRAM_SOLVER_THREADS = 1
    geometry_bases.SMALL_LINALG_ONE_THREAD = False
    geometry_bases.GRAM_WORKING_PRECISION = False
    old = state_relative_geometry(state, update)
    for key in ("rank_state", "rank_update", "union_rank"):
        assert torch.equal(new[key], old[key]), key
    assert 0.2 < float(new["geometry_conflict"].min())  # a real, nonzero conflict is compared
    # The earlier path certified its pairs to a 1e-4 relative Ritz residual; measured on the
    # quickstart's real deltas it sat 3.5e-7 (GC) and 2e-6 (SAR) from the exact answer.
    torch.testing.assert_close(new["geometry_conflict"], old["geometry_conflict"], rtol=0, atol=1e-5)
    torch.testing.assert_close(new["sar_state_to_update"], old["sar_state_to_update"], rtol=0, atol=1e-5)
    torch.testing.assert_close(new["sar_update_to_state"], old["sar_update_to_state"], rtol=0, atol=1e-5)
    assert torch.equal(new["norm_state"], old["norm_state"]) and torch.equal(new["norm_update"], old["norm_update"])


def test_small_linalg_runs_on_one_thread_and_restores_the_count(restore_switches):
    torch.set_num_threads(2)
    geometry_bases.GRAM_SOLVER_THREADS = None
    with geometry_bases.small_linalg("cpu"):
        assert torch.get_num_threads() == 1
        assert geometry_bases._solver_threads() == 2  # the eigensolve pool keeps the process's count
        with geometry_bases.small_linalg("cpu"):  # nested: still one, and the outer count comes back
            assert torch.get_num_threads() == 1 and geometry_bases._solver_threads() == 2
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and geometry_bases._one_thread_scope.threads is None
    with pytest.raises(RuntimeError), geometry_bases.small_linalg("cpu"):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2  # restored on an exception too
    with geometry_bases.small_linalg("meta"):  # other devices: untouched
        assert torch.get_num_threads() == 2
    geometry_bases.SMALL_LINALG_ONE_THREAD = False
    with geometry_bases.small_linalg("cpu"):
        assert torch.get_num_threads() == 2


def test_one_thread_factorizations_change_results_by_rounding_only(restore_switches):
    torch.set_num_threads(2)
    deltas = slow_decay(4, 200, 120, seed=5, dtype=F64)
    bases = [right_basis(deltas, 16, 0.9), right_basis(deltas.flip(0), 16, 0.9)]
    one_thread = union_basis(bases)
    geometry_bases.SMALL_LINALG_ONE_THREAD = False
    process_threads = union_basis(bases)
    assert torch.equal(one_thread[1], process_threads[1])
    torch.testing.assert_close(one_thread[0], process_threads[0], rtol=0, atol=1e-13)


def test_pair_geometry_rows_unchanged_by_the_switches(restore_switches):
    generator = torch.Generator().manual_seed(6)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    state = dict(zip(names, slow_decay(3, 300, 264, seed=7), strict=True))
    update = {name: torch.randn(300, 264, generator=generator) * 1e-3 for name in names}  # flat: Gram either way
    settings = GeometrySettings()
    new = pair_geometry(names, state.__getitem__, update.__getitem__, settings)
    geometry_bases.GRAM_AUTO_MAX_SIDE_CPU = 0
    geometry_bases.GRAM_SOLVER_THREADS = 1
    geometry_bases.SMALL_LINALG_ONE_THREAD = False
    geometry_bases.GRAM_WORKING_PRECISION = False
    old = pair_geometry(names, state.__getitem__, update.__getitem__, settings)
    for name in names:
        assert new[name]["rank_a"] == old[name]["rank_a"] and new[name]["union_rank"] == old[name]["union_rank"]
        for key in ("geometry_conflict", "sar_a_to_b", "sar_b_to_a"):
            assert new[name][key] == pytest.approx(old[name][key], abs=1e-5), (name, key)


@pytest.mark.parametrize("shape", [(300, 264), (264, 300)])
def test_nearly_low_rank_float32_deltas_fall_back_to_float64(shape, restore_switches):
    """Asked for more pairs than a delta has (s_k/s_1 < 1e-2), the float32 subspace would hold
    directions float32 cannot resolve: those elements are redone in float64, the others are not."""
    generator = torch.Generator().manual_seed(9)
    m, n = shape
    rank_five = (torch.randn(m, 5, generator=generator) @ torch.randn(5, n, generator=generator)) * 1e-2
    deltas = torch.stack([rank_five, slow_decay(1, m, n, seed=10)[0]])
    working = right_basis(deltas, 16, 1.0, method="gram")
    geometry_bases.GRAM_WORKING_PRECISION = False
    float64 = right_basis(deltas, 16, 1.0, method="gram")
    assert torch.equal(working.basis[0], float64.basis[0])  # redone in float64, bit for bit
    assert torch.equal(working.singular_values[0], float64.singular_values[0])
    assert not torch.equal(working.basis[1], float64.basis[1])  # resolved: the float32 subspace
    torch.testing.assert_close(working.singular_values[1], float64.singular_values[1], rtol=1e-6, atol=0)


def test_gram_path_geometry_runs_torch_on_one_thread_and_restores_it(restore_switches, monkeypatch):
    """Gram-path shapes on the CPU: torch on one thread during the computation (the eigensolves
    have their own pool), the process's count afterwards; randomized shapes keep their threads."""
    torch.set_num_threads(2)
    seen = []
    real_right_basis = geometry_bases.right_basis

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_right_basis(*args, **kwargs)

    import cpt.geometry.conflict as conflict

    monkeypatch.setattr(conflict, "right_basis", spy)
    small = slow_decay(1, 300, 264, seed=11)
    assert geometry_bases.takes_gram_path(small.shape, "cpu") and not geometry_bases.takes_gram_path((900, 800), "cpu")
    assert not geometry_bases.takes_gram_path(small.shape, "meta")  # other devices: the old 256 rule
    state_relative_geometry(small, small.flip(-1))
    assert seen == [1, 1] and torch.get_num_threads() == 2
    seen.clear()
    large = slow_decay(1, 900, 800, seed=12)
    state_relative_geometry(large, large.flip(-1))
    assert seen == [2, 2] and torch.get_num_threads() == 2


def test_pair_geometry_loads_and_stacks_gram_batches_on_one_thread(restore_switches):
    """Loading a delta (reads and a subtraction in the callback) also paid for idle OpenMP
    threads: after the batch's first pair decides the path, the rest load on one thread
    (without the thread split; with it, every share loads on its worker's one thread)."""
    torch.set_num_threads(2)
    geometry_bases.GRAM_SOLVER_THREADS = 1  # no split: one batch, measured on the calling thread
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    deltas = dict(zip(names, slow_decay(3, 300, 264, seed=13), strict=True))
    threads_at_load = []

    def load(name):
        threads_at_load.append(torch.get_num_threads())
        return deltas[name]

    def group_key(name):  # as the callback batches: by shape, without loading
        return ((300, 264), "dense"), 4 * 300 * 264

    rows = pair_geometry(names, load, lambda name: deltas[name].flip(-1), GeometrySettings(), group_key=group_key)
    assert threads_at_load == [2, 1, 1] and torch.get_num_threads() == 2
    assert all(0.0 <= rows[name]["geometry_conflict"] <= 1.0 for name in names)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_nogil_gram_solve_equals_scipys_wrappers_bit_for_bit(shape, dtype):
    """cpt.geometry.lapack calls the ?syrk/?syevr scipy's wrappers call, with the same arguments
    and workspace: the same bits; and both are the top of a dense float64 eigendecomposition."""
    assert lapack.available()
    matrix = slow_decay(1, *shape, seed=21, dtype=F64)[0].numpy().astype(dtype)
    for right in (True, False):
        size = shape[1] if right else shape[0]
        with geometry_bases.one_blas_thread():
            values, vectors = geometry_bases._top_pairs(matrix, 12, size, right)
        nogil_values, nogil_vectors = lapack.gram_top_pairs(matrix, 12, right)
        assert nogil_values.dtype == nogil_vectors.dtype == numpy.float64
        numpy.testing.assert_array_equal(nogil_values, values)
        numpy.testing.assert_array_equal(nogil_vectors, vectors)
        exact = matrix.astype(numpy.float64)
        gram = exact.T @ exact if right else exact @ exact.T
        dense_values, dense_vectors = numpy.linalg.eigh(gram)
        tolerance = 1e-12 if dtype == numpy.float64 else 1e-5
        numpy.testing.assert_allclose(nogil_values, dense_values[::-1][:12], rtol=tolerance)
        overlap = numpy.abs(
            numpy.sum(nogil_vectors * dense_vectors[:, ::-1][:, :12], axis=0)
        )  # same vectors up to sign
        numpy.testing.assert_allclose(overlap, 1.0, atol=100 * tolerance)


def test_gram_solves_fall_back_to_scipys_wrappers_without_the_capsules(restore_switches, monkeypatch):
    deltas = slow_decay(3, 90, 60, seed=22, dtype=F64)
    nogil = geometry_bases._gram_right_basis(deltas, 12)
    monkeypatch.setattr(lapack, "available", lambda: False)
    assert geometry_bases.geometry_worker_threads("cpu") == 1  # no split when the solves hold the GIL
    for one, other in zip(nogil, geometry_bases._gram_right_basis(deltas, 12), strict=True):
        assert torch.equal(one, other)


def test_split_cuts_a_batch_into_near_equal_contiguous_shares():
    assert _split(list("abcdefg"), 2) == [list("abcd"), list("efg")]
    assert _split(list("abc"), 3) == [["a"], ["b"], ["c"]]
    assert _split(["a"], 4) == [["a"]]


def test_thread_split_pair_geometry_equals_one_thread_bit_for_bit(restore_switches):
    """pair_geometry's shares on two worker threads (the CPU default with two torch threads)
    give every row of the one-thread computation exactly: dense Gram-path and randomized
    shapes, a LoRA batch, batches of odd length; the process's thread count is kept."""
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(23)
    state, update = {}, {}
    for index in range(5):
        name = f"model.layers.{index}.mlp.up_proj.weight"
        state[name], update[name] = slow_decay(2, 120, 80, seed=30 + index)
    for index in range(3):
        name = f"model.layers.{index}.self_attn.q_proj.weight"  # randomized path on the CPU (side > 768)
        state[name], update[name] = slow_decay(2, 800, 790, seed=40 + index)
        name = f"model.layers.{index}.self_attn.v_proj.weight"
        state[name] = slow_decay(1, 64, 48, seed=50 + index)[0]
        update[name] = LowRankDelta(
            torch.randn(64, 4, generator=generator), torch.randn(4, 48, generator=generator), 0.5
        )
    names = list(state)
    assert geometry_bases.geometry_worker_threads("cpu") == 2
    assert geometry_bases.geometry_worker_threads("meta") == 1  # other devices: one batch at a time
    split = pair_geometry(names, state.__getitem__, update.__getitem__, GeometrySettings())
    assert torch.get_num_threads() == 2
    geometry_bases.GRAM_SOLVER_THREADS = 1
    assert geometry_bases.geometry_worker_threads("cpu") == 1
    assert split == pair_geometry(names, state.__getitem__, update.__getitem__, GeometrySettings())
    assert all(0.0 <= row["geometry_conflict"] <= 1.0 for row in split.values())
