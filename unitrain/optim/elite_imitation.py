"""Elite imitation: a policy fitted by projection to the actions of its own best episodes.

Reinforcement learning with the projection-based training of Bergmeister et al., "A
projection-based framework for gradient-free and parallel learning" (arXiv:2506.05878). Each
iteration runs ``episodes`` whole episodes with exploring actions of the current policy (drawn
from the softmax of its logits or, in a share of the env slots, its argmax, plus a share of
uniformly random actions), keeps the ``(observation, action)`` pairs of those with the highest
returns (the elites), and fits the policy's logits to those actions with the composed
:class:`~unitrain.optim.projection.Projection` rule (``fit``), as the cross-entropy method does
with a parametric policy (Rubinstein 1999; Szita & Lőrincz 2006).

Episodes are played by :func:`unitrain.rollout.rollout`: env slot ``i`` plays a fixed share of the
iteration's episodes (``episodes // n``, one more for the first ``episodes % n`` slots), so the
kept episodes are the first ones each slot started, however long they last. With several
processes each rank collects its own episodes and fits its own elites; the projection consensus
is averaged across ranks (see :mod:`unitrain.optim.projection`), so parameters stay identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unitrain.errors import ConfigError, UserError, check
from unitrain.optim.base import UpdateRule, register_rule
from unitrain.optim.projection import Projection
from unitrain.rollout import Step, rollout

if TYPE_CHECKING:
    from unitrain.envs import EnvInfo, EnvSpec
    from unitrain.module import RLModule
    from unitrain.optim.base import RuleContext

__all__ = ["EliteImitation"]


@register_rule("elite_imitation")
@dataclass
class EliteImitation(UpdateRule):
    """Fit the policy by projection to the actions of its best episodes (discrete actions).

    The defaults are the settings measured on CartPole (``docs/projection.md``): a calibrated,
    relaxed fit (cross-entropy with ``lam`` 1, 20 solver iterations on standardised inputs, 30%
    of the way to each consensus) of one batch per iteration, with a quarter of the env slots
    acting greedily.

    Args:
        fit: the projection fit of the elite pairs (a :class:`Projection` block: solver,
            iterations, output, lam, margin, step_size, standardize).
        episodes: episodes collected per iteration on each rank.
        elite_fraction: share of the iteration's episode count kept as elites, by return.
        keep_elites: rank the previous elites together with the new episodes, so the
            demonstrations never get worse.
        explore: probability of a uniformly random action at each step while collecting.
        sample: draw the other actions from the softmax of the logits (else take their argmax),
            so exploration shrinks as the fitted logits grow confident.
        greedy_share: share of the env slots that take the argmax action even when ``sample``
            is on (``explore`` still applies). Their episodes show what the deterministic policy
            earns; once it earns the most, they become the elites, so the greedy policy is a
            fixed point of the fit instead of being pulled toward the sampled policy's weaker
            episodes.
        batch_size: elite pairs per fitted batch.
        updates: batches fitted per iteration.
        window: the elites of the last ``window`` iterations are fitted together (each
            iteration's elites are chosen among that iteration's episodes, plus the previous
            elites when ``keep_elites``); more and more varied pairs make each fit generalise.
    """

    fit: Projection = field(default_factory=lambda: Projection(
        iterations=20, lam=1.0, step_size=0.3, standardize=True))
    episodes: int = 16
    elite_fraction: float = 0.3
    keep_elites: bool = False
    explore: float = 0.05
    sample: bool = True
    greedy_share: float = 0.25
    batch_size: int = 512
    updates: int = 1
    window: int = 1

    def validate(self) -> None:
        check(self.episodes >= 1, "episodes", "an integer >= 1", self.episodes)
        check(0 < self.elite_fraction <= 1, "elite_fraction", "a number in (0, 1]",
              self.elite_fraction)
        check(0 <= self.explore <= 1, "explore", "a number in [0, 1]", self.explore)
        check(0 <= self.greedy_share <= 1, "greedy_share", "a number in [0, 1]",
              self.greedy_share)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(self.updates >= 1, "updates", "an integer >= 1", self.updates)
        check(self.window >= 1, "window", "an integer >= 1", self.window)

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        if not info.discrete:
            raise ConfigError("env.id", f"{info.id} has continuous actions; elite_imitation "
                                        "fits logits and needs discrete actions")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        info = ctx.env_info
        if info is None:
            raise UserError("elite_imitation needs an env: give the Trainer env=...")
        self.fit.attach(module)
        self.module = module
        self._elites: list[dict[str, Any]] = []
        # The elite sets of the last ``window`` iterations, newest last.
        self._window: list[list[dict[str, Any]]] = []

    # ------------------------------------------------------------------ one iteration
    def step(self, ctx: "RuleContext") -> dict[str, float]:
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
        metrics = self.fit.fit(batches, ctx)
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

        Returns:
            The episodes (``observation``, ``action``, ``return`` and the env ``slot`` that ran
            them) and the env steps taken.
        """
        env = ctx.train_env()
        n = env.num_envs
        act_dim = self.module.actions.act_dim
        greedy = torch.arange(n) < round(self.greedy_share * n)

        def policy(obs: Tensor, slots: slice) -> Tensor:
            k = obs.shape[0]
            logits = self.module(obs.to(ctx.device)).cpu().double()
            action = logits.argmax(-1)
            if self.sample:
                probs = torch.softmax(logits, -1)
                sampled = torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)
                action = torch.where(greedy[slots], action, sampled)
            random_action = torch.randint(act_dim, (k,), generator=ctx.generator)
            explore = torch.rand(k, generator=ctx.generator) < self.explore
            return torch.where(explore, random_action, action)

        obs_buf: list[list[Tensor]] = [[] for _ in range(n)]
        act_buf: list[list[Tensor]] = [[] for _ in range(n)]
        trajectories: list[tuple[int, Tensor, Tensor]] = []

        def record(step: Step) -> None:
            for i in step.active.nonzero().squeeze(-1).tolist():
                obs_buf[i].append(step.observation[i].reshape(-1).clone())
                act_buf[i].append(step.action[i])
                if step.ended[i]:
                    trajectories.append((i, torch.stack(obs_buf[i]), torch.stack(act_buf[i])))
                    obs_buf[i], act_buf[i] = [], []

        quota = [self.episodes // n + (i < self.episodes % n) for i in range(n)]
        played = rollout(env, policy, quota=quota, observe=record)
        episodes = [{"observation": o, "action": a, "return": float(r), "slot": slot}
                    for (slot, o, a), r in zip(trajectories, played.returns.tolist(), strict=True)]
        return episodes, played.steps

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"elites": [dict(e) for e in getattr(self, "_elites", [])],
                "window": [[dict(e) for e in elites] for elites in getattr(self, "_window", [])]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elites = [dict(e) for e in state.get("elites", [])]
        self._window = [[dict(e) for e in elites] for elites in state.get("window", [])]
