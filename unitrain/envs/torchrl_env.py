"""The ``torchrl`` backend: a user's own TorchRL :class:`~torchrl.envs.EnvBase` as a torch-native
backend of :class:`~unitrain.envs.BatchedEnv`.

An :class:`~unitrain.envs.EnvSpec` with ``make`` names the env: a factory (a callable, or its
import path ``"mypkg.envs:make_env"``) or an ``EnvBase`` instance. How it becomes ``n`` slots:

- a factory taking a ``num_envs`` argument is called as ``make(num_envs=n, **kwargs)`` and must
  return an env of batch size ``[n]`` (a vectorised simulator serves any slot count);
- any other factory is called as ``make(**kwargs)``: an env without a batch size is copied into
  a TorchRL ``SerialEnv`` of ``n`` slots (one call per copy); an env of batch size ``[N]``
  serves ``n <= N`` slots (the others are stepped with zero actions and ignored);
- an instance is a template: each env the run builds (training, evaluation, population waves)
  steps a ``copy.deepcopy`` of it, so the user's object is never stepped and evaluation never
  disturbs training episodes; an instance without a batch size is copied ``n`` times into a
  ``SerialEnv``, one of batch size ``[N]`` serves ``n <= N`` slots. An env that cannot be
  deep-copied needs a factory.

Autoreset is the same-step kind of the gymnasium backend: when slot ``i``'s episode ends, the
slots that ended are reset at once with TorchRL's partial reset (a ``"_reset"`` mask, through
``step_and_maybe_reset``), the step returns the next episode's first observation for them and,
separately, the observation the episode ended in. Everything stays in torch on the env's device.

Action masks: an env whose ``observation_spec`` has an ``"action_mask"`` entry (TorchRL's
convention, as its ``ActionMask`` transform reads it) gives a mask of the allowed actions with
every observation; the run reads it there (``[A]`` bool per slot, ``A`` the number of logits).

Seeding: ``reset(seed)`` calls the env's ``set_seed(seed)`` and then resets it (a list of per-slot
seeds gives its first; TorchRL seeds the copies of a ``SerialEnv`` in a chain from it): episodes
are reproducible for a seed and a slot count, but an evaluation episode's seed is not the slot's
own as on the gymnasium backend, so how many processes split an evaluation can change its
episodes.
"""

from __future__ import annotations

import copy
import functools
import inspect
import pickle
from collections import OrderedDict
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.data import Categorical, Composite, MultiCategorical, MultiOneHot, OneHot
from torchrl.envs import EnvBase, SerialEnv, StepCounter, TransformedEnv

from unitrain.envs.spec import EnvSpec, resolve_make
from unitrain.errors import ConfigError

__all__ = ["TorchRLVector", "build_env", "env_spaces", "spaces_from_env"]


def _takes_num_envs(factory: Any) -> bool:
    try:
        return "num_envs" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def _call(factory: Any, kwargs: dict[str, Any], **extra: Any) -> EnvBase:
    env = factory(**kwargs, **extra)
    if not isinstance(env, EnvBase):
        raise ConfigError("env.make", f"{getattr(factory, '__name__', factory)!r} returned "
                                      f"{type(env).__name__}, not a torchrl.envs.EnvBase")
    return env


def _copy(env: EnvBase) -> EnvBase:
    try:
        return copy.deepcopy(env)
    except Exception as e:  # noqa: BLE001 - an env holding a handle that cannot be copied
        raise ConfigError("env.make", f"the run needs copies of this {type(env).__name__} "
                                      f"(training, evaluation) and it cannot be deep-copied "
                                      f"({type(e).__name__}); pass a factory that builds it "
                                      "instead") from None


