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
row ``w_j`` and of the input vector ``h``, followed by ``relu(d + b_j)`` (or ``d + b_j`` without the
ReLU) on its own copies of ``d`` and ``b_j``; the last layer's output has one more copy held by
the output constraint (:class:`SquaredErrorOutput`, :class:`CrossEntropyOutput`,
:class:`MarginOutput`, :class:`OneVsRestOutput`).

A state is a ``dict`` of tensors, all with the batch as their first axis, keyed by the stage's
position ``i`` in :attr:`ProjectionGraph.stages` (a linear layer and the ReLU fused after it form
one stage):

* ``"{i}.x"``: stage ``i``'s copies of its input, ``(B, m, n)`` for a linear stage (one per unit),
  ``(B, n)`` for a standalone ReLU;
* ``"{i}.w"``: weight copies ``(B, m, n)``; ``"{i}.b"``: bias copies ``(B, m)``;
* ``"{i}.d_dot"`` / ``"{i}.d_act"``: the dot product's copy and the activation's copy of
  ``<w_j, h>``, ``(B, m)``;
* ``"{i}.y"``: stage ``i``'s copy of its output, ``(B, m)``;
* ``"out"``: the output constraint's copy of the network output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from unitrain.projection.operators import (
    project_dot,
    project_dot_multiplier,
    project_margin,
    project_one_vs_rest,
    project_relu,
    project_sum,
    prox_cross_entropy,
    prox_squared_error,
)

__all__ = [
    "SUPPORTED_LAYERS",
    "CrossEntropyOutput",
    "LinearStage",
    "MarginOutput",
    "OneVsRestOutput",
    "OutputConstraint",
    "ProjectionGraph",
    "ReLUStage",
    "ReduceMean",
    "SquaredErrorOutput",
    "State",
]

State = dict[str, Tensor]
ReduceMean = Callable[[Tensor], Tensor]

SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.ReLU, torch.nn.Identity, and containers of these "
    "(torch.nn.Sequential, or modules without parameters of their own whose forward applies "
    "their children in registration order)"
)


# Newton steps of the inner solves in the warm-started mode of ProjectionGraph.project_ops.
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
        """See :func:`unitrain.projection.operators.prox_squared_error`."""
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
        """See :func:`unitrain.projection.operators.prox_cross_entropy`."""
        return prox_cross_entropy(outputs, targets, self.lam, self.iterations)


