"""A user's own gymnasium envs, registered when this module is imported: ``userenvs:Reach-v0``,
``userenvs:Cue-v0`` and ``userenvs:CueTuple-v0`` (:class:`Cue`: a ``Dict`` observation).

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


if "Reach-v0" not in gym.registry:
    gym.register("Reach-v0", entry_point=Reach, max_episode_steps=50)


class Cue(gym.Env):
    """A cue to follow, in a ``Dict`` observation: ``userenvs:Cue-v0``.

    Each step shows a cue ``c`` in ``{-1, +1}`` (drawn anew every step) in the ``"cue"`` entry,
    ``[c, noise]``; ``"clock"`` holds the fraction of the 20-step episode gone. A discrete action
    (``0``/``1``) earns 1 when it is ``c > 0``; a continuous one (``continuous=True``, in
    ``[-1, 1]``) earns ``1 - |a - c| / 2``. Random play earns about 10 an episode, following the
    cue 20. With ``image=True`` an ``"image"`` entry, uint8 ``[1, 4, 4]`` noise, is a
    distractor.
    """

    LENGTH = 20

    def __init__(self, continuous: bool = False, image: bool = False) -> None:
        entries: dict[str, gym.Space] = {
            "cue": gym.spaces.Box(-2.0, 2.0, (2,), np.float32),
            "clock": gym.spaces.Box(0.0, 1.0, (1,), np.float32)}
        if image:
            entries["image"] = gym.spaces.Box(0, 255, (1, 4, 4), np.uint8)
        self.observation_space = gym.spaces.Dict(entries)
        self.action_space = (gym.spaces.Box(-1.0, 1.0, (1,), np.float32) if continuous
                             else gym.spaces.Discrete(2))
        self.continuous, self.image = continuous, image
        self.t, self.cue = 0, 1.0

    def _obs(self) -> dict[str, np.ndarray]:
        self.cue = float(self.np_random.choice([-1.0, 1.0]))
        obs = {"cue": np.array([self.cue, self.np_random.normal(0.0, 0.3)], dtype=np.float32),
               "clock": np.array([self.t / self.LENGTH], dtype=np.float32)}
        if self.image:
            obs["image"] = self.np_random.integers(0, 256, (1, 4, 4), dtype=np.uint8)
        return obs

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        if self.continuous:
            reward = 1.0 - abs(float(np.asarray(action).reshape(-1)[0]) - self.cue) / 2.0
        else:
            reward = float(int(action) == int(self.cue > 0))
        self.t += 1
        return self._obs(), reward, False, self.t >= self.LENGTH, {}


class CueTuple(Cue):
    """:class:`Cue` with a ``Tuple`` observation ``(cue, clock)``: ``userenvs:CueTuple-v0``."""

    def __init__(self, continuous: bool = False) -> None:
        super().__init__(continuous)
        spaces = self.observation_space.spaces
        self.observation_space = gym.spaces.Tuple((spaces["cue"], spaces["clock"]))

    def _obs(self):
        obs = super()._obs()
        return obs["cue"], obs["clock"]


for _name, _entry in (("Cue-v0", Cue), ("CueTuple-v0", CueTuple)):
    if _name not in gym.registry:
        gym.register(_name, entry_point=_entry)
