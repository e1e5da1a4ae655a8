"""Observations with named entries: a gymnasium ``Dict`` or ``Tuple`` space, a TorchRL
``Composite`` spec of several entries.

A Box observation travels as one tensor under the ``"observation"`` key. A named one travels as
a sub-TensorDict under the same key, one entry per name, so every place that moves observations
(collectors, rollouts, the replay buffer, slicing and concatenation of steps) moves all entries
together, with the env's batch dimensions in front of each entry's own shape. ``Tuple`` entries
are named ``obs0``, ``obs1``, ... by position.

The *layout* of an observation is its shape (a Box) or ``{name: shape}`` (named entries) in the
documented order: the env's own key order, which for gymnasium's ``Dict`` is sorted by name, and
for a ``Tuple`` the position. Whatever needs one flat vector (the rules' default critics and
value functions, ``MLPPolicy``, behaviour characterisations) concatenates the flattened entries
in that order (:func:`flat_observation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase

__all__ = ["batch_shape", "flat_observation", "is_named", "tuple_names", "zero_observation"]


def is_named(observation: Any) -> bool:
    """Whether ``observation`` has named entries (a TensorDict or a mapping of tensors)."""
    return isinstance(observation, (TensorDictBase, Mapping))


def tuple_names(count: int) -> list[str]:
    """The names of a ``Tuple`` observation's entries: ``obs0``, ``obs1``, ..."""
    return [f"obs{i}" for i in range(count)]


def flat_observation(observation: Any, layout: Any) -> torch.Tensor:
    """One vector per observation, ``[*batch, obs_dim]`` (named entries as float32).

    Args:
        observation: a tensor ``[*batch, *shape]``, or named entries ``[*batch, *shape_k]``.
        layout: the observation's shape, or ``{name: shape}`` in the documented order (the
            entries are flattened and concatenated in that order).
    """
    if isinstance(layout, Mapping):
        parts = []
        for key, shape in layout.items():
            x = observation[key]
            parts.append(x.reshape(*x.shape[: x.ndim - len(shape)], -1).to(torch.float32))
        return torch.cat(parts, dim=-1)
    shape = tuple(layout)
    x = observation
    return x.reshape(*x.shape[: x.ndim - len(shape)], -1) if len(shape) != 1 else x


def zero_observation(layout: Any, images: Any, batch: int, device: Any = None) -> Any:
    """A batch of zero observations of ``layout`` (uint8 where the entry, or the whole Box
    observation when ``images is True``, is an image; float32 elsewhere)."""
    if isinstance(layout, Mapping):
        return TensorDict({key: torch.zeros((batch, *shape), device=device,
                                            dtype=torch.uint8 if key in images else torch.float32)
                           for key, shape in layout.items()}, batch_size=[batch], device=device)
    dtype = torch.uint8 if images is True else torch.float32
    return torch.zeros((batch, *layout), dtype=dtype, device=device)


def batch_shape(observation: Any, layout: Any) -> torch.Size:
    """The batch dimensions in front of an observation of ``layout``."""
    if is_named(observation):
        if isinstance(observation, TensorDictBase):
            return observation.batch_size
        key, shape = next(iter(layout.items()))
        x = observation[key]
        return x.shape[: x.ndim - len(shape)]
    return observation.shape[: observation.ndim - len(tuple(layout))]
