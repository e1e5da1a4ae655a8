"""TD3: twin delayed deep deterministic policy gradient, as an update rule.

Reference: S. Fujimoto, H. van Hoof, D. Meger, "Addressing Function Approximation Error in
Actor-Critic Methods", ICML 2018 (arXiv:1802.09477).

DDPG's deterministic actor ``a = tanh(u(s))`` (``u`` the module's pre-squash mean, read through
the shared action contract of :mod:`unitrain.policy.action`) with the paper's three changes, through
TorchRL's ``TD3Loss``: two critics and the smaller of their targets (clipped double Q-learning),
``r + γ(1 − terminated) min_i Q'_i(s', clip(μ'(s') + clip(ε, −c, c), −1, 1))`` with
``ε ~ N(0, policy_noise²)`` (target policy smoothing), and the actor and target networks updated
once per ``delay`` critic updates (the actor ascends ``Q_1(s, μ(s))``; Polyak ``tau``).
Collection, replay, warm-up and the update-to-data schedule are the
:class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop` this rule composes, as for DDPG, SAC and DSAC-T.

Exploration adds Gaussian noise of standard deviation ``noise_std`` to the squashed action in
``[-1, 1]`` (then clipped), drawn from the loop's seeded generator; the target smoothing noise is
in the same ``[-1, 1]`` units (the paper's 0.2 and 0.5 for actions of range ±1).

Critics: two networks ``(observation, action) -> Q`` from the module's ``make_critic()`` if it has
one, else MLPs with ``critic_hidden`` ReLU layers (the paper's code: 2 x 256). The loss, holding
the critics and the target actor and critics, is registered as ``module.aux["td3"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tensordict import TensorDictBase
from torch import Tensor, nn
from torchrl.objectives import TD3Loss, ValueEstimators

from unitrain.rules.gradient.ddpg import TanhActor
from unitrain.rules.gradient.offpolicy import (LeanModule, OffPolicyFields, OffPolicyLoop,
                                               critic_steps, make_critics)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["TD3", "td3_loss"]

_METRICS = ("loss/critic", "loss/actor", "train/q_mean", "train/target_q_mean")


def td3_loss(rule: Any, module: "RLModule", ctx: "RuleContext") -> TD3Loss:
    """TorchRL's ``TD3Loss`` over the module's ``tanh`` actor and two critics, with ``rule``'s
    ``critic_hidden``, ``policy_noise``, ``noise_clip`` and ``gamma`` (shared with CEM-RL)."""
    actor = LeanModule(TanhActor(module), in_keys=["observation"], out_keys=["action"])
    critics = [LeanModule(c, in_keys=["observation", "action"],
                          out_keys=["state_action_value"])
               for c in make_critics(module, 2, 1, rule.critic_hidden, nn.ReLU)]
    loss = TD3Loss(actor, critics, bounds=(-1.0, 1.0), num_qvalue_nets=2,
                   policy_noise=rule.policy_noise, noise_clip=rule.noise_clip,
                   loss_function="l2").to(ctx.device)
    loss.make_value_estimator(ValueEstimators.TD0, gamma=rule.gamma)
    return loss


@register_rule("td3")
@dataclass
class TD3(OffPolicyFields):
    """TD3 (Fujimoto et al. 2018): twin critics, target policy smoothing, delayed actor updates.

    Fields of :class:`~unitrain.rules.gradient.offpolicy.OffPolicyFields` (replay, warm-up, learning
    rates, ``tau``, ...) with the defaults of the paper's code, plus:

    Args:
        noise_std: standard deviation of the exploration noise, in ``[-1, 1]`` action units.
        policy_noise: standard deviation of the target policy smoothing noise.
        noise_clip: bound of the smoothing noise.
        delay: critic updates per actor and target-network update.
    """

    warmup_frames: int = 25_000
    noise_std: float = bounded(0.1, "[0, inf]")
    policy_noise: float = bounded(0.2, "[0, inf]")
    noise_clip: float = bounded(0.5, "[0, inf]")
    delay: int = bounded(2, "[1, inf]")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, _METRICS)
        self.loss: TD3Loss = module.add_aux(self.name, td3_loss(self, module, ctx))
        self.actor = self.loss.actor_network.module
        self.updater, self.critic_opt, self.actor_opt, self.alpha_opt = critic_steps(
            self, self.loss, self.loss.qvalue_network_params, module.policy_parameters())
        self._critic_loss = self.loop.compiled(self.loss.value_loss)
        self._actor_loss = self.loop.compiled(self.loss.actor_loss)

    def _explore(self, observation: Tensor) -> Tensor:
        action = self.actor(observation)
        return (action + self.noise_std * self.loop.draw(tuple(action.shape))).clamp(-1.0, 1.0)

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        critic_loss, info = self._critic_loss(batch)
        self.loop.descend(critic_loss, [self.critic_opt], ctx)
        metrics: dict[str, Tensor | float] = {
            "loss/critic": critic_loss.detach(), "train/q_mean": info["pred_value"].mean(),
            "train/target_q_mean": info["target_value"].mean()}
        if self.loop.updates % self.delay == self.delay - 1:
            actor_loss, _ = self._actor_loss(batch)
            self.loop.descend(actor_loss, [self.actor_opt], ctx)
            self.updater.step()
            metrics["loss/actor"] = actor_loss.detach()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)
