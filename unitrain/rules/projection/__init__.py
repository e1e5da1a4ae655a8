"""Projection-based training: a network as a feasibility problem solved by projections.

Implements the numerical core of Bergmeister et al., "A projection-based framework for
gradient-free and parallel learning" (arXiv:2506.05878): closed-form projections onto the graphs
of elementary operations (:mod:`.operators`), the split of a network into per-operation
constraints and copy consistency (:mod:`.graph`, with the network's stages in :mod:`.stages`,
the supported layers in :mod:`.layers` and the output constraints in :mod:`.outputs`), and the
Douglas-Rachford and alternating-projection solvers over that split (:mod:`.solvers`).

The package exports the public names of :mod:`.graph`, :mod:`.operators` and :mod:`.solvers`.
"""

from unitrain.rules.projection import graph, operators, solvers
from unitrain.rules.projection.graph import *
from unitrain.rules.projection.operators import *
from unitrain.rules.projection.solvers import *

__all__ = graph.__all__ + operators.__all__ + solvers.__all__
