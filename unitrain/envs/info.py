"""The shapes a module needs, read from an env's spaces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from unitrain.envs.gymnasium import make_single
from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError


@dataclass
class EnvInfo:
    """The shapes a module needs, read from the env's spaces.

    ``obs_dim`` is the flattened observation size; ``act_dim`` is the number of actions (discrete)
    or the action vector size (continuous).
    """

    id: str
    obs_shape: tuple[int, ...]
    obs_dim: int
    act_dim: int
    discrete: bool
    action_low: torch.Tensor | None = None
    action_high: torch.Tensor | None = None
    image: bool = False

    def module_kwargs(self) -> dict[str, Any]:
        """Constructor arguments a module may take by name."""
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "obs_shape": self.obs_shape,
                "discrete": self.discrete}


def env_info(spec: EnvSpec) -> EnvInfo:
    """Read observation and action shapes for ``spec`` from one env instance (a TorchRL env's
    from its specs)."""
    if spec.make is not None:
        from unitrain.envs.torchrl_env import env_spaces

        return info_from_spaces(spec.id, *env_spaces(spec))
    env = make_single(spec)
    try:
        return info_from_spaces(spec.id, env.observation_space, env.action_space)
    finally:
        env.close()


def info_from_spaces(env_id: str, obs_space: gym.Space, act_space: gym.Space) -> EnvInfo:
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError("id", f"{env_id}: observation space {obs_space} is not supported; "
                                "unitrain supports Box observations")
    obs_shape = tuple(int(s) for s in obs_space.shape)
    image = obs_space.dtype == np.uint8
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.n), True, image=image)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.shape[0]), False,
                       torch.as_tensor(act_space.low, dtype=torch.float32),
                       torch.as_tensor(act_space.high, dtype=torch.float32), image=image)
    raise ConfigError("id", f"{env_id}: action space {act_space} is not supported; "
                            "unitrain supports Discrete and 1-D Box actions")
