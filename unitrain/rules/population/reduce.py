"""A population update split across processes, with the same bits for any number of them.

The update of a population rule is a weighted sum over the population — the search gradient of
OpenAI-ES (Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to
Reinforcement Learning"), the directions ARS keeps, CEM's and CMA-ES's recombination and
variance, CBO's consensus — and with a large network and population it costs as much as the
evaluation: P regenerated perturbations of n parameters. :func:`exact_sum` splits that sum: each
rank computes only its contiguous share of the terms (:func:`~unitrain.envs.rollout.shard`), and one all-reduce of ``n`` float64 values
combines the shares. Update time and memory per rank fall as ``1/W``; what crosses the network
is one vector of ``n`` float64 values per rank and generation (a ring all-reduce sends about
twice that), whatever the population.

Floating-point addition is not associative, so partial sums combined in a rank-dependent order
would make ``devices=1`` and ``devices=4`` drift apart. Sums are therefore rounded onto a
fixed-point grid, ``round(x · 2^s)``, with the exponent ``s`` chosen from a bound on the
whole sum that every rank knows in advance so that the bound sits below ``2^52``: every rounded
value and every partial sum is an integer that float64 holds exactly, and such additions are
exact in any order. To keep the rounding off the hot path, the terms are cut into fixed blocks of
:data:`BLOCK` (by position, never by rank): a block is summed in float64 by the one rank that owns
it and rounded once, and ranks own whole blocks. The result is the same on every rank and for every
world size, bit for bit, and differs from the float64 sum by at most half a grid step per block
(about ``2^-53`` of the bound each: float64's own resolution).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from unitrain.envs.rollout import shard
from unitrain.rules.population.service import noise

if TYPE_CHECKING:
    from unitrain.rules.base import RuleContext

__all__ = ["NOISE_BOUND", "exact_sum", "global_max", "noise_sum"]

# |ε| of torch's CPU normal generator: Box–Muller on uniforms of at most 53 bits gives
# |ε| ≤ √(2·53·ln 2) ≈ 8.6; the bound leaves room (and the sums are checked against it).
NOISE_BOUND = 16.0
# Terms are scaled so that the bound sits below 2^52: every rounded block and every partial sum
# is then an integer that float64 represents exactly, so float64 additions of them are exact.
_BITS = 52
# Terms per block: a block is summed in float64 by one rank and rounded once. Blocks are fixed
# by the terms' positions, never by the world size, and handed out to ranks whole.
BLOCK = 4


def exact_sum(ctx: RuleContext, terms: Sequence[int], add: Callable[[int, torch.Tensor], object],
              bound: float, shape: Sequence[int] | torch.Size, block: int = BLOCK
              ) -> torch.Tensor:
    """``Σₖ term(k)`` over ``terms`` in float64, this rank computing its share only.

    The terms are cut into blocks of ``block`` consecutive ones; this rank sums the blocks of its
    :func:`~unitrain.envs.rollout.shard` of them, each in float64 in order, rounds each block sum
    onto the grid, and one all-reduce adds every rank's integers.

    Args:
        ctx: the run's services (rank, world size, the all-reduce).
        terms: the indices to sum over, the same list on every rank.
        add: ``add(k, out)`` adds term ``k`` into ``out`` (float64, CPU, of ``shape``) in place,
            e.g. ``out.add_(x, alpha=w)``: the term is never materialised on its own.
        bound: an upper bound of ``Σₖ max|term(k)|`` over *all* terms, identical on every rank
            (it sets the grid); sums that reach beyond it are an error, never a silent
            overflow.
        shape: the shape of each term.
        block: terms per block (``1``: this rank sums exactly its ``shard`` of ``terms``, e.g.
            the individuals it holds).

    Returns:
        The sum, float64, on the CPU: the same bits on every rank, for any world size.
    """
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"exact_sum: the bound must be a finite number >= 0, got {bound}")
    scale = math.ldexp(1.0, _BITS - math.frexp(bound)[1]) if bound > 0 else 1.0
    acc = torch.zeros(tuple(shape), dtype=torch.float64)
    part = torch.empty_like(acc)
    reach = torch.zeros((), dtype=torch.float64)  # Σ max|block sum| over this rank's blocks
    for b in shard(math.ceil(len(terms) / block), ctx.rank, ctx.world_size):
        part.zero_()
        for k in terms[b * block: (b + 1) * block]:
            add(k, part)
        low, high = torch.aminmax(part)
        reach += torch.maximum(-low, high)
        acc.add_(part.mul_(scale).round_())
    if ctx.world_size > 1:
        # One collective carries the integers and, behind them, the reach for the check.
        both = ctx.all_reduce_(torch.cat([acc.reshape(-1), reach.reshape(1)]).to(ctx.device),
                               "sum").cpu()
        acc, reach = both[:-1].reshape(acc.shape), both[-1]
    if reach.item() > bound * (1 + 1e-9):
        raise RuntimeError(f"exact_sum: the terms reach {reach.item():.6g}, above the stated "
                           f"bound {bound:.6g} of the whole sum")
    return acc.div_(scale)


def noise_sum(ctx: RuleContext, seeds: Sequence[int], weights: Sequence[float], numel: int,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Σₖ wₖ·ε(seedₖ)`` (float64, CPU) split across ranks by :func:`exact_sum`; a zero weight
    adds nothing, and its noise is regenerated by no rank."""
    live = [k for k, w in enumerate(weights) if w != 0.0]
    bound = NOISE_BOUND * sum(abs(float(weights[k])) for k in live)
    return exact_sum(ctx, live, lambda k, out: out.add_(noise(seeds[k], numel, dtype),
                                                         alpha=float(weights[k])),
                     bound, (numel,))


def global_max(ctx: RuleContext, local: float) -> float:
    """The largest of every rank's ``local`` (exact: a maximum does not round)."""
    value = torch.tensor([local], dtype=torch.float64)
    if ctx.world_size > 1:
        value = ctx.all_reduce_(value.to(ctx.device), "max").cpu()
    return float(value.item())
