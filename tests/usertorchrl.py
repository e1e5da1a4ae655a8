"""A user's own TorchRL envs, importable by recipes as ``usertorchrl:<name>``.

``Countdown`` is batched and deterministic, so that the torch-native path's episode bookkeeping
can be checked by hand: slot ``i``'s episodes last ``2 + i`` steps, the observation is the
number of steps left (and the slot), the reward is the action.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase, GymEnv


class Countdown(EnvBase):
    """``num_envs`` slots; slot ``i``'s episodes last ``2 + i`` steps (terminated)."""

    def __init__(self, num_envs: int = 3) -> None:
        super().__init__(batch_size=torch.Size([num_envs]), device="cpu")
        n = num_envs
        self.observation_spec = Composite(
            observation=Unbounded(shape=(n, 2), dtype=torch.float32), shape=(n,))
        self.action_spec = Bounded(-1.0, 1.0, shape=(n, 1), dtype=torch.float32)
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32)
        self.done_spec = Composite(
            done=Categorical(2, shape=(n, 1), dtype=torch.bool),
            terminated=Categorical(2, shape=(n, 1), dtype=torch.bool), shape=(n,))
        self.length = torch.arange(n) + 2
        self.left = self.length.clone()
        self.resets = 0

    def _obs(self) -> torch.Tensor:
        return torch.stack([self.left.float(), torch.arange(len(self.left)).float()], -1)

    def _reset(self, tensordict: TensorDictBase | None, **kwargs) -> TensorDictBase:
        mask = torch.ones(len(self.left), dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():  # noqa: SIM118
            mask = tensordict["_reset"].reshape(-1)
        self.left[mask] = self.length[mask]
        self.resets += int(mask.sum())
        done = torch.zeros(len(self.left), 1, dtype=torch.bool)
        return TensorDict({"observation": self._obs(), "done": done, "terminated": done.clone()},
                          batch_size=self.batch_size)

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        self.left -= 1
        done = (self.left <= 0).unsqueeze(-1)
        return TensorDict({"observation": self._obs(), "reward": tensordict["action"].clone(),
                           "done": done, "terminated": done.clone()}, batch_size=self.batch_size)

    def _set_seed(self, seed: int | None) -> None:
        del seed


def make_countdown(num_envs: int) -> Countdown:
    """A factory taking ``num_envs``: called with each env's slot count."""
    return Countdown(num_envs)


def make_pendulum(g: float = 10.0) -> GymEnv:
    """A factory of one (unbatched) TorchRL env; copies fill the slots."""
    return GymEnv("Pendulum-v1", g=g)


class NotAnEnv:
    """What a factory must not return."""


def make_nothing() -> NotAnEnv:
    return NotAnEnv()


def make_cue():
    """:class:`userenvs.Cue` (a ``Dict`` observation) through TorchRL's ``GymWrapper``: its
    observation spec has the entries ``clock`` and ``cue`` side by side."""
    from torchrl.envs import GymWrapper
    from userenvs import Cue

    return GymWrapper(Cue())
