"""DDPG: deep deterministic policy gradient, as an update rule.

Reference: T. P. Lillicrap, J. J. Hunt, A. Pritzel, N. Heess, T. Erez, Y. Tassa, D. Silver,
D. Wierstra, "Continuous control with deep reinforcement learning", ICLR 2016 (arXiv:1509.02971),
building on the deterministic policy gradient of Silver et al. 2014.

A deterministic actor ``a = tanh(u(s))`` (``u`` the module's pre-squash mean, read through the
shared action contract of :mod:`unitrain.policy.action`) and a critic ``Q(s, a)`` learn from replayed
transitions with TorchRL's ``DDPGLoss``: the critic regresses on ``r + gamma (1 - terminated)
Q'(s', mu'(s'))`` from the target networks ``Q'`` and ``mu'`` (both kept, as in the paper), the
actor ascends ``Q(s, mu(s))``; each gradient update steps the critic, then the actor (its loss
taken with the updated critic), then moves both targets by Polyak averaging (``SoftUpdate``,
``tau``). Collection, replay, warm-up and the update-to-data schedule are the
:class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop` this rule composes.

Exploration adds noise to the squashed action ``tanh(u(s))`` in ``[-1, 1]`` (then clipped to
``[-1, 1]``): independent Gaussian noise with standard deviation ``noise_std`` (``"normal"``, as
in TD3 and rl-baselines3-zoo), or the paper's Ornstein-Uhlenbeck process ``x <- (1 - theta) x +
noise_std * N(0, 1)`` per env, restarted at 0 with every episode (``"ou"``; the paper's
``theta = 0.15``, ``sigma = 0.2``). The noise is drawn from the rule's seeded generator.

Critic: the module's ``make_critic()`` if it has one (a network ``(observation, action) ->
[..., 1]``), else an MLP over ``[observation, action]`` with ``critic_hidden`` ReLU layers. The
loss, holding the critic and both target networks, is registered as ``module.aux["ddpg"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import DDPGLoss, ValueEstimators

from unitrain.policy.inputs import call_module
from unitrain.rules.gradient.offpolicy import (LeanModule, OffPolicyFields, OffPolicyLoop,
                                               critic_steps, make_critics)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["DDPG"]

_METRICS = ("loss/critic", "loss/actor", "train/q_mean", "train/target_q_mean")


class TanhActor(nn.Module):
    """``observation -> tanh(u(observation))``, the module's action in ``[-1, 1]``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, observation: Any) -> Tensor:
        return torch.tanh(self.module.actions.loc(call_module(self.module, observation)))


@register_rule("ddpg")
@dataclass
class DDPG(OffPolicyFields):
    """DDPG (Lillicrap et al. 2016) with target actor and critic, Gaussian or OU exploration.

    Fields of :class:`~unitrain.rules.gradient.offpolicy.OffPolicyFields` (replay, warm-up, learning
    rates, ``tau``, ...), plus:

    Args:
        noise: ``"normal"`` (independent Gaussian) or ``"ou"`` (Ornstein-Uhlenbeck).
        noise_std: standard deviation of the Gaussian noise, or the OU process's sigma, in units
            of the ``[-1, 1]`` action (0: no exploration noise).
        ou_theta: mean reversion of the OU process per step, in (0, 1].
    """

    lr_actor: float = 1e-3
    lr_critic: float = 1e-3
    noise: str = one_of("normal", "normal", "ou")
    noise_std: float = bounded(0.1, "[0, inf]")
    ou_theta: float = bounded(0.15, "(0, 1]")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, _METRICS)
        actor = LeanModule(TanhActor(module), in_keys=["observation"], out_keys=["action"])
        critic = LeanModule(make_critics(module, 1, 1, self.critic_hidden, nn.ReLU)[0],
                            in_keys=["observation", "action"],
                            out_keys=["state_action_value"])
        loss = DDPGLoss(actor, critic, delay_actor=True, delay_value=True,
                        loss_function="l2").to(ctx.device)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=self.gamma)
        self.loss: DDPGLoss = module.add_aux(self.name, loss)
        self.actor = self.loss.actor_network.module
        self.updater, self.critic_opt, self.actor_opt, self.alpha_opt = critic_steps(
            self, self.loss, self.loss.value_network_params, module.policy_parameters())
        self._critic_loss = self.loop.compiled(self.loss.loss_value)
        self._actor_loss = self.loop.compiled(self.loss.loss_actor)
        self._ou: Tensor | None = None
        self._episodes_seen: np.ndarray | Tensor | None = None

    def _explore(self, observation: Tensor) -> Tensor:
        action = self.actor(observation)
        eps = self.loop.draw(tuple(action.shape))
        noise = self._ou_step(eps) if self.noise == "ou" else self.noise_std * eps
        return (action + noise).clamp(-1.0, 1.0)

    def _ou_step(self, eps: Tensor) -> Tensor:
        """Advance the per-env OU process (restarting finished episodes at 0)."""
        done = self.loop.env.episodes_done
        if self._ou is None or self._ou.shape != eps.shape:
            self._ou = torch.zeros_like(eps)
        elif self._episodes_seen is not None:
            restarted = torch.as_tensor(done != self._episodes_seen).to(eps.device)
            self._ou[restarted] = 0.0
        # A numpy array, or a tensor on the device of a torch-native env.
        self._episodes_seen = done.clone() if isinstance(done, Tensor) else done.copy()
        self._ou = (1.0 - self.ou_theta) * self._ou + self.noise_std * eps
        return self._ou

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        critic_loss, info = self._critic_loss(batch)
        self.loop.descend(critic_loss, [self.critic_opt], ctx)
        actor_loss, _ = self._actor_loss(batch)
        self.loop.descend(actor_loss, [self.actor_opt], ctx)
        self.updater.step()
        return {"loss/critic": critic_loss.detach(), "loss/actor": actor_loss.detach(),
                "train/q_mean": info["pred_value"].mean(),
                "train/target_q_mean": info["target_value"].mean()}

    def state_dict(self) -> dict[str, Any]:
        return {**self.loop.state_dict(), "ou": self._ou, "episodes_seen": self._episodes_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)
        self._ou, self._episodes_seen = state.get("ou"), state.get("episodes_seen")