def build_env(spec: EnvSpec, num_envs: int) -> tuple[EnvBase, int]:
    """The TorchRL env of ``spec`` for ``num_envs`` slots, and its batch size (``>= num_envs``).

    Raises:
        ConfigError: the factory returns no ``EnvBase``, a batched env too small, or the env
            has more than one batch dimension.
    """
    make = resolve_make(spec.make)
    if isinstance(make, str):
        from unitrain.validation import import_object

        make = import_object(make, "env.make")
    kwargs = dict(spec.kwargs)
    if isinstance(make, EnvBase):
        if kwargs:
            raise ConfigError("env.kwargs", "an env instance takes no kwargs; pass a factory")
        first = _copy(make)
        again: Any = functools.partial(_copy, make)
    elif _takes_num_envs(make):
        first = _call(make, kwargs, num_envs=num_envs)
        if tuple(first.batch_size) != (num_envs,):
            raise ConfigError("env.make", f"called with num_envs={num_envs}, the factory returned "
                                          f"an env of batch size {list(first.batch_size)}; "
                                          f"expected [{num_envs}]")
        again = None
    else:
        first = _call(make, kwargs)
        # A partial, not a closure: the SerialEnv of copies pickles (checkpoints) with it.
        again = functools.partial(_call, make, kwargs)
    if len(first.batch_size) > 1:
        raise ConfigError("env.make", f"the env has batch size {list(first.batch_size)}; "
                                      "unitrain steps envs with one batch dimension")
    if len(first.batch_size) == 0:
        # Copies, one per slot (the probe told what the factory builds).
        first.close(raise_if_closed=False)
        env: EnvBase = SerialEnv(num_envs, again)
    else:
        env = first
    size = int(env.batch_size[0])
    if size < num_envs:
        raise ConfigError("env.make", f"the env has {size} slots and this use needs {num_envs} "
                                      "(num_envs, evaluation waves, population waves); give a "
                                      "factory taking num_envs, or an env without a batch size")
    if spec.max_episode_steps is not None:
        env = TransformedEnv(env, StepCounter(max_steps=spec.max_episode_steps))
    return env, size


MASK_KEY = "action_mask"


def _obs_key(env: EnvBase) -> Any:
    """Where the observation is: one key (a Box observation), or ``{name: key}`` of named
    entries: the leaves of a Composite ``"observation"``, or the observation spec's entries
    when there are several and none is ``"observation"`` (in the spec's order). The
    ``"action_mask"`` entry is no observation."""
    spec = env.observation_spec
    keys = [k for k in spec.keys(True, True) if k != MASK_KEY]
    if isinstance(env, TransformedEnv) and "step_count" not in env.base_env.observation_spec.keys():
        keys = [k for k in keys if k != "step_count"]  # a StepCounter's count is no observation
    if "observation" in keys:
        return "observation"
    if "observation" in spec.keys() and isinstance(spec["observation"], Composite):
        sub = spec["observation"]
        leaves = list(sub.keys(True, True))
        if any(isinstance(k, tuple) for k in leaves):
            raise ConfigError("env.make", f"the env's observation entries {leaves} are nested; "
                                          "unitrain reads one level of named entries")
        return {str(k): ("observation", k) for k in leaves}
    if len(keys) == 1:
        return keys[0]
    if any(isinstance(k, tuple) for k in keys):
        raise ConfigError("env.make", f"the env's observation_spec has nested entries {keys}; "
                                      "unitrain reads one observation or one level of named "
                                      "entries")
    return {str(k): k for k in keys}


def _single(value: torch.Tensor, batch_dims: int) -> np.ndarray:
    """One slot's bound of a spec (bounds are the same in every slot)."""
    value = value.detach().cpu()
    for _ in range(batch_dims):
        value = value[0] if value.ndim else value
    return value.numpy()


def _box(obs: Any, dims: int) -> gym.spaces.Box:
    """The gymnasium ``Box`` of one slot of an observation spec."""
    shape = tuple(obs.shape[dims:])
    dtype = np.uint8 if obs.dtype == torch.uint8 else np.float32
    space = getattr(obs, "space", None)
    if hasattr(space, "low") and dtype != np.uint8:
        low = np.broadcast_to(_single(space.low, dims), shape).astype(np.float32)
        high = np.broadcast_to(_single(space.high, dims), shape).astype(np.float32)
        return gym.spaces.Box(low, high, shape, np.float32)
    if dtype == np.uint8:
        return gym.spaces.Box(0, 255, shape, np.uint8)
    return gym.spaces.Box(-np.inf, np.inf, shape, np.float32)


