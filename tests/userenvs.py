"""A user's own gymnasium envs, registered when this module is imported: ``userenvs:Reach-v0``
(and its discrete twin ``userenvs:ReachDiscrete-v0``, for rules that need discrete actions),
``userenvs:Trap-v0``, ``userenvs:TrapDict-v0``, ``userenvs:Dial-v0``, ``userenvs:Cue-v0`` and
``userenvs:CueTuple-v0`` (:class:`Cue`: a ``Dict`` observation).

Reach: a point on a line moves by ``0.1 * action`` (``action`` in ``[-1, 1]``) towards a target
drawn at reset; the reward is minus the distance after the move, and the episode ends (terminated)
when the point is within 0.05 of the target, or after 50 steps (truncated).

Trap (action masks): ``Discrete(4)``, 20 steps. The observation is the one-hot phase ``p`` in
``0..3`` (drawn anew every step); action ``a < 3`` pays 1 when ``a == p``, action 3 pays 5 but
is allowed only in phase 3 (``info["action_mask"]``). Taking it while it is masked ends the
episode with reward -100 and is counted in ``Trap.masked_taken`` (all instances in the
process). Best return: about 20 · (0.75 + 0.25 · 5) = 40. TrapDict is Trap with the mask in
its observation, ``{"action_mask": ..., "phase": ...}``, and nothing in its info.

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


class TrapDict(Trap):
    """:class:`Trap` with its mask as an observation entry: a ``Dict`` observation
    ``{"action_mask": MultiBinary(4), "phase": the one-hot phase}`` and no info."""

    def __init__(self) -> None:
        super().__init__()
        self.observation_space = gym.spaces.Dict({
            "action_mask": gym.spaces.MultiBinary(4),
            "phase": gym.spaces.Box(0.0, 1.0, (4,), np.float32)})

    def _out(self) -> tuple[dict[str, np.ndarray], dict]:
        phase, info = super()._out()
        return {"action_mask": info["action_mask"], "phase": phase}, {}


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
if "TrapDict-v0" not in gym.registry:
    gym.register("TrapDict-v0", entry_point=TrapDict, max_episode_steps=20)
if "Dial-v0" not in gym.registry:
    gym.register("Dial-v0", entry_point=Dial, max_episode_steps=10)


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
