"""The stages of a split network: each kind of operation, its copies and their projection.

Part of projection-based training (Bergmeister et al., "A projection-based framework for
gradient-free and parallel learning", arXiv:2506.05878; the problem as a whole is described in
:mod:`unitrain.rules.projection.graph`). A stage is one operation of the network with its own
copies of its inputs, parameters and output: a linear or convolution layer with the activation
fused after it (:class:`LinearStage`, :class:`ConvStage`), an average pooling
(:class:`PoolStage`), a standalone activation (:class:`ActivationStage`), or a reshape that holds
no copies (:class:`ReshapeStage`). Each fills its copies from a forward pass, projects them onto
its graph (set A), and gathers and scatters its input copies for the consistency projection.

A state is a ``dict`` of tensors, all with the batch as their first axis, keyed by the stage's
position ``i`` in :attr:`ProjectionGraph.stages <unitrain.rules.projection.graph.ProjectionGraph>`:

* ``"{i}.x"``: stage ``i``'s copies of its input: ``(B, m, n)`` for a linear stage (one per
  unit), ``(B, C, P, K)`` for a convolution (one per output channel ``C`` and position ``P`` of
  the patch of ``K`` values), ``(B, C, P, k*k)`` for a pooling stage (one per window),
  the input's shape for a standalone activation;
* ``"{i}.w"``: weight copies, shaped like ``"{i}.x"``; ``"{i}.b"``: bias copies ``(B, m)`` or
  ``(B, C, P)``;
* ``"{i}.d_dot"`` / ``"{i}.d_act"``: the dot product's copy and the activation's copy of
  ``<w_j, h>``, ``(B, m)`` or ``(B, C, P)``;
* ``"{i}.y"``: stage ``i``'s copy of its output (a convolution's and a pooling's as
  ``(B, C, P)``);
* ``"out"``: the output constraint's copy of the network output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unitrain.policy.nn import Step
from unitrain.rules.projection.operators import (project_dot, project_dot_multiplier, project_mean,
                                                 project_relu, project_step, project_sum)

__all__ = [
    "ACTIVATIONS",
    "WARM_CE_STEPS",
    "WARM_DOT_STEPS",
    "ActivationStage",
    "ConvStage",
    "DotStage",
    "LinearStage",
    "OperationStage",
    "PoolStage",
    "ReshapeStage",
    "Stage",
    "State",
]

State = dict[str, Tensor]

# Newton steps of the inner solves when ProjectionGraph.project_ops is given their starts.
WARM_DOT_STEPS = 3
WARM_CE_STEPS = 2

# The activation layers fused into stages, and their kind.
ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", Step: "step"}


def _activate(kind: str, pre: Tensor) -> Tensor:
    if kind == "relu":
        return pre.clamp_min(0.0)
    if kind == "step":
        return (pre > 0).to(pre.dtype)
    return pre


def _project_activation(kind: str, terms: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Project the terms of a pre-activation (last axis) and the output onto ``y = act(sum)``."""
    if kind == "relu":
        return project_relu(terms, y)
    if kind == "step":
        return project_step(terms, y)
    return project_sum(terms, y)


class OperationStage:
    """One operation of the split network and its copies.

    ``in_shape`` is the shape of one sample's input value, set by
    :meth:`ProjectionGraph.init_state` (a convolution's spatial size is only known from data).
    """

    name: str
    in_shape: tuple[int, ...] = ()

    def init(self, h: Tensor, state: State, p: str) -> Tensor:
        """Fill the copies of a forward pass on ``h`` (keys prefixed ``p``); return the output."""
        raise NotImplementedError

    def project(self, state: State, new: State, p: str, warm: State | None) -> None:
        """Project the stage's copies in ``state`` onto its graph, into ``new``."""
        raise NotImplementedError

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        """The sum of the input copies ``x`` per input value ``(B, *in_shape)``, and their count."""
        raise NotImplementedError

    def scatter(self, value: Tensor) -> Tensor:
        """The input copies that all equal ``value`` ``(B, *in_shape)``."""
        raise NotImplementedError

    def params(self) -> list[tuple[str, str, nn.Parameter]]:
        """``(state key suffix, parameter name in the module, parameter)`` of each parameter."""
        return []

    def param_mean(self, copies: Tensor) -> Tensor:
        """The mean over one sample's copies of a parameter (``copies`` without the batch axis)."""
        return copies

    def param_expand(self, mean: Tensor, shape: torch.Size) -> Tensor:
        """A parameter's value broadcast to the shape of its copies (inverse of the mean)."""
        return mean.unsqueeze(0).expand(shape)


