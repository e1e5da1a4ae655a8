"""The constraints on a network's output: the losses of projection training as set-A operations.

Part of projection-based training (Bergmeister et al., "A projection-based framework for
gradient-free and parallel learning", arXiv:2506.05878). The network output has one more copy,
held by the output constraint: a projection onto a set of acceptable outputs (a margin, a box)
or the proximal step of a loss (squared error, cross-entropy). Each constraint here is one
operator of :mod:`unitrain.rules.projection.operators` with its settings as the operator's
arguments after the outputs and targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from torch import Tensor

from unitrain.rules.projection.operators import (project_margin, project_one_vs_rest,
                                                 prox_cross_entropy, prox_squared_error)

__all__ = [
    "CrossEntropyOutput",
    "MarginOutput",
    "OneVsRestOutput",
    "OutputConstraint",
    "SquaredErrorOutput",
]


class OutputConstraint(Protocol):
    """The operation attached to the network output: a projection or a proximal step."""

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Map the constraint's copy of the outputs ``(B, K)`` to its projection/proximal point."""
        ...


class _OperatorOutput:
    """An output constraint that applies :attr:`operator` to ``(outputs, targets)`` followed by
    the dataclass fields, in their order."""

    operator: ClassVar[Callable[..., Tensor]]

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Map the constraint's copy of the outputs ``(B, K)`` to its projection/proximal point."""
        settings = (getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]
        return self.operator(outputs, targets, *settings)


@dataclass(frozen=True)
class SquaredErrorOutput(_OperatorOutput):
    """Proximal step of ``weight/2 |y - target|^2``; ``weight = inf`` forces ``y = target``
    (:func:`~unitrain.rules.projection.operators.prox_squared_error`).

    Args:
        weight: weight of the squared error against the proximity term.
    """

    operator = staticmethod(prox_squared_error)
    weight: float = 1.0


@dataclass(frozen=True)
class CrossEntropyOutput(_OperatorOutput):
    """Proximal step of ``lam * CE(logits, labels)``
    (:func:`~unitrain.rules.projection.operators.prox_cross_entropy`).

    Args:
        lam: weight of the cross-entropy.
        iterations: Newton steps of the proximal solve.
    """

    operator = staticmethod(prox_cross_entropy)
    lam: float = 5.0
    iterations: int = 25


@dataclass(frozen=True)
class MarginOutput(_OperatorOutput):
    """Projection onto ``{correct logit >= every other logit + margin}``
    (:func:`~unitrain.rules.projection.operators.project_margin`).

    Args:
        margin: the required gap.
    """

    operator = staticmethod(project_margin)
    margin: float = 1.0


@dataclass(frozen=True)
class OneVsRestOutput(_OperatorOutput):
    """Projection onto ``{correct logit >= high, other logits <= low}``
    (:func:`~unitrain.rules.projection.operators.project_one_vs_rest`).

    Args:
        high: lower bound on the correct logit.
        low: upper bound on the other logits.
    """

    operator = staticmethod(project_one_vs_rest)
    high: float = 1.0
    low: float = 0.0
