"""On-policy training of recurrent modules: collection with a carried state, losses on sequences.

A recurrent module (:mod:`unitrain.policy.recurrent`) is trained by PPO and REINFORCE on whole
trajectory segments, the scheme of PPO with recurrent policies in OpenAI Baselines' ``ppo2`` and
of Kapturowski et al. 2019 ("Recurrent Experience Replay in Distributed Reinforcement Learning")
for stored states:

- **collection** (:class:`CarriedPolicy`): the collector's policy keeps one state per env slot
  across steps and batches, resets a slot's state to ``initial_state`` where its episode starts,
  and stores at every step the state it acted from (``"recurrent_state"``) and whether the step
  began an episode (``"is_init"``);
- **losses** (:class:`SequenceOutput`): a batch ``[envs, steps]`` is cut along time into
  segments of ``sequence_length`` consecutive steps of one env; minibatches are whole segments.
  Each segment's outputs are *recomputed* by running the module from the state *stored* at the
  segment's first step, resetting it where ``"is_init"`` marks an episode start inside the
  segment. On the first epoch the recomputed outputs are the collection's (the PPO ratio is 1);
  later epochs see the new parameters through the segment, from a start state of the collecting
  parameters.

Episode starts are read from the env's per-slot count of finished episodes
(:attr:`~unitrain.envs.BatchedEnv.episodes_done`), which the collector's fast path keeps
without TorchRL's ``InitTracker`` transform (and its generic, slower step); the carried states
are part of the rule's checkpoint, so a resumed run continues its episodes with their states.
TorchRL's ``GRUModule``/``LSTMModule`` (``set_recurrent_mode``) need the module to be one of
theirs; this works for any module with the state contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import nn

from unitrain.envs.carry import State, flatten_state, leaves, map_state, unflatten_state, where_start
from unitrain.envs.observation import is_named
from unitrain.errors import ConfigError
from unitrain.policy.recurrent import module_step

if TYPE_CHECKING:
    from unitrain.envs.batched import BatchedEnv
    from unitrain.policy.module import RLModule

__all__ = ["SequenceOutput", "CarriedPolicy", "state_keys", "segments", "carried_spec", "STATE",
           "NEXT_STATE", "IS_INIT"]

STATE, NEXT_STATE, IS_INIT = "recurrent_state", "next_recurrent_state", "is_init"


def state_keys(like: State, root: str) -> list[tuple[str, str]]:
    """The TensorDict keys ``(root, "0")``, ``(root, "1")``, ... of a state's tensors."""
    return [(root, k) for k in flatten_state(like)]


