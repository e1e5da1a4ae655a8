"""DSAC-T: distributional soft actor-critic with three refinements, as an update rule.

Reference: J. Duan, W. Wang, L. Xiao, J. Gao, S. E. Li, C. Liu, Y.-Q. Zhang, B. Cheng, K. Li,
"Distributional Soft Actor-Critic with Three Refinements" (DSAC-T, released as DSAC-v2),
arXiv:2310.05858.

The losses are :class:`unitrain.rules.gradient.dsac_t_loss.DSACTLoss` (the paper's critic-loss form, with
expected value substitution, twin value distribution learning and variance-based critic gradient
adjustment; see that module for the equations). This rule adds what the paper's training loop
does around them (collection, replay, warm-up: the composed
:class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop`), and its delayed
updates: the critics take a step on every gradient update; the policy, the temperature and the
target networks (Polyak ``tau``) on every ``delay``-th, from gradients taken at the same
parameters as the critics' (as in the authors' code). ``alpha_every="update"`` steps the
temperature on every gradient update instead (from fresh policy samples), the schedule of SAC
with one update per step: comparing the two rules at equal temperature schedules needs it, since
with ``delay=2`` the paper's schedule takes half as many temperature steps.

Policy: the module's tanh-squashed Gaussian of the shared action contract (:mod:`unitrain.policy.action`).
With ``action_std="state"`` the module gives the pre-tanh mean and a raw log standard deviation
per state (the paper's actor); with ``"param"`` the log standard deviation is the learned
state-independent vector ``aux.log_std`` (initialised to 0), trained with the actor.

Critics: two distinct networks ``(observation, action) -> (mean, raw std)`` (a tuple, or one
tensor ``[..., 2]``), from the module's ``make_critic()`` if it has one, else MLPs with
``critic_hidden`` GELU layers (the paper's 3 x 256). The loss keeps stacked copies of their
parameters; it is registered as ``module.aux["dsac_t"]``, so critics, targets, ``log_alpha`` and
the moving average ``omega`` are checkpointed with the module. With several processes ``omega``
is averaged across processes after every update, which equals the moving average over the
union of their batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tensordict import TensorDictBase
from torch import Tensor, nn

from unitrain.rules.gradient.dsac_t_loss import DSACTLoss
from unitrain.policy.inputs import call_module
from unitrain.rules.gradient.offpolicy import (OffPolicyFields, OffPolicyLoop,
                                               critic_steps, make_critics)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["DSACT", "dsac_t_loss"]

# The authors' MuJoCo bounds on the policy's log standard deviation.
LOG_STD_BOUNDS = (-20.0, 0.5)

_METRICS = ("loss/critic", "loss/actor", "loss/temperature", "train/alpha", "train/entropy",
            "train/omega", "train/q_mean", "train/sigma_mean", "train/target_q_mean")


class _GaussianActor(nn.Module):
    """``observation -> (loc, raw log std)`` of the module's pre-tanh Gaussian."""

    def __init__(self, module: nn.Module, log_std: nn.Module | None) -> None:
        super().__init__()
        self.module = module
        # ``log_std`` lives under ``module.aux``: registering it here too would give the loss
        # two copies of it (one per path) to keep in step.
        self.__dict__["log_std"] = log_std

    def forward(self, observation: Any) -> tuple[Tensor, Tensor]:
        head = self.module.actions
        out = call_module(self.module, observation)
        return head.loc(out), head.log_std(out, self.log_std)


