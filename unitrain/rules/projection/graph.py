"""A network as a feasibility problem over copies of its values.

Projection-based training (Bergmeister et al., "A projection-based framework for gradient-free
and parallel learning", arXiv:2506.05878) gives every edge of the compute graph its own copy of
the value on it. Training a batch is then the search for copies that satisfy two families of
constraints:

* set A, one constraint per operation: the operation's copies of its inputs and output lie on
  its graph. Every operation is projected independently (:meth:`ProjectionGraph.project_ops`).
* set B, consistency: all copies of one value agree, data copies equal the data, and each
  parameter's copies (one per sample) agree. Its projection averages copies
  (:meth:`ProjectionGraph.project_consistency`).

A fully connected layer ``h -> relu(W h + b)`` of width ``m`` over inputs of width ``n`` becomes,
for each sample ``s`` and unit ``j``, a dot operation ``d = <w_j, h>`` on its own copies of the
row ``w_j`` and of the input vector ``h``, followed by ``relu(d + b_j)`` (or ``d + b_j`` without an
activation, or the hard threshold ``step(d + b_j)``) on its own copies of ``d`` and ``b_j``. A
convolution is the same per output channel and spatial position: a dot operation between the
channel's filter and the input patch at that position (every position holds its own copies of
both), then the bias and the activation. Average pooling is a mean over each window's copies.
``nn.Flatten``/``nn.Unflatten`` only reshape a value, so they add no constraint. The last
layer's output has one more copy held by the output constraint (:class:`SquaredErrorOutput`,
:class:`CrossEntropyOutput`, :class:`MarginOutput`, :class:`OneVsRestOutput`).

A state is a ``dict`` of tensors, all with the batch as their first axis, keyed by the stage's
position ``i`` in :attr:`ProjectionGraph.stages` (a linear or convolution layer and the
activation fused after it form one stage):

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unitrain.policy.nn import Step
from unitrain.rules.projection.operators import (project_dot, project_dot_multiplier,
                                                 project_margin, project_mean, project_one_vs_rest,
                                                 project_relu, project_step, project_sum,
                                                 prox_cross_entropy, prox_squared_error)

__all__ = [
    "SUPPORTED_LAYERS",
    "ActivationStage",
    "ConvStage",
    "CrossEntropyOutput",
    "LinearStage",
    "MarginOutput",
    "OneVsRestOutput",
    "OutputConstraint",
    "PoolStage",
    "ProjectionGraph",
    "ReduceMean",
    "ReshapeStage",
    "SquaredErrorOutput",
    "State",
]

State = dict[str, Tensor]
ReduceMean = Callable[[Tensor], Tensor]

SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.Conv2d (zero padding, one group), torch.nn.AvgPool2d (no "
    "padding), torch.nn.ReLU, unitrain.policy.nn.Step, torch.nn.Flatten, torch.nn.Unflatten, "
    "torch.nn.Identity, and containers of these "
    "(torch.nn.Sequential, or modules without parameters of their own whose forward applies "
    "their children in registration order)"
)


# Newton steps of the inner solves when ProjectionGraph.project_ops is given their starts.
WARM_DOT_STEPS = 3
WARM_CE_STEPS = 2


def _identity(tensor: Tensor) -> Tensor:
    return tensor


class OutputConstraint(Protocol):
    """The operation attached to the network output: a projection or a proximal step."""

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Map the constraint's copy of the outputs ``(B, K)`` to its projection/proximal point."""
        ...


@dataclass(frozen=True)
class SquaredErrorOutput:
    """Proximal step of ``weight/2 |y - target|^2``; ``weight = inf`` forces ``y = target``.

    Args:
        weight: weight of the squared error against the proximity term.
    """

    weight: float = 1.0

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """See :func:`unitrain.rules.projection.operators.prox_squared_error`."""
        return prox_squared_error(outputs, targets, self.weight)


@dataclass(frozen=True)
class CrossEntropyOutput:
    """Proximal step of ``lam * CE(logits, labels)``.

    Args:
        lam: weight of the cross-entropy.
        iterations: Newton steps of the proximal solve.
    """

    lam: float = 5.0
    iterations: int = 25

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """See :func:`unitrain.rules.projection.operators.prox_cross_entropy`."""
        return prox_cross_entropy(outputs, targets, self.lam, self.iterations)


@dataclass(frozen=True)
class MarginOutput:
    """Projection onto ``{correct logit >= every other logit + margin}``.

    Args:
        margin: the required gap.
    """

    margin: float = 1.0

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """See :func:`unitrain.rules.projection.operators.project_margin`."""
        return project_margin(outputs, targets, self.margin)


