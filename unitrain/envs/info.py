"""The shapes a module needs, read from an env's spaces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from unitrain.envs.gymnasium import make_single, probe_mask
from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError


@dataclass
class EnvInfo:
    """The shapes a module needs, read from the env's spaces.

    ``obs_dim`` is the flattened observation size; ``act_dim`` is the number of actions (discrete)
    or the action vector size (continuous). A ``MultiDiscrete(nvec)`` space is discrete with
    ``nvec`` set and ``act_dim = sum(nvec)`` (the number of logits). ``masked`` says the env
    gives a mask of the allowed actions with every observation (``"action_mask"``, see
    :mod:`unitrain.policy.action`).
    """

    id: str
    obs_shape: tuple[int, ...]
    obs_dim: int
    act_dim: int
    discrete: bool
    action_low: torch.Tensor | None = None
    action_high: torch.Tensor | None = None
    image: bool = False
    nvec: tuple[int, ...] | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        if self.nvec is not None:
            self.nvec = tuple(int(k) for k in self.nvec)

    @property
    def action_space(self) -> str:
        """``"discrete"``, ``"multidiscrete"`` or ``"continuous"``."""
        if not self.discrete:
            return "continuous"
        return "discrete" if self.nvec is None else "multidiscrete"

    def describe_actions(self, masks: bool = True) -> str:
        """The action space in words, for messages (``MultiDiscrete([3, 2])``, and whether the
        env gives action masks unless ``masks`` is false)."""
        if self.nvec is not None:
            text = f"MultiDiscrete({list(self.nvec)})"
        elif self.discrete:
            text = f"Discrete({self.act_dim})"
        else:
            text = f"Box({self.act_dim},)"
        return text + (" with action masks" if self.masked and masks else "")

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
        return info_from_spaces(spec.id, env.observation_space, env.action_space,
                                not spec.is_atari and probe_mask(env))
    finally:
        env.close()


def info_from_spaces(env_id: str, obs_space: gym.Space, act_space: gym.Space,
                     masked: bool = False) -> EnvInfo:
    """The :class:`EnvInfo` of an env with these spaces; ``masked``: it gives action masks."""
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError("id", f"{env_id}: observation space {obs_space} is not supported; "
                                "unitrain supports Box observations")
    obs_shape = tuple(int(s) for s in obs_space.shape)
    image = obs_space.dtype == np.uint8
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.n), True, image=image,
                       masked=masked)
    if isinstance(act_space, gym.spaces.MultiDiscrete) and len(act_space.shape) == 1:
        if bool((np.asarray(act_space.start) != 0).any()):
            raise ConfigError("id", f"{env_id}: action space {act_space} starts above 0; unitrain "
                                    "supports MultiDiscrete actions starting at 0")
        nvec = tuple(int(k) for k in act_space.nvec)
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), sum(nvec), True, image=image,
                       nvec=nvec, masked=masked)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.shape[0]), False,
                       torch.as_tensor(act_space.low, dtype=torch.float32),
                       torch.as_tensor(act_space.high, dtype=torch.float32), image=image)
    raise ConfigError("id", f"{env_id}: action space {act_space} is not supported; "
                            "unitrain supports Discrete, 1-D MultiDiscrete and 1-D Box actions")