@dataclass(frozen=True)
class MarginOutput:
    """Projection onto ``{correct logit >= every other logit + margin}``.

    Args:
        margin: the required gap.
    """

    margin: float = 1.0

    def project(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """See :func:`unitrain.projection.operators.project_margin`."""
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
        """See :func:`unitrain.projection.operators.project_one_vs_rest`."""
        return project_one_vs_rest(outputs, targets, self.high, self.low)


@dataclass(frozen=True)
class LinearStage:
    """A ``nn.Linear``, with the ``nn.ReLU`` that directly follows it fused in.

    Attributes:
        name: qualified name of the linear layer in the root module.
        module: the layer.
        relu: whether a ReLU follows.
        relu_name: qualified name of that ReLU, if any.
    """

    name: str
    module: nn.Linear
    relu: bool
    relu_name: str | None = None


@dataclass(frozen=True)
class ReLUStage:
    """A ``nn.ReLU`` that does not follow a linear layer.

    Attributes:
        name: qualified name of the layer in the root module.
    """

    name: str


Stage = LinearStage | ReLUStage


def _qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    if isinstance(module, (nn.Linear, nn.ReLU)):
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
        raise ValueError(
            f"projection training does not support layer {label!r} of type {kind}{reason}; "
            f"supported: {SUPPORTED_LAYERS}"
        )
    for name, child in children:
        _flatten(child, _qualified(prefix, name), out)


def _stages(module: nn.Module) -> list[Stage]:
    leaves: list[tuple[str, nn.Module]] = []
    _flatten(module, "", leaves)
    stages: list[Stage] = []
    i = 0
    while i < len(leaves):
        name, leaf = leaves[i]
        if isinstance(leaf, nn.Linear):
            follow = leaves[i + 1] if i + 1 < len(leaves) else None
            if follow is not None and isinstance(follow[1], nn.ReLU):
                stages.append(LinearStage(name, leaf, relu=True, relu_name=follow[0]))
                i += 2
                continue
            stages.append(LinearStage(name, leaf, relu=False))
        else:
            stages.append(ReLUStage(name))
        i += 1
    if not any(isinstance(s, LinearStage) for s in stages):
        raise ValueError(
            "projection training needs at least one torch.nn.Linear layer to train; "
            f"supported: {SUPPORTED_LAYERS}"
        )
    return stages


class ProjectionGraph:
    """The feasibility problem of a ReLU network: its copies, their constraints, their consensus.

    Args:
        module: a network built from ``nn.Linear`` and ``nn.ReLU`` layers (see
            :data:`SUPPORTED_LAYERS`), applied in registration order to inputs of shape
            ``(B, in_features)``.

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
            if isinstance(s, LinearStage):
                lin = s.module
                act = "+relu" if s.relu else ""
                parts.append(
                    f"{s.name or '<root>'}:linear{act}({lin.in_features}->{lin.out_features})"
                )
            else:
                parts.append(f"{s.name or '<root>'}:relu")
        return f"ProjectionGraph({', '.join(parts)})"

    # ------------------------------------------------------------------ initialisation
    def _param_dtype(self) -> torch.dtype:
        first = next(s for s in self.stages if isinstance(s, LinearStage))
        return first.module.weight.dtype

    @torch.no_grad()
    def init_state(self, inputs: Tensor) -> State:
        """Copies of every value of a forward pass on ``inputs``: a point of both sets.

        The output constraint's copy is the network output itself. The forward pass of the
        stages is checked against ``module(inputs)``, which catches containers whose forward
        does not apply their children in registration order.

        Args:
            inputs: a batch ``(B, in_features)``.

        Returns:
            The consistent state of the forward pass.

        Raises:
            ValueError: the stages do not reproduce the module's own forward pass.
        """
        h = inputs.to(self._param_dtype())
        batch = h.shape[0]
        state: State = {}
        for i, stage in enumerate(self.stages):
            if isinstance(stage, LinearStage):
                lin = stage.module
                m = lin.out_features
                state[f"{i}.x"] = h.unsqueeze(1).expand(batch, m, -1).clone()
                state[f"{i}.w"] = lin.weight.detach().unsqueeze(0).expand(batch, -1, -1).clone()
                d = h @ lin.weight.detach().T
                state[f"{i}.d_dot"] = d.clone()
                state[f"{i}.d_act"] = d.clone()
                pre = d
                if lin.bias is not None:
                    bias = lin.bias.detach().unsqueeze(0).expand(batch, -1)
                    state[f"{i}.b"] = bias.clone()
                    pre = d + bias
                h = pre.clamp_min(0.0) if stage.relu else pre
            else:
                state[f"{i}.x"] = h.clone()
                h = h.clamp_min(0.0)
            state[f"{i}.y"] = h.clone()
        state["out"] = h.clone()
        reference = self.module(inputs.to(self._param_dtype()))
        if reference.shape != h.shape or not torch.allclose(reference, h, rtol=1e-4, atol=1e-5):
            raise ValueError(
                "the module's forward pass differs from its layers applied in registration "
                f"order; supported: {SUPPORTED_LAYERS}"
            )
        return state

    # ------------------------------------------------------------------ set A
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
                cross-entropy's proximal step) to rounding. A dict holds their solutions between
                calls and is updated in place (keys ``"{i}.t"`` and ``"out"``): an empty dict
                solves to rounding and fills it; later calls take a fixed number of steps
                (:data:`WARM_DOT_STEPS`, :data:`WARM_CE_STEPS`) from the held solutions.
                Between iterations of a solver the inner problems change little, so a few steps
                suffice; the fixed count reads nothing back to the host, which lets
                ``torch.compile`` fuse the whole projection.

        Returns:
            A new state.
        """
        new: State = {}
        for i, stage in enumerate(self.stages):
            if isinstance(stage, LinearStage):
                w, x, d = state[f"{i}.w"], state[f"{i}.x"], state[f"{i}.d_dot"]
                if warm is None:
                    w, x, d = project_dot(w, x, d)
                elif f"{i}.t" not in warm:
                    w, x, d, warm[f"{i}.t"] = project_dot_multiplier(w, x, d)
                else:
                    w, x, d, warm[f"{i}.t"] = project_dot_multiplier(
                        w, x, d, WARM_DOT_STEPS, early_exit=False, start=warm[f"{i}.t"])
                new[f"{i}.w"], new[f"{i}.x"], new[f"{i}.d_dot"] = w, x, d
                has_bias = f"{i}.b" in state
                terms = state[f"{i}.d_act"].unsqueeze(-1)
                if has_bias:
                    terms = torch.stack((state[f"{i}.d_act"], state[f"{i}.b"]), -1)
                project = project_relu if stage.relu else project_sum
                terms, y = project(terms, state[f"{i}.y"])
                new[f"{i}.d_act"] = terms[..., 0]
                if has_bias:
                    new[f"{i}.b"] = terms[..., 1]
                new[f"{i}.y"] = y
            else:
                x, y = project_relu(state[f"{i}.x"].unsqueeze(-1), state[f"{i}.y"])
                new[f"{i}.x"], new[f"{i}.y"] = x.squeeze(-1), y
        if warm is not None and isinstance(output, CrossEntropyOutput):
            if "out" not in warm:
                new["out"] = output.project(state["out"], targets)
            else:
                new["out"] = prox_cross_entropy(state["out"], targets, output.lam,
                                                WARM_CE_STEPS, early_exit=False,
                                                start=warm["out"])
            warm["out"] = new["out"]
        else:
            new["out"] = output.project(state["out"], targets)
        return new

    # ------------------------------------------------------------------ set B
    def _linear_keys(self) -> list[str]:
        keys = []
        for i, stage in enumerate(self.stages):
            if isinstance(stage, LinearStage):
                keys.append(f"{i}.w")
                if stage.module.bias is not None:
                    keys.append(f"{i}.b")
        return keys

    def _param_means(self, state: State, reduce_mean: ReduceMean) -> dict[str, Tensor]:
        keys = self._linear_keys()
        batch = state[keys[0]].shape[0]
        sums = [state[k].sum(0) for k in keys]
        count = torch.tensor([float(batch)], dtype=sums[0].dtype, device=sums[0].device)
        # One reduction carries every parameter's per-rank sum and the rank's sample count, so
        # the mean over ranks of both gives the batch-size-weighted mean over all copies.
        flat = reduce_mean(torch.cat([s.reshape(-1) for s in sums] + [count]))
        values = flat[:-1] / flat[-1]
        out: dict[str, Tensor] = {}
        offset = 0
        for k, s in zip(keys, sums, strict=True):
            out[k] = values[offset : offset + s.numel()].view_as(s)
            offset += s.numel()
        return out

    def project_consistency(
        self, state: State, inputs: Tensor, reduce_mean: ReduceMean | None = None
    ) -> State:
        """Project onto agreement of all copies (set B): every value becomes its copies' mean.

        Data copies are set to the data; parameter copies to the mean over the batch, extended
        over processes by ``reduce_mean``. This set is affine, so its projection is affine.

        Args:
            state: the current copies.
            inputs: the batch, fixed.
            reduce_mean: elementwise mean of a tensor over all processes; identity (the
                default) for a single process.

        Returns:
            A new, consistent state. Copies of one value share memory (a parameter's copies
            are one broadcast row, a value's copies one tensor), so it must not be modified in
            place.
        """
        reduce = reduce_mean or _identity
        new: State = {}
        dtype = state["out"].dtype
        batch = state["out"].shape[0]
        prev = inputs.to(dtype)  # the current activation's value; data when it is the input
        prev_key: str | None = None
        for i, stage in enumerate(self.stages):
            x = state[f"{i}.x"]
            if isinstance(stage, LinearStage):
                m = x.shape[1]
                if prev_key is None:
                    value = prev
                else:
                    value = (state[prev_key] + x.sum(1)) / (m + 1)
                    new[prev_key] = value
                new[f"{i}.x"] = value.unsqueeze(1).expand(batch, m, -1)
                d = 0.5 * (state[f"{i}.d_dot"] + state[f"{i}.d_act"])
                new[f"{i}.d_dot"] = d
                new[f"{i}.d_act"] = d
            else:
                value = prev if prev_key is None else 0.5 * (state[prev_key] + x)
                if prev_key is not None:
                    new[prev_key] = value
                new[f"{i}.x"] = value
            prev_key = f"{i}.y"
        assert prev_key is not None
        final = 0.5 * (state[prev_key] + state["out"])
        new[prev_key] = final
        new["out"] = final
        for key, mean in self._param_means(state, reduce).items():
            new[key] = mean.unsqueeze(0).expand_as(state[key])
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
            ``{"<layer>.weight": tensor, "<layer>.bias": tensor, ...}``.
        """
        means = self._param_means(state, reduce_mean or _identity)
        out: dict[str, Tensor] = {}
        for i, stage in enumerate(self.stages):
            if isinstance(stage, LinearStage):
                out[_qualified(stage.name, "weight")] = means[f"{i}.w"]
                if f"{i}.b" in means:
                    out[_qualified(stage.name, "bias")] = means[f"{i}.b"]
        return out

    @torch.no_grad()
    def write_parameters(self, state: State, reduce_mean: ReduceMean | None = None) -> None:
        """Copy the consensus parameters of ``state`` into the module's parameters.

        Args:
            state: copies of the parameters.
            reduce_mean: as in :meth:`project_consistency`.
        """
        means = self._param_means(state, reduce_mean or _identity)
        for i, stage in enumerate(self.stages):
            if isinstance(stage, LinearStage):
                lin = stage.module
                lin.weight.copy_(means[f"{i}.w"])
                if lin.bias is not None:
                    lin.bias.copy_(means[f"{i}.b"])

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
