"""A user's own gymnasium env, registered when this module is imported: ``userenvs:Reach-v0``
(and its discrete twin ``userenvs:ReachDiscrete-v0``, for rules that need discrete actions).

Reach: a point on a line moves by ``0.1 * action`` (``action`` in ``[-1, 1]``) towards a target
drawn at reset; the reward is minus the distance after the move, and the episode ends (terminated)
when the point is within 0.05 of the target, or after 50 steps (truncated).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np


class Reach(gym.Env):
    """Reach a target on a line: observation ``[position, target]``, one continuous action."""

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.pos = 0.0
        self.target = 0.0

    def _obs(self) -> np.ndarray:
        return np.array([self.pos, self.target], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.pos = 0.0
        self.target = float(self.np_random.uniform(-1.0, 1.0))
        return self._obs(), {}

    def step(self, action):
        self.pos = float(np.clip(self.pos + 0.1 * float(np.asarray(action).reshape(-1)[0]),
                                 -1.0, 1.0))
        distance = abs(self.pos - self.target)
        return self._obs(), -distance, distance < 0.05, False, {}


class ReachDiscrete(Reach):
    """Reach with three discrete actions: move by -0.1, 0 or +0.1."""

    def __init__(self) -> None:
        super().__init__()
        self.action_space = gym.spaces.Discrete(3)

    def step(self, action):
        return super().step(float(np.asarray(action).reshape(-1)[0]) - 1.0)


if "ReachDiscrete-v0" not in gym.registry:
    gym.register("ReachDiscrete-v0", entry_point=ReachDiscrete, max_episode_steps=50)
if "Reach-v0" not in gym.registry:
    gym.register("Reach-v0", entry_point=Reach, max_episode_steps=50)
