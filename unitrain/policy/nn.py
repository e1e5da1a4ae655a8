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

__all__ = ["Step", "GRUCell"]


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


class GRUCell(nn.Module):
    """A gated recurrent unit (Cho et al. 2014, "Learning Phrase Representations using RNN
    Encoder–Decoder for Statistical Machine Translation"), one step, from two linear maps.

    ``r, z = σ(W_ir x + W_hr h), σ(W_iz x + W_hz h)``; ``n = tanh(W_in x + r ⊙ (W_hn h))``;
    ``h' = (1 − z) ⊙ n + z ⊙ h`` (biases inside each ``W``), the update of ``torch.nn.GRUCell``.
    Written with ``nn.Linear`` so that ``torch.func.vmap`` batches it over a population's
    stacked parameters (``nn.GRUCell`` has no batching rule and falls back to a loop).

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input = nn.Linear(input_size, 3 * hidden_size)
        self.hidden = nn.Linear(hidden_size, 3 * hidden_size)
        bound = hidden_size ** -0.5  # torch.nn.GRUCell's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        ir, iz, in_ = self.input(x).chunk(3, -1)
        hr, hz, hn = self.hidden(h).chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h