@dataclass
class DotStage(OperationStage):
    """A layer of dot products (linear or convolution), its bias and the activation after it."""

    name: str
    activation: str = "identity"
    activation_name: str | None = None

    @property
    def relu(self) -> bool:
        """Whether a ReLU follows."""
        return self.activation == "relu"

    @property
    def relu_name(self) -> str | None:
        """The qualified name of the ReLU that follows, if any."""
        return self.activation_name if self.relu else None

    def _finish(self, h_terms: Tensor, weight: Tensor, bias: Tensor | None, d: Tensor,
                state: State, p: str) -> Tensor:
        state[f"{p}x"] = h_terms.clone()
        state[f"{p}w"] = weight.clone()
        state[f"{p}d_dot"] = d.clone()
        state[f"{p}d_act"] = d.clone()
        pre = d
        if bias is not None:
            state[f"{p}b"] = bias.clone()
            pre = d + bias
        y = _activate(self.activation, pre)
        state[f"{p}y"] = y.clone()
        return y

    def project(self, state: State, new: State, p: str, warm: State | None) -> None:
        w, x, d = state[f"{p}w"], state[f"{p}x"], state[f"{p}d_dot"]
        if warm is None:
            w, x, d = project_dot(w, x, d)
        else:
            w, x, d, warm[f"{p}t"] = project_dot_multiplier(
                w, x, d, WARM_DOT_STEPS, early_exit=False, start=warm[f"{p}t"])
        new[f"{p}w"], new[f"{p}x"], new[f"{p}d_dot"] = w, x, d
        has_bias = f"{p}b" in state
        terms = state[f"{p}d_act"].unsqueeze(-1)
        if has_bias:
            terms = torch.stack((state[f"{p}d_act"], state[f"{p}b"]), -1)
        terms, y = _project_activation(self.activation, terms, state[f"{p}y"])
        new[f"{p}d_act"] = terms[..., 0]
        if has_bias:
            new[f"{p}b"] = terms[..., 1]
        new[f"{p}y"] = y


@dataclass
class LinearStage(DotStage):
    """A ``nn.Linear``, with the activation (``nn.ReLU`` or :class:`unitrain.policy.nn.Step`) that
    directly follows it fused in.

    Attributes:
        name: qualified name of the linear layer in the root module.
        module: the layer.
        activation: ``"relu"``, ``"step"`` or ``"identity"`` (none follows).
        activation_name: qualified name of that activation layer, if any.
    """

    module: nn.Linear = None  # type: ignore[assignment]

    def init(self, h: Tensor, state: State, p: str) -> Tensor:
        lin = self.module
        batch, m = h.shape[0], lin.out_features
        weight = lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach().unsqueeze(0).expand(batch, -1)
        return self._finish(h.unsqueeze(1).expand(batch, m, -1),
                            weight.unsqueeze(0).expand(batch, -1, -1), bias, h @ weight.T,
                            state, p)

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        return x.sum(1), float(x.shape[1])

    def scatter(self, value: Tensor) -> Tensor:
        return value.unsqueeze(1).expand(value.shape[0], self.module.out_features, -1)

    def params(self) -> list[tuple[str, str, nn.Parameter]]:
        out = [("w", "weight", self.module.weight)]
        if self.module.bias is not None:
            out.append(("b", "bias", self.module.bias))
        return out


