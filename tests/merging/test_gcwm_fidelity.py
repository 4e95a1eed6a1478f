"""GCWM (METHOD §2) against an independent, plain, unbatched float64 implementation.

The reference below is written from METHOD.md alone and shares no code with
``cpt.geometry`` / ``cpt.merging``: its own SVD-based right bases, its own QR union, its
own eigh roots, its own barycenter fixed point, explicit whitening/recoloring matrices,
and its own Adam loop (torch's update rule written out by hand) with the gradient taken
straight from the objective's definition, ``2 Σ w_i (m − u_i) u_iᵀ u_i / ‖u_i‖²`` (no
G/H precomputation, no autograd). The library runs batched, with its randomized/Gram
bases and a float32 Adam loop; results must agree to 1e-4 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from cpt.merging.gcwm import GCWMParams, gcwm_continual_step, gcwm_merge

F64 = torch.float64
RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- reference (METHOD §2)


def ref_right_basis(delta, rank, energy):
    _, s, vh = torch.linalg.svd(delta, full_matrices=False)
    total = (s**2).sum()
    if total == 0:
        return delta.new_zeros(delta.shape[1], 0), delta.new_zeros(0)
    cum = torch.cumsum(s**2, 0)
    r_energy = int((cum < energy * total).sum()) + 1
    r = min(rank, r_energy)
    return vh[:r].T, s[:r]


def ref_union(vs):
    cat = torch.cat(vs, 1)
    if cat.shape[1] == 0:
        return cat
    q, r = torch.linalg.qr(cat)
    keep = r.diagonal().abs() > 1e-8
    return q[:, keep]


def ref_eig_fn(a, fn):
    lam, w = torch.linalg.eigh((a + a.T) / 2)
    return (w * fn(lam)) @ w.T


def ref_sqrt(a):
    return ref_eig_fn(a, lambda lam: lam.clamp_min(0).sqrt())


def ref_inv_sqrt(a, eps):
    return ref_eig_fn(a, lambda lam: lam.clamp_min(eps).rsqrt())


def ref_barycenter(covs, w, iters, tol, eps):
    w = [x / sum(w) for x in w]
    b = sum(wi * c for wi, c in zip(w, covs))
    for _ in range(iters):
        root, inv_root = ref_sqrt(b), ref_inv_sqrt(b, eps)
        mean_root = sum(wi * ref_sqrt(root @ c @ root) for wi, c in zip(w, covs))
        new = inv_root @ mean_root @ mean_root @ inv_root
        new = (new + new.T) / 2
        rel = torch.linalg.norm(new - b) / torch.linalg.norm(b)
        b = new
        if rel < tol:
            break
    return b


def ref_gc(a, b):
    ra = ref_sqrt(a)
    cross = torch.linalg.eigvalsh(ra @ b @ ra).clamp_min(0).sqrt().sum()
    d2 = (a.trace() + b.trace() - 2 * cross).clamp_min(0)
    return d2 / (a.trace() + b.trace())


def ref_adam(us, w, lr, iters):
    m = sum(us).clone()
    ea = torch.zeros_like(m)
    eas = torch.zeros_like(m)
    for t in range(1, iters + 1):
        g = sum(2 * wi * ((m - u) @ u.T) @ u / (u**2).sum() for wi, u in zip(w, us))
        ea = 0.9 * ea + 0.1 * g
        eas = 0.999 * eas + 0.001 * g * g
        denom = eas.sqrt() / math.sqrt(1 - 0.999**t) + 1e-8
        m = m - (lr / (1 - 0.9**t)) * ea / denom
    return m


def ref_gcwm(deltas, weights, p):
    """One tensor, METHOD §2 steps 1–7; returns (m, c, alpha, branch)."""
    keep = [(d, w) for d, w in zip(deltas, weights) if float(d.norm()) > 0 and w > 0]
    if not keep:
        return torch.zeros_like(deltas[0]), 0.0, None, None
    vs, ws = [d for d, _ in keep], [w for _, w in keep]
    bases = [ref_right_basis(v, p.rank, p.energy) for v in vs]
    q = ref_union([b[0] for b in bases])
    k = q.shape[1]
    covs = []
    for vb, s in bases:
        pr = q.T @ vb
        covs.append(pr @ torch.diag(s**2) @ pr.T + p.eps * torch.eye(k, dtype=F64))
    if p.metric == "barycenter":
        bstar = ref_barycenter(covs, ws, p.bary_iters, p.bary_tol, p.eps)
    else:
        bstar = sum(w / sum(ws) * c for w, c in zip(ws, covs))
    num = den = 0.0
    for i in range(len(vs)):
        for j in range(i + 1, len(vs)):
            num += ws[i] * ws[j] * float(ref_gc(covs[i], covs[j]))
            den += ws[i] * ws[j]
    c = num / den if den > 0 else 0.0
    if p.gate == "none":
        alpha = 1.0
    else:
        sig = 1 / (1 + math.exp(-p.gate_sharpness * (c - p.gate_threshold)))
        alpha = p.alpha_min + (p.alpha_max - p.alpha_min) * sig
    branch = "plain" if alpha <= 0.05 else ("relation" if alpha >= 0.95 else "both")
    eye = torch.eye(q.shape[0], dtype=F64)
    perp = eye - q @ q.T
    whiten = q @ ref_inv_sqrt(bstar, p.eps) @ q.T + p.eps**-0.5 * perp
    recolor = q @ ref_sqrt(bstar) @ q.T + p.eps**0.5 * perp
    m_plain = ref_adam(vs, ws, p.lr, p.iters)
    m_rel = ref_adam([v @ whiten for v in vs], ws, p.lr, p.iters) @ recolor
    if branch == "plain":
        m = m_plain
    elif branch == "relation":
        m = m_rel
    else:
        m = alpha * m_rel + (1 - alpha) * m_plain
    return m, c, alpha, branch


def ref_continual(taus, p):
    """METHOD §2.8 over a task sequence of one tensor: per step (m_t, θ_t − θ0)."""
    out, prev, state = [], None, torch.zeros_like(taus[0])
    for t in range(1, len(taus) + 1):
        if p.memory == "current_anchor":
            active = [taus[0]] if t == 1 else [prev, taus[t - 1]]
            w = [p.new_weight] if t == 1 else [p.old_weight, p.new_weight]
        else:
            active = taus[:t] if p.memory_size < 0 else taus[max(0, t - p.memory_size) : t]
            w = [1.0] * len(active)
        m = ref_gcwm(active, w, p)[0]
        c_t = p.step_coef * p.decay ** (t - 1)
        state = state + c_t * (m - (prev if prev is not None else 0))
        out.append((m, state.clone()))
        prev = m
    return out


# ----------------------------------------------------------------------------- data


def low_rank(d_out, d_in, rank, gen, scale=0.02, shared=None):
    """A rank-``rank`` delta with entries ~``scale``; ``shared`` rows (right directions)
    are reused so tasks overlap partially."""
    rows = torch.randn(rank, d_in, generator=gen, dtype=F64)
    if shared is not None:
        rows[: shared.shape[0]] = shared
    cols = torch.randn(d_out, rank, generator=gen, dtype=F64)
    spread = torch.linspace(1.0, 0.3, rank, dtype=F64)
    return scale * (cols * spread) @ rows / math.sqrt(rank)


def task_sequence(shape, steps, seed):
    """``steps`` task vectors of one tensor, ranks 2–5, sharing two right directions."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    shared = torch.randn(2, d_in, generator=gen, dtype=F64)
    ranks = [2 + (seed + t) % 4 for t in range(steps)]
    # Rounded through float32, so float32 and float64 inputs carry the same values.
    return [low_rank(d_out, d_in, r, gen, shared=shared[: min(2, r - 1)]).float().double() for r in ranks]


