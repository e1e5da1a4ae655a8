"""Black-box test functions as one-step environments, for checking population rules.

``unitrain/Sphere-v0`` and ``unitrain/Rosenbrock-v0`` (``gymnasium.make(id, dim=10)``) play one
step: the action is a point ``x ∈ ℝ^dim``, the reward is ``−f(x)`` and the episode ends. The
observation is a constant zero, so a policy's action is all it says; :class:`ParameterVector` is
the module whose action *is* its parameter vector (:mod:`unitrain.policy.models`). A population rule run on these envs goes
through exactly the code path of an RL run (population evaluation, env stepping, fitness,
checkpoints), with one env frame per function evaluation, so frames count evaluations.

- sphere: ``f(x) = Σ xᵢ²``, minimum 0 at ``x = 0``;
- Rosenbrock: ``f(x) = Σᵢ₌₁ⁿ⁻¹ 100(xᵢ² − xᵢ₊₁)² + (xᵢ − 1)²``, minimum 0 at ``x = 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["FunctionEnv", "sphere", "rosenbrock", "FUNCTIONS"]


def sphere(x: np.ndarray) -> float:
    return float(np.sum(x * x))


def rosenbrock(x: np.ndarray) -> float:
    return float(np.sum(100.0 * (x[:-1] ** 2 - x[1:]) ** 2 + (x[:-1] - 1.0) ** 2))


FUNCTIONS: dict[str, Callable[[np.ndarray], float]] = {"Sphere": sphere, "Rosenbrock": rosenbrock}


class FunctionEnv(gym.Env):
    """One step: action ``x``, reward ``−f(x)`` (computed in float64), then the episode ends.

    Args:
        function: ``x -> f(x)`` to minimise.
        dim: the dimension of ``x``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, function: Callable[[np.ndarray], float], dim: int = 10) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.function = function
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.action_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        value = self.function(np.asarray(action, dtype=np.float64))
        return np.zeros(1, np.float32), -value, True, False, {}


def _register() -> None:
    for name, fn in FUNCTIONS.items():
        env_id = f"unitrain/{name}-v0"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=FunctionEnv, kwargs={"function": fn, "dim": 10})


_register()
