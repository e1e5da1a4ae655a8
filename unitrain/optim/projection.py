"""Projection-based updates: training a ReLU network as a feasibility problem, without gradients.

Bergmeister et al., "A projection-based framework for gradient-free and parallel learning"
(arXiv:2506.05878). Every value of the network's compute graph on a batch gets its own copies;
each elementary operation constrains its copies to lie on its graph, and every parameter's copies
must agree. A batch is fitted by Douglas-Rachford splitting (or alternating projections) between
those two sets, starting from a forward pass; the consensus of the parameter copies becomes the
new parameters. The numerical core lives in :mod:`unitrain.projection`.

The same rule serves two kinds of run through one :class:`unitrain.Trainer`:

* supervised (``env=None``, a dataloader of ``(inputs, labels)``): each iteration fits the
  current batch ``ctx.batch``;
* reinforcement learning by elite imitation (an env with discrete actions): each iteration runs
  episodes with the current policy (actions sampled from its logits or, in a share of the env
  slots, its argmax, plus a share of uniformly random actions), keeps the
  ``(observation, action)`` pairs of the episodes with the highest returns, and fits the policy's
  logits to those actions, as the cross-entropy method does with a parametric policy.

With several processes each rank fits its own samples and the parameter consensus averages the
copies of all ranks, weighted by their sample counts (one all-reduce per solver iteration), so
parameters stay identical on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from unitrain.errors import check
from unitrain.optim.base import UpdateRule, register_rule
from unitrain.projection import (
    CrossEntropyOutput,
    LinearStage,
    MarginOutput,
    OneVsRestOutput,
    OutputConstraint,
    ProjectionGraph,
    SquaredErrorOutput,
    fit_batch,
)

if TYPE_CHECKING:
    from unitrain.module import RLModule
    from unitrain.optim.base import RuleContext

__all__ = ["Projection"]

_SOLVERS = ("douglas_rachford", "alternating_projections")
_OUTPUTS = ("cross_entropy", "margin", "one_vs_rest", "squared_error")
# Solver iterations at which the violation curve is logged (those within ``iterations``).
_CURVE_AT = (1, 2, 5, 10, 20, 50, 100, 200, 500)


@register_rule("projection")
@dataclass
class Projection(UpdateRule):
    """Projection-based training of a ``Linear``/``ReLU`` network (supervised or elite imitation).

    The trained network is ``module.projection_net`` if the module defines it, else the module
    itself; either must apply ``nn.Linear`` and ``nn.ReLU`` layers (in ``nn.Sequential`` or plain
    containers) in registration order to flat inputs. :class:`unitrain.MLPPolicy` with
    ``activation="relu"`` qualifies.

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
        episodes: (RL) episodes collected per iteration on each rank.
        elite_fraction: (RL) share of the iteration's episode count kept as elites, by return.
        keep_elites: (RL) rank the previous elites together with the new episodes, so the
            demonstrations never get worse.
        explore: (RL) probability of a uniformly random action at each step while collecting.
        sample: (RL) draw the other actions from the softmax of the logits (else take their
            argmax), so exploration shrinks as the fitted logits grow confident.
        greedy_share: (RL) share of the env slots that take the argmax action even when
            ``sample`` is on (``explore`` still applies). Their episodes show what the
            deterministic policy earns; once it earns the most, they become the elites, so the
            greedy policy is a fixed point of the fit instead of being pulled toward the
            sampled policy's weaker episodes.
        batch_size: (RL) elite pairs per fitted batch.
        updates: (RL) batches fitted per iteration.
        window: (RL) the elites of the last ``window`` iterations are fitted together (each
            iteration's elites are chosen among that iteration's episodes, plus the previous
            elites when ``keep_elites``); more and more varied pairs make each fit generalise.
        step_size: move the parameters only this share of the way from their value before a
            batch to the batch's projection consensus (1 takes the consensus as it is).
        standardize: fit each batch in coordinates where its inputs have zero mean and unit
            standard deviation per feature (the first layer's weights and bias are rescaled
            before the solve and back after it, so the network computes the same function);
            projections measure distances in parameter space, so badly scaled inputs (CartPole's
            pole angle is ~0.1) otherwise make the fit slow and lopsided.
    """

    supervised_only: ClassVar[bool] = False

    solver: str = "douglas_rachford"
    iterations: int = 50
    output: str = "cross_entropy"
    lam: float = 5.0
    margin: float = 1.0
    episodes: int = 16
    elite_fraction: float = 0.25
    keep_elites: bool = True
    explore: float = 0.05
    sample: bool = True
    greedy_share: float = 0.0
    batch_size: int = 256
    updates: int = 4
    window: int = 1
    step_size: float = 1.0
    standardize: bool = False

    def __post_init__(self) -> None:
        check(self.solver in _SOLVERS, "solver", f"one of {', '.join(_SOLVERS)}", self.solver)
        check(self.iterations >= 1, "iterations", "an integer >= 1", self.iterations)
        check(self.output in _OUTPUTS, "output", f"one of {', '.join(_OUTPUTS)}", self.output)
        check(self.lam > 0, "lam", "a number > 0", self.lam)
        check(self.margin > 0, "margin", "a number > 0", self.margin)
        check(self.episodes >= 1, "episodes", "an integer >= 1", self.episodes)
        check(0 < self.elite_fraction <= 1, "elite_fraction", "a number in (0, 1]",
              self.elite_fraction)
        check(0 <= self.explore <= 1, "explore", "a number in [0, 1]", self.explore)
        check(0 <= self.greedy_share <= 1, "greedy_share", "a number in [0, 1]",
              self.greedy_share)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.updates >= 1, "updates", "an integer >= 1", self.updates)
        check(self.window >= 1, "window", "an integer >= 1", self.window)
        check(0 < self.step_size <= 1, "step_size", "a number in (0, 1]", self.step_size)

    # ------------------------------------------------------------------ construction
    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        net = getattr(module, "projection_net", None)
        self.net: nn.Module = net if isinstance(net, nn.Module) else module
        # Unsupported layers are reported here, before any data is touched.
        self.graph = ProjectionGraph(self.net)
        self.constraint = self._output_constraint()
        self.module = module
        if ctx.env_info is not None and not ctx.env_info.discrete:
            raise ValueError("projection elite imitation needs discrete actions; "
                             f"{ctx.env_info.id} has continuous actions")
        self._elites: list[dict[str, Any]] = []
        # The elite sets of the last ``window`` iterations, newest last.
        self._window: list[list[dict[str, Any]]] = []

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
        if ctx.env_spec is None:
            inputs, targets = ctx.batch
            return self._fit([(inputs, targets)], ctx)
        return self._imitate_elites(ctx)

    def _fit(self, batches: list[tuple[Tensor, Tensor]], ctx: "RuleContext") -> dict[str, float]:
        """Fit each ``(inputs, targets)`` batch in turn.

        Args:
            batches: inputs ``(B, ...)`` (flattened here) with class labels or real targets.
            ctx: the run context (device and the all-reduce of the parameter consensus).

        Returns:
            Violation, parameter-change and accuracy metrics, averaged over the batches.
        """
        before = nn.utils.parameters_to_vector(self.net.parameters()).detach().clone()

        def reduce_mean(tensor: Tensor) -> Tensor:
            return ctx.all_reduce_(tensor, "mean")

        firsts, lasts, accs, dead = [], [], [], []
        curve = torch.zeros(self.iterations, dtype=torch.float64)
        for inputs, targets in batches:
            inputs = inputs.to(ctx.device).reshape(len(inputs), -1)
            labels = None if targets.is_floating_point() else targets.to(ctx.device)
            start = [p.detach().clone() for p in self.net.parameters()]
            result = self._solve(inputs, self._targets(targets.to(ctx.device)), reduce_mean)
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
                             self.iterations, reduce_mean)
        first = next(s.module for s in self.graph.stages if isinstance(s, LinearStage))
        x = inputs.to(first.weight.dtype)
        # Per-feature mean and std over the samples of every rank, so all ranks agree.
        moments = torch.cat([x.sum(0), (x * x).sum(0),
                             torch.tensor([float(len(x))], dtype=x.dtype, device=x.device)])
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
                               self.solver, self.iterations, reduce_mean)
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

    def _targets(self, targets: Tensor) -> Tensor:
        """The targets in the form the output constraint takes."""
        if self.output == "squared_error" and not targets.is_floating_point():
            # Class labels are regressed as one-hot vectors.
            width = self.graph.stages[-1].module.out_features  # type: ignore[union-attr]
            return nn.functional.one_hot(targets.long(), width).to(torch.get_default_dtype())
        return targets

    # ------------------------------------------------------------------ elite imitation
    def _imitate_elites(self, ctx: "RuleContext") -> dict[str, float]:
        """Collect episodes, update the elites, fit the policy to their actions.

        Args:
            ctx: the run context.

        Returns:
            The fit's metrics, elite and collection returns, and ``frames`` collected.
        """
        episodes, frames = self._collect(ctx)
        returns = [e["return"] for e in episodes]
        keep = max(1, math.ceil(self.elite_fraction * len(episodes)))
        pool = episodes + (self._elites if self.keep_elites else [])
        # Stable sort: among equal returns, the newer episodes (listed first) win.
        pool.sort(key=lambda e: -e["return"])
        self._elites = pool[:keep]
        self._window = (self._window + [self._elites])[-self.window:]
        fitted = [e for elites in self._window for e in elites]
        obs = torch.cat([e["observation"] for e in fitted])
        act = torch.cat([e["action"] for e in fitted])
        batches = []
        for _ in range(self.updates):
            idx = torch.randperm(len(obs), generator=ctx.generator)[: self.batch_size]
            batches.append((obs[idx], act[idx]))
        metrics = self._fit(batches, ctx)
        metrics.update({
            "train/elite_return_mean": sum(e["return"] for e in self._elites) / keep,
            "train/collect_return_mean": sum(returns) / len(returns),
            "train/elite_pairs": float(len(obs)),
            "frames": float(frames),
        })
        return metrics

    @torch.no_grad()
    def _collect(self, ctx: "RuleContext") -> tuple[list[dict[str, Any]], int]:
        """Run ``episodes`` whole episodes with exploring actions of the current policy.

        Every iteration restarts the envs, so each kept episode comes from one policy. Env slot
        ``i`` contributes a fixed share of the episodes, so the kept episodes are the first ones
        started in each slot whatever their length; the steps a slot takes after its share is
        done are counted but discarded.

        Args:
            ctx: the run context (training env, generator).

        Returns:
            The episodes (``observation``, ``action``, ``return`` and the env ``slot`` that ran
            them) and the env steps taken.
        """
        env = ctx.train_env()
        info = ctx.env_info
        assert info is not None
        n = env.num_envs
        td = env.reset()
        obs_buf: list[list[Tensor]] = [[] for _ in range(n)]
        act_buf: list[list[Tensor]] = [[] for _ in range(n)]
        ret = [0.0] * n
        # Each env slot runs a fixed quota of episodes: stopping at the first ``episodes`` to
        # finish would drop the long (good) episodes still running in favour of short ones.
        quota = [self.episodes // n + (i < self.episodes % n) for i in range(n)]
        done_eps: list[dict[str, Any]] = []
        frames = 0
        greedy = torch.arange(n) < round(self.greedy_share * n)
        while len(done_eps) < self.episodes:
            obs = td["observation"]
            logits = self.module(obs.to(ctx.device)).cpu().double()
            policy = logits.argmax(-1)
            if self.sample:
                probs = torch.softmax(logits, -1)
                sampled = torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)
                policy = torch.where(greedy, policy, sampled)
            random_action = torch.randint(info.act_dim, (n,), generator=ctx.generator)
            explore = torch.rand(n, generator=ctx.generator) < self.explore
            action = torch.where(explore, random_action, policy)
            td["action"] = action
            out, td = env.step_and_maybe_reset(td)
            frames += n
            reward = out["next", "reward"].squeeze(-1).tolist()
            done = out["next", "done"].squeeze(-1).tolist()
            for i in range(n):
                obs_buf[i].append(obs[i].reshape(-1).clone())
                act_buf[i].append(action[i])
                ret[i] += reward[i]
                if done[i]:
                    if quota[i] > 0:
                        quota[i] -= 1
                        done_eps.append({"observation": torch.stack(obs_buf[i]),
                                         "action": torch.stack(act_buf[i]), "return": ret[i],
                                         "slot": i})
                    obs_buf[i], act_buf[i], ret[i] = [], [], 0.0
        return done_eps, frames

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"elites": [dict(e) for e in getattr(self, "_elites", [])],
                "window": [[dict(e) for e in elites] for elites in getattr(self, "_window", [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elites = [dict(e) for e in state.get("elites", [])]
        self._window = [[dict(e) for e in elites] for elites in state.get("window", [])]
