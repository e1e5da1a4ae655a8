"""On-policy policy gradient: PPO (clipped surrogate) and REINFORCE with a learned baseline.

PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with generalized advantage
estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation"). REINFORCE: Williams 1992, "Simple statistical gradient-following algorithms for
connectionist reinforcement learning", here with a value baseline and one gradient step per batch.

Both use TorchRL's losses (``ClipPPOLoss``, ``ReinforceLoss``) and ``GAE``. The policy is the
user's module: logits for discrete actions; for continuous actions the module's output is the
mean of a Gaussian whose log standard deviation is a state-independent parameter (``aux.log_std``)
and actions are clipped to the env's bounds by the env, as in the PPO paper's MuJoCo setup. A value
function (``aux.value``, an MLP over the flattened observation) is added unless the module has a
``value(observation)`` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import IndependentNormal, ProbabilisticActor, ValueOperator
from torchrl.objectives import ClipPPOLoss, ReinforceLoss
from torchrl.objectives.value import GAE

from unitrain.errors import check
from unitrain.module import mlp
from unitrain.optim.base import UpdateRule, register_rule

if TYPE_CHECKING:
    from unitrain.module import RLModule
    from unitrain.optim.base import RuleContext

__all__ = ["PPO", "REINFORCE"]


class _Flatten(nn.Module):
    """Flatten the observation's trailing dims before an MLP (images included)."""

    def __init__(self, net: nn.Module, obs_ndim: int) -> None:
        super().__init__()
        self.net, self.obs_ndim = net, obs_ndim

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        x = observation.flatten(-self.obs_ndim) if self.obs_ndim > 1 else observation
        return self.net(x.float())


class _ModuleValue(nn.Module):
    """The user's ``module.value(observation)`` as a network."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.module.value(observation)


class _LogStd(nn.Module):
    def __init__(self, act_dim: int, init: float) -> None:
        super().__init__()
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init)))


class _GaussianHead(nn.Module):
    """``observation -> (loc, scale)`` from the module's mean and a state-independent log std."""

    def __init__(self, module: nn.Module, log_std: _LogStd, act_dim: int) -> None:
        super().__init__()
        self.module, self.log_std, self.act_dim = module, log_std, act_dim

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.module(observation)[..., : self.act_dim]
        return loc, self.log_std.log_std.exp().expand_as(loc)