#: Three target tensors: two 24×16 (batched together) and one 16×24.
SHAPES = [(24, 16), (24, 16), (16, 24)]


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("memory", ["current_anchor", "all_history"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continual_three_steps_match_reference(memory, dtype):
    """Both memory modes over 3 steps (float32 and float64 inputs; the Adam loop is
    float32 in both): merged deltas m_t and the integrated θ_t − θ0 = Σ c_t (m_t − m_{t−1})."""
    p = GCWMParams(memory=memory)
    steps = 3
    seqs = [task_sequence(shape, steps, seed) for seed, shape in enumerate(SHAPES)]
    refs = [ref_continual(seq, p) for seq in seqs]

    # The library: the two 24×16 tensors batched, the 16×24 one alone.
    groups = [[0, 1], [2]]
    for group in groups:
        prev, state, hist = None, None, []
        for t in range(1, steps + 1):
            tau = torch.stack([seqs[i][t - 1] for i in group]).to(dtype)
            m, inc, stats = gcwm_continual_step(t, tau, prev, hist, p)
            state = inc if state is None else state + inc
            for b, i in enumerate(group):
                ref_m, ref_state = refs[i][t - 1]
                assert rel_err(m[b].double(), ref_m) < RTOL, (memory, t, i)
                assert rel_err(state[b].double(), ref_state) < RTOL, (memory, t, i)
            if t > 1:
                assert bool((stats["branch"] == 2).all())  # defaults: both branches
                assert bool((stats["conflict"] > 0).all())
            prev = m
            hist.append(tau)


@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("plain", {"alpha_min": 0.0, "alpha_max": 0.04}, "plain"),
        ("relation", {"alpha_min": 0.96, "alpha_max": 1.0}, "relation"),
        ("relation-gate-none", {"gate": "none"}, "relation"),
        ("both", {}, "both"),
        ("both-mean-metric", {"metric": "mean"}, "both"),
    ],
)
def test_each_branch_matches_reference(name, overrides, expected):
    p = GCWMParams(**overrides)
    seqs = [task_sequence((24, 16), 3, seed) for seed in (5, 6)]
    codes = {"plain": 0, "relation": 1, "both": 2}
    deltas = [torch.stack([s[i] for s in seqs]).float() for i in range(3)]
    weights = [1.0, 0.5, 2.0]
    m, stats = gcwm_merge(deltas, weights, p)
    for b, seq in enumerate(seqs):
        ref_m, ref_c, ref_alpha, ref_branch = ref_gcwm(seq, weights, p)
        assert ref_branch == expected
        assert int(stats["branch"][b]) == codes[expected]
        assert abs(float(stats["conflict"][b]) - ref_c) < 1e-8
        assert abs(float(stats["alpha"][b]) - ref_alpha) < 1e-8
        assert rel_err(m[b].double(), ref_m) < RTOL, name
