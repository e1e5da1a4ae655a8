"""PPO: proximal policy optimisation with a clipped surrogate objective.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms", with generalized advantage
estimation (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
Estimation"), over TorchRL's ``ClipPPOLoss`` and ``GAE``. The policy is the
user's module read through the shared action contract (:mod:`unitrain.policy.action`): a categorical
policy over logits, or a tanh-squashed Gaussian scaled to the env's bounds whose log standard
deviation is ``aux.log_std`` or the module's own second half of outputs. A value function
(``aux.value``, an MLP over the flattened observation) is added unless the module has a
``value(observation)`` method. :class:`REINFORCE` lives in :mod:`unitrain.rules.gradient.reinforce` and
composes :class:`OnPolicyBatches` (policy, value function, collection, GAE) and uses
:func:`gradient_step` and :func:`annealed_lr` like PPO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torchrl.modules import ValueOperator
from torchrl.objectives import ClipPPOLoss
from torchrl.objectives.value import GAE

from unitrain.envs.observation import flat_observation
from unitrain.errors import UserError, check
from unitrain.policy.action import stochastic_actor
from unitrain.policy.inputs import call_module
from unitrain.policy.models import mlp
from unitrain.policy.recurrent import is_recurrent
from unitrain.rules.base import UpdateRule
from unitrain.rules.gradient.recurrent import (IS_INIT, NEXT_STATE, STATE, CarriedPolicy,
                                               SequenceOutput, carried_spec, segments, state_keys)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["PPO", "OnPolicyFields", "OnPolicyBatches", "check_batch", "value_operator", "gradient_step", "annealed_lr"]


class _Flatten(nn.Module):
    """Flatten the observation's trailing dims before an MLP (images included; named entries
    concatenated in the documented order, :func:`~unitrain.envs.observation.flat_observation`)."""

    def __init__(self, net: nn.Module, layout: Any) -> None:
        super().__init__()
        self.net, self.layout = net, layout

    def forward(self, *observation: torch.Tensor) -> torch.Tensor:
        # Named entries come one by one (the value operator reads each leaf), in layout order.
        obs = (dict(zip(self.layout, observation)) if isinstance(self.layout, dict)
               else observation[0])
        return self.net(flat_observation(obs, self.layout).float())


class _ModuleValue(nn.Module):
    """The user's ``module.value(observation)`` as a network (``module.value(**entries)`` for
    named entries, which come one by one in ``names`` order)."""

    def __init__(self, module: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *observation: torch.Tensor) -> torch.Tensor:
        obs = observation[0] if self.names is None else dict(zip(self.names, observation))
        return call_module(self.module, obs, "value")


def value_operator(module: "RLModule", info: "EnvInfo", hidden: tuple[int, ...]) -> ValueOperator:
    """The state-value function: ``module.value`` if defined, else an MLP under ``aux.value``.

    Args:
        module: the user's module.
        info: the env's shapes.
        hidden: hidden sizes of the default MLP.
    """
    names = None if info.obs_shapes is None else list(info.obs_shapes)
    if callable(getattr(module, "value", None)):
        value_net: nn.Module = _ModuleValue(module, names)
    else:
        value_net = module.add_aux("value", _Flatten(
            mlp(info.obs_dim, 1, hidden, nn.Tanh, out_gain=1.0), info.layout))
    # The leaves of a named observation, one by one: TorchRL's value estimators read tensors.
    in_keys: list[Any] = (["observation"] if names is None
                          else [("observation", key) for key in names])
    return ValueOperator(value_net, in_keys=in_keys)


def gradient_step(loss: nn.Module, batch: Any, optimizer: torch.optim.Optimizer,
                  max_grad_norm: float, ctx: "RuleContext", sums: dict[str, float]) -> None:
    """One optimizer step on the sum of ``loss(batch)``'s ``loss_*`` entries.

    Gradients are averaged across processes, then clipped to ``max_grad_norm``; the scalars of
    the loss's output and the gradient norm are added to ``sums``.
    """
    out = loss(batch)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ctx.all_reduce_grads(params)
    grad_norm = nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    for k, v in out.items():
        if v.numel() == 1:
            name = f"loss/{k[5:]}" if k.startswith("loss_") else f"train/{k}"
            sums[name] = sums.get(name, 0.0) + float(v.detach())
    sums["train/grad_norm"] = sums.get("train/grad_norm", 0.0) + float(grad_norm)


def check_batch(frames_per_batch: int, env: "EnvSpec") -> None:
    """``optimizer.frames_per_batch`` must fill whole steps of the vectorised env."""
    check(frames_per_batch % env.num_envs == 0, "optimizer.frames_per_batch",
          f"a multiple of env.num_envs={env.num_envs}", frames_per_batch)


class OnPolicyBatches:
    """The on-policy evidence PPO and REINFORCE share: the module's stochastic policy (the action
    contract's) and a state-value function, ``frames_per_batch`` transitions per iteration from a
    TorchRL collector, and GAE advantages.

    Args:
        rule: the rule's name (for messages).
        module: the user's module.
        ctx: the run's services.
        frames_per_batch: transitions per batch on each rank (a multiple of ``env.num_envs``).
        gamma, lmbda: GAE's discount and λ.
        log_std_init: initial log std of continuous actions (``aux.log_std``, if created here).
        value_hidden: hidden sizes of the default value network.
    """

    def __init__(self, rule: str, module: "RLModule", ctx: "RuleContext", frames_per_batch: int,
                 gamma: float, lmbda: float, log_std_init: float,
                 value_hidden: tuple[int, ...]) -> None:
        info = ctx.env_info
        if info is None:
            raise UserError(f"{rule} needs an env: give the Trainer env=...")
        self.frames_per_batch = frames_per_batch
        self.device = module.device
        self.recurrent = is_recurrent(module)
        if self.recurrent:
            # Collection carries a state per env slot; the losses recompute whole segments from
            # the state stored at their first step (unitrain.rules.gradient.recurrent).
            like = module.initial_state(1)
            self.actor = stochastic_actor(
                module, log_std_init, output=SequenceOutput(module, len(info.obs_shape)),
                in_keys=("observation", IS_INIT, *state_keys(like, STATE)),
                carried=tuple(state_keys(like, NEXT_STATE)))
            for key, spec in carried_spec(like, module.device).items():
                self.actor.spec[key] = spec
            self.policy: Any = CarriedPolicy(self.actor, module, ctx.train_env)
        else:
            self.actor = stochastic_actor(module, log_std_init)
            self.policy = self.actor
        self.critic = value_operator(module, info, value_hidden)
        self.advantage = GAE(gamma=gamma, lmbda=lmbda, value_network=self.critic,
                             average_gae=False)
        self._batches: Any = None

    def next(self, ctx: "RuleContext") -> Any:
        """The next batch ``[num_envs, steps]`` with its ``"advantage"`` and value targets."""
        if self._batches is None:
            self._batches = iter(ctx.collector(self.policy, self.frames_per_batch))
        batch = next(self._batches)
        with torch.no_grad():
            self.advantage(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """A recurrent module's carried collection states (empty for a feed-forward one)."""
        return {"carried": self.policy.state_dict_carried()} if self.recurrent else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.recurrent:
            self.policy.load_carried(state.get("carried") or {}, self.device)