@dataclass(frozen=True)
class OneVsRestOutput:
    """Projection onto ``{correct logit >= high, other logits <= low}``.

    Args:
        high: lower bound on the correct logit.
        low: upper bound on the other logits.
    """

    high: float = 1.0
    low: float = 0.0

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """See :func:`unitrain.rules.projection.operators.project_one_vs_rest`."""
        return project_one_vs_rest(outputs, targets, self.high, self.low)


_ACTIVATIONS: dict[type[nn.Module], str] = {nn.ReLU: "relu", Step: "step"}


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


class _Stage:
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
class _DotStage(_Stage):
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
class LinearStage(_DotStage):
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
class _WindowStage(_Stage):
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
class ConvStage(_DotStage, _WindowStage):
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
class ActivationStage(_Stage):
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
_Layer = nn.Linear | nn.Conv2d


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unsupported(label: str, kind: str, why: str) -> ValueError:
    return ValueError(f"projection training does not support layer {label!r} of type {kind}"
                      f"{why}; supported: {SUPPORTED_LAYERS}")


def _check_leaf(label: str, module: nn.Module) -> None:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise _unsupported(label, kind, " with groups, non-zero padding modes or string "
                                            "padding (give the padding as numbers)")
    if isinstance(module, nn.AvgPool2d):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        if any(padding) or module.ceil_mode or module.divisor_override is not None:
            raise _unsupported(label, kind, " with padding, ceil_mode or divisor_override")


_LEAVES = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.ReLU, Step, nn.Flatten, nn.Unflatten)


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    if isinstance(module, _LEAVES):
        _check_leaf(prefix or "<root>", module)
        out.append((prefix, module))
        return
    if isinstance(module, nn.Identity):
        return
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    label = prefix or "<root>"
    children = list(module.named_children())
    own = [n for n, _ in module.named_parameters(recurse=False)]
    own += [n for n, _ in module.named_buffers(recurse=False)]
    if not children or own:
        reason = f" (it holds tensors of its own: {', '.join(own)})" if own and children else ""
        raise _unsupported(label, kind, reason)
    for name, child in children:
        _flatten(child, _qualified(prefix, name), out)


def _stages(module: nn.Module) -> list[Stage]:
    leaves: list[tuple[str, nn.Module]] = []
    _flatten(module, "", leaves)
    stages: list[Stage] = []
    i = 0
    while i < len(leaves):
        name, leaf = leaves[i]
        if isinstance(leaf, (nn.Linear, nn.Conv2d)):
            cls = LinearStage if isinstance(leaf, nn.Linear) else ConvStage
            follow = leaves[i + 1] if i + 1 < len(leaves) else None
            if follow is not None and type(follow[1]) in _ACTIVATIONS:
                stages.append(cls(name, _ACTIVATIONS[type(follow[1])], follow[0], module=leaf))
                i += 2
                continue
            stages.append(cls(name, module=leaf))
        elif isinstance(leaf, nn.AvgPool2d):
            stages.append(PoolStage(name, module=leaf))
        elif isinstance(leaf, (nn.Flatten, nn.Unflatten)):
            stages.append(ReshapeStage(name, leaf))
        else:
            stages.append(ActivationStage(name, _ACTIVATIONS[type(leaf)]))
        i += 1
    if not any(isinstance(s, _DotStage) for s in stages):
        raise ValueError(
            "projection training needs at least one torch.nn.Linear or torch.nn.Conv2d layer "
            f"to train; supported: {SUPPORTED_LAYERS}"
        )
    return stages


