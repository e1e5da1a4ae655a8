"""Every projection operator against an independent minimisation of the same distance.

Exact projections are compared with exhaustive searches (dense grids refined by golden-section
search, or enumeration of every KKT candidate); convex proximal steps with L-BFGS on the same
objective. All checks run in float64.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import Tensor

from unitrain.rules.projection import (project_dot, project_equal, project_margin, project_mean,
                                       project_one_vs_rest, project_relu, project_step, project_sum,
                                       prox_cross_entropy, prox_squared_error)

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _golden(f, lo: Tensor, hi: Tensor, iters: int = 80) -> Tensor:
    """Batched golden-section minimisation of ``f`` on ``[lo, hi]``; returns the minimum value."""
    r = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo.clone(), hi.clone()
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        left = fc < fd
        b = torch.where(left, d, b)
        a = torch.where(left, a, c)
        c, d = b - r * (b - a), a + r * (b - a)
        fc, fd = f(c), f(d)
    return torch.minimum(torch.minimum(fc, fd), torch.minimum(f(lo), f(hi)))


def _grid_min_1d(f, lo: float, hi: float, points: int, batch: int) -> Tensor:
    """Exhaustive 1-D search: the best grid point of ``f`` (batched), refined in its two cells."""
    grid = torch.linspace(lo, hi, points, dtype=DT)
    h = grid[1] - grid[0]
    values = f(grid.unsqueeze(0).expand(batch, -1))
    best = grid[values.argmin(-1)]
    refined = _golden(lambda s: f(s.unsqueeze(-1)).squeeze(-1), best - h, best + h)
    return torch.minimum(refined, values.min(-1).values)


# ----------------------------------------------------------------------------- dot product


def _dot_dist2(a, b, z, a2, b2, y):
    return ((a2 - a) ** 2).sum(-1) + ((b2 - b) ** 2).sum(-1) + (y - z) ** 2


def _dot_kkt_min(a: Tensor, b: Tensor, z: Tensor) -> Tensor:
    """Smallest squared distance over every KKT point of the dot projection.

    Stationarity gives ``a' = (a + t b)/(1 - t^2)``, ``b' = (b + t a)/(1 - t^2)``, ``y = z - t``
    for every real root ``t`` (of any size) of the quintic
    ``U (1+t)^2/2 - V (1-t)^2/2 + (t - z)(1 - t^2)^2``; when ``a = -b`` or ``a = b`` the points
    with ``t = 1`` or ``t = -1`` (any direction for the free block) are candidates too. Each
    candidate is evaluated on the graph (``y = <a', b'>``), so it is feasible by construction.
    """
    out = []
    for ai, bi, zi in zip(a, b, z, strict=True):
        ai_np, bi_np, zi_f = ai.numpy(), bi.numpy(), float(zi)
        u = (ai_np + bi_np) / math.sqrt(2)
        v = (ai_np - bi_np) / math.sqrt(2)
        uu, vv = float(u @ u), float(v @ v)
        coeffs = [
            1.0,
            -zi_f,
            -2.0,
            2 * zi_f + uu / 2 - vv / 2,
            1.0 + uu + vv,
            -zi_f + uu / 2 - vv / 2,
        ]
        best = zi_f**2 + uu + vv  # never worse than the point (0, 0, 0) of the graph
        for root in np.roots(coeffs):
            if abs(root.imag) > 1e-6 * (1 + abs(root.real)):
                continue
            t = root.real
            if abs(1 - t * t) < 1e-12:
                continue
            a2 = (ai_np + t * bi_np) / (1 - t * t)
            b2 = (bi_np + t * ai_np) / (1 - t * t)
            y = float(a2 @ b2)
            best = min(
                best,
                float((a2 - ai_np) @ (a2 - ai_np) + (b2 - bi_np) @ (b2 - bi_np) + (y - zi_f) ** 2),
            )
        # Hard cases: u = 0 with t = 1 (v' = v/2, |u'|^2 = 2(z - 1) + |v'|^2) and symmetrically.
        if uu == 0.0 and 2 * (zi_f - 1) + vv / 4 >= 0:
            best = min(best, vv / 4 + 2 * (zi_f - 1) + vv / 4 + 1.0)
        if vv == 0.0 and uu / 4 - 2 * (zi_f + 1) >= 0:
            best = min(best, uu / 4 + uu / 4 - 2 * (zi_f + 1) + 1.0)
        out.append(best)
    return torch.tensor(out, dtype=DT)


def _random_dot_cases(seed: int, count: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    scale = torch.exp(torch.empty(count, 1, dtype=DT).uniform_(-2.0, 1.5, generator=g))
    a = torch.randn(count, n, dtype=DT, generator=g) * scale
    b = torch.randn(count, n, dtype=DT, generator=g) * scale
    z = torch.randn(count, dtype=DT, generator=g) * 3.0 * scale.squeeze(-1) ** 2
    return a, b, z


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_dot_matches_kkt_enumeration(n: int) -> None:
    a, b, z = _random_dot_cases(10 + n, 150, n)
    a2, b2, y = project_dot(a, b, z)
    assert torch.allclose(y, (a2 * b2).sum(-1), atol=1e-12, rtol=0)
    ours = _dot_dist2(a, b, z, a2, b2, y)
    kkt = _dot_kkt_min(a, b, z)
    scale = 1.0 + z.abs() + (a * a).sum(-1) + (b * b).sum(-1)
    assert torch.all(ours <= kkt + 1e-9 * scale)
    assert torch.all(ours >= kkt - 1e-9 * scale)


def test_dot_matches_exhaustive_search_n1() -> None:
    """For n = 1 the best ``b'`` given ``a'`` is a ridge step, which leaves a 1-D search."""
    count = 200
    a, b, z = _random_dot_cases(3, count, 1)
    a2, b2, y = project_dot(a, b, z)
    ours = _dot_dist2(a, b, z, a2, b2, y)

    def reduced(s: Tensor) -> Tensor:
        # min over b' of (b' - b)^2 + (s b' - z)^2 = (z - s b)^2 / (1 + s^2)
        return (s - a) ** 2 + (z.unsqueeze(-1) - s * b) ** 2 / (1 + s * s)

    bound = float(3.0 * (a.abs().max() + b.abs().max() + z.abs().max().sqrt()) + 3.0)
    brute = _grid_min_1d(reduced, -bound, bound, 40001, count)
    assert torch.allclose(ours, brute, atol=1e-10, rtol=1e-8)


def test_dot_matches_exhaustive_search_n2() -> None:
    count = 40
    a, b, z = _random_dot_cases(4, count, 2)
    a2, b2, y = project_dot(a, b, z)
    ours = _dot_dist2(a, b, z, a2, b2, y)

    def reduced(p: Tensor) -> Tensor:  # p: (count, m, 2) candidate a'
        pb = (p * b.unsqueeze(1)).sum(-1)
        return ((p - a.unsqueeze(1)) ** 2).sum(-1) + (z.unsqueeze(-1) - pb) ** 2 / (
            1 + (p * p).sum(-1)
        )

    bound = float(2.0 * (a.abs().max() + b.abs().max() + z.abs().max().sqrt()) + 2.0)
    centre = torch.zeros(count, 2, dtype=DT)
    half = torch.full((count, 1), bound, dtype=DT)
    ticks = torch.linspace(-1.0, 1.0, 121, dtype=DT)
    offsets = torch.stack(torch.meshgrid(ticks, ticks, indexing="ij"), -1).reshape(-1, 2)
    best = torch.full((count,), math.inf, dtype=DT)
    for _ in range(10):  # exhaustive grid, then zoom on the best cell
        pts = centre.unsqueeze(1) + half.unsqueeze(1) * offsets
        vals = reduced(pts)
        idx = vals.argmin(-1)
        best = torch.minimum(best, vals.min(-1).values)
        centre = pts[torch.arange(count), idx]
        half = half * 0.06
    assert torch.all(ours <= best + 1e-10)
    assert torch.allclose(ours, best, atol=1e-8, rtol=1e-7)


def test_dot_hard_and_degenerate_cases() -> None:
    g = _gen(5)
    base = torch.randn(8, 3, dtype=DT, generator=g)
    zeros = torch.zeros(1, 3, dtype=DT)
    cases = [
        (base, -base, torch.full((8,), 6.0, dtype=DT)),  # u = 0, z large: hard case at t = 1
        (base, -base, torch.full((8,), -0.5, dtype=DT)),  # u = 0, interior root
        (base, base, torch.full((8,), -6.0, dtype=DT)),  # v = 0, z very negative: t = -1
        (base, base, torch.full((8,), 2.0, dtype=DT)),
        (zeros, zeros, torch.tensor([3.0], dtype=DT)),
        (zeros, zeros, torch.tensor([-3.0], dtype=DT)),
        (zeros, zeros, torch.tensor([0.4], dtype=DT)),
        (base, torch.zeros_like(base), torch.zeros(8, dtype=DT)),
    ]
    for a, b, z in cases:
        a2, b2, y = project_dot(a, b, z)
        assert torch.all(torch.isfinite(a2)) and torch.all(torch.isfinite(b2))
        assert torch.allclose(y, (a2 * b2).sum(-1), atol=1e-10, rtol=0)
        ours = _dot_dist2(a, b, z, a2, b2, y)
        kkt = _dot_kkt_min(a, b, z)
        assert torch.all(ours <= kkt + 1e-9), (ours, kkt)
        assert torch.all(ours >= kkt - 1e-9), (ours, kkt)
    # Next to the hard cases the distance is continuous (1-Lipschitz in the data) and the result
    # stays feasible, although the root sits within rounding of the pole.
    for sign, zval in ((-1.0, 6.0), (1.0, -6.0)):
        z = torch.full((8,), zval, dtype=DT)
        for eps in (1e-6, 1e-9, 1e-13):
            b = sign * base + eps * torch.randn(8, 3, dtype=DT, generator=g)
            a2, b2, y = project_dot(base, b, z)
            assert torch.allclose(y, (a2 * b2).sum(-1), atol=1e-10, rtol=0)
            ours = _dot_dist2(base, b, z, a2, b2, y).sqrt()
            exact = _dot_kkt_min(base, sign * base, z).sqrt()
            assert torch.all((ours - exact).abs() <= 2 * eps * math.sqrt(3) + 1e-9)


def test_dot_fixed_points_batches_and_float32() -> None:
    g = _gen(6)
    a = torch.randn(3, 4, 5, dtype=DT, generator=g)
    b = torch.randn(3, 4, 5, dtype=DT, generator=g)
    z = (a * b).sum(-1)
    a2, b2, y = project_dot(a, b, z)
    assert a2.shape == a.shape and y.shape == z.shape
    assert torch.allclose(a2, a, atol=1e-12) and torch.allclose(b2, b, atol=1e-12)
    z32 = (z + torch.randn(z.shape, dtype=DT, generator=g) * 4).float()
    a32, b32, y32 = project_dot(a.float(), b.float(), z32)
    assert y32.dtype == torch.float32
    assert torch.allclose(y32, (a32 * b32).sum(-1), atol=1e-5, rtol=1e-5)
    a64, _, _ = project_dot(a, b, z32.double())
    assert torch.allclose(a32.double(), a64, atol=1e-4)


# ----------------------------------------------------------------------------- sum


@pytest.mark.parametrize("n", [1, 2, 7])
def test_sum_matches_normal_equations(n: int) -> None:
    g = _gen(20 + n)
    x = torch.randn(300, n, dtype=DT, generator=g) * 3
    z = torch.randn(300, dtype=DT, generator=g) * 5
    x2, y = project_sum(x, z)
    assert torch.allclose(y, x2.sum(-1), atol=1e-12)
    # min |x' - x|^2 + (sum x' - z)^2 over x': (I + 1 1^T) x' = x + z 1
    system = torch.eye(n, dtype=DT) + torch.ones(n, n, dtype=DT)
    expected = torch.linalg.solve(system, (x + z.unsqueeze(-1)).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(x2, expected, atol=1e-12)


# ----------------------------------------------------------------------------- relu


def _relu_brute(x: Tensor, z: Tensor) -> Tensor:
    """Exhaustive search over the pre-activation ``s' = sum x'``.

    For a fixed ``s'`` the nearest ``x'`` is the hyperplane projection ``x + (s' - s)/n``, so the
    squared distance is ``(s' - s)^2 / n + (relu(s') - z)^2``; it is searched over a dense grid,
    refined in the best cells, and the two kinks' neighbourhoods are covered by the grid.
    """
    n = x.shape[-1]
    s = x.sum(-1)
    count = x.shape[0]

    def f(sp: Tensor) -> Tensor:
        return (sp - s.unsqueeze(-1)) ** 2 / n + (sp.clamp_min(0.0) - z.unsqueeze(-1)) ** 2

    bound = float(s.abs().max() + z.abs().max() + 1.0)
    # The objective is convex on each side of s' = 0, so each half is searched separately.
    neg = _grid_min_1d(f, -bound, 0.0, 4001, count)
    pos = _grid_min_1d(f, 0.0, bound, 4001, count)
    return torch.minimum(neg, pos)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_relu_matches_exhaustive_search(n: int) -> None:
    g = _gen(30 + n)
    count = 400
    x = torch.randn(count, n, dtype=DT, generator=g) * 2
    z = torch.randn(count, dtype=DT, generator=g) * 2  # about half the targets are negative
    x2, y = project_relu(x, z)
    assert torch.equal(y, x2.sum(-1).clamp_min(0.0))
    ours = ((x2 - x) ** 2).sum(-1) + (y - z) ** 2
    brute = _relu_brute(x, z)
    assert torch.all(ours <= brute + 1e-10)
    assert torch.allclose(ours, brute, atol=1e-9, rtol=1e-9)


def test_relu_negative_targets_every_sign_case() -> None:
    """Negative targets with positive, zero and negative pre-activations, on a dense sweep."""
    s_vals = torch.linspace(-4.0, 4.0, 41, dtype=DT)
    z_vals = torch.linspace(-4.0, -0.05, 40, dtype=DT)
    s, z = torch.meshgrid(s_vals, z_vals, indexing="ij")
    for n in (1, 2):
        x = torch.stack([s.reshape(-1) / n] * n, -1)
        zf = z.reshape(-1)
        x2, y = project_relu(x, zf)
        ours = ((x2 - x) ** 2).sum(-1) + (y - zf) ** 2
        brute = _relu_brute(x, zf)
        assert torch.allclose(ours, brute, atol=1e-9, rtol=1e-9)
        assert torch.all(y >= 0)
    # Worked cases (n = 1): the active branch wins although z < 0 ...
    x2, y = project_relu(torch.tensor([[2.0]], dtype=DT), torch.tensor([-1.0], dtype=DT))
    assert torch.allclose(x2, torch.tensor([[0.5]], dtype=DT)) and torch.allclose(
        y, torch.tensor([0.5], dtype=DT)
    )
    # ... and loses when its hyperplane projection would need a negative output.
    x2, y = project_relu(torch.tensor([[0.5]], dtype=DT), torch.tensor([-2.0], dtype=DT))
    assert torch.allclose(x2, torch.zeros(1, 1, dtype=DT)) and torch.allclose(
        y, torch.zeros(1, dtype=DT)
    )


def test_relu_on_graph_is_fixed() -> None:
    g = _gen(7)
    x = torch.randn(50, 3, dtype=DT, generator=g)
    y = x.sum(-1).clamp_min(0.0)
    x2, y2 = project_relu(x, y)
    assert torch.allclose(x2, x) and torch.allclose(y2, y)


# ----------------------------------------------------------------------------- equality


def test_equal_is_weighted_mean_and_nearest() -> None:
    g = _gen(8)
    x = torch.randn(100, 5, dtype=DT, generator=g)
    w = torch.rand(100, 5, dtype=DT, generator=g) + 0.1
    for weight in (None, w):
        p = project_equal(x, -1, weight)
        assert torch.allclose(p, p[:, :1].expand_as(p))
        wt = torch.ones_like(x) if weight is None else weight
        ours = (wt * (p - x) ** 2).sum(-1)
        brute = _grid_min_1d(
            lambda c, wt=wt: (wt.unsqueeze(1) * (c.unsqueeze(-1) - x.unsqueeze(1)) ** 2).sum(-1),
            -5.0,
            5.0,
            2001,
            100,
        )
        assert torch.allclose(ours, brute, atol=1e-10)


# ----------------------------------------------------------------------------- outputs


def _lbfgs(objective, start: Tensor, iters: int = 400) -> Tensor:
    x = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=iters,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective(x).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


@pytest.mark.parametrize("weight", [0.3, 1.0, 20.0])
def test_squared_error_prox_matches_minimisation(weight: float) -> None:
    g = _gen(9)
    x = torch.randn(200, 3, dtype=DT, generator=g) * 3
    t = torch.randn(200, 3, dtype=DT, generator=g) * 3
    ours = prox_squared_error(x, t, weight)
    brute = _lbfgs(
        lambda p: 0.5 * ((p - x) ** 2).sum(-1) + 0.5 * weight * ((p - t) ** 2).sum(-1), x
    )
    assert torch.allclose(ours, brute, atol=1e-8)
    assert torch.equal(prox_squared_error(x, t, math.inf), t)


@pytest.mark.parametrize("lam", [0.5, 5.0, 40.0])
def test_cross_entropy_prox_matches_minimisation(lam: float) -> None:
    g = _gen(10)
    k = 4
    logits = torch.randn(300, k, dtype=DT, generator=g) * 4
    labels = torch.randint(0, k, (300,), generator=g)
    ours = prox_cross_entropy(logits, labels, lam)
    onehot = torch.nn.functional.one_hot(labels, k).to(DT)

    def objective(p: Tensor) -> Tensor:
        return 0.5 * ((p - logits) ** 2).sum(-1) + lam * (
            torch.logsumexp(p, -1) - (onehot * p).sum(-1)
        )

    brute = _lbfgs(objective, logits)
    assert torch.all(objective(ours) <= objective(brute) + 1e-10)
    assert torch.allclose(ours, brute, atol=1e-6)
    # The fixed-point form of the optimality condition holds to rounding.
    residual = ours - logits - lam * (onehot - torch.softmax(ours, -1))
    assert residual.abs().max() < 1e-10
    # Soft labels equal to one-hot vectors give the same point.
    assert torch.allclose(prox_cross_entropy(logits, onehot, lam), ours, atol=1e-12)


def _margin_enumeration(x: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Exact projection by enumerating active sets.

    For an active set ``S`` of other classes held at ``x_y' - margin``, the equality-constrained
    least-squares solution raises ``x_y`` by ``delta = sum_S c_k / (|S| + 1)``; every feasible
    candidate is a feasible point, and the projection is one of them, so the nearest feasible
    candidate is the projection.
    """
    count, k = x.shape
    best = torch.full((count,), math.inf, dtype=DT)
    result = x.clone()
    for i in range(count):
        y = int(labels[i])
        others = [j for j in range(k) if j != y]
        c = x[i] + margin - x[i, y]
        for r in range(len(others) + 1):
            for subset in itertools.combinations(others, r):
                delta = sum(float(c[j]) for j in subset) / (len(subset) + 1)
                cand = x[i].clone()
                cand[y] = x[i, y] + delta
                for j in subset:
                    cand[j] = cand[y] - margin
                gaps = cand[y] - cand - margin
                gaps[y] = 0.0
                if torch.all(gaps >= -1e-12):
                    dist = float(((cand - x[i]) ** 2).sum())
                    if dist < best[i]:
                        best[i] = dist
                        result[i] = cand
    return result


