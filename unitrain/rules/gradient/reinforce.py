"""REINFORCE with a learned value baseline: one gradient step on each whole batch.

Williams 1992, "Simple statistical gradient-following algorithms for connectionist reinforcement
learning". Each iteration collects ``frames_per_batch`` transitions per process with the current
stochastic policy (the shared action contract, :mod:`unitrain.policy.action`), computes advantages as
discounted returns minus the baseline ``V(s)`` (GAE with λ = 1: an episode cut by the end of a
batch is bootstrapped with the baseline), standardises them over the batch, and takes one Adam
step on TorchRL's ``ReinforceLoss``: ``−mean[log π(a|s) · Â] + mean[(V(s) − R)²]``.

The policy, value function, collection and advantages are PPO's
(:class:`~unitrain.rules.gradient.ppo.OnPolicyBatches`), and so is the gradient step
(:func:`~unitrain.rules.gradient.ppo.gradient_step`); REINFORCE has no clipping, epochs or minibatches,
so it has no such fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torchrl.objectives import ReinforceLoss

from unitrain.errors import check
from unitrain.rules.base import UpdateRule
from unitrain.rules.gradient.ppo import OnPolicyBatches, annealed_lr, check_batch, gradient_step
from unitrain.rules.registry import register_rule

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["REINFORCE"]


@register_rule("reinforce")
@dataclass
class REINFORCE(UpdateRule):
    """REINFORCE with a value baseline and standardised advantages.

    Args:
        lr: Adam step size (annealed linearly to 0 over ``max_frames`` if ``anneal_lr``).
        anneal_lr: linear learning-rate decay over the frame budget.
        frames_per_batch: transitions per gradient step on each rank (a multiple of
            ``env.num_envs``).
        gamma: discount factor.
        normalize_advantage: standardise the batch's advantages.
        max_grad_norm: gradient norm clip.
        log_std_init: initial log standard deviation of continuous actions.
        value_hidden: hidden sizes of the default value network.
    """

    lr: float = 1e-2
    anneal_lr: bool = True
    frames_per_batch: int = 256
    gamma: float = 0.99
    normalize_advantage: bool = True
    max_grad_norm: float = 0.5
    log_std_init: float = 0.0
    value_hidden: tuple[int, ...] = (64, 64)

    def validate(self) -> None:
        check(self.lr > 0, "lr", "a number > 0", self.lr)
        check(self.frames_per_batch >= 1, "frames_per_batch", "an integer >= 1",
              self.frames_per_batch)
        check(0 < self.gamma <= 1, "gamma", "a number in (0, 1]", self.gamma)
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0", self.max_grad_norm)

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        check_batch(self.frames_per_batch, env)

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        # GAE with λ = 1: discounted returns minus the baseline.
        self.data = OnPolicyBatches(self.name, module, ctx, self.frames_per_batch, self.gamma,
                                    1.0, self.log_std_init, self.value_hidden)
        self.loss = ReinforceLoss(self.data.actor, self.data.critic, loss_critic_type="l2")
        self.optimizer = torch.optim.Adam(module.parameters(), lr=self.lr, eps=1e-5)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        batch = self.data.next(ctx)
        with torch.no_grad():
            if self.normalize_advantage:
                adv = batch.get("advantage")
                batch.set("advantage", (adv - adv.mean()) / (adv.std() + 1e-8))
        lr = annealed_lr(self.optimizer, self.lr, self.anneal_lr, ctx.progress)
        sums: dict[str, float] = {}
        gradient_step(self.loss, batch.reshape(-1), self.optimizer, self.max_grad_norm, ctx, sums)
        return {**sums, "optim/lr": lr, "optim/updates": 1.0, "frames": float(batch.numel())}
