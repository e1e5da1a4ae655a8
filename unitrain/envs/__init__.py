"""Environments: the env contract and its backends, rollouts, collection and replay.

An :class:`EnvSpec` names what to collect from; :func:`make_env` turns it into a
:class:`BatchedEnv`, a TorchRL :class:`~torchrl.envs.EnvBase` over a backend (:mod:`.gymnasium`,
:mod:`.envpool`). :mod:`.rollout` is the one loop that steps envs (evaluation, population
evaluation and elite collection); :mod:`.collect` builds TorchRL collectors for transition
rules; :mod:`.replay` is the replay memory; :mod:`.data` the supervised datasets;
:mod:`.memory` registers memory tasks (``unitrain/CartPoleNoVel-v1``); :mod:`.carry` carries a
recurrent policy's state per env slot.

This is the lowest layer of unitrain: it imports nothing from the layers above it
(``policy``, ``rules``, ``run``, ``app``).
"""

from unitrain.envs.batched import BACKENDS, BatchedEnv, halves, make_env
from unitrain.envs.info import EnvInfo, env_info
from unitrain.envs.memory import MEMORY_IDS
from unitrain.envs.obs_norm import ObsNorm
from unitrain.envs.spec import (BACKEND_CHOICES, EnvSpec, derive_seed, envpool_id, is_mujoco,
                                resolve_backend, validate_env_id)

__all__ = ["EnvSpec", "EnvInfo", "ObsNorm", "BatchedEnv", "make_env", "env_info",
           "derive_seed", "resolve_backend", "envpool_id", "is_mujoco", "validate_env_id",
           "halves", "BACKENDS", "BACKEND_CHOICES", "MEMORY_IDS"]
