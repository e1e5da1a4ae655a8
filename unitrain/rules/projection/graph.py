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

This module holds :class:`ProjectionGraph`, the problem and its two projections. The network
is read into stages by :mod:`~unitrain.rules.projection.layers`; the stages, their copies and
the layout of a state (:data:`State`) are in :mod:`~unitrain.rules.projection.stages`; the output
constraints in :mod:`~unitrain.rules.projection.outputs`. Their public names are re-exported
here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from unitrain.rules.projection.layers import SUPPORTED_LAYERS, qualified_name, split_stages
from unitrain.rules.projection.operators import prox_cross_entropy
from unitrain.rules.projection.outputs import (CrossEntropyOutput, MarginOutput, OneVsRestOutput,
                                               OutputConstraint, SquaredErrorOutput)
from unitrain.rules.projection.stages import (WARM_CE_STEPS, WARM_DOT_STEPS, ActivationStage,
                                              ConvStage, DotStage, LinearStage, OperationStage,
                                              PoolStage, ReshapeStage, Stage, State)

__all__ = [
    "SUPPORTED_LAYERS",
    "WARM_CE_STEPS",
    "WARM_DOT_STEPS",
    "ActivationStage",
    "ConvStage",
    "CrossEntropyOutput",
    "DotStage",
    "LinearStage",
    "MarginOutput",
    "OneVsRestOutput",
    "OperationStage",
    "OutputConstraint",
    "PoolStage",
    "ProjectionGraph",
    "ReduceMean",
    "ReshapeStage",
    "SquaredErrorOutput",
    "Stage",
    "State",
]

ReduceMean = Callable[[Tensor], Tensor]


def _identity(tensor: Tensor) -> Tensor:
    return tensor


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
        self.stages: list[Stage] = split_stages(module)
        # The batch size the solvers' compiled iteration is specialised to (set on first use).
        self.compiled_batch: int | None = None

    def __repr__(self) -> str:
        parts = []
        for s in self.stages:
            label = s.name or "<root>"
            act = f"+{s.activation}" if isinstance(s, DotStage) and s.activation != "identity" else ""
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

    def _active(self) -> list[tuple[int, OperationStage]]:
        """The stages that hold copies, with their positions."""
        return [(i, s) for i, s in enumerate(self.stages) if not isinstance(s, ReshapeStage)]

    def _params(self) -> list[tuple[str, str, nn.Parameter, OperationStage]]:
        """``(state key, parameter name, parameter, stage)`` of every trained parameter."""
        return [(f"{i}.{suffix}", qualified_name(s.name, pname), param, s)
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
                       for i, s in self._active() if isinstance(s, DotStage)}
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
            if isinstance(stage, DotStage):
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