class _MeanStd(nn.Module):
    """A critic's output as DSACTLoss reads it: ``(mean, raw_std)``, each ``[..., 1]``."""

    def __init__(self, critic: nn.Module) -> None:
        super().__init__()
        self.critic = critic

    def forward(self, observation: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        out = self.critic(observation, action)
        if isinstance(out, tuple):
            return out
        return out[..., :1], out[..., 1:2]


def dsac_t_loss(rule: Any, module: "RLModule",
                ctx: "RuleContext") -> tuple[DSACTLoss, list[nn.Parameter]]:
    """The :class:`~unitrain.rules.gradient.dsac_t_loss.DSACTLoss` over the module's tanh-Gaussian policy and two
    Gaussian critics (the module's ``make_critic()`` or GELU MLPs of ``rule.critic_hidden``),
    with ``rule``'s ``gamma``, ``alpha_init``, ``target_entropy`` and ``tau`` (shared with
    CEM-RL), and the actor's parameters: the policy's, plus ``aux.log_std`` if the module has
    one."""
    log_std = module.log_std_param()
    actor_params = module.policy_parameters() + ([] if log_std is None else [log_std.log_std])
    critics = [_MeanStd(c) for c in make_critics(module, 2, 2, rule.critic_hidden, nn.GELU)]
    loss = DSACTLoss(_GaussianActor(module, log_std), critics, gamma=rule.gamma,
                     alpha_init=rule.alpha_init,
                     target_entropy="auto" if rule.target_entropy is None
                     else rule.target_entropy, tau_b=rule.tau,
                     log_std_bounds=LOG_STD_BOUNDS).to(ctx.device)
    return loss, actor_params


@register_rule("dsac_t")
@dataclass
class DSACT(OffPolicyFields):
    """DSAC-T (Duan et al.): twin Gaussian critics, expected value substitution, clipped targets.

    Fields of :class:`~unitrain.rules.gradient.offpolicy.OffPolicyFields` (replay, warm-up, learning
    rates, ``tau``, ...) with the paper's defaults, plus:

    Args:
        lr_alpha: Adam step size of the temperature's logarithm.
        alpha_init: initial temperature (``e``, as in the authors' code).
        target_entropy: target policy entropy (``None``: ``-act_dim``).
        delay: gradient updates per policy, temperature and target-network update.
        alpha_every: ``"delayed"`` (the paper's: the temperature steps with the policy, every
            ``delay`` updates) or ``"update"`` (every gradient update, as SAC with ``delay=1``).
    """

    lr_actor: float = 1e-4
    lr_critic: float = 1e-4
    warmup_frames: int = 10_000
    utd_ratio: float = 0.05
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    lr_alpha: float = bounded(3e-4, "(0, inf]")
    alpha_init: float = bounded(math.e, "(0, inf]")
    target_entropy: float | None = None
    delay: int = bounded(2, "[1, inf]")
    alpha_every: str = one_of("delayed", "delayed", "update")

    log_std_bounds: ClassVar[tuple[float, float]] = LOG_STD_BOUNDS

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, _METRICS)
        loss, actor_params = dsac_t_loss(self, module, ctx)
        self.loss: DSACTLoss = module.add_aux(self.name, loss)
        self.actor = self.loss.actor_network
        self.updater, self.critic_opt, self.actor_opt, self.alpha_opt = critic_steps(
            self, self.loss, self.loss.qvalue_network_params, actor_params, self.loss.log_alpha)
        self._critic_loss = self.loop.compiled(self.loss.critic_loss)
        self._actor_loss = self.loop.compiled(self.loss.actor_loss)

    def _explore(self, observation: Tensor) -> Tensor:
        loc, raw_scale = self.actor(observation)
        scale = raw_scale.clamp(*self.log_std_bounds).exp()
        return torch.tanh(loc + scale * self.loop.draw(tuple(loc.shape)))

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        delayed = self.loop.updates % self.delay == 0
        critic_loss, info = self._critic_loss(batch)
        metrics: dict[str, Tensor | float] = {
            "loss/critic": critic_loss.detach(), "train/q_mean": info["pred_value"].mean(),
            "train/sigma_mean": info["pred_std"].mean(), "train/omega": info["omega"].mean(),
            "train/target_q_mean": info["target_value"].mean()}
        total, optimizers = critic_loss, [self.critic_opt]
        if delayed:
            actor_loss, actor_info = self._actor_loss(batch)
            alpha_loss = self.loss.alpha_loss(actor_info["log_prob"])
            total = total + actor_loss + alpha_loss
            optimizers += [self.actor_opt, self.alpha_opt]
            metrics.update({"loss/actor": actor_loss.detach(),
                            "loss/temperature": alpha_loss.detach(),
                            "train/entropy": actor_info["entropy"]})
        elif self.alpha_every == "update":
            with torch.no_grad():
                _, log_prob = self.loss._sample_action(batch, self.loss.actor_network_params)
            alpha_loss = self.loss.alpha_loss(log_prob)
            total = total + alpha_loss
            optimizers.append(self.alpha_opt)
            metrics["loss/temperature"] = alpha_loss.detach()
        # The three losses touch disjoint parameters, so one backward serves them all.
        self.loop.descend(total, optimizers, ctx)
        ctx.all_reduce_(self.loss.omega, "mean")
        if delayed:
            self.updater.step()
        metrics["train/alpha"] = self.loss.alpha
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)
