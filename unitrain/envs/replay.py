"""Replay memory for off-policy update rules: a TorchRL ``ReplayBuffer`` in CPU memory.

Experience replay (Lin 1992, "Self-improving reactive agents based on reinforcement learning,
planning and teaching"; Mnih et al. 2015) decorrelates the transitions a gradient step sees and
lets every transition serve many steps. :class:`Replay` keeps the entries the actor-critic losses
read (observation, action, next observation, reward, done and terminated flags; a named
observation with all its entries, each in its own dtype) in a
``LazyTensorStorage`` on the CPU, whatever device the networks use, so that the buffer's size is
bounded by host memory rather than accelerator memory. Sampling is uniform with replacement and
draws from the generator it is given, so runs are reproducible.

Checkpointing (:meth:`Replay.state_dict`) saves only the filled rows plus the write cursor, as
plain tensors; a full buffer of ``capacity`` transitions costs about ``capacity x (2 x obs_dim +
act_dim + 3) x 4`` bytes in every checkpoint (HalfCheetah, 10^6 transitions: ~160 MB).
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer

__all__ = ["Replay", "TRANSITION_KEYS"]

# What the actor-critic losses read; everything else a collector writes is dropped.
TRANSITION_KEYS: tuple[Any, ...] = ("observation", "action", ("next", "observation"),
                                    ("next", "reward"), ("next", "done"), ("next", "terminated"))


class Replay:
    """A bounded first-in-first-out store of transitions with uniform sampling.

    Args:
        capacity: transitions kept; the oldest are overwritten once it is full.
        batch_size: transitions per :meth:`sample`.
        generator: CPU generator the sampled indices are drawn from.
        device: where sampled batches are delivered (the networks' device).
    """

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> None:
        self.capacity, self.batch_size = capacity, batch_size
        self.generator = generator
        self.device = torch.device(device)
        self.buffer = ReplayBuffer(storage=LazyTensorStorage(capacity, device="cpu"),
                                   batch_size=batch_size, generator=generator)

    def __len__(self) -> int:
        return len(self.buffer)

    def extend(self, transitions: TensorDictBase) -> None:
        """Append transitions (any batch shape; flattened, reduced to :data:`TRANSITION_KEYS`).

        Args:
            transitions: a collector batch whose ``"action"`` is what the losses should read.
        """
        flat = transitions.reshape(-1).select(*TRANSITION_KEYS)
        self.buffer.extend(flat.to("cpu"))

    def sample(self) -> TensorDictBase:
        """A batch of ``batch_size`` transitions drawn uniformly with replacement.

        Returns:
            A TensorDict of shape ``[batch_size]`` on :attr:`device`.
        """
        # The draw of the buffer's own RandomSampler (one randint from the same generator),
        # read from the storage's TensorDict directly: the same batch without the replay
        # buffer's per-call locks, sampler and storage dispatch.
        index = torch.randint(0, len(self.buffer), (self.batch_size,), generator=self.generator)
        batch = self.buffer.storage._storage[index]
        return batch if self.device.type == "cpu" else batch.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        """The filled rows (cloned, as nested dicts of tensors) and the write cursor."""
        n = len(self.buffer)
        rows = self.buffer.storage[:n] if n else None
        return {"rows": None if rows is None else rows.clone().to_dict(),
                "size": n, "writer": dict(self.buffer.writer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the sampling generator is kept)."""
        self.buffer.empty()
        if state["rows"] is not None:
            rows = TensorDict(state["rows"], batch_size=[state["size"]])
            self.buffer.extend(rows)
        self.buffer.writer.load_state_dict(state["writer"])
