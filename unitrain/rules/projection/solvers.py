"""Douglas-Rachford and alternating projections over the two-set split of a network's graph.

The feasibility problem of :class:`~unitrain.rules.projection.graph.ProjectionGraph` has two sets: A,
every operation on its graph (and the output constraint), and B, all copies consistent. Both
projections are cheap and parallel across operations and samples, which is the premise of
Bergmeister et al., "A projection-based framework for gradient-free and parallel learning"
(arXiv:2506.05878). Each mini-batch starts from a forward pass, runs a fixed number of
iterations, and writes the consensus parameters back into the module.

The reported violation of an iterate is ``dist(x, B)`` for ``x = P_A(z)``: how far the
operation-wise projected copies are from agreeing, divided by ``sqrt(batch size)``. It is zero
exactly at a point of both sets (and at a fixed point of Douglas-Rachford, also when the output
"constraint" is a proximal step). With several processes it is the local part of that distance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from unitrain.rules.projection.graph import OutputConstraint, ProjectionGraph, ReduceMean, State

__all__ = [
    "Method",
    "SolveResult",
    "alternating_projections",
    "douglas_rachford",
    "fit_batch",
    "solve",
]

Method = Literal["douglas_rachford", "alternating_projections"]


@dataclass
class SolveResult:
    """Outcome of a solve on one batch.

    Attributes:
        state: the consistent state ``P_B(P_A(z))`` of the last iterate; its parameter copies
            are the consensus parameters.
        violation: ``dist(P_A(z_k), B)`` for every iteration ``k``, shape ``(iterations,)``.
    """

    state: State
    violation: Tensor


def _check_iterations(iterations: int) -> None:
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")


class _Batch(NamedTuple):
    """What stays fixed through the iterations on one batch."""

    inputs: Tensor
    targets: Tensor
    output: OutputConstraint
    reduce_mean: ReduceMean | None
    warm: State | None  # the inner solves' starting points, or None to solve them from scratch
    weights: Tensor | None  # per-sample weights (0 for padding), or None for all 1


Step = Callable[[ProjectionGraph, State, State, _Batch], tuple[State, State, Tensor]]


def _violation(x: State, pb_x: State, weights: Tensor | None) -> Tensor:
    """``dist(x, P_B(x)) / sqrt(batch)``, counting only samples of positive weight."""
    if weights is None:
        total = sum(((x[k] - pb_x[k]) ** 2).sum() for k in x)
        return torch.as_tensor(total).sqrt() / math.sqrt(x["out"].shape[0])
    per_sample = sum(((x[k] - pb_x[k]) ** 2).reshape(len(weights), -1).sum(1) for k in x)
    return (torch.as_tensor(per_sample) * (weights > 0)).sum().sqrt() / (weights > 0).sum().sqrt()


def _dr_step(graph: ProjectionGraph, z: State, pb_z: State,
             batch: _Batch) -> tuple[State, State, Tensor]:
    """One Douglas-Rachford iteration: the new ``z``, ``P_B(x)`` and the violation of ``x``."""
    x = graph.project_ops(z, batch.output, batch.targets, batch.warm)
    pb_x = graph.project_consistency(x, batch.inputs, batch.reduce_mean, batch.weights)
    # z <- z + P_B(2x - z) - x = z - (x - P_B(x)) + P_B(x) - P_B(z), as P_B(2x - z) =
    # 2 P_B(x) - P_B(z); the residual x - P_B(x) also gives the violation.
    z = {key: z[key] - x[key] + 2.0 * pb_x[key] - pb_z[key] for key in z}
    return z, pb_x, _violation(x, pb_x, batch.weights)


def _ap_step(graph: ProjectionGraph, z: State, pb_z: State,
             batch: _Batch) -> tuple[State, State, Tensor]:
    """One alternating projection ``z <- P_B(P_A(z))``: the new ``z`` (twice) and violation."""
    del pb_z
    x = graph.project_ops(z, batch.output, batch.targets, batch.warm)
    z = graph.project_consistency(x, batch.inputs, batch.reduce_mean, batch.weights)
    return z, z, _violation(x, z, batch.weights)


_COMPILED: dict[Step, Step] = {}


def _compiled(step: Step) -> Step:
    """The ``torch.compile``-d ``step``, one per step function for the whole process.

    Every call goes through Dynamo's guards (the graph's structure, the output constraint, the
    tensors' shapes, strides and aliasing, the global state), which select the compiled version
    made for exactly that problem or compile a new one; checking them costs microseconds against
    the milliseconds of an iteration. ``fullgraph`` makes a graph break an error rather than a
    silent split of the iteration into several programs.
    """
    if step not in _COMPILED:
        _COMPILED[step] = torch.compile(step, dynamic=False, fullgraph=True)
    return _COMPILED[step]


def _contiguous(tensor: Tensor) -> Tensor:
    """``tensor`` with the strides of a new contiguous tensor, including along axes of size 1.

    :meth:`torch.Tensor.contiguous` keeps the strides of size-1 axes, which the guards of a
    compiled step compare too.
    """
    strides: list[int] = []
    step = 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _iterate(step: Step, graph: ProjectionGraph, z: State, inputs: Tensor, targets: Tensor,
             output: OutputConstraint, iterations: int, reduce_mean: ReduceMean | None,
             warm_start: bool, compile: bool) -> SolveResult:
    """Run ``step`` ``iterations`` times.

    A compiled step is used for one batch size per graph, the first it is compiled for. A
    smaller batch (the last of an epoch) is padded to that size with repeats of its own samples
    at weight 0, which leave the parameters and the violation unchanged, and runs compiled too;
    a larger one runs uncompiled. The compiled path starts from contiguous tensors, laid out like
    the compiled Douglas-Rachford step's own outputs, so that its first iteration runs the
    program compiled for the later ones instead of needing one of its own (alternating
    projections compile a second, for the consistent states their later iterations start from).
    """
    _check_iterations(iterations)
    fast = step
    batch = int(inputs.shape[0])
    weights: Tensor | None = None
    if compile and reduce_mean is None:
        if graph.compiled_batch is None:
            graph.compiled_batch = batch
        if graph.compiled_batch >= batch:
            fast = _compiled(step)
            weights = torch.zeros(graph.compiled_batch, dtype=z["out"].dtype,
                                  device=z["out"].device)
            weights[:batch] = 1.0
            if graph.compiled_batch > batch:
                rows = torch.arange(graph.compiled_batch, device=inputs.device) % batch
                z = {key: value[rows] for key, value in z.items()}
                inputs, targets = inputs[rows], targets[rows]
            z = {key: _contiguous(value) for key, value in z.items()}
    pb_z = graph.project_consistency(z, inputs, reduce_mean, weights)
    warm: State | None = graph.inner_start(z) if (warm_start or compile) else None
    violation: list[Tensor] = []
    fixed = _Batch(inputs, targets, output, reduce_mean, warm, weights)
    for _ in range(iterations):
        z, pb_z, v = fast(graph, z, pb_z, fixed)
        violation.append(v)
    if pb_z["out"].shape[0] != batch:
        pb_z = {key: value[:batch] for key, value in pb_z.items()}
    return SolveResult(state=pb_z, violation=torch.stack(violation))


_STEPS: dict[str, Step] = {"douglas_rachford": _dr_step, "alternating_projections": _ap_step}


@torch.no_grad()
def solve(
    graph: ProjectionGraph,
    state: State,
    inputs: Tensor,
    targets: Tensor,
    output: OutputConstraint,
    method: Method = "douglas_rachford",
    iterations: int = 50,
    reduce_mean: ReduceMean | None = None,
    warm_start: bool = False,
    compile: bool = False,
) -> SolveResult:
    """Run ``method`` from ``state``.

    Douglas-Rachford splitting ``z <- z/2 + R_B R_A z / 2`` with ``R = 2P - I`` is written with the
    shadow ``x = P_A(z)``: ``z <- z + P_B(2x - z) - x``. Because ``P_B`` is affine,
    ``P_B(2x - z) = 2 P_B(x) - P_B(z)``, and after an update ``P_B(z + P_B(2x - z) - x) =
    P_B(x)``; so one consistency projection per iteration serves the update, the violation and
    the consensus, and ``reduce_mean`` is called once per iteration. Alternating projections
    iterate ``z <- P_B(P_A(z))``.

    Args:
        graph: the network's feasibility problem.
        state: the starting point ``z_0``, usually :meth:`ProjectionGraph.init_state`.
        inputs: the batch's inputs (fixed data).
        targets: the batch's targets for ``output``.
        output: the constraint on the network output.
        method: ``"douglas_rachford"`` or ``"alternating_projections"``.
        iterations: number of iterations.
        reduce_mean: elementwise mean over processes, for the parameter consensus.
        warm_start: solve the inner scalar problems of set A (the dot products' multipliers,
            the cross-entropy's proximal step) with a fixed number of Newton steps started from
            the previous iteration's solutions (see :meth:`ProjectionGraph.project_ops`)
            instead of to rounding from scratch; the first iteration starts them from
            :meth:`ProjectionGraph.inner_start`.
        compile: run every iteration as one ``torch.compile``-d program
            (implies ``warm_start``; single-process only: with ``reduce_mean`` the iterations
            run uncompiled). The first batch compiles one program for the problem (graph,
            output constraint, batch size), about half a minute on a CPU and cached on disk for
            later processes; every call checks that program's guards. A smaller batch is padded
            to its size (with weight-0 repeats of its samples) and a larger one runs uncompiled.

    Returns:
        The consistent state of the last iterate (Douglas-Rachford: of its shadow), whose
        parameter copies are the consensus parameters, and the violation per iteration.

    Raises:
        ValueError: unknown method, or ``iterations < 1``.
    """
    if method not in _STEPS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {sorted(_STEPS)}")
    with _flush_denormals():
        return _iterate(_STEPS[method], graph, state, inputs, targets, output, iterations,
                        reduce_mean, warm_start, compile)


def douglas_rachford(graph: ProjectionGraph, state: State, inputs: Tensor, targets: Tensor,
                     output: OutputConstraint, *args: Any, **kwargs: Any) -> SolveResult:
    """:func:`solve` with ``method="douglas_rachford"``; the other arguments are its own."""
    return solve(graph, state, inputs, targets, output, "douglas_rachford", *args, **kwargs)


def alternating_projections(graph: ProjectionGraph, state: State, inputs: Tensor,
                            targets: Tensor, output: OutputConstraint, *args: Any,
                            **kwargs: Any) -> SolveResult:
    """:func:`solve` with ``method="alternating_projections"``; the other arguments are its
    own."""
    return solve(graph, state, inputs, targets, output, "alternating_projections", *args,
                 **kwargs)


@contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU for the duration of the block.

    Copies that the iterations drive towards zero (inactive ReLU branches, multipliers of
    satisfied constraints) pass through the subnormal range, where x86 arithmetic is up to two
    orders of magnitude slower; flushing them changes values below 1e-38 only.
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def fit_batch(graph: ProjectionGraph, inputs: Tensor, targets: Tensor, output: OutputConstraint,
              *args: Any, **kwargs: Any) -> SolveResult:
    """One training step: initialise from a forward pass of ``inputs`` (``(B, *input shape)``),
    :func:`solve` (``args``/``kwargs``: its own, from ``method`` on), and write the consensus
    parameters into ``graph``'s module.

    With several ranks, ``reduce_mean`` must average over all of them (e.g. an all-reduce sum
    divided by the world size), and every rank must call this function the same number of times.
    """
    result = solve(graph, graph.init_state(inputs), inputs, targets, output, *args, **kwargs)
    # The result state is consistent: its parameter copies already hold the all-rank mean.
    graph.write_parameters(result.state, consistent=True)
    return result