@pytest.mark.parametrize("k", [2, 3, 5])
def test_margin_matches_active_set_enumeration(k: int) -> None:
    g = _gen(40 + k)
    x = torch.randn(150, k, dtype=DT, generator=g) * 2
    labels = torch.randint(0, k, (150,), generator=g)
    ours = project_margin(x, labels, margin=1.0)
    expected = _margin_enumeration(x, labels, 1.0)
    assert torch.allclose(ours, expected, atol=1e-12)
    correct = ours.gather(-1, labels.unsqueeze(-1))
    gaps = correct - ours - 1.0
    gaps = gaps.masked_fill(torch.nn.functional.one_hot(labels, k).bool(), 0.0)
    assert torch.all(gaps >= -1e-12)


def test_one_vs_rest_matches_coordinate_search() -> None:
    g = _gen(11)
    x = torch.randn(200, 4, dtype=DT, generator=g) * 2
    labels = torch.randint(0, 4, (200,), generator=g)
    ours = project_one_vs_rest(x, labels, high=1.0, low=0.0)
    # The box separates coordinates: search each one over its feasible interval.
    grid_hi = torch.linspace(1.0, 8.0, 7001, dtype=DT)
    grid_lo = torch.linspace(-8.0, 0.0, 8001, dtype=DT)
    is_label = torch.nn.functional.one_hot(labels, 4).bool()
    for j in range(4):
        col = x[:, j : j + 1]
        best_hi = grid_hi[((grid_hi - col) ** 2).argmin(-1)]
        best_lo = grid_lo[((grid_lo - col) ** 2).argmin(-1)]
        expected = torch.where(is_label[:, j], best_hi, best_lo)
        assert torch.allclose(ours[:, j], expected, atol=1e-3)
    assert torch.all(ours[is_label] >= 1.0) and torch.all(ours[~is_label] <= 0.0)


