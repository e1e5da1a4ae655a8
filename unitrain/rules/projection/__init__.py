"""Projection-based training: a network as a feasibility problem solved by projections.

Implements the numerical core of Bergmeister et al., "A projection-based framework for
gradient-free and parallel learning" (arXiv:2506.05878): closed-form projections onto the graphs
of elementary operations (:mod:`.operators`), the split of a network into per-operation
constraints and copy consistency (:mod:`.graph`), and the Douglas-Rachford and
alternating-projection solvers over that split (:mod:`.solvers`).
"""

from unitrain.rules.projection.graph import (SUPPORTED_LAYERS, ActivationStage, ConvStage,
                                             CrossEntropyOutput, LinearStage, MarginOutput,
                                             OneVsRestOutput, OutputConstraint, PoolStage,
                                             ProjectionGraph, ReduceMean, ReshapeStage,
                                             SquaredErrorOutput, State)
from unitrain.rules.projection.operators import (project_dot, project_dot_multiplier, project_equal,
                                                 project_margin, project_mean, project_one_vs_rest,
                                                 project_relu, project_step, project_sum,
                                                 prox_cross_entropy, prox_squared_error)
from unitrain.rules.projection.solvers import (Method, SolveResult, alternating_projections,
                                               douglas_rachford, fit_batch, solve)

__all__ = [
    "SUPPORTED_LAYERS",
    "ActivationStage",
    "ConvStage",
    "CrossEntropyOutput",
    "LinearStage",
    "MarginOutput",
    "Method",
    "OneVsRestOutput",
    "OutputConstraint",
    "PoolStage",
    "ProjectionGraph",
    "ReduceMean",
    "ReshapeStage",
    "SolveResult",
    "SquaredErrorOutput",
    "State",
    "alternating_projections",
    "douglas_rachford",
    "fit_batch",
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
    "solve",
]
