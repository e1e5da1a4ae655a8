"""Constraint violation per solver iteration on a realisable problem.

A random teacher network ``4 -> H -> 2`` (ReLU) labels random inputs; a student of the same shape
(other initial weights) is fitted to the teacher's outputs on one batch by Douglas-Rachford and by
alternating projections (Bergmeister et al., "A projection-based framework for gradient-free and
parallel learning", arXiv:2506.05878), with the squared-error output constraint. Since a student
equal to the teacher satisfies every constraint, the feasibility problem has a solution and the
violation ``dist(P_A(z), B)`` can go to zero. Printed: the violation at chosen iterations and the
student's mean squared error to the targets before and after. Run::

    python tools/projection_curve.py                       # batch 32, hidden 8, 2,000 iterations
    python tools/projection_curve.py --hidden 16 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from unitrain.rules.projection import ProjectionGraph, SquaredErrorOutput, solve

MARKS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _mlp(hidden: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2)).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=8, help="hidden width of both networks")
    parser.add_argument("--batch", type=int, default=32, help="samples in the batch")
    parser.add_argument("--iterations", type=int, default=2000, help="solver iterations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    teacher = _mlp(args.hidden, args.seed + 100)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 4, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        targets = teacher(x)
    marks = [m for m in MARKS if m <= args.iterations]
    print(f"teacher/student 4 -> {args.hidden} -> 2 (ReLU), batch {args.batch}, float64, "
          f"squared-error output; violation = dist(P_A(z), B) / sqrt(batch)")
    print(f"{'method':<26}" + "".join(f"{m:>10}" for m in marks) + f"{'mse before':>12}"
          f"{'mse after':>11}{'s':>7}")
    for method in ("douglas_rachford", "alternating_projections"):
        student = _mlp(args.hidden, args.seed + 200)
        graph = ProjectionGraph(student)
        with torch.no_grad():
            before = float(((student(x) - targets) ** 2).mean())
        start = time.perf_counter()
        result = solve(graph, graph.init_state(x), x, targets, SquaredErrorOutput(1.0),
                       method=method, iterations=args.iterations)
        seconds = time.perf_counter() - start
        graph.write_parameters(result.state, consistent=True)
        with torch.no_grad():
            after = float(((student(x) - targets) ** 2).mean())
        curve = result.violation
        print(f"{method:<26}" + "".join(f"{float(curve[m - 1]):>10.2e}" for m in marks)
              + f"{before:>12.3e}{after:>11.3e}{seconds:>7.1f}")


if __name__ == "__main__":
    main()
