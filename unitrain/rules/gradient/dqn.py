"""DQN and Double DQN: Q-learning from replayed transitions, as an update rule.

References: V. Mnih, K. Kavukcuoglu, D. Silver, A. A. Rusu, J. Veness, M. G. Bellemare, A. Graves,
M. Riedmiller, A. K. Fidjeland, G. Ostrovski, et al., "Human-level control through deep
reinforcement learning", Nature 518 (2015) — the deep Q-network with experience replay, a
target network and ε-greedy exploration; H. van Hasselt, A. Guez, D. Silver, "Deep
Reinforcement Learning with Double Q-learning", AAAI 2016 (arXiv:1509.06461) — Double DQN;
Z. Wang, T. Schaul, M. Hessel, H. van Hasselt, M. Lanctot, N. de Freitas, "Dueling Network
Architectures for Deep Reinforcement Learning", ICML 2016 — the dueling head, which is a module
(:class:`unitrain.policy.models.DuelingMLP`), not a rule.

The module's discrete output is read as one action value ``Q(s, a)`` per action. TorchRL's
``DQNLoss`` regresses ``Q(s, a)`` on the one-step target

- DQN: ``y = r + γ (1 − terminated) max_a' Q'(s', a')``,
- Double DQN (``double``): ``y = r + γ (1 − terminated) Q'(s', argmax_a' Q(s', a'))``: the online
  network chooses the next action, the target network ``Q'`` values it,

with the Huber loss (``loss_function="smooth_l1"``: the paper's clipping of the error term to
``[-1, 1]``) or the squared error, averaged over ``batch_size`` transitions sampled uniformly from
the replay memory. Gradients are averaged across processes, rescaled to at most
``max_grad_norm``, and applied by Adam. Every ``target_update`` frames of training the target
network moves to ``Q' <- tau Q + (1 − tau) Q'`` (``tau = 1``: the paper's copy).

Collection, replay, warm-up (``learning_starts`` uniformly random frames) and the schedule of one
update per ``train_frequency`` frames are the
:class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop` this rule composes, as for SAC, TD3 and
DDPG. Exploration is ε-greedy: with probability ε a uniformly random action, else
``argmax_a Q(s, a)``; ε falls linearly from ``epsilon_start`` to ``epsilon_end`` over the first
``exploration_fraction`` of the frame budget and stays there. Both draws come from the loop's
seeded generator, so a run is reproducible and resumes exactly.

Action contract (:mod:`unitrain.policy.action`): the output is one number per action and the
deterministic action is its argmax, as for logits, so ``module.act`` is the greedy policy and a
module trained here can be evaluated, exported or handed to another rule (``init=``) as it is.
Read as logits by PPO or a population rule, Q-values give the Boltzmann policy ``softmax(Q)``
with temperature 1 (see ``docs/dqn.md``). The loss, holding the target network, is registered
as ``module.aux["dqn"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import Categorical
from torchrl.modules import QValueActor
from torchrl.objectives import DQNLoss, ValueEstimators

from unitrain.envs.observation import batch_shape
from unitrain.errors import ConfigError, check
from unitrain.policy.inputs import ModuleCall, call_module
from unitrain.rules.base import UpdateRule
from unitrain.rules.gradient.offpolicy import (FEW_UPDATES, LeanModule, OffPolicyLoop,
                                               PolyakUpdate, TargetCopy, adam)
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["DQN", "epsilon_at"]

_METRICS = ("loss/q", "train/td_error")


def epsilon_at(frames: float, start: float, end: float, decay_frames: float) -> float:
    """The exploration rate after ``frames`` frames: linear from ``start`` to ``end`` over
    ``decay_frames`` frames, then ``end``.

    Args:
        frames: frames collected so far.
        start: ε at frame 0.
        end: ε from ``decay_frames`` on.
        decay_frames: length of the linear decay (0: ``end`` from the start).
    """
    if frames >= decay_frames:
        return end
    return start + (end - start) * frames / decay_frames


@register_rule("dqn")
@dataclass
class DQN(UpdateRule):
    """DQN (Mnih et al. 2015) and Double DQN (van Hasselt et al. 2016) over a replay memory.

    Defaults are those of CleanRL's Atari DQN (the Nature settings with Adam), with the Nature
    paper's Huber loss and a replay memory of 100,000 transitions; ``docs/dqn.md`` gives the
    source of every value. Frame counts are per process.

    Args:
        lr: Adam step size.
        gamma: discount factor.
        batch_size: transitions per gradient update.
        buffer_size: replay memory capacity per process (oldest transitions are overwritten).
        learning_starts: frames per process collected with uniformly random actions before the
            first update (the memory then holds at least ``max(learning_starts, batch_size)``).
        train_frequency: frames collected per gradient update after ``learning_starts``.
        target_update: frames of training between target-network updates.
        tau: step of a target-network update (1: a copy, the paper's; below 1: Polyak).
        epsilon_start: ε of ε-greedy exploration at the start.
        epsilon_end: ε after the decay.
        exploration_fraction: fraction of the frame budget over which ε decays linearly.
        max_grad_norm: bound on the gradient's total 2-norm (``None``: no clipping).
        double: Double DQN's target (the online network picks the next action).
        loss_function: ``"smooth_l1"`` (Huber, the paper's error clipping) or ``"l2"``.
        frames_per_batch: transitions collected per iteration per process, a multiple of
            ``env.num_envs`` (``None``: one step of every env).
        save_buffer: save the replay memory in checkpoints, so a resumed run continues with it;
            otherwise a resumed run refills ``max(learning_starts, batch_size)`` transitions with
            its current policy before updating again.
        compile: compile the loss's forward and backward with ``torch.compile``.
    """

    action_spaces: ClassVar[tuple[str, ...]] = ("discrete",)
    feedforward_only = ("its replay memory keeps single transitions, without recurrent states, "
                        "and its Q-values are of one observation")

    lr: float = bounded(1e-4, "(0, inf]")
    gamma: float = bounded(0.99, "(0, 1]")
    batch_size: int = bounded(32, "[1, buffer_size]")
    buffer_size: int = bounded(100_000, "[1, inf]")
    learning_starts: int = bounded(80_000, "[0, buffer_size]")
    train_frequency: int = bounded(4, "[1, inf]")
    target_update: int = bounded(1_000, "[1, inf]")
    tau: float = bounded(1.0, "(0, 1]")
    epsilon_start: float = bounded(1.0, "[0, 1]")
    epsilon_end: float = bounded(0.01, "[0, epsilon_start]")
    exploration_fraction: float = bounded(0.1, "[0, 1]")
    max_grad_norm: float | None = bounded(10.0, "(0, inf]", null=True)
    double: bool = False
    loss_function: str = one_of("smooth_l1", "smooth_l1", "l2")
    frames_per_batch: int | None = bounded(None, "[1, inf]", null=True)
    save_buffer: bool = False
    compile: bool = False

    # What the off-policy loop reads, in its own terms.
    @property
    def warmup_frames(self) -> int:
        return self.learning_starts

    @property
    def utd_ratio(self) -> float:
        return 1.0 / self.train_frequency

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        if not info.discrete:
            raise ConfigError("env.id", f"{info.id} has a continuous (Box) action space; "
                                        f"{self.name} needs discrete actions (for continuous "
                                        "actions use sac, td3, ddpg, dsac_t or ppo)")
        if self.frames_per_batch is not None:
            check(self.frames_per_batch % env.num_envs == 0, "optimizer.frames_per_batch",
                  f"a multiple of env.num_envs={env.num_envs}", self.frames_per_batch)

    def budget_warning(self, max_frames: int, processes: int) -> str | None:
        per_process = max_frames // max(1, processes)
        ready = max(self.learning_starts, self.batch_size)
        if per_process <= ready:
            return (f"{self.name} makes no update in {max_frames:,} frames: each process "
                    f"collects {ready:,} frames before its first one (optimizer.learning_starts); "
                    "lower optimizer.learning_starts or raise trainer.max_frames")
        updates = (per_process - ready) // self.train_frequency
        if updates < FEW_UPDATES:
            return (f"{self.name} makes about {updates:,} updates in {max_frames:,} frames "
                    f"({ready:,} before learning starts, then one per "
                    f"optimizer.train_frequency={self.train_frequency} frames), fewer than "
                    f"{FEW_UPDATES:,}; lower optimizer.train_frequency or "
                    "optimizer.learning_starts, or raise trainer.max_frames")
        return None

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, _METRICS)
        self.module = module
        # ε decays over a share of the budget; each process collects its share of the frames.
        budget = ctx.max_frames
        if budget is None and self.exploration_fraction > 0 and \
                self.epsilon_start != self.epsilon_end:
            raise ConfigError("trainer.max_frames", f"{self.name} decays ε over "
                              "optimizer.exploration_fraction of the frame budget; set a budget "
                              "or optimizer.exploration_fraction=0")
        self.decay_frames = self.exploration_fraction * (budget or 0) / ctx.world_size
        n = module.actions.act_dim
        value = QValueActor(LeanModule(ModuleCall(module), in_keys=["observation"],
                                       out_keys=["action_value"]),
                            in_keys=["observation"], spec=Categorical(n, device=ctx.device))
        loss = DQNLoss(value, loss_function=self.loss_function, delay_value=True,
                       double_dqn=self.double, action_space="categorical").to(ctx.device)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=self.gamma)
        self.loss: DQNLoss = module.add_aux(self.name, loss)
        self.updater = (TargetCopy(self.loss) if self.tau == 1
                        else PolyakUpdate(self.loss, tau=self.tau))
        self.optimizer = adam(module.policy_parameters(), self.lr)
        self._loss = self.loop.compiled(self.loss)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def epsilon(self) -> float:
        """ε for the frames this process has collected."""
        return epsilon_at(self.loop.collected, self.epsilon_start, self.epsilon_end,
                          self.decay_frames)

    def greedy(self, observation: Tensor) -> Tensor:
        """``argmax_a Q(s, a)`` through the loss's value network (TorchRL's ``QValueActor``)."""
        with torch.no_grad(), self.loss.value_network_params.to_module(self.loss.value_network):
            td = TensorDict(observation=observation,
                            batch_size=batch_shape(observation, self.loop.obs_shape))
            return self.loss.value_network(td).get("action")

    def _explore(self, observation: Tensor) -> Tensor:
        greedy = self.module.actions.deterministic(call_module(self.module, observation))
        shape, generator = tuple(greedy.shape), self.loop.generator
        explore = torch.rand(shape, generator=generator) < self.epsilon()
        random = torch.randint(self.module.actions.act_dim, shape, generator=generator)
        return torch.where(explore.to(greedy.device), random.to(greedy.device), greedy)

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        loss = self._loss(batch)["loss"]
        self.loop.descend(loss, [self.optimizer], ctx, self.max_grad_norm)
        # The target moves whenever this update's frames cross a multiple of target_update.
        done = self.loop.updates * self.train_frequency
        if (done + self.train_frequency) // self.target_update > done // self.target_update:
            self.updater.step()
        return {"loss/q": loss.detach(), "train/td_error": batch.get("td_error").mean()}

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        """One iteration of the :class:`OffPolicyLoop` with DQN's update, and the ε it reached."""
        metrics = self.loop.step(ctx, self._update)
        metrics["train/epsilon"] = self.epsilon()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)

