"""Modules used by the tests (importable by recipes as ``policies.<Name>``)."""

from __future__ import annotations

import torch
from torch import nn

import unitrain as ut


class TinyPolicy(ut.RLModule):
    """A user-written module: one hidden layer (``activation``: ``"tanh"`` or ``"relu"``)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 32,
                 activation: str = "tanh") -> None:
        super().__init__()
        act = nn.ReLU() if activation == "relu" else nn.Tanh()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), act, nn.Linear(hidden, act_dim))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)