# ----------------------------------------------------------------------------- mean (average pool)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_mean_is_the_hyperplane_projection(n: int) -> None:
    """Against the projection onto ``{<c, v> = 0}``, ``c = (1/n, ..., 1/n, -1)``, by least squares."""
    g = _gen(60 + n)
    count = 400
    x = torch.randn(count, n, dtype=DT, generator=g) * 3
    z = torch.randn(count, dtype=DT, generator=g) * 3
    x2, y = project_mean(x, z)
    assert torch.allclose(y, x2.mean(-1), atol=1e-12)
    c = torch.cat([torch.full((n,), 1.0 / n, dtype=DT), torch.tensor([-1.0], dtype=DT)])
    v = torch.cat([x, z.unsqueeze(-1)], -1)
    # min |v' - v| s.t. <c, v'> = 0, solved as a least-squares problem on the null space of c.
    basis = torch.linalg.svd(c.unsqueeze(0)).Vh[1:]  # (n, n + 1), orthonormal, <c, row> = 0
    coef = torch.linalg.lstsq(basis.T.expand(count, -1, -1), v.unsqueeze(-1)).solution
    expected = (basis.T @ coef).squeeze(-1)
    assert torch.allclose(torch.cat([x2, y.unsqueeze(-1)], -1), expected, atol=1e-10)
    # On the graph, the projection changes nothing.
    x3, y3 = project_mean(x2, y)
    assert torch.allclose(x3, x2, atol=1e-12) and torch.allclose(y3, y, atol=1e-12)


