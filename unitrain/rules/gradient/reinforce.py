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

from unitrain.rules.gradient.ppo import OnPolicyBatches, OnPolicyFields, annealed_lr, gradient_step
from unitrain.rules.registry import register_rule

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["REINFORCE"]


@register_rule("reinforce")
@dataclass
class REINFORCE(OnPolicyFields):
    """REINFORCE with a value baseline and standardised advantages: the fields of
    :class:`~unitrain.rules.gradient.ppo.OnPolicyFields`, with a larger step on smaller batches
    (``frames_per_batch`` transitions per gradient step).
    """

    lr: float = 1e-2
    frames_per_batch: int = 256

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
        # A recurrent module's batch stays [envs, steps]: each env's steps are one sequence,
        # recomputed from the state stored at its first step.
        gradient_step(self.loss, batch if self.data.recurrent else batch.reshape(-1),
                      self.optimizer, self.max_grad_norm, ctx, sums)
        return {**sums, "optim/lr": lr, "optim/updates": 1.0, "frames": float(batch.numel())}
