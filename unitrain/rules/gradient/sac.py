"""SAC: soft actor-critic with automatic temperature, as an update rule.

Reference: T. Haarnoja, A. Zhou, K. Hartikainen, G. Tucker, S. Ha, J. Tan, V. Kumar, H. Zhu,
A. Gupta, P. Abbeel, S. Levine, "Soft Actor-Critic Algorithms and Applications",
arXiv:1812.05905 (2018): twin Q critics without a state-value network, the temperature α
learned towards a target entropy; after Haarnoja et al., "Soft Actor-Critic: Off-Policy Maximum
Entropy Deep Reinforcement Learning with a Stochastic Actor", ICML 2018.

The losses are TorchRL's ``SACLoss``: the critics regress with a squared error on
``r + γ(1 − terminated)(min_i Q'_i(s', a') − α log π(a'|s'))`` with ``a' ~ π(·|s')`` and the
target critics ``Q'_i`` (Polyak ``tau``); the actor minimises ``α log π(a|s) − min_i Q_i(s, a)``
with ``a`` reparameterised; ``log α`` descends ``−α (log π(a|s) + target_entropy)``. One backward
serves the three losses (they touch disjoint parameters). Collection, replay, warm-up and the
update-to-data schedule are the :class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop` this rule
composes, as for DDPG and DSAC-T.

Policy: the module's tanh-squashed Gaussian of the shared action contract
(:mod:`unitrain.policy.action`): ``action_std="state"`` gives the paper's actor (mean and log std from
the network); ``"param"`` a learned state-independent ``aux.log_std``. The log std is clamped to
``[-20, 2]`` (the paper's code). ``delay`` (default 1, the paper's) spaces the actor, temperature
and target updates; a comparison with DSAC-T sets the same temperature schedule on both (see
``docs/sac.md``).

Critics: two distinct networks ``(observation, action) -> Q`` from the module's ``make_critic()``
if it has one, else MLPs with ``critic_hidden`` ReLU layers (the paper's 2 x 256). The loss is
registered as ``module.aux["sac"]`` (critics, targets and ``log_alpha`` checkpoint with the
module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import SACLoss, ValueEstimators

from unitrain.policy.inputs import call_module
from unitrain.rules.gradient.offpolicy import (LeanModule, OffPolicyFields, OffPolicyLoop,
                                               critic_steps, make_critics)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["SAC"]

_METRICS = ("loss/critic", "loss/actor", "loss/temperature", "train/alpha", "train/entropy")


class _LocScale(nn.Module):
    """``observation -> (loc, scale)`` of the module's pre-tanh Gaussian, log std clamped."""

    def __init__(self, module: nn.Module, log_std: nn.Module | None,
                 bounds: tuple[float, float]) -> None:
        super().__init__()
        self.module, self.bounds = module, bounds
        # ``log_std`` lives under ``module.aux``, which ``module`` registers already.
        self.__dict__["log_std"] = log_std

    def forward(self, observation: Any) -> tuple[Tensor, Tensor]:
        head = self.module.actions
        out = call_module(self.module, observation)
        return head.loc(out), head.log_std(out, self.log_std).clamp(*self.bounds).exp()


@register_rule("sac")
@dataclass
class SAC(OffPolicyFields):
    """SAC (Haarnoja et al. 2018): twin critics, tanh-Gaussian policy, learned temperature.

    Fields of :class:`~unitrain.rules.gradient.offpolicy.OffPolicyFields` (replay, warm-up, learning
    rates, ``tau``, ...) with the paper's defaults, plus:

    Args:
        lr_alpha: Adam step size of the temperature's logarithm.
        alpha_init: initial temperature.
        target_entropy: target policy entropy (``None``: ``-act_dim``, the paper's).
        delay: gradient updates per actor, temperature and target-network update (the paper: 1).
    """

    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    lr_alpha: float = bounded(3e-4, "(0, inf]")
    alpha_init: float = bounded(1.0, "(0, inf]")
    target_entropy: float | None = None
    delay: int = bounded(1, "[1, inf]")

    log_std_bounds: ClassVar[tuple[float, float]] = (-20.0, 2.0)

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, _METRICS)
        log_std = module.log_std_param()
        actor_params = module.policy_parameters() + ([] if log_std is None else [log_std.log_std])
        self.actor = _LocScale(module, log_std, self.log_std_bounds)
        # Actions in [-1, 1] (TanhNormal's default bounds): what the critics and the replay see.
        actor = ProbabilisticActor(
            LeanModule(self.actor, in_keys=["observation"], out_keys=["loc", "scale"]),
            in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        critics = [LeanModule(c, in_keys=["observation", "action"],
                              out_keys=["state_action_value"])
                   for c in make_critics(module, 2, 1, self.critic_hidden, nn.ReLU)]
        target = (-float(module.actions.act_dim) if self.target_entropy is None
                  else self.target_entropy)
        loss = SACLoss(actor, critics, num_qvalue_nets=2, loss_function="l2",
                       alpha_init=self.alpha_init, target_entropy=target).to(ctx.device)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=self.gamma)
        # SACLoss registers its target-entropy buffer on first use; make it now, so that a
        # checkpoint (which holds it) loads into a fresh module.
        _ = loss.target_entropy
        self.loss: SACLoss = module.add_aux(self.name, loss)
        self.updater, self.critic_opt, self.actor_opt, self.alpha_opt = critic_steps(
            self, self.loss, self.loss.qvalue_network_params, actor_params, self.loss.log_alpha)
        self._critic_loss = self.loop.compiled(self.loss.qvalue_v2_loss)
        self._actor_loss = self.loop.compiled(self.loss.actor_loss)

    def _explore(self, observation: Tensor) -> Tensor:
        loc, scale = self.actor(observation)
        return torch.tanh(loc + scale * self.loop.draw(tuple(loc.shape)))

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        delayed = self.loop.updates % self.delay == 0
        critic_loss, _ = self._critic_loss(batch)
        total, optimizers = critic_loss, [self.critic_opt]
        metrics: dict[str, Tensor | float] = {"loss/critic": critic_loss.detach()}
        if delayed:
            actor_loss, actor_info = self._actor_loss(batch)
            alpha_loss = self.loss.alpha_loss(actor_info["log_prob"]).mean()
            total = total + actor_loss + alpha_loss
            optimizers += [self.actor_opt, self.alpha_opt]
            metrics.update({"loss/actor": actor_loss.detach(),
                            "loss/temperature": alpha_loss.detach(),
                            "train/entropy": -actor_info["log_prob"].mean().detach()})
        self.loop.descend(total, optimizers, ctx)
        if delayed:
            self.updater.step()
        metrics["train/alpha"] = self.loss.log_alpha.detach().exp()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)
