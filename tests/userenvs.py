"""A user's own gymnasium envs, registered when this module is imported: ``userenvs:Reach-v0``
(and its discrete twin ``userenvs:ReachDiscrete-v0``, for rules that need discrete actions),
``userenvs:Trap-v0`` and ``userenvs:Dial-v0``.

Reach: a point on a line moves by ``0.1 * action`` (``action`` in ``[-1, 1]``) towards a target
drawn at reset; the reward is minus the distance after the move, and the episode ends (terminated)
when the point is within 0.05 of the target, or after 50 steps (truncated).

Trap (action masks): ``Discrete(4)``, 20 steps. The observation is the one-hot phase ``p`` in
``0..3`` (drawn anew every step); action ``a < 3`` pays 1 when ``a == p``, action 3 pays 5 but
is allowed only in phase 3 (``info["action_mask"]``). Taking it while it is masked ends the
episode with reward -100 and is counted in ``Trap.masked_taken`` (all instances in the
process). Best return: about 20 · (0.75 + 0.25 · 5) = 40.

Dial (multi-discrete): ``MultiDiscrete([3, 2])``, 10 steps. The observation is a target
``(t0, t1)`` as two one-hot blocks, drawn anew every step; the reward is 0.5 per sub-action that
matches its target. Best return: 10; uniform random actions: about 4.2. With
``kwargs={"masked": True}`` each step's info holds ``"action_mask"`` as one array per
sub-action (gymnasium's ``MultiDiscrete`` form) ruling out one wrong value of the first
sub-action; a masked value taken is counted in ``Dial.masked_taken``.
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


class Trap(gym.Env):
    """An env with action masks where the masked action is the attractive one (see above)."""

    masked_taken = 0

    def __init__(self) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, (4,), np.float32)
        self.action_space = gym.spaces.Discrete(4)
        self.phase = 0

    def _out(self) -> tuple[np.ndarray, dict]:
        obs = np.zeros(4, dtype=np.float32)
        obs[self.phase] = 1.0
        mask = np.array([1, 1, 1, self.phase == 3], dtype=np.int8)
        return obs, {"action_mask": mask}

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.phase = int(self.np_random.integers(4))
        return self._out()

    def step(self, action):
        a = int(action)
        if a == 3 and self.phase != 3:
            Trap.masked_taken += 1
            return (*self._out()[:1], -100.0, True, False, self._out()[1])
        reward = 5.0 if a == 3 else float(a == self.phase)
        self.phase = int(self.np_random.integers(4))
        obs, info = self._out()
        return obs, reward, False, False, info


class Dial(gym.Env):
    """Match a target with two discrete sub-actions (see above)."""

    masked_taken = 0

    def __init__(self, masked: bool = False) -> None:
        self.observation_space = gym.spaces.Box(0.0, 1.0, (5,), np.float32)
        self.action_space = gym.spaces.MultiDiscrete([3, 2])
        self.target = (0, 0)
        self.masked = masked

    def _info(self) -> dict:
        if not self.masked:
            return {}
        first = np.ones(3, dtype=np.int8)
        first[(self.target[0] + 1) % 3] = 0
        return {"action_mask": (first, np.ones(2, dtype=np.int8))}

    def _obs(self) -> np.ndarray:
        obs = np.zeros(5, dtype=np.float32)
        obs[self.target[0]] = 1.0
        obs[3 + self.target[1]] = 1.0
        return obs

    def _draw(self) -> None:
        self.target = (int(self.np_random.integers(3)), int(self.np_random.integers(2)))

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self._draw()
        return self._obs(), self._info()

    def step(self, action):
        a = np.asarray(action).reshape(-1)
        if self.masked and int(a[0]) == (self.target[0] + 1) % 3:
            Dial.masked_taken += 1
        reward = 0.5 * float(int(a[0]) == self.target[0]) + 0.5 * float(int(a[1]) == self.target[1])
        self._draw()
        return self._obs(), reward, False, False, self._info()


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
if "Trap-v0" not in gym.registry:
    gym.register("Trap-v0", entry_point=Trap, max_episode_steps=20)
if "Dial-v0" not in gym.registry:
    gym.register("Dial-v0", entry_point=Dial, max_episode_steps=10)
