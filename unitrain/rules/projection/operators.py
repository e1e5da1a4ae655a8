"""Closed-form projections onto the graphs of elementary operations.

These are the local steps of projection-based training as proposed in Bergmeister et al.,
"A projection-based framework for gradient-free and parallel learning" (arXiv:2506.05878):
every operation of a compute graph holds its own copy of its inputs and output, and a training
step alternates between projecting each operation's copies onto the graph of that operation and
reconciling the copies.

Every function here is the exact Euclidean projection (or, for the output losses, the exact
proximal step) of its arguments, batched over any number of leading dimensions and free of
device- or dtype-specific code. Projections onto the graph of ``f`` return the projected inputs
and ``f`` evaluated at them, so the result always lies on the graph up to rounding.

The projections onto an n-ary reduction ``y = f(x_1, ..., x_n)`` (:func:`project_sum`,
:func:`project_mean`, :func:`project_relu`, :func:`project_step`) share one signature: ``x``, the
terms, of shape ``(..., n)`` (for the activations, the terms of the pre-activation, bias folded
in), and ``z``, the output's current value, of shape ``(...)``; they return ``(x', f(x'))``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "project_dot",
    "project_dot_multiplier",
    "project_equal",
    "project_margin",
    "project_mean",
    "project_one_vs_rest",
    "project_relu",
    "project_step",
    "project_sum",
    "prox_cross_entropy",
    "prox_squared_error",
]


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def project_dot(a: Tensor, b: Tensor, z: Tensor, **options: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Project ``(a, b, z)`` onto the graph ``{(a', b', y) : y = <a', b'>}``: ``(a', b', y)``.

    ``options`` are those of :func:`project_dot_multiplier`, which documents the solve and also
    returns the multiplier.
    """
    a_new, b_new, y, _ = project_dot_multiplier(a, b, z, **options)
    return a_new, b_new, y


