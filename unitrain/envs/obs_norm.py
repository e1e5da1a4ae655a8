"""Observation normalisation with running statistics merged across processes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo

__all__ = ["NamedObsNorm", "ObsNorm", "make_obs_norm"]


class ObsNorm(nn.Module):
    """Running mean/variance of observations; normalises and clips to ``±clip``.

    Observations folded in by :meth:`update` are *pending*: normalisation uses the statistics as of
    the last :meth:`sync`, which merges every process's pending statistics in rank order. Every
    process therefore normalises with identical statistics, and one process behaves the same way
    with a trivial gather. Statistics combine by the parallel-variance formula (Chan et al. 1979).
    """

    def __init__(self, shape: tuple[int, ...], clip: float = 5.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.clip, self.eps = clip, eps
        for prefix in ("", "pending_"):
            self.register_buffer(f"{prefix}count", torch.zeros((), dtype=torch.float64))
            self.register_buffer(f"{prefix}mean", torch.zeros(shape, dtype=torch.float64))
            self.register_buffer(f"{prefix}m2", torch.zeros(shape, dtype=torch.float64))

    def update(self, x: torch.Tensor) -> None:
        """Fold a batch ``[B, *shape]`` into the pending statistics."""
        x = x.detach().to(self.mean.device, torch.float64).reshape(-1, *self.mean.shape)
        _chan_merge(self.pending_count, self.pending_mean, self.pending_m2,
                    torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                    x.mean(0), x.var(0, unbiased=False) * x.shape[0])

    def merge(self, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Merge statistics ``(count, mean, m2)`` of another stream into the applied ones."""
        _chan_merge(self.count, self.mean, self.m2, count, mean, m2)

    def sync(self, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply every process's pending statistics, in rank order, then clear them.

        Args:
            all_gather: stacks a tensor from every process along a new leading dim.
        """
        d = self.mean.numel()
        packed = torch.cat([self.pending_count.reshape(1), self.pending_mean.flatten(),
                            self.pending_m2.flatten()])
        for row in all_gather(packed):
            self.merge(row[0], row[1: 1 + d].view_as(self.mean), row[1 + d:].view_as(self.m2))
        for buf in (self.pending_count, self.pending_mean, self.pending_m2):
            buf.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` normalised and clipped, float32 (``x`` itself, as float32, before any sync)."""
        if self.count <= 1:
            return x.to(torch.float32)
        # The statistics live on the CPU; an env on another device gets them there.
        std = (self.m2 / self.count).sqrt().to(x.device, x.dtype) + self.eps
        return ((x - self.mean.to(x.device, x.dtype)) / std).clamp(
            -self.clip, self.clip).to(torch.float32)


class NamedObsNorm(nn.Module):
    """:class:`ObsNorm` for each entry of a named observation (a ``Dict``/``Tuple`` space),
    images (uint8 entries) excluded: they pass through unchanged.

    The same interface as :class:`ObsNorm`, over a TensorDict (or a dict) of entries: one
    running statistic per normalised entry (``norms[name]``), synchronised entry by entry in
    the observation's key order.

    Args:
        shapes: ``{name: shape}`` of the entries to normalise.
        clip: clip of every normalised entry.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], clip: float = 5.0) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({key: ObsNorm(shape, clip) for key, shape in shapes.items()})

    def update(self, x: Any) -> None:
        """Fold a batch of named entries into each entry's pending statistics."""
        for key, norm in self.norms.items():
            norm.update(x[key])

    def sync(self, all_gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """:meth:`ObsNorm.sync` of every entry, in key order."""
        for norm in self.norms.values():
            norm.sync(all_gather)

    def forward(self, x: Any) -> Any:
        """The entries with the normalised ones replaced (a TensorDict for a TensorDict)."""
        out = {key: self.norms[key](value) if key in self.norms else value
               for key, value in x.items()}
        if isinstance(x, TensorDictBase):
            return TensorDict(out, batch_size=x.batch_size, device=x.device)
        return out


def make_obs_norm(info: EnvInfo, clip: float = 5.0) -> ObsNorm | NamedObsNorm:
    """The observation normalisation of an env: :class:`ObsNorm` over a Box observation, a
    :class:`NamedObsNorm` over the non-image entries of a named one."""
    if info.obs_shapes is None:
        return ObsNorm(info.obs_shape, clip)
    return NamedObsNorm({k: s for k, s in info.obs_shapes.items() if k not in info.images}, clip)


def _chan_merge(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                other_count: torch.Tensor, other_mean: torch.Tensor, other_m2: torch.Tensor) -> None:
    """In place: ``(count, mean, m2)`` ← the statistics of both streams together."""
    total = count + other_count
    if total <= 0:
        return
    delta = other_mean - mean
    mean += delta * (other_count / total)
    m2 += other_m2 + delta.pow(2) * count * other_count / total
    count.copy_(total)