def _out_size(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
              padding: tuple[int, ...] = (0, 0), dilation: tuple[int, ...] = (1, 1)) -> list[int]:
    """Spatial output size of a sliding window (PyTorch's convolution/pooling formula)."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)]


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value, value)


def _unfold_args(module: nn.Conv2d | nn.AvgPool2d) -> dict[str, object]:
    if isinstance(module, nn.Conv2d):
        return dict(kernel_size=module.kernel_size, dilation=module.dilation,
                    padding=module.padding, stride=module.stride)
    return dict(kernel_size=module.kernel_size, stride=module.stride)


@dataclass
class _WindowStage(OperationStage):
    """A stage whose input copies are the sliding windows (patches) of an image."""

    name: str

    def _patches(self, value: Tensor, channels_together: bool) -> Tensor:
        """``(B, P, K)`` patches of ``value`` ``(B, C, H, W)`` (per channel: ``(B, C, P, k*k)``)."""
        batch = value.shape[0]
        args = _unfold_args(self.module)  # type: ignore[attr-defined]
        if channels_together:
            return F.unfold(value, **args).transpose(1, 2)
        c, h, w = value.shape[1:]
        cols = F.unfold(value.reshape(batch * c, 1, h, w), **args)
        return cols.reshape(batch, c, cols.shape[1], cols.shape[2]).transpose(2, 3)

    def _fold(self, patches: Tensor, channels_together: bool) -> Tensor:
        """The adjoint of :meth:`_patches`: each patch entry added back to its pixel."""
        args = _unfold_args(self.module)  # type: ignore[attr-defined]
        c, h, w = self.in_shape
        if channels_together:
            return F.fold(patches.transpose(1, 2), (h, w), **args)
        batch = patches.shape[0]
        cols = patches.transpose(2, 3).reshape(batch * c, patches.shape[3], patches.shape[2])
        return F.fold(cols, (h, w), **args).reshape(batch, c, h, w)

    def _count(self, like: Tensor, channels_together: bool, copies: int) -> Tensor:
        ones = torch.ones((1, *self.in_shape), dtype=like.dtype, device=like.device)
        return self._fold(self._patches(ones, channels_together), channels_together) * copies


@dataclass
class ConvStage(DotStage, _WindowStage):
    """A ``nn.Conv2d`` (zero padding, one group), with the activation that follows fused in.

    Attributes:
        name: qualified name of the convolution in the root module.
        module: the layer.
        activation: ``"relu"``, ``"step"`` or ``"identity"``.
        activation_name: qualified name of that activation layer, if any.
    """

    module: nn.Conv2d = None  # type: ignore[assignment]

    def init(self, h: Tensor, state: State, p: str) -> Tensor:
        conv = self.module
        batch, c = h.shape[0], conv.out_channels
        patches = self._patches(h, True)  # (B, P, K)
        n_pos = patches.shape[1]
        weight = conv.weight.detach().reshape(c, -1)
        bias = None
        if conv.bias is not None:
            bias = conv.bias.detach().view(1, c, 1).expand(batch, c, n_pos)
        y = self._finish(patches.unsqueeze(1).expand(batch, c, -1, -1),
                         weight.view(1, c, 1, -1).expand(batch, c, n_pos, -1), bias,
                         torch.einsum("bpk,ck->bcp", patches, weight), state, p)
        size = _out_size(self.in_shape[1:], conv.kernel_size, conv.stride,
                         conv.padding, conv.dilation)  # type: ignore[arg-type]
        return y.reshape(batch, c, *size)

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        return self._fold(x.sum(1), True), self._count(x, True, x.shape[1])

    def scatter(self, value: Tensor) -> Tensor:
        patches = self._patches(value, True)
        return patches.unsqueeze(1).expand(value.shape[0], self.module.out_channels, -1, -1)

    def params(self) -> list[tuple[str, str, nn.Parameter]]:
        out = [("w", "weight", self.module.weight)]
        if self.module.bias is not None:
            out.append(("b", "bias", self.module.bias))
        return out

    def param_mean(self, copies: Tensor) -> Tensor:
        # Every position holds its own copy of the filters: (C, P, K) -> (C, K), (C, P) -> (C,).
        return copies.mean(1)

    def param_expand(self, mean: Tensor, shape: torch.Size) -> Tensor:
        return mean.unsqueeze(0).unsqueeze(2).expand(shape)


@dataclass
class PoolStage(_WindowStage):
    """A ``nn.AvgPool2d`` without padding: each window's mean, channel by channel.

    Attributes:
        name: qualified name of the layer in the root module.
        module: the layer.
    """

    module: nn.AvgPool2d = None  # type: ignore[assignment]

    def init(self, h: Tensor, state: State, p: str) -> Tensor:
        windows = self._patches(h, False)  # (B, C, P, k*k)
        state[f"{p}x"] = windows.clone()
        y = windows.mean(-1)
        state[f"{p}y"] = y.clone()
        pool = self.module
        size = _out_size(self.in_shape[1:], _pair(pool.kernel_size), _pair(pool.stride))
        return y.reshape(h.shape[0], h.shape[1], *size)

    def project(self, state: State, new: State, p: str, warm: State | None) -> None:
        new[f"{p}x"], new[f"{p}y"] = project_mean(state[f"{p}x"], state[f"{p}y"])

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        return self._fold(x, False), self._count(x, False, 1)

    def scatter(self, value: Tensor) -> Tensor:
        return self._patches(value, False)


@dataclass
class ActivationStage(OperationStage):
    """A ``nn.ReLU`` or :class:`unitrain.policy.nn.Step` that does not follow a linear or convolution.

    Attributes:
        name: qualified name of the layer in the root module.
        activation: ``"relu"`` or ``"step"``.
    """

    name: str
    activation: str = "relu"

    def init(self, h: Tensor, state: State, p: str) -> Tensor:
        state[f"{p}x"] = h.clone()
        y = _activate(self.activation, h)
        state[f"{p}y"] = y.clone()
        return y

    def project(self, state: State, new: State, p: str, warm: State | None) -> None:
        x, y = _project_activation(self.activation, state[f"{p}x"].unsqueeze(-1), state[f"{p}y"])
        new[f"{p}x"], new[f"{p}y"] = x.squeeze(-1), y

    def gather(self, x: Tensor) -> tuple[Tensor, Tensor | float]:
        return x, 1.0

    def scatter(self, value: Tensor) -> Tensor:
        return value


@dataclass
class ReshapeStage:
    """A ``nn.Flatten`` or ``nn.Unflatten``: the same values in another shape, no constraint.

    Attributes:
        name: qualified name of the layer in the root module.
        module: the layer.
    """

    name: str
    module: nn.Module


Stage = LinearStage | ConvStage | PoolStage | ActivationStage | ReshapeStage