def project_dot_multiplier(
    a: Tensor,
    b: Tensor,
    z: Tensor,
    iterations: int = 60,
    early_exit: bool = True,
    start: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Project ``(a, b, z)`` onto the graph ``{(a', b', y) : y = <a', b'>}``.

    Minimises ``|a' - a|^2 + |b' - b|^2 + (y - z)^2`` subject to ``y = <a', b'>``. With the
    multiplier written as ``-t``, stationarity gives ``a' = (a + t b) / (1 - t^2)``,
    ``b' = (b + t a) / (1 - t^2)``, ``y = z - t``, and the constraint becomes the scalar equation

        ((1 + t^2) p + t q) / (1 - t^2)^2 + t - z = 0,   p = <a, b>,  q = |a|^2 + |b|^2.

    In the rotated coordinates ``u = (a + b)/sqrt 2``, ``v = (a - b)/sqrt 2`` the constraint is
    ``y = (|u'|^2 - |v'|^2) / 2`` and the equation reads
    ``g(t) = U / (2 (1 - t)^2) - V / (2 (1 + t)^2) + t - z = 0`` with ``U = |u|^2``,
    ``V = |v|^2``. The Hessian of the Lagrangian in ``(u', v', y)`` is
    ``diag((1 - t) I, (1 + t) I, 1)``, and for a single quadratic equality constraint the global
    minimiser is the KKT point whose Hessian is positive semidefinite, so ``t`` lies in
    ``[-1, 1]``. There ``g`` is strictly increasing (``g' = 1 + U/(1-t)^3 + V/(1+t)^3``), so the
    root is unique. It is found by Newton's method, safeguarded by bisection, on the pole-free
    quintic ``P(t) = (1 - t^2)^2 g(t) = U (1+t)^2 / 2 - V (1-t)^2 / 2 + (t - z) (1 - t^2)^2``,
    which has the sign of ``g`` inside the bracket (``P(-1) = -2V``, ``P(1) = 2U``). When no
    root lies inside (``u = 0`` or ``v = 0`` with a large enough ``|z|``, the "hard case") the
    bracket closes on ``t = +-1`` and the free block takes any direction with the norm the
    constraint requires.

    The block whose scale ``1/(1 -+ t)`` is bounded by 1 is scaled directly; the other block
    keeps its direction and takes the norm that satisfies the constraint exactly, which keeps
    the result feasible even when ``t`` is close to ``+-1``. Both blocks are therefore scalings
    ``u' = alpha u``, ``v' = beta v``, and the result is formed as ``a' = (alpha s + beta d) / 2``,
    ``b' = (alpha s - beta d) / 2`` with ``s = a + b``, ``d = a - b``: two passes over the
    vectors after the three reductions, whatever the number of Newton steps.

    Args:
        a: first factor, shape ``(..., n)``.
        b: second factor, shape ``(..., n)``.
        z: the output's current value, shape ``(...)``.
        iterations: at most this many safeguarded Newton steps on the multiplier; 60 reaches
            machine precision in float64 even if every step fell back to bisection.
        early_exit: stop once every root is resolved to rounding (typically within 10 steps).
            ``False`` runs exactly ``iterations`` steps without reading any value back to the
            host, which lets ``torch.compile`` fuse the solve into one kernel.
        start: an initial multiplier, shape ``(...)``, e.g. the previous solve's ``t``;
            clamped into ``(-1, 1)``. Default 0.

    Returns:
        ``(a', b', y, t)`` with ``y = <a', b'>`` and ``t`` the multiplier, which warm-starts
        the next solve of a nearby problem.
    """
    s = a + b
    d = a - b
    big_u = 0.5 * torch.linalg.vecdot(s, s)
    big_v = 0.5 * torch.linalg.vecdot(d, d)
    z = z.to(a.dtype)

    lo = torch.full_like(z, -1.0)
    hi = torch.full_like(z, 1.0)
    t = torch.zeros_like(z) if start is None else start.to(z.dtype).clamp(-0.999, 0.999)
    tol = 8.0 * torch.finfo(a.dtype).eps
    for _ in range(iterations):
        om = 1.0 - t
        op = 1.0 + t
        w = om * op
        # P(t) = (1 - t^2)^2 g(t): no poles, and the sign of g on (-1, 1).
        poly = 0.5 * big_u * op * op - 0.5 * big_v * om * om + (t - z) * w * w
        slope = big_u * op + big_v * om + w * w - 4.0 * t * (t - z) * w
        lo = torch.where(poly < 0, t, lo)
        hi = torch.where(poly > 0, t, hi)
        step = poly / slope
        newton = t - step
        inside = (newton > lo) & (newton < hi)
        done = (step.abs() <= tol) | (hi - lo <= tol) | (poly == 0)
        t = torch.where(
            done,
            torch.minimum(torch.maximum(newton, lo), hi),
            torch.where(inside, newton, 0.5 * (lo + hi)),
        )
        if early_exit and bool(done.all()):
            break

    y = z - t
    tiny = _tiny(a)
    # t >= 0: v' = v / (1 + t) is well conditioned and |u'|^2 = 2 y + |v'|^2 from the constraint.
    beta_pos = 1.0 / (1.0 + t)
    u_norm2 = (2.0 * y + beta_pos * beta_pos * big_v).clamp_min(0.0)
    alpha_pos = (u_norm2 / big_u.clamp_min(tiny)).sqrt()
    # t < 0: u' = u / (1 - t) is well conditioned and |v'|^2 = |u'|^2 - 2 y.
    alpha_neg = 1.0 / (1.0 - t)
    v_norm2 = (alpha_neg * alpha_neg * big_u - 2.0 * y).clamp_min(0.0)
    beta_neg = (v_norm2 / big_v.clamp_min(tiny)).sqrt()

    positive = t >= 0
    zero = torch.zeros_like(t)
    alpha = torch.where(positive, torch.where(big_u > 0, alpha_pos, zero), alpha_neg)
    beta = torch.where(positive, beta_pos, torch.where(big_v > 0, beta_neg, zero))
    # Hard case: the block to be rescaled is zero, so it takes the first basis direction
    # (any unit vector is optimal), with the norm the constraint requires.
    free_u = torch.where(positive & (big_u == 0), u_norm2.sqrt(), zero)
    free_v = torch.where(~positive & (big_v == 0), v_norm2.sqrt(), zero)
    half_alpha = (0.5 * alpha).unsqueeze(-1)
    half_beta = (0.5 * beta).unsqueeze(-1)
    # u' = free_u e_1 adds free_u / sqrt 2 to the first coordinate of both factors; v' = free_v e_1
    # adds it to a' and subtracts it from b'.
    rt2 = math.sqrt(2.0)
    shift_a = (free_u + free_v) / rt2
    shift_b = (free_u - free_v) / rt2
    if torch.compiler.is_compiling():
        # One fused expression: an in-place write into a slice would copy the whole tensor.
        first = torch.zeros(a.shape[-1], dtype=a.dtype, device=a.device)
        first[0] = 1.0
        a_new = half_alpha * s + half_beta * d + shift_a.unsqueeze(-1) * first
        b_new = half_alpha * s - half_beta * d + shift_b.unsqueeze(-1) * first
    else:
        # Eagerly, each operation is a pass over memory: two per factor, and a column update.
        a_new = torch.addcmul(half_alpha * s, half_beta, d)
        b_new = torch.addcmul(half_alpha * s, half_beta, d, value=-1.0)
        a_new[..., 0] += shift_a
        b_new[..., 0] += shift_b
    return a_new, b_new, torch.linalg.vecdot(a_new, b_new), t


def project_sum(x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``(x, z)`` onto the graph ``{(x', y) : y = sum_i x'_i}``.

    The constraint is a hyperplane with normal ``(1, ..., 1, -1)``, so every term moves by the
    same ``t = (z - sum x) / (n + 1)`` and the output by ``-t``.
    """
    n = x.shape[-1]
    t = (z - x.sum(-1)) / (n + 1)
    x_new = x + t.unsqueeze(-1)
    return x_new, x_new.sum(-1)


def project_relu(x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``(x, z)`` onto the graph ``{(x', y) : y = relu(sum_i x'_i)}``.

    The terms of the sum carry the bias folded in (e.g. ``x = (w.h, b)`` for ``relu(w.h + b)``);
    a plain elementwise ReLU is the case ``n = 1``. The graph is the union of two convex pieces
    and the projection is the closer of the projections onto each, with ``s = sum x``:

    * inactive piece ``{sum x' <= 0, y = 0}``: ``y = 0`` and, if ``s > 0``, every term drops by
      the mean excess ``s / n``; squared distance ``z^2 + max(s, 0)^2 / n``.
    * active piece ``{sum x' >= 0, y = sum x'}``: the hyperplane projection ``x' = x + t``,
      ``y = z - t`` with ``t = (z - s) / (n + 1)``, squared distance ``(z - s)^2 / (n + 1)``,
      valid when ``z - t >= 0``. Otherwise the nearest point of the piece lies on its boundary
      ``{sum x' = 0, y = 0}``, which also belongs to the inactive piece and is never closer than
      the inactive projection, so the inactive projection is taken.

    Both signs of ``z`` and of ``s`` go through the same comparison; a negative target simply
    makes the active hyperplane projection invalid or more distant.
    """
    n = x.shape[-1]
    z = z.to(x.dtype)
    s = x.sum(-1)
    excess = s.clamp_min(0.0)
    dist_inactive = z * z + excess * excess / n
    t = (z - s) / (n + 1)
    dist_active = (n + 1) * t * t
    active = (z - t >= 0) & (dist_active < dist_inactive)
    x_active = x + t.unsqueeze(-1)
    x_inactive = x - (excess / n).unsqueeze(-1)
    x_new = torch.where(active.unsqueeze(-1), x_active, x_inactive)
    return x_new, x_new.sum(-1).clamp_min(0.0)


def project_mean(x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``(x, z)`` onto the graph ``{(x', y) : y = mean_i x'_i}`` (average pooling).

    The constraint is a hyperplane with normal ``(1/n, ..., 1/n, -1)``: with the residual
    ``r = mean(x) - z``, every term moves by ``-t/n`` and the output by ``+t``, where
    ``t = r / (1 + 1/n)``.
    """
    n = x.shape[-1]
    t = (x.mean(-1) - z.to(x.dtype)) * (n / (n + 1.0))
    x_new = x - (t / n).unsqueeze(-1)
    return x_new, x_new.mean(-1)


def project_step(x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``(x, z)`` onto the closed graph of a hard threshold ``y = step(sum_i x'_i)``.

    ``step(s)`` is 1 for ``s > 0`` and 0 otherwise (:class:`unitrain.policy.nn.Step`); the terms carry
    the bias folded in, as in :func:`project_relu`. The graph's closure is the union of two
    convex pieces, and the projection is the closer of the projections onto each, with
    ``s = sum x``:

    * off ``{sum x' <= 0, y = 0}``: if ``s > 0`` every term drops by ``s / n``; squared distance
      ``z^2 + max(s, 0)^2 / n``;
    * on ``{sum x' >= 0, y = 1}``: if ``s < 0`` every term rises by ``-s / n``; squared distance
      ``(z - 1)^2 + max(-s, 0)^2 / n``.

    On the boundary ``sum x' = 0`` both outputs belong to the closure; the result is on the
    graph itself everywhere else. Ties go to the off piece. The result ``(x', y)`` has ``y`` in
    ``{0, 1}`` and ``(sum x', y)`` on the closed graph.
    """
    n = x.shape[-1]
    z = z.to(x.dtype)
    s = x.sum(-1)
    excess = s.clamp_min(0.0)
    deficit = (-s).clamp_min(0.0)
    on = (z - 1.0) ** 2 + deficit * deficit / n < z * z + excess * excess / n
    shift = torch.where(on, deficit, -excess) / n
    return x + shift.unsqueeze(-1), on.to(x.dtype)


def project_equal(x: Tensor, dim: int = -1, weight: Tensor | None = None) -> Tensor:
    """Project copies of one value onto ``{all copies equal}``.

    The nearest point of the diagonal is the mean; with positive weights ``w_i`` (the metric
    ``sum_i w_i |x_i' - x_i|^2``) it is the weighted mean.

    Args:
        x: the copies, indexed along ``dim``.
        dim: the axis holding the copies.
        weight: optional positive weights broadcastable to ``x``.

    Returns:
        ``x`` with every copy replaced by the (weighted) mean.
    """
    if weight is None:
        mean = x.mean(dim, keepdim=True)
    else:
        w = torch.broadcast_to(weight.to(x.dtype), x.shape)
        mean = (w * x).sum(dim, keepdim=True) / w.sum(dim, keepdim=True)
    return mean.expand_as(x).clone()


def prox_squared_error(x: Tensor, target: Tensor, weight: float = 1.0) -> Tensor:
    """Proximal step of a weighted squared error toward a target.

    ``argmin_x' |x' - x|^2 / 2 + weight |x' - target|^2 / 2 = (x + weight target) / (1 + weight)``;
    ``weight = inf`` is the projection onto ``{x' = target}``.

    Args:
        x: current outputs.
        target: regression targets, broadcastable to ``x``.
        weight: weight of the squared error relative to the proximity term, ``>= 0``.

    Returns:
        The proximal point, shaped like ``x``.
    """
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    target = torch.broadcast_to(target.to(x.dtype), x.shape)
    if math.isinf(weight):
        return target.clone()
    return (x + weight * target) / (1.0 + weight)


def _as_probabilities(labels: Tensor, like: Tensor) -> Tensor:
    if labels.is_floating_point() and labels.shape == like.shape:
        return labels.to(like.dtype)
    if labels.shape != like.shape[:-1]:
        raise ValueError(
            f"labels must be class indices of shape {tuple(like.shape[:-1])} or probabilities "
            f"of shape {tuple(like.shape)}, got shape {tuple(labels.shape)}"
        )
    return torch.nn.functional.one_hot(labels.long(), like.shape[-1]).to(like.dtype)


def prox_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    lam: float = 5.0,
    iterations: int = 25,
    early_exit: bool = True,
    start: Tensor | None = None,
) -> Tensor:
    """Proximal step of the cross-entropy: ``argmin_x |x - l|^2 / 2 + lam CE(x, y)``.

    ``CE(x, y) = logsumexp(x) - <y, x>``. The optimum satisfies ``x = l + lam (y - softmax(x))``,
    but iterating that map contracts only for ``lam < 2`` (the softmax Jacobian has norm up to
    1/2). The objective is 1-strongly convex with Hessian ``I + lam (diag(p) - p p^T)``, whose
    inverse is diagonal plus rank one (Sherman-Morrison), so Newton's method is used:

        H^-1 g = g/D + lam (p/D) <p, g/D> / (1 - lam <p, p/D>),   D = 1 + lam p,

    where ``1 - lam <p, p/D> = 1 - sum lam p_k^2 / (1 + lam p_k) > 1 - sum p_k = 0``. Each step
    is damped by backtracking (Armijo) over the step sizes ``1, 1/2, ..., 2^-12`` until the
    predicted decrease falls below the objective's rounding, where full steps are taken.

    Args:
        logits: current logits ``l``, shape ``(..., K)``.
        labels: class indices of shape ``(...)`` or probability vectors of shape ``(..., K)``.
        lam: weight of the cross-entropy, ``> 0``.
        iterations: at most this many Newton steps; the loop stops once every step is at the
            rounding level.
        early_exit: stop once every step is at the rounding level; ``False`` runs exactly
            ``iterations`` steps without reading values back to the host.
        start: where Newton's method starts (default ``logits``), e.g. the previous solve's
            result when the logits change little between calls.

    Returns:
        The proximal point, shaped like ``logits``.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    y = _as_probabilities(labels, logits)
    steps = 0.5 ** torch.arange(13, dtype=logits.dtype, device=logits.device)
    eps = torch.finfo(logits.dtype).eps
    tol = 8.0 * eps

    def objective(x: Tensor, centre: Tensor, probs: Tensor) -> Tensor:
        d = x - centre
        return 0.5 * (d * d).sum(-1) + lam * (torch.logsumexp(x, -1) - (probs * x).sum(-1))

    x = logits.clone() if start is None else start.to(logits.dtype)
    for _ in range(iterations):
        p = torch.exp(x - torch.logsumexp(x, -1, keepdim=True))
        grad = x - logits + lam * (p - y)
        d = 1.0 + lam * p
        g_d = grad / d
        p_d = p / d
        denom = 1.0 - lam * (p * p_d).sum(-1, keepdim=True)
        step = g_d + lam * p_d * (p * g_d).sum(-1, keepdim=True) / denom
        f0 = objective(x, logits, y)
        slope = (grad * step).sum(-1)
        trial = x.unsqueeze(-2) - steps.view(-1, 1) * step.unsqueeze(-2)
        f_trial = objective(trial, logits.unsqueeze(-2), y.unsqueeze(-2))
        ok = f_trial <= f0.unsqueeze(-1) - 1e-4 * steps * slope.unsqueeze(-1)
        first = ok.to(torch.int8).argmax(-1)
        alpha = torch.where(ok.any(-1), steps[first], torch.zeros_like(f0))
        # Once the predicted decrease is below the objective's rounding the line search cannot
        # judge a step, but Newton is then deep in its region of quadratic convergence.
        resolved = slope <= 1e3 * eps * (1.0 + f0.abs())
        alpha = torch.where(resolved, torch.ones_like(alpha), alpha)
        x = x - alpha.unsqueeze(-1) * step
        if early_exit and bool((step.abs() <= tol * (1.0 + x.abs())).all()):
            break
    return x


def project_margin(logits: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Project logits onto ``{x : x_y >= x_k + margin for every k != y}``.

    With ``c_k = x_k + margin - x_y`` (the violation of class ``k``), the projection raises the
    correct logit by ``delta >= 0`` and lowers every violating logit to ``x_y + delta - margin``;
    stationarity gives ``delta = sum_k max(c_k - delta, 0)``. Its left side increases and its
    right side decreases in ``delta``, so the root is unique: with ``c`` sorted in decreasing
    order and partial sums ``S_j``, the active set is the prefix ``{j : c_(j) > S_j / (j + 1)}``
    of length ``r`` and ``delta = S_r / (r + 1)``.

    Args:
        logits: shape ``(..., K)``.
        labels: class indices, shape ``(...)``.
        margin: required gap between the correct logit and every other logit.

    Returns:
        The projected logits.
    """
    labels = labels.long()
    k = logits.shape[-1]
    x_y = logits.gather(-1, labels.unsqueeze(-1))
    c = logits + margin - x_y
    is_label = torch.nn.functional.one_hot(labels, k).bool()
    c = c.masked_fill(is_label, -math.inf)
    c_sorted, _ = torch.sort(c, dim=-1, descending=True)
    finite = torch.isfinite(c_sorted)
    partial = torch.cumsum(torch.where(finite, c_sorted, torch.zeros_like(c_sorted)), -1)
    counts = torch.arange(1, k + 1, dtype=logits.dtype, device=logits.device)
    in_active = finite & (c_sorted > partial / (counts + 1.0))
    r = in_active.sum(-1, keepdim=True)
    s_r = torch.where(r > 0, partial.gather(-1, (r - 1).clamp_min(0)), torch.zeros_like(x_y))
    delta = s_r / (r.to(logits.dtype) + 1.0)
    new_y = x_y + delta
    others = torch.minimum(logits, new_y - margin)
    return torch.where(is_label, new_y.expand_as(logits), others)


def project_one_vs_rest(
    logits: Tensor, labels: Tensor, high: float = 1.0, low: float = 0.0
) -> Tensor:
    """Project logits onto ``{x : x_y >= high, x_k <= low for k != y}``.

    The set is a box, so the projection clamps each coordinate independently.

    Args:
        logits: shape ``(..., K)``.
        labels: class indices, shape ``(...)``.
        high: lower bound on the correct logit.
        low: upper bound on every other logit.

    Returns:
        The projected logits.
    """
    is_label = torch.nn.functional.one_hot(labels.long(), logits.shape[-1]).bool()
    return torch.where(is_label, logits.clamp_min(high), logits.clamp_max(low))