class ProjectionGraph:
    """The feasibility problem of a network: its copies, their constraints, their consensus.

    Args:
        module: a network built from the layers of :data:`SUPPORTED_LAYERS`, applied in
            registration order to inputs of shape ``(B, *input shape)``.

    Raises:
        ValueError: a layer is not supported; the message names it and lists what is.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.stages: list[Stage] = _stages(module)
        # The batch size the solvers' compiled iteration is specialised to (set on first use).
        self.compiled_batch: int | None = None

    def __repr__(self) -> str:
        parts = []
        for s in self.stages:
            label = s.name or "<root>"
            act = f"+{s.activation}" if isinstance(s, _DotStage) and s.activation != "identity" else ""
            if isinstance(s, LinearStage):
                lin = s.module
                parts.append(f"{label}:linear{act}({lin.in_features}->{lin.out_features})")
            elif isinstance(s, ConvStage):
                conv = s.module
                parts.append(f"{label}:conv{act}({conv.in_channels}->{conv.out_channels}, "
                             f"{'x'.join(map(str, conv.kernel_size))})")
            elif isinstance(s, PoolStage):
                parts.append(f"{label}:avgpool({s.module.kernel_size})")
            elif isinstance(s, ReshapeStage):
                parts.append(f"{label}:reshape")
            else:
                parts.append(f"{label}:{s.activation}")
        return f"ProjectionGraph({', '.join(parts)})"

    def _active(self) -> list[tuple[int, _Stage]]:
        """The stages that hold copies, with their positions."""
        return [(i, s) for i, s in enumerate(self.stages) if not isinstance(s, ReshapeStage)]

    def _params(self) -> list[tuple[str, str, nn.Parameter, _Stage]]:
        """``(state key, parameter name, parameter, stage)`` of every trained parameter."""
        return [(f"{i}.{suffix}", _qualified(s.name, pname), param, s)
                for i, s in self._active() for suffix, pname, param in s.params()]

    # ------------------------------------------------------------------ initialisation
    def _param_dtype(self) -> torch.dtype:
        return self._params()[0][2].dtype

    @torch.no_grad()
    def init_state(self, inputs: Tensor) -> State:
        """Copies of every value of a forward pass on ``inputs``: a point of both sets.

        The output constraint's copy is the network output itself. The forward pass of the
        stages is checked against ``module(inputs)``, which catches containers whose forward
        does not apply their children in registration order.

        Args:
            inputs: a batch ``(B, *input shape)``.

        Returns:
            The consistent state of the forward pass.

        Raises:
            ValueError: the stages do not reproduce the module's own forward pass.
        """
        h = inputs.to(self._param_dtype())
        state: State = {}
        for i, stage in enumerate(self.stages):
            if isinstance(stage, ReshapeStage):
                h = stage.module(h)
                continue
            stage.in_shape = tuple(h.shape[1:])
            h = stage.init(h, state, f"{i}.")
        state["out"] = h.clone()
        reference = self.module(inputs.to(self._param_dtype()))
        if reference.shape != h.shape or not torch.allclose(reference, h, rtol=1e-4, atol=1e-5):
            raise ValueError(
                "the module's forward pass differs from its layers applied in registration "
                f"order; supported: {SUPPORTED_LAYERS}"
            )
        return state

    # ------------------------------------------------------------------ set A
    def inner_start(self, state: State) -> State:
        """Starting points of the inner scalar solves for :meth:`project_ops`'s ``warm``.

        The dot products' multipliers start at 0 and the cross-entropy's proximal step at a
        copy of the current output copy (its own tensor, like the solutions that replace it).
        """
        warm: State = {f"{i}.t": torch.zeros_like(state[f"{i}.d_dot"])
                       for i, s in self._active() if isinstance(s, _DotStage)}
        warm["out"] = state["out"].clone()
        return warm

    def project_ops(
        self,
        state: State,
        output: OutputConstraint,
        targets: Tensor,
        warm: State | None = None,
    ) -> State:
        """Project every operation's copies onto its graph (set A), independently.

        Args:
            state: the current copies.
            output: the constraint on the network output.
            targets: its targets (regression values or class labels) for the batch.
            warm: ``None`` solves the inner scalar problems (the dot products' multipliers, the
                cross-entropy's proximal step) to rounding. Otherwise it holds where they start
                (:meth:`inner_start`, then the previous call's solutions, keys ``"{i}.t"`` and
                ``"out"``), each takes a fixed number of Newton steps (:data:`WARM_DOT_STEPS`,
                :data:`WARM_CE_STEPS`) and their solutions are written back in place. Between
                iterations of a solver the inner problems change little, so a few steps
                suffice; the fixed count reads nothing back to the host, which lets
                ``torch.compile`` fuse the whole projection.

        Returns:
            A new state.
        """
        new: State = {}
        for i, stage in self._active():
            stage.project(state, new, f"{i}.", warm)
        if warm is not None and isinstance(output, CrossEntropyOutput):
            new["out"] = prox_cross_entropy(state["out"], targets, output.lam, WARM_CE_STEPS,
                                            early_exit=False, start=warm["out"])
            warm["out"] = new["out"]
        else:
            new["out"] = output.project(state["out"], targets)
        return new

    # ------------------------------------------------------------------ set B
    def _param_means(self, state: State, reduce_mean: ReduceMean,
                     weights: Tensor | None = None) -> dict[str, Tensor]:
        params = self._params()
        first = state[params[0][0]]
        if weights is None:
            sums = [stage.param_mean(state[key].sum(0)) for key, _, _, stage in params]
            count = torch.tensor([float(first.shape[0])], dtype=first.dtype, device=first.device)
        else:
            sums = [stage.param_mean(torch.tensordot(weights, state[key], 1))
                    for key, _, _, stage in params]
            count = weights.sum().reshape(1)
        # One reduction carries every parameter's per-rank sum and the rank's sample count, so
        # the mean over ranks of both gives the batch-size-weighted mean over all copies.
        flat = reduce_mean(torch.cat([s.reshape(-1) for s in sums] + [count]))
        values = flat[:-1] / flat[-1]
        out: dict[str, Tensor] = {}
        offset = 0
        for (key, _, _, _), s in zip(params, sums, strict=True):
            out[key] = values[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out

    def project_consistency(
        self, state: State, inputs: Tensor, reduce_mean: ReduceMean | None = None,
        weights: Tensor | None = None,
    ) -> State:
        """Project onto agreement of all copies (set B): every value becomes its copies' mean.

        Data copies (the inputs, and the zeros a convolution pads with) are set to the data;
        parameter copies to the mean over the batch (and a convolution's positions), extended
        over processes by ``reduce_mean``. This set is affine, so its projection is affine.

        Args:
            state: the current copies.
            inputs: the batch, fixed.
            reduce_mean: elementwise mean of a tensor over all processes; identity (the
                default) for a single process.
            weights: per-sample weights ``(B,)`` of the parameter copies (default: all 1). A
                sample of weight 0 is padding: it does not move the parameters.

        Returns:
            A new, consistent state. Copies of one value share memory (a parameter's copies
            are one broadcast row, a value's copies one tensor), so it must not be modified in
            place.
        """
        reduce = reduce_mean or _identity
        new: State = {}
        batch = state["out"].shape[0]
        prev = inputs.to(state["out"].dtype)  # data when the value is the network input
        prev_key: str | None = None
        for i, stage in self._active():
            x = state[f"{i}.x"]
            if prev_key is None:
                value = prev.reshape(batch, *stage.in_shape)
            else:
                copies, count = stage.gather(x)
                value = (state[prev_key].reshape(copies.shape) + copies) / (count + 1.0)
                new[prev_key] = value.reshape(state[prev_key].shape)
            new[f"{i}.x"] = stage.scatter(value)
            if isinstance(stage, _DotStage):
                d = 0.5 * (state[f"{i}.d_dot"] + state[f"{i}.d_act"])
                new[f"{i}.d_dot"] = d
                new[f"{i}.d_act"] = d
            prev_key = f"{i}.y"
        assert prev_key is not None
        final = 0.5 * (state[prev_key].reshape(state["out"].shape) + state["out"])
        # One tensor when the shapes agree (as a compiled step returns it), else a view.
        same = final.shape == state[prev_key].shape
        new[prev_key] = final if same else final.reshape(state[prev_key].shape)
        new["out"] = final
        means = self._param_means(state, reduce, weights)
        for key, _, _, stage in self._params():
            new[key] = stage.param_expand(means[key], state[key].shape)
        return new

    # ------------------------------------------------------------------ parameters
    def consensus_parameters(
        self, state: State, reduce_mean: ReduceMean | None = None
    ) -> dict[str, Tensor]:
        """The mean of each parameter's copies, keyed by the module's parameter names.

        Args:
            state: copies of the parameters (any state).
            reduce_mean: as in :meth:`project_consistency`.

        Returns:
            ``{"<layer>.weight": tensor, "<layer>.bias": tensor, ...}``, shaped like the
            parameters.
        """
        means = self._param_means(state, reduce_mean or _identity)
        return {name: means[key].reshape(param.shape) for key, name, param, _ in self._params()}

    @torch.no_grad()
    def write_parameters(self, state: State, reduce_mean: ReduceMean | None = None,
                         consistent: bool = False) -> None:
        """Copy the consensus parameters of ``state`` into the module's parameters.

        Args:
            state: copies of the parameters.
            reduce_mean: as in :meth:`project_consistency`.
            consistent: ``state`` is an output of :meth:`project_consistency`, whose copies of a
                parameter all hold its consensus: it is read from the first sample's copy, not
                averaged again over the batch (whose rounding would depend on the batch size,
                which differs between processes).
        """
        if consistent:
            means = {key: stage.param_mean(state[key][0]) for key, _, _, stage in self._params()}
        else:
            means = self._param_means(state, reduce_mean or _identity)
        for key, _, param, _ in self._params():
            param.copy_(means[key].reshape(param.shape))

    # ------------------------------------------------------------------ measures
    @staticmethod
    def distance(a: State, b: State) -> Tensor:
        """Euclidean distance between two states, divided by ``sqrt(batch size)``.

        Args:
            a: a state.
            b: a state with the same keys and shapes.

        Returns:
            A scalar tensor: the per-sample root of the summed squared differences.
        """
        total = sum(((a[k] - b[k]) ** 2).sum() for k in a)
        batch = a["out"].shape[0]
        return torch.as_tensor(total).sqrt() / math.sqrt(batch)
