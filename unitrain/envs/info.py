"""The shapes a module needs, read from an env's spaces."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from unitrain.envs.gymnasium import make_single, probe_mask
from unitrain.envs.observation import tuple_names, zero_observation
from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError


@dataclass
class EnvInfo:
    """The shapes a module needs, read from the env's spaces.

    ``obs_dim`` is the flattened observation size; ``act_dim`` is the number of actions (discrete)
    or the action vector size (continuous). A ``MultiDiscrete(nvec)`` space is discrete with
    ``nvec`` set and ``act_dim = sum(nvec)`` (the number of logits). ``masked`` says the env
    gives a mask of the allowed actions with every observation (``"action_mask"``, see
    :mod:`unitrain.policy.action`). A named observation (a ``Dict`` or ``Tuple`` space;
    :mod:`unitrain.envs.observation`) has ``obs_shapes`` ``{name: shape}`` in the documented
    order and ``images``, the names of its uint8 entries; its ``obs_shape`` is ``(obs_dim,)``,
    the shape of the entries flattened and concatenated.
    """

    id: str
    obs_shape: tuple[int, ...]
    obs_dim: int
    act_dim: int
    discrete: bool
    action_low: torch.Tensor | None = None
    action_high: torch.Tensor | None = None
    image: bool = False
    obs_shapes: dict[str, tuple[int, ...]] | None = None
    images: tuple[str, ...] = ()
    nvec: tuple[int, ...] | None = None
    masked: bool = False

    def __post_init__(self) -> None:
        if self.nvec is not None:
            self.nvec = tuple(int(k) for k in self.nvec)

    @property
    def layout(self) -> Any:
        """The observation's layout: ``obs_shapes`` for named entries, else ``obs_shape``."""
        return self.obs_shape if self.obs_shapes is None else self.obs_shapes

    def zero_observation(self, batch: int, device: Any = None) -> Any:
        """A batch of zero observations (uint8 images, float32 elsewhere)."""
        return zero_observation(self.layout, self.image if self.obs_shapes is None
                                else self.images, batch, device)

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
                "discrete": self.discrete, "obs_shapes": self.obs_shapes}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "EnvInfo":
        """The info :func:`dataclasses.asdict` recorded (a checkpoint's ``env_info``)."""
        shapes = record.get("obs_shapes")
        return cls(**{**record, "obs_shape": tuple(record["obs_shape"]),
                      "obs_shapes": None if shapes is None else
                      {k: tuple(v) for k, v in shapes.items()},
                      "images": tuple(record.get("images") or ())})


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


def named_spaces(env_id: str, obs_space: gym.Space) -> dict[str, gym.spaces.Box] | None:
    """The entries of a ``Dict`` (its key order) or ``Tuple`` (``obs0``, ``obs1``, ...)
    observation space, or ``None`` for a ``Box``.

    Raises:
        ConfigError: another space, or an entry that is not a ``Box``.
    """
    if isinstance(obs_space, gym.spaces.Box):
        return None
    if isinstance(obs_space, gym.spaces.Dict):
        entries = {str(k): s for k, s in obs_space.spaces.items()}
    elif isinstance(obs_space, gym.spaces.Tuple):
        entries = dict(zip(tuple_names(len(obs_space.spaces)), obs_space.spaces))
    else:
        raise ConfigError("id", f"{env_id}: observation space {type(obs_space).__name__} is not "
                                "supported; unitrain supports Box observations and Dict/Tuple "
                                "observations of Box entries")
    for key, space in entries.items():
        if not isinstance(space, gym.spaces.Box):
            raise ConfigError("id", f"{env_id}: observation entry {key!r} is "
                                    f"{type(space).__name__}; unitrain supports Dict/Tuple "
                                    "observations of Box entries (not nested, not Discrete)")
    return entries


def info_from_spaces(env_id: str, obs_space: gym.Space, act_space: gym.Space,
                     masked: bool = False) -> EnvInfo:
    """The :class:`EnvInfo` of an env with these spaces; ``masked``: it gives action masks."""
    entries = named_spaces(env_id, obs_space)
    shapes: dict[str, tuple[int, ...]] | None = None
    images: tuple[str, ...] = ()
    if entries is None:
        obs_shape = tuple(int(s) for s in obs_space.shape)
        image = obs_space.dtype == np.uint8
    else:
        shapes = {k: tuple(int(d) for d in s.shape) for k, s in entries.items()}
        images = tuple(k for k, s in entries.items() if s.dtype == np.uint8)
        obs_shape, image = (sum(math.prod(s) for s in shapes.values()),), False
    named = {"obs_shapes": shapes, "images": images}
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.n), True,
                       image=image, masked=masked, **named)
    if isinstance(act_space, gym.spaces.MultiDiscrete) and len(act_space.shape) == 1:
        if bool((np.asarray(act_space.start) != 0).any()):
            raise ConfigError("id", f"{env_id}: action space {act_space} starts above 0; unitrain "
                                    "supports MultiDiscrete actions starting at 0")
        nvec = tuple(int(k) for k in act_space.nvec)
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), sum(nvec), True, image=image,
                       nvec=nvec, masked=masked, **named)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.shape[0]), False,
                       torch.as_tensor(act_space.low, dtype=torch.float32),
                       torch.as_tensor(act_space.high, dtype=torch.float32), image=image,
                       **named)
    raise ConfigError("id", f"{env_id}: action space {act_space} is not supported; "
                            "unitrain supports Discrete, 1-D MultiDiscrete and 1-D Box actions")
