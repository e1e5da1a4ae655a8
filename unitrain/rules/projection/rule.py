"""Projection-based updates: training a network as a feasibility problem, without gradients.

Bergmeister et al., "A projection-based framework for gradient-free and parallel learning"
(arXiv:2506.05878). Every value of the network's compute graph on a batch gets its own copies;
each elementary operation constrains its copies to lie on its graph, and every parameter's copies
must agree. A batch is fitted by Douglas-Rachford splitting (or alternating projections) between
those two sets, starting from a forward pass; the consensus of the parameter copies becomes the
new parameters. The numerical core lives in :mod:`unitrain.rules.projection`.

This rule fits the batches of a supervised run (``env=None``, a dataloader of ``(inputs,
labels)``): each iteration fits the current batch ``ctx.batch``. Reinforcement learning by elite
imitation is another rule, :class:`~unitrain.rules.projection.elite_imitation.EliteImitation`, which
collects episodes and composes this one (:meth:`Projection.fit`) to fit the policy to the best
of them.

With several processes each rank fits its own samples and the parameter consensus averages the
copies of all ranks, weighted by their sample counts (one all-reduce per solver iteration), so
parameters stay identical on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from unitrain.errors import ConfigError, check
from unitrain.policy.recurrent import recurrent_layer, refuse_recurrent
from unitrain.rules.base import UpdateRule
from unitrain.rules.projection import (ConvStage, CrossEntropyOutput, LinearStage, MarginOutput,
                                       OneVsRestOutput, OutputConstraint, PoolStage,
                                       ProjectionGraph, ReshapeStage, SquaredErrorOutput, fit_batch)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["Projection"]

_SOLVERS = ("douglas_rachford", "alternating_projections")
_OUTPUTS = ("cross_entropy", "margin", "one_vs_rest", "squared_error")
# Solver iterations at which the violation curve is logged (those within ``iterations``).
_CURVE_AT = (1, 2, 5, 10, 20, 50, 100, 200, 500)


@register_rule("projection")
@dataclass
class Projection(UpdateRule):
    """Projection-based training of a network on ``(input, target)`` batches.

    The trained network is ``module.projection_net`` if the module defines it, else the module
    itself; either must apply the layers of :data:`unitrain.rules.projection.SUPPORTED_LAYERS`
    (``nn.Linear``, ``nn.Conv2d``, ``nn.AvgPool2d``, ``nn.ReLU``, :class:`unitrain.policy.nn.Step`,
    reshapes; in ``nn.Sequential`` or plain containers) in registration order.
    :class:`unitrain.MLPPolicy` with ``activation="relu"`` or ``"step"`` and
    :class:`unitrain.policy.models.ConvNet` qualify.

    Args:
        solver: ``"douglas_rachford"`` or ``"alternating_projections"``.
        iterations: solver iterations per batch (each starts from a forward pass).
        output: the constraint on the network output: ``"cross_entropy"`` (proximal step of
            ``lam`` x cross-entropy), ``"margin"`` (correct logit above the others by
            ``margin``), ``"one_vs_rest"`` (correct logit >= ``margin``, others <= 0) or
            ``"squared_error"`` (proximal step of ``lam``/2 x squared error to the one-hot label,
            or to real-valued targets).
        lam: weight of the cross-entropy or squared error in the output's proximal step.
        margin: the gap of ``margin`` and the correct logit's bound of ``one_vs_rest``.
        step_size: move the parameters only this share of the way from their value before a
            batch to the batch's projection consensus (1 takes the consensus as it is).
        standardize: fit each batch in coordinates where its inputs have zero mean and unit
            standard deviation per feature (the first layer's weights and bias are rescaled
            before the solve and back after it, so the network computes the same function);
            projections measure distances in parameter space, so badly scaled inputs (CartPole's
            pole angle is ~0.1) otherwise make the fit slow and lopsided.
        compile: run the solver's iterations as one ``torch.compile``-d program each, with
            the inner Newton solves warm-started from the previous iteration and a fixed step
            count (see :func:`unitrain.rules.projection.douglas_rachford`). Several times faster per
            batch after a one-time compilation of about half a minute on a CPU (cached on disk
            for later runs); for runs of many equal-sized batches in one process. With several
            processes the iterations run warm-started but uncompiled.
    """

    def check_module(self, module: "RLModule") -> None:
        refuse_recurrent(module, self.name, "the solver projects onto the graphs of feed-forward "
                                            f"layers; {recurrent_layer(module)} is recurrent")

    supervised_only: ClassVar[bool] = True

    solver: str = "douglas_rachford"
    iterations: int = bounded(50, "[1, inf]")
    output: str = "cross_entropy"
    lam: float = bounded(5.0, "(0, inf]")
    margin: float = bounded(1.0, "(0, inf]")
    step_size: float = bounded(1.0, "(0, 1]")
    standardize: bool = False
    compile: bool = False

    def validate(self) -> None:
        check(self.solver in _SOLVERS, "solver", f"one of {', '.join(_SOLVERS)}", self.solver)
        check(self.output in _OUTPUTS, "output", f"one of {', '.join(_OUTPUTS)}", self.output)

    # ------------------------------------------------------------------ construction
    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        raise ConfigError("env", "projection fits (input, target) batches of a supervised run "
                                 "(env: null with a data: block; in Python env=None and "
                                 "train_dataloaders); to train a policy in an env use "
                                 "elite_imitation, which fits the policy to its best episodes "
                                 "by projection")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.attach(module)

    def attach(self, module: "RLModule") -> None:
        """Build the feasibility problem of ``module`` (or its ``projection_net``)."""
        net = getattr(module, "projection_net", None)
        self.net: nn.Module = net if isinstance(net, nn.Module) else module
        # Unsupported layers are reported here, before any data is touched.
        self.graph = ProjectionGraph(self.net)
        if isinstance(self.graph.stages[0], (ConvStage, PoolStage)):
            raise ConfigError("module", "the rule passes flat inputs (B, features), so a network "
                                        "that starts with a convolution or pooling must start "
                                        "with nn.Unflatten(1, (channels, height, width))")
        first = next(s for s in self.graph.stages if not isinstance(s, ReshapeStage))
        if self.standardize and not isinstance(first, LinearStage):
            raise ConfigError("standardize", "rescales the first layer's weights, which needs a "
                                             "network whose first layer is nn.Linear; set it to "
                                             "false for this network")
        self.constraint = self._output_constraint()

    def _output_constraint(self) -> OutputConstraint:
        if self.output == "cross_entropy":
            return CrossEntropyOutput(lam=self.lam)
        if self.output == "margin":
            return MarginOutput(margin=self.margin)
        if self.output == "one_vs_rest":
            return OneVsRestOutput(high=self.margin, low=0.0)
        return SquaredErrorOutput(weight=self.lam)

    # ------------------------------------------------------------------ one iteration
    def step(self, ctx: "RuleContext") -> dict[str, float]:
        inputs, targets = ctx.batch
        return {**self.fit([(inputs, targets)], ctx), "frames": 0.0}

    def fit(self, batches: list[tuple[Tensor, Tensor]], ctx: "RuleContext") -> dict[str, float]:
        """Fit each ``(inputs, targets)`` batch in turn.

        Args:
            batches: inputs ``(B, ...)`` (flattened here) with class labels or real targets.
            ctx: the run context (device and the all-reduce of the parameter consensus).

        Returns:
            Violation, parameter-change and accuracy metrics, averaged over the batches.
        """
        before = nn.utils.parameters_to_vector(self.net.parameters()).detach().clone()

        def all_ranks_mean(tensor: Tensor) -> Tensor:
            return ctx.all_reduce_(tensor, "mean")

        reduce_mean = all_ranks_mean if ctx.world_size > 1 else None

        firsts, lasts, accs, dead = [], [], [], []
        curve = torch.zeros(self.iterations, dtype=torch.float64)
        for inputs, targets in batches:
            inputs = inputs.to(ctx.device).reshape(len(inputs), -1)
            labels = None if targets.is_floating_point() else targets.to(ctx.device)
            start = [p.detach().clone() for p in self.net.parameters()]
            result = self._solve(inputs, self._targets(targets.to(ctx.device), inputs),
                                 reduce_mean)
            if self.step_size < 1:
                with torch.no_grad():
                    for p, p0 in zip(self.net.parameters(), start, strict=True):
                        p.lerp_(p0, 1.0 - self.step_size)
            dead.append(self._dead_share(inputs))
            violation = result.violation.detach().double().cpu()
            curve += violation
            firsts.append(float(violation[0]))
            lasts.append(float(violation[-1]))
            if labels is not None:
                with torch.no_grad():
                    predicted = self.net(inputs.to(result.state["out"].dtype)).argmax(-1)
                accs.append(float((predicted == labels).float().mean()))
        after = nn.utils.parameters_to_vector(self.net.parameters()).detach()
        first, last = sum(firsts) / len(firsts), sum(lasts) / len(lasts)
        metrics = {"train/violation_first": first, "train/violation_last": last,
                   "train/violation_ratio": last / max(first, 1e-12),
                   "train/param_change": float((after - before).norm())}
        curve /= len(batches)
        for k in _CURVE_AT:
            if k <= self.iterations:
                metrics[f"violation/iter_{k:03d}"] = float(curve[k - 1])
        if accs:
            metrics["train/accuracy"] = sum(accs) / len(accs)
        if dead[0] is not None:
            metrics["train/dead_units"] = sum(dead) / len(dead)
        return metrics

    def _solve(self, inputs: Tensor, targets: Tensor, reduce_mean: Any) -> Any:
        """:func:`fit_batch` on one batch, in standardised input coordinates if asked."""
        if not self.standardize:
            return fit_batch(self.graph, inputs, targets, self.constraint, self.solver,
                             self.iterations, reduce_mean, compile=self.compile)
        first = next(s.module for s in self.graph.stages if isinstance(s, LinearStage))
        x = inputs.to(first.weight.dtype)
        # Per-feature mean and std over the samples of every rank, so all ranks agree.
        moments = torch.cat([x.sum(0), (x * x).sum(0),
                             torch.tensor([float(len(x))], dtype=x.dtype, device=x.device)])
        if reduce_mean is not None:
            moments = reduce_mean(moments)
        width = x.shape[1]
        mean = moments[:width] / moments[-1]
        std = (moments[width: 2 * width] / moments[-1] - mean * mean).clamp_min(0.0).sqrt()
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        with torch.no_grad():
            # W x + b = (W * std) ((x - mean) / std) + (b + W mean).
            if first.bias is not None:
                first.bias.add_(first.weight @ mean)
            first.weight.mul_(std)
        try:
            result = fit_batch(self.graph, (x - mean) / std, targets, self.constraint,
                               self.solver, self.iterations, reduce_mean, compile=self.compile)
        finally:
            with torch.no_grad():
                first.weight.div_(std)
                if first.bias is not None:
                    first.bias.sub_(first.weight @ mean)
        return result

    @torch.no_grad()
    def _dead_share(self, inputs: Tensor) -> float | None:
        """Share of the first hidden layer's ReLU units inactive on every input of the batch."""
        stage = self.graph.stages[0]
        if not isinstance(stage, LinearStage) or not stage.relu:
            return None
        lin = stage.module
        pre = inputs.to(lin.weight.dtype) @ lin.weight.T
        if lin.bias is not None:
            pre = pre + lin.bias
        return float((pre <= 0).all(0).float().mean())

    def _targets(self, targets: Tensor, inputs: Tensor) -> Tensor:
        """The targets in the form the output constraint takes."""
        if self.output == "squared_error" and not targets.is_floating_point():
            # Class labels are regressed as one-hot vectors as wide as the network's output
            # (whatever its last layer: linear, pooling or a reshape).
            with torch.no_grad():
                width = self.net(inputs[:1].to(self.graph._param_dtype())).shape[-1]
            return nn.functional.one_hot(targets.long(), width).to(torch.get_default_dtype())
        return targets