# ----------------------------------------------------------------------------- hard threshold


def _step_brute(x: Tensor, z: Tensor) -> Tensor:
    """Smallest squared distance to the closed graph of ``y = step(sum x')`` by grid search.

    For a fixed sum ``s'`` the nearest terms move equally (``|x' - x|^2 = (s' - s)^2 / n``), so
    each piece is a 1-D search over ``s'``: ``s' <= 0`` with ``y = 0``, ``s' >= 0`` with ``y = 1``.
    """
    n = x.shape[-1]
    s = x.sum(-1)
    count = x.shape[0]
    bound = float(s.abs().max() + 1.0)

    def piece(y: float):
        # The refinement may step past the piece's end; clamping keeps it on the piece.
        def f(sp: Tensor) -> Tensor:
            sp = sp.clamp_max(0.0) if y == 0.0 else sp.clamp_min(0.0)
            return (sp - s.unsqueeze(-1)) ** 2 / n + (y - z.unsqueeze(-1)) ** 2
        return f

    off = _grid_min_1d(piece(0.0), -bound, 0.0, 4001, count)
    on = _grid_min_1d(piece(1.0), 0.0, bound, 4001, count)
    return torch.minimum(off, on)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_step_matches_exhaustive_search(n: int) -> None:
    g = _gen(70 + n)
    count = 500
    x = torch.randn(count, n, dtype=DT, generator=g) * 2
    z = torch.randn(count, dtype=DT, generator=g) + 0.5
    x2, y = project_step(x, z)
    s2 = x2.sum(-1)
    # On the closed graph: y is 0 or 1, with the matching sign of the pre-activation.
    assert torch.all((y == 0) | (y == 1))
    assert torch.all(s2[y == 1] >= -1e-12) and torch.all(s2[y == 0] <= 1e-12)
    ours = ((x2 - x) ** 2).sum(-1) + (y - z) ** 2
    brute = _step_brute(x, z)
    assert torch.all(ours <= brute + 1e-10)
    assert torch.allclose(ours, brute, atol=1e-9, rtol=1e-9)
    # No random point of the graph is closer.
    for _ in range(20):
        cand = x + torch.randn(count, n, dtype=DT, generator=g)
        cy = (cand.sum(-1) > 0).to(DT)
        assert torch.all(ours <= ((cand - x) ** 2).sum(-1) + (cy - z) ** 2 + 1e-12)


def test_step_worked_cases_and_fixed_points() -> None:
    x = torch.tensor([[2.0], [-2.0], [0.3], [-0.3]], dtype=DT)
    z = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=DT)
    x2, y = project_step(x, z)
    # (2, 0): off costs 4, on costs 1 -> y = 1, x kept; (-2, 1): off costs 1 -> y = 0, x kept.
    # (0.3, 0): off costs 0.09 < on's 1 -> x drops to 0; (-0.3, 1): on costs 0.09 -> x rises to 0.
    assert torch.equal(y, torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=DT))
    assert torch.allclose(x2.squeeze(-1), torch.tensor([2.0, -2.0, 0.0, 0.0], dtype=DT))
    on_graph = torch.randn(100, 3, dtype=DT)
    x3, y3 = project_step(on_graph, (on_graph.sum(-1) > 0).to(DT))
    assert torch.equal(x3, on_graph) and torch.equal(y3, (on_graph.sum(-1) > 0).to(DT))
