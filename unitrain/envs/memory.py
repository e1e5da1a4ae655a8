"""Memory tasks: envs that a policy of the current observation alone cannot solve.

``unitrain/CartPoleNoVel-v1`` is gymnasium's ``CartPole-v1`` with the two velocity entries of the
observation removed: the policy sees the cart position and the pole angle only, so it must infer
the velocities from the observations it has seen (the partially observed CartPole of Meng,
Gorbet & Kulić 2021, "Memory-based Deep Reinforcement Learning for POMDPs", and of Ni,
Eysenbach & Salakhutdinov 2022, "Recurrent Model-Free RL Can Be a Strong Baseline for Many
POMDPs"). Rewards, termination and the 500-step limit are CartPole-v1's. The id is registered
when :mod:`unitrain.envs` is imported, so recipes name it like any gymnasium id.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

__all__ = ["CartPoleNoVel", "MEMORY_IDS"]

# CartPole's observation is (x, x_dot, theta, theta_dot): the positions are entries 0 and 2.
_POSITIONS = np.array([0, 2])


class CartPoleNoVel(gym.ObservationWrapper):
    """CartPole-v1 observing ``(cart position, pole angle)`` only.

    Args:
        **kwargs: passed to ``gym.make("CartPole-v1", ...)`` (e.g. ``render_mode``).
    """

    # CartPole's render modes and frame rate, readable from the class before an env is made.
    metadata = CartPoleEnv.metadata

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(gym.make("CartPole-v1", **kwargs).unwrapped)
        full = self.env.observation_space
        self.observation_space = gym.spaces.Box(full.low[_POSITIONS], full.high[_POSITIONS],
                                                dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[_POSITIONS]


MEMORY_IDS = ("unitrain/CartPoleNoVel-v1",)


def register_memory_envs() -> None:
    """Register :data:`MEMORY_IDS` with gymnasium (once)."""
    if MEMORY_IDS[0] not in gym.registry:
        gym.register(MEMORY_IDS[0], entry_point=CartPoleNoVel, max_episode_steps=500,
                     reward_threshold=475.0)


register_memory_envs()
