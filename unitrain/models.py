"""Ready-made networks for image observations.

:class:`NatureCNN` is the network of Mnih et al. 2015 ("Human-level control through deep
reinforcement learning"), the one Such et al. 2017 ("Deep Neuroevolution") evolve on Atari with
the Deep GA: three convolutions (32×8×8 stride 4, 64×4×4 stride 2, 64×3×3 stride 1), a 512-unit
fully connected layer and one output per action; about 1.7 M parameters with 18 actions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unitrain.module import RLModule

__all__ = ["NatureCNN"]


class NatureCNN(RLModule):
    """The Nature-DQN convolutional policy over stacked 84×84 frames.

    Args:
        obs_shape: ``(frames, height, width)`` of an observation (filled in from the env by
            recipes); uint8 pixels are scaled to ``[0, 1]``.
        act_dim: number of actions (logits) or action size (continuous mean).
        hidden: units of the fully connected layer.
    """

    def __init__(self, obs_shape: Sequence[int], act_dim: int, hidden: int = 512) -> None:
        super().__init__()
        channels, height, width = (int(s) for s in obs_shape)
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(-3))
        with torch.no_grad():
            size = self.features(torch.zeros(1, channels, height, width)).shape[-1]
        self.head = nn.Sequential(nn.Linear(size, hidden), nn.ReLU(), nn.Linear(hidden, act_dim))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(observation.float() / 255.0))