def annealed_lr(optimizer: torch.optim.Optimizer, lr: float, anneal: bool, progress: float) -> float:
    """Set (and return) ``lr``, decayed linearly to 0 over the budget if ``anneal``."""
    lr = lr * (1.0 - progress) if anneal else lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class OnPolicyFields(UpdateRule):
    """The hyperparameters PPO and REINFORCE share (fields and their checks only): the policy,
    value network, collection and advantages of :class:`OnPolicyBatches`, and the Adam step.

    Args:
        lr: Adam step size (annealed linearly to 0 over ``max_frames`` if ``anneal_lr``).
        anneal_lr: linear learning-rate decay over the frame budget.
        frames_per_batch: transitions collected per iteration on each rank (a multiple of
            ``env.num_envs``).
        gamma: discount factor.
        normalize_advantage: standardise the advantages (PPO: per minibatch; REINFORCE: over
            the batch).
        max_grad_norm: gradient norm clip.
        log_std_init: initial log standard deviation of continuous actions.
        value_hidden: hidden sizes of the default value network.
    """

    # Recurrent modules train on whole trajectory segments (see OnPolicyBatches).
    feedforward_only = None

    lr: float = bounded(3e-4, "(0, inf]")
    anneal_lr: bool = True
    frames_per_batch: int = bounded(2048, "[1, inf]")
    gamma: float = bounded(0.99, "(0, 1]")
    normalize_advantage: bool = True
    max_grad_norm: float = bounded(0.5, "(0, inf]")
    log_std_init: float = 0.0
    value_hidden: tuple[int, ...] = (64, 64)

    action_spaces: ClassVar[tuple[str, ...]] = ("discrete", "multidiscrete", "continuous")
    action_masks: ClassVar[bool] = True

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        check_batch(self.frames_per_batch, env)

    def state_dict(self) -> dict[str, Any]:
        data = getattr(self, "data", None)
        return data.state_dict() if data is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data.load_state_dict(state)