@register_rule("ppo")
@dataclass
class PPO(UpdateRule):
    """Proximal Policy Optimization with a clipped surrogate objective and GAE.

    Args:
        lr: Adam step size (annealed linearly to 0 over ``max_frames`` if ``anneal_lr``).
        anneal_lr: linear learning-rate decay over the frame budget.
        frames_per_batch: transitions collected per iteration on each rank (a multiple of
            ``env.num_envs``).
        minibatch_size: transitions per gradient step.
        epochs: passes over each batch.
        gamma: discount factor.
        gae_lambda: GAE λ.
        clip: surrogate clipping range ε.
        entropy_coef: entropy bonus coefficient.
        value_coef: value loss coefficient.
        max_grad_norm: gradient norm clip.
        normalize_advantage: standardise advantages per minibatch.
        log_std_init: initial log standard deviation of continuous actions.
        value_hidden: hidden sizes of the default value network.
    """

    lr: float = 3e-4
    anneal_lr: bool = True
    frames_per_batch: int = 2048
    minibatch_size: int = 64
    epochs: int = 10
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    normalize_advantage: bool = True
    log_std_init: float = 0.0
    value_hidden: tuple[int, ...] = (64, 64)

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "a number > 0", self.lr)
        check(self.frames_per_batch >= 1, "frames_per_batch", "an integer >= 1", self.frames_per_batch)
        check(1 <= self.minibatch_size, "minibatch_size", "an integer >= 1", self.minibatch_size)
        check(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        check(0 < self.gamma <= 1, "gamma", "a number in (0, 1]", self.gamma)
        check(0 <= self.gae_lambda <= 1, "gae_lambda", "a number in [0, 1]", self.gae_lambda)
        check(0 < self.clip < 1, "clip", "a number in (0, 1)", self.clip)
        check(self.entropy_coef >= 0, "entropy_coef", "a number >= 0", self.entropy_coef)
        check(self.value_coef >= 0, "value_coef", "a number >= 0", self.value_coef)
        check(self.max_grad_norm > 0, "max_grad_norm", "a number > 0", self.max_grad_norm)
        self.value_hidden = tuple(int(h) for h in self.value_hidden)

    # ------------------------------------------------------------------ construction
    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        info = ctx.env_info
        if info is None:
            raise ValueError(f"{type(self).__name__} needs an env: give the Trainer env=...")
        check(self.frames_per_batch % ctx.env_spec.num_envs == 0, "frames_per_batch",
              f"a multiple of env.num_envs={ctx.env_spec.num_envs}", self.frames_per_batch)
        self.module = module
        if info.discrete:
            policy = TensorDictModule(module, in_keys=["observation"], out_keys=["logits"])
            self.actor = ProbabilisticActor(policy, in_keys=["logits"],
                                            distribution_class=torch.distributions.Categorical,
                                            return_log_prob=True)
        else:
            log_std = module.add_aux("log_std", _LogStd(info.act_dim, self.log_std_init))
            head = TensorDictModule(_GaussianHead(module, log_std, info.act_dim),
                                    in_keys=["observation"], out_keys=["loc", "scale"])
            self.actor = ProbabilisticActor(head, in_keys=["loc", "scale"],
                                            distribution_class=IndependentNormal,
                                            return_log_prob=True)
        if callable(getattr(module, "value", None)):
            value_net: nn.Module = _ModuleValue(module)
        else:
            value_net = module.add_aux("value", _Flatten(
                mlp(info.obs_dim, 1, self.value_hidden, nn.Tanh, out_gain=1.0), len(info.obs_shape)))
        self.critic = ValueOperator(value_net, in_keys=["observation"])
        self.loss = self._make_loss()
        self.advantage = GAE(gamma=self.gamma, lmbda=self.gae_lambda, value_network=self.critic,
                             average_gae=False)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=self.lr, eps=1e-5)
        self._batches: Any = None

    def _make_loss(self) -> nn.Module:
        return ClipPPOLoss(self.actor, self.critic, clip_epsilon=self.clip,
                           entropy_bonus=self.entropy_coef > 0,
                           entropy_coeff=self.entropy_coef or None, critic_coeff=self.value_coef,
                           loss_critic_type="l2", normalize_advantage=self.normalize_advantage)

    def _post_advantage(self, batch: Any) -> None:
        """Hook on the batch after GAE (ClipPPOLoss standardises per minibatch itself)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    # ------------------------------------------------------------------ one iteration
    def step(self, ctx: "RuleContext") -> dict[str, float]:
        if self._batches is None:
            self._batches = iter(ctx.collector(self.actor, self.frames_per_batch))
        batch = next(self._batches)
        with torch.no_grad():
            self.advantage(batch)
            self._post_advantage(batch)
        flat = batch.reshape(-1)
        lr = self.lr * (1.0 - ctx.progress) if self.anneal_lr else self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(self.epochs):
            order = torch.randperm(flat.shape[0], generator=ctx.generator).to(flat.device)
            for idx in order.split(self.minibatch_size):
                out = self.loss(flat[idx])
                loss = sum(v for k, v in out.items() if k.startswith("loss_"))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ctx.all_reduce_grads(params)
                grad_norm = nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                self.optimizer.step()
                for k, v in out.items():
                    if v.numel() == 1:
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(grad_norm)
                updates += 1
        metrics = {_metric_name(k): v / updates for k, v in sums.items()}
        metrics.update({"optim/lr": lr, "optim/updates": float(updates),
                        "frames": float(batch.numel())})
        return metrics


def _metric_name(key: str) -> str:
    return f"loss/{key[5:]}" if key.startswith("loss_") else f"train/{key}"


@register_rule("reinforce")
@dataclass
class REINFORCE(PPO):
    """REINFORCE with a learned value baseline: one gradient step on each whole batch.

    Advantages are discounted returns minus the baseline (GAE with λ = 1; an episode cut by the
    end of a batch is bootstrapped with the baseline), standardised over the batch. Fields are
    those of :class:`PPO`; ``clip`` is unused and ``minibatch_size`` should equal
    ``frames_per_batch`` for the textbook single step per batch.
    """

    lr: float = 1e-2
    frames_per_batch: int = 256
    minibatch_size: int = 256
    epochs: int = 1
    gae_lambda: float = 1.0

    def _make_loss(self) -> nn.Module:
        return ReinforceLoss(self.actor, self.critic, loss_critic_type="l2")

    def _post_advantage(self, batch: Any) -> None:
        if self.normalize_advantage:
            adv = batch.get("advantage")
            batch.set("advantage", (adv - adv.mean()) / (adv.std() + 1e-8))
