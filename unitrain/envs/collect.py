"""Transition collection through a TorchRL :class:`~torchrl.collectors.Collector`.

The collector runs the policy on the module's device and steps a :class:`~unitrain.envs.BatchedEnv`
on the CPU; each batch is a TensorDict of shape ``[num_envs, steps]`` with ``("next", ...)``
entries, the layout TorchRL's losses and value estimators expect.
"""

from __future__ import annotations

from typing import Callable

import torch
from tensordict import TensorDictBase
from torchrl.collectors import Collector
from torchrl.envs import EnvBase

__all__ = ["make_collector"]


def make_collector(env: EnvBase, policy: Callable[[TensorDictBase], TensorDictBase] | None,
                   frames_per_batch: int, device: torch.device | str | None = None,
                   track_traj_ids: bool = False) -> Collector:
    """A collector that yields ``frames_per_batch`` transitions per iteration, forever.

    Args:
        env: the batched env (its ``num_envs`` must divide ``frames_per_batch``).
        policy: a TensorDict module reading ``"observation"`` and writing ``"action"``
            (``None`` samples random actions from the env's action spec).
        frames_per_batch: transitions per batch, summed over the vectorised envs.
        device: where the policy runs and batches are stored (default: the env's device).
        track_traj_ids: also write ``("collector", "traj_ids")`` (trajectory ids, for
            trajectory-aware replay sampling); episode boundaries are in ``("next", "done")``
            either way.
    """
    # A device-less carrier would be copied onto the env's device at every step; naming the
    # env's device when the caller names none keeps policy, env and storage on one device.
    device = env.device if device is None else torch.device(device)
    collector = Collector(
        env,
        policy,
        frames_per_batch=frames_per_batch,
        total_frames=-1,
        env_device=env.device,
        policy_device=device,
        storing_device=device,
        split_trajs=False,
        track_traj_ids=track_traj_ids,
        # Recurrent policies need InitTracker/primer transforms, and the collector would add an
        # InitTracker for any policy, wrapping the env in a TransformedEnv off the fast path.
        auto_register_policy_transforms=False,
    )
    # TorchRL 0.14 keeps the output keys of a policy that declares its spec as a set, and with
    # the policy on another device than the env (a GPU module, CPU envs) each step then fails in
    # ``update(..., keys_to_update=<set>)``, which takes a list.
    if isinstance(getattr(collector, "_policy_output_keys", None), set):
        collector._policy_output_keys = list(collector._policy_output_keys)
    return collector