@register_rule("ppo")
@dataclass
class PPO(OnPolicyFields):
    """Proximal Policy Optimization with a clipped surrogate objective and GAE.

    Fields of :class:`OnPolicyFields` (learning rate, batch, discount, ...), plus:

    Args:
        minibatch_size: transitions per gradient step.
        epochs: passes over each batch.
        gae_lambda: GAE λ.
        clip: surrogate clipping range ε.
        entropy_coef: entropy bonus coefficient.
        value_coef: value loss coefficient.
        sequence_length: a recurrent module's segment length: minibatches are whole segments of
            this many consecutive steps of one env (``minibatch_size // sequence_length``
            segments each), recomputed from the state stored at their first step; ``None``:
            each env's whole share of the batch. Feed-forward modules train on shuffled
            transitions and do not read it.
    """

    minibatch_size: int = bounded(64, "[1, inf]")
    epochs: int = bounded(10, "[1, inf]")
    gae_lambda: float = bounded(0.95, "[0, 1]")
    clip: float = bounded(0.2, "(0, 1)")
    entropy_coef: float = bounded(0.0, "[0, inf]")
    value_coef: float = bounded(0.5, "[0, inf]")
    sequence_length: int | None = bounded(None, "[1, inf]", null=True)

    # ------------------------------------------------------------------ construction
    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.data = OnPolicyBatches(self.name, module, ctx, self.frames_per_batch, self.gamma,
                                    self.gae_lambda, self.log_std_init, self.value_hidden)
        self.loss = ClipPPOLoss(self.data.actor, self.data.critic, clip_epsilon=self.clip,
                                entropy_bonus=self.entropy_coef > 0,
                                entropy_coeff=self.entropy_coef or None,
                                critic_coeff=self.value_coef, loss_critic_type="l2",
                                normalize_advantage=self.normalize_advantage)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=self.lr, eps=1e-5)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    # ------------------------------------------------------------------ one iteration
    def step(self, ctx: "RuleContext") -> dict[str, float]:
        batch = self.data.next(ctx)
        if self.data.recurrent:
            # Whole segments [S, L] of one env each, kept in time order; shuffled as segments.
            length = self.sequence_length or batch.shape[1]
            flat, size = segments(batch, length), max(1, self.minibatch_size // length)
        else:
            flat, size = batch.reshape(-1), self.minibatch_size
        lr = annealed_lr(self.optimizer, self.lr, self.anneal_lr, ctx.progress)
        sums: dict[str, float] = {}
        updates = 0
        for _ in range(self.epochs):
            order = torch.randperm(flat.shape[0], generator=ctx.generator).to(flat.device)
            for idx in order.split(size):
                gradient_step(self.loss, flat[idx], self.optimizer, self.max_grad_norm, ctx, sums)
                updates += 1
        metrics = {k: v / updates for k, v in sums.items()}
        metrics.update({"optim/lr": lr, "optim/updates": float(updates),
                        "frames": float(batch.numel())})
        return metrics
