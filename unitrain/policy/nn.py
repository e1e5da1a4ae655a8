"""Layers without a useful gradient, for networks trained by projection or by evolution.

:class:`Step` is the hard threshold (Heaviside) activation. Its derivative is zero wherever it
exists, so gradient descent cannot train the layers before it; projection training
(:mod:`unitrain.rules.projection`, Bergmeister et al., "A projection-based framework for gradient-free
and parallel learning", arXiv:2506.05878) projects onto its graph exactly, and population rules
only evaluate it. For gradient baselines it offers the straight-through estimator (Bengio,
Léonard & Courville 2013, "Estimating or propagating gradients through stochastic neurons for
conditional computation"): the forward value of the threshold with the gradient of the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Step"]


class Step(nn.Module):
    """``step(x) = 1`` for ``x > 0``, else ``0``, elementwise.

    Args:
        straight_through: let gradients pass as if the layer were the identity (the
            straight-through estimator); the forward value is unchanged. Off, the layer passes
            no gradient at all.
    """

    def __init__(self, straight_through: bool = False) -> None:
        super().__init__()
        self.straight_through = straight_through

    def forward(self, x: Tensor) -> Tensor:
        out = (x > 0).to(x.dtype)
        if self.straight_through and torch.is_grad_enabled() and x.requires_grad:
            return x + (out - x).detach()
        return out

    def extra_repr(self) -> str:
        return "straight_through=True" if self.straight_through else ""