class SequenceOutput(nn.Module):
    """``(observation, is_init, *state tensors) -> (output, *next state tensors)``.

    One step for inputs ``[B, *obs_shape]`` (collection); for ``[S, T, *obs_shape]`` (a
    minibatch of segments), a loop over time from the state at ``t = 0``, reset to the initial
    state where ``is_init`` is set for ``t > 0``, returning outputs and states ``[S, T, ...]``.

    Args:
        module: the recurrent module.
        obs_ndim: dimensions of one observation.
    """

    def __init__(self, module: "RLModule", obs_ndim: int) -> None:
        super().__init__()
        self.module = module
        self.obs_ndim = obs_ndim

    def forward(self, observation: Any, is_init: torch.Tensor,
                *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        like = self.module.initial_state(1)
        state = unflatten_state(like, dict(zip(map(str, range(len(flat))), flat)))
        # Named entries are a TensorDict whose batch dimensions are the steps'.
        batch_dims = (observation.batch_dims if is_named(observation)
                      else observation.ndim - self.obs_ndim)
        if batch_dims == 1:
            out, nxt = module_step(self.module, observation, state)
            return (out, *leaves(nxt))
        segments, steps = observation.shape[:2]
        initial = map_state(lambda t: t.to(is_init.device), self.module.initial_state(segments))
        state = map_state(lambda t: t[:, 0], state)
        starts = is_init.reshape(segments, steps)
        outs, states = [], []
        for t in range(steps):
            if t > 0:
                state = where_start(starts[:, t], initial, state)
            out, state = module_step(self.module, observation[:, t], state)
            outs.append(out)
            states.append(leaves(state))
        return (torch.stack(outs, 1), *(torch.stack(col, 1) for col in zip(*states)))


class CarriedPolicy(TensorDictModuleBase):
    """The collector's policy for a recurrent module: a state per env slot, carried across steps
    and batches and reset where a slot's episode starts.

    Before running ``actor`` (a ``ProbabilisticActor`` over :class:`SequenceOutput`) it writes
    ``"is_init"`` ``[n, 1]`` and the state the step acts from under ``"recurrent_state"``; the
    actor's ``"next_recurrent_state"`` is carried to the slot's next step.

    Args:
        actor: the stochastic actor.
        module: the recurrent module.
        env: returns the collector's env (its ``episodes_done`` counts tell where episodes
            start).
    """

    def __init__(self, actor: nn.Module, module: "RLModule",
                 env: "Callable[[], BatchedEnv]") -> None:
        super().__init__()
        self.actor = actor
        self.__dict__["module"] = module  # the actor registers it
        self.__dict__["env"] = env
        self.spec = actor.spec.clone()
        like = module.initial_state(1)
        self._like = like
        self.in_keys = ["observation"]
        self.out_keys = [*actor.out_keys, IS_INIT, *state_keys(like, STATE)]
        self.state: State | None = None
        self.seen: torch.Tensor | None = None

    def _finished(self) -> torch.Tensor:
        done = self.env().episodes_done
        done = torch.from_numpy(np.asarray(done)) if isinstance(done, np.ndarray) else done
        return done.clone()

    def forward(self, td: TensorDictBase) -> TensorDictBase:
        n, device = td.batch_size[0], td.device
        finished = self._finished()
        initial = map_state(lambda t: t.to(device), self.module.initial_state(n))
        if self.state is None or self.seen is None:
            starts = torch.ones(n, dtype=torch.bool)
            state = initial
        else:
            starts = (finished != self.seen).cpu()
            state = where_start(starts, initial, self.state)
        self.seen = finished
        td.set(IS_INIT, starts.to(device)[:, None])
        for key, value in zip(state_keys(self._like, STATE), leaves(state)):
            td.set(key, value)
        td = self.actor(td)
        nxt = td.get(NEXT_STATE)
        self.state = unflatten_state(self._like, {k: nxt.get(k).clone() for k in nxt.keys()})
        return td

    def state_dict_carried(self) -> dict[str, Any]:
        """The carried states and episode counts (for the rule's checkpoint)."""
        if self.state is None or self.seen is None:
            return {}
        return {"state": [t.detach().cpu().clone() for t in leaves(self.state)],
                "seen": self.seen.cpu().clone()}

    def load_carried(self, saved: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict_carried`."""
        if not saved:
            self.state = self.seen = None
            return
        flat = {str(i): t.to(device) for i, t in enumerate(saved["state"])}
        self.state = unflatten_state(self._like, flat)
        self.seen = saved["seen"].clone()


def segments(batch: TensorDictBase, length: int) -> TensorDictBase:
    """``[envs, steps]`` cut along time into ``[envs * steps / length, length]`` segments of
    consecutive steps of one env (in env-major order)."""
    envs, steps = batch.batch_size
    if steps % length:
        raise ConfigError("optimizer.sequence_length",
                          f"must divide the steps per env of a batch (frames_per_batch / "
                          f"env.num_envs = {steps}); got {length}")
    return batch.reshape(envs, steps // length, length).reshape(envs * (steps // length), length)


def carried_spec(like: State, device: torch.device | str) -> dict[Any, Any]:
    """Specs of the entries :class:`CarriedPolicy` and :class:`SequenceOutput` add."""
    from torchrl.data import Unbounded

    entries: dict[Any, Any] = {IS_INIT: Unbounded((1,), dtype=torch.bool, device=device)}
    for root in (STATE, NEXT_STATE):
        for key, t in zip(state_keys(like, root), leaves(like)):
            entries[key] = Unbounded(tuple(t.shape[1:]), dtype=t.dtype, device=device)
    return entries