def spaces_from_env(env: EnvBase) -> tuple[gym.spaces.Space, gym.spaces.Space]:
    """Gymnasium spaces of one slot of ``env``, read from its observation and action specs.

    Raises:
        ConfigError: the action spec is continuous and unbounded (unitrain's action contract
            scales actions to the bounds), or of a kind unitrain does not support.
    """
    dims = len(env.batch_size)
    where = _obs_key(env)
    if isinstance(where, dict):  # named entries, in the spec's order
        obs_space: gym.Space = gym.spaces.Dict(OrderedDict(
            (name, _box(env.observation_spec[key], dims)) for name, key in where.items()))
    else:
        obs_space = _box(env.observation_spec[where], dims)
    act = env.action_spec
    if isinstance(act, MultiCategorical):
        nvec = _single(act.nvec, dims).reshape(-1)
        return obs_space, gym.spaces.MultiDiscrete(nvec.astype(np.int64))
    if isinstance(act, MultiOneHot):
        raise ConfigError("env.make", "the env's action spec is MultiOneHot; unitrain takes "
                                      "multi-discrete actions as a MultiCategorical spec")
    if isinstance(act, (Categorical, OneHot)):
        return obs_space, gym.spaces.Discrete(int(act.space.n))
    space = getattr(act, "space", None)
    if not hasattr(space, "low"):
        raise ConfigError("env.make", f"the env's action spec is {type(act).__name__} without "
                                      "bounds; unitrain scales continuous actions to the bounds "
                                      "(give the env a Bounded action spec)")
    act_shape = tuple(act.shape[dims:])
    low = np.broadcast_to(_single(space.low, dims), act_shape).astype(np.float32)
    high = np.broadcast_to(_single(space.high, dims), act_shape).astype(np.float32)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise ConfigError("env.make", "the env's action bounds are not finite; unitrain scales "
                                      "continuous actions to the bounds")
    return obs_space, gym.spaces.Box(low, high, act_shape, np.float32)


class TorchRLVector:
    """The ``torchrl`` backend: ``num_envs`` slots of a user's TorchRL env, torch-native.

    Follows the backend protocol of :class:`~unitrain.envs.BatchedEnv` with torch tensors on
    :attr:`device`: ``reset(seed) -> obs``, ``step(action) -> (obs, reward, terminated,
    truncated, final_obs or None)``, same-step autoreset through a partial ``"_reset"`` reset.
    """

    name = "torchrl"
    torch_native = True

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int) -> None:
        del seed, num_threads  # seeded at the first reset; steps in this thread
        self.env, self.size = build_env(spec, num_envs)
        self.num_envs = num_envs
        self.device = torch.device(self.env.device or "cpu")
        self.observation_space, self.action_space = spaces_from_env(self.env)
        self.obs_key = _obs_key(self.env)
        self.action_key = self.env.action_key
        self.reward_key = self.env.reward_key
        self.one_hot = isinstance(self.env.action_spec, OneHot)
        self.masked = MASK_KEY in self.env.observation_spec.keys()
        self.mask: torch.Tensor | None = None
        self.final_mask: torch.Tensor | None = None
        self._batch = torch.Size([self.size])
        self._pad = None
        if self.size > num_envs:
            pad = self.env.action_spec.zero()[num_envs:]
            self._pad = pad.to(self.device)
        self._action: torch.Tensor | None = None
        self._root: TensorDict | None = None  # the next step's input: observation, carried keys

    def _obs(self, td: TensorDict) -> Any:
        """The observation of the first ``num_envs`` slots (a dict of named entries)."""
        if isinstance(self.obs_key, dict):
            return {name: self._entry(td, key) for name, key in self.obs_key.items()}
        return self._entry(td, self.obs_key)

    def _entry(self, td: TensorDict, key: Any) -> torch.Tensor:
        obs = td.get(key)[: self.num_envs]
        return obs if obs.dtype in (torch.uint8, torch.float32) else obs.to(torch.float32)

    def reset(self, seed: int | list[int] | None) -> torch.Tensor:
        if seed is not None:
            self.env.set_seed(int(seed[0] if isinstance(seed, list) else seed))
        self._root = self.env.reset()
        if self.masked:
            self.mask = self.final_mask = self._mask(self._root)
        return self._obs(self._root)

    def _mask(self, td: TensorDict) -> torch.Tensor:
        return td.get(MASK_KEY)[: self.num_envs].to(torch.bool)

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, torch.Tensor | None]:
        """``(obs, reward, terminated, truncated, final)``, as :class:`GymnasiumVector`'s step,
        in torch on :attr:`device` (``final`` is ``None`` when no episode ended).

        TorchRL's ``step_and_maybe_reset`` steps and resets the slots whose episode ended with
        a partial reset (a ``"_reset"`` mask); it carries the env's own root entries (a
        ``StepCounter``'s count, a recurrent state) from one step to the next.
        """
        n = self.num_envs
        if self.one_hot:
            action = torch.nn.functional.one_hot(action.long(), self.action_space.n)
        if self._pad is not None:
            action = torch.cat([action.to(self._pad.dtype), self._pad])
        root = self._root
        assert root is not None, "step before reset"
        root.set(self.action_key, action.to(self.device))
        out, self._root = self.env.step_and_maybe_reset(root)
        nxt = out.get("next")
        last = self._obs(nxt)
        reward = nxt.get(self.reward_key)[:n].reshape(n)
        done = nxt.get("done")[:n].reshape(n)
        terminated = nxt.get("terminated", done)[:n].reshape(n)
        truncated = nxt.get("truncated", None)
        truncated = (done & ~terminated) if truncated is None else truncated[:n].reshape(n)
        if self.masked:
            self.final_mask, self.mask = self._mask(nxt), self._mask(self._root)
        if not bool(done.any()):
            return last, reward, terminated, truncated, None
        return self._obs(self._root), reward, terminated, truncated, last

    def send(self, action: torch.Tensor) -> None:
        """Start a step (TorchRL envs step in this thread: at :meth:`recv`)."""
        self._action = action

    def recv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                            torch.Tensor | None]:
        """Finish the step :meth:`send` started; what :meth:`step` returns."""
        assert self._action is not None, "recv without send"
        action, self._action = self._action, None
        return self.step(action)

    def state(self) -> bytes | None:
        """The env pickled with its running episodes (TorchRL's ``GymEnv`` over a classic-control
        env pickles its state and random stream), or ``None`` when it cannot be pickled: a
        resumed run then starts its episodes afresh."""
        try:
            return pickle.dumps((self.env, self._root))
        except Exception:  # noqa: BLE001 - an env holding a handle or a device resource
            return None

    def load(self, state: bytes) -> None:
        env, root = pickle.loads(state)
        if tuple(env.batch_size) != tuple(self.env.batch_size):
            raise ValueError(f"saved env has batch size {list(env.batch_size)}, this env "
                             f"{list(self.env.batch_size)}")
        self.env.close(raise_if_closed=False)
        self.env, self._root = env, root

    def close(self) -> None:
        self.env.close(raise_if_closed=False)


def env_spaces(spec: EnvSpec) -> tuple[gym.Space, gym.Space, bool]:
    """The spaces of ``spec``'s env (an instance is read as it is; a factory builds one), and
    whether it gives action masks."""
    make = resolve_make(spec.make)
    if isinstance(make, str):
        from unitrain.validation import import_object

        make = import_object(make, "env.make")
    if isinstance(make, EnvBase):
        return (*spaces_from_env(make), MASK_KEY in make.observation_spec.keys())
    extra = {"num_envs": 1} if _takes_num_envs(make) else {}
    env = _call(make, dict(spec.kwargs), **extra)
    try:
        return (*spaces_from_env(env), MASK_KEY in env.observation_spec.keys())
    finally:
        env.close(raise_if_closed=False)
