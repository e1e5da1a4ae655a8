"""Environment specs and the TorchRL environment that unitrain collects from.

An :class:`EnvSpec` names a gymnasium id (classic control, MuJoCo ``*-v5``, ``ALE/*``), how many
copies run together in one process, and the backend that simulates them: gymnasium's Python envs
in one synchronous vector env, or EnvPool's C++ envs (Weng et al. 2022, "EnvPool: A Highly
Parallel Reinforcement Learning Environment Execution Engine") on threads of their own.
:func:`make_env` turns it into :class:`BatchedEnv`, a TorchRL :class:`~torchrl.envs.EnvBase` with
same-step autoreset over either backend. It is a lean replacement for ``GymWrapper`` on the hot
path: observations are
converted to float32 once per step, episode returns and lengths are tracked in numpy, the final
observation of an episode is returned as the ``next`` observation (for correct bootstrapping),
and ``step_and_maybe_reset`` (what a collector calls) builds the next step's input directly
instead of going through TorchRL's generic ``step_mdp``/partial-reset machinery.

A backend may instead be *torch-native* (a user's TorchRL env, :mod:`.torchrl_env`; MuJoCo Warp):
it steps on a torch device and hands back torch tensors there, and :class:`BatchedEnv` then keeps
its bookkeeping in torch on that device too (see "The backend protocol" in :class:`BatchedEnv`).

Atari ids get the usual preprocessing (Mnih et al. 2015; Machado et al. 2018) on either backend:
no-op starts, frame skip 4 with max-pooling, 84×84 grayscale, 4 stacked frames, sticky actions
(p = 0.25) and the minimal action set."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.data import Binary, Bounded, Categorical, Composite, MultiCategorical, Unbounded
from torchrl.envs import EnvBase

from unitrain.envs.envpool import EnvPoolVector
from unitrain.envs.gymnasium import GymnasiumVector
from unitrain.envs.info import info_from_spaces
from unitrain.envs.mjwarp import MJWarpVector
from unitrain.envs.obs_norm import ObsNorm
from unitrain.envs.spec import EnvSpec, resolve_backend
from unitrain.envs.torchrl_env import TorchRLVector
from unitrain.errors import ConfigError, UserError, check

__all__ = ["BatchedEnv", "make_env", "halves", "BACKENDS"]


class _Running:
    """Per-step mutable state of a :class:`BatchedEnv`.

    Kept off the env itself: every attribute assignment on an ``EnvBase`` (an ``nn.Module``),
    including ``self.x += ...`` on an array, goes through two ``__setattr__`` overrides, and a
    step makes several. Numpy arrays over a numpy backend, torch tensors on the backend's device
    over a torch-native one.
    """

    __slots__ = ("obs", "ep_return", "ep_length", "ended", "action", "mask")

    def __init__(self, num_envs: int, device: torch.device | None = None) -> None:
        self.obs: torch.Tensor | None = None  # what the next step starts from
        if device is None:
            self.ep_return: Any = np.zeros(num_envs)
            self.ep_length: Any = np.zeros(num_envs, dtype=np.int64)
        else:
            self.ep_return = torch.zeros(num_envs, dtype=torch.float64, device=device)
            self.ep_length = torch.zeros(num_envs, dtype=torch.int64, device=device)
        # Torch-native backends: (slots, done, returns, lengths) of steps where an episode
        # ended, turned into ``finished`` entries only when they are read (no device sync per
        # step).
        self.ended: list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.action: torch.Tensor | None = None  # sent to a backend without send/recv
        self.mask: torch.Tensor | None = None  # action masks of ``obs`` (an env with masks)


class _Split:
    """Slots split into groups, each with a backend (and, on EnvPool, threads) of its own.

    :meth:`step` steps every group (all started before any is waited for); a rollout can instead
    :meth:`send` to one group and run the policy of another while the first one's envs step
    (:func:`unitrain.envs.rollout.rollout`). Slot ``i`` is the same env, with the same seed, as in an
    unsplit backend of the same size.
    """

    def __init__(self, make: Callable[[int, int | None], Any], sizes: Sequence[int],
                 seed: int | None) -> None:
        starts = np.cumsum([0, *sizes])
        self.slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
        self.parts = [make(size, (seed or 0) + sl.start) for size, sl in zip(sizes, self.slices)]
        self.name = self.parts[0].name
        self.observation_space = self.parts[0].observation_space
        self.action_space = self.parts[0].action_space

    def reset(self, seed: int | list[int] | None) -> np.ndarray:
        return np.concatenate([
            part.reset(seed[sl] if isinstance(seed, list) else
                       None if seed is None else seed + sl.start)
            for part, sl in zip(self.parts, self.slices)])

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        for part, sl in zip(self.parts, self.slices):
            part.send(action[sl])
        outs = [part.recv() for part in self.parts]
        obs, reward, terminated, truncated = (np.concatenate([o[k] for o in outs])
                                              for k in range(4))
        final = None
        if any(o[4] is not None for o in outs):
            final = np.concatenate([o[0] if o[4] is None else o[4] for o in outs])
        return obs, reward, terminated, truncated, final

    def state(self) -> None:
        return None

    def load(self, state: bytes) -> None:
        raise ValueError("a split env has no saved state to load")

    def close(self) -> None:
        for part in self.parts:
            part.close()


# Backends that deliver Dict/Tuple observations (the others refuse them).
NAMED_OBS_BACKENDS = ("gymnasium", "torchrl")

# Backends by name (EnvSpec.backend, after resolve_backend).
BACKENDS: dict[str, Callable[[EnvSpec, int, int | None, int], Any]] = {
    "gymnasium": GymnasiumVector, "envpool": EnvPoolVector, "torchrl": TorchRLVector,
    "mjwarp": MJWarpVector}


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


class BatchedEnv(EnvBase):
    """``num_envs`` copies of an env, stepped together, as a batched TorchRL env.

    The copies come from a backend (:data:`BACKENDS`): gymnasium's envs in this process,
    EnvPool's C++ pool with its own threads, or a torch-native backend (a user's TorchRL env).
    Either way the env autoresets in the same step, so
    when episode ``i`` ends,
    ``("next", "observation")[i]`` is the episode's final observation (for bootstrapping) and the
    first observation of the next episode is what the env delivers as ``"observation"`` on the
    following step: directly from :meth:`step_and_maybe_reset` (the collector's path), or from
    the partial reset that :meth:`~torchrl.envs.EnvBase.maybe_reset` issues after :meth:`step`.

    **The backend protocol.** A backend is built as ``backend(spec, num_envs, seed,
    num_threads)`` (registered in :data:`BACKENDS` under the name :func:`resolve_backend`
    gives) and has:

    - ``observation_space``, ``action_space``: one slot's gymnasium spaces (a ``Box``
      observation, or a ``Dict`` of ``Box`` entries; ``Discrete``, 1-D ``MultiDiscrete`` or
      1-D ``Box`` actions), read by :func:`info_from_spaces`;
    - ``reset(seed) -> obs``: ``[n, *obs_shape]`` (a dict of such arrays for a ``Dict``
      observation, as every ``obs`` and ``final`` below); ``seed`` is ``None`` (keep the envs'
      own streams), an int (slot ``i`` gets ``seed + i``) or a list of per-slot seeds;
    - ``step(action) -> (obs, reward, terminated, truncated, final)``, with same-step autoreset:
      ``obs[i]`` is the next episode's first observation where slot ``i``'s episode ended
      (``terminated | truncated``), and ``final`` holds the observations the step ended in for
      every slot (``final[i]`` the ended episode's last one), or is ``None`` when no episode
      ended; ``reward``, ``terminated``, ``truncated`` are ``[n]``;
    - optionally ``send(action)`` / ``recv() -> step's result`` (start a step, finish it: a
      rollout runs one slot group's policy while another's envs step); without them a step
      runs at ``recv_part``;
    - ``state() -> bytes | None`` (``None``: the episodes cannot be saved) and ``load(state)``;
    - ``close()``;
    - optionally ``masked = True`` for an env with action masks, with ``mask`` (``[n, A]``
      bool, the masks of the observations the next step starts from, after ``reset`` and
      ``step``) and ``final_mask`` (those of the observations the last step ended in).

    An env with action masks (``info.masked``) has an ``"action_mask"`` entry ``[n, A]`` next to
    each ``"observation"`` (``A``: the number of logits, :mod:`unitrain.policy.action`).

    A numpy backend returns numpy arrays (observations in the space's dtype, ``bool`` flags) and
    steps on the CPU. A **torch-native** backend sets ``torch_native = True`` and ``device`` (a
    ``torch.device``), takes actions as tensors and returns tensors on ``device``
    (observations ``float32`` or ``uint8``, rewards floating, flags ``bool``); the env is then
    on ``device`` and its episode bookkeeping (returns, lengths, :attr:`episodes_done`) stays in
    torch there, with no host copy per step (``finished`` is assembled when it is read).

    Args:
        spec: what to run (``spec.backend`` chooses the backend, see :func:`resolve_backend`).
        seed: seed of the first reset (env ``i`` gets ``seed + i``).
        obs_norm: shared :class:`ObsNorm`, or ``None``.
        update_norm: whether stepping this env updates ``obs_norm`` (training) or not (evaluation).
        num_envs: overrides ``spec.num_envs``.
        num_threads: threads the backend may step envs on (EnvPool; gymnasium steps in this one).
        parts: sizes of slot groups that :meth:`send_part`/:meth:`recv_part` step one at a time
            (summing to ``num_envs``), so that a rollout can run the policy of one group while
            EnvPool's threads step another; only the EnvPool backend splits (on gymnasium, which
            steps in this thread, there is nothing to overlap and ``parts`` is ignored).
        render_mode: gymnasium's ``render_mode`` for the envs (e.g. ``"rgb_array"`` for videos);
            rendering envs run on the gymnasium backend, whatever ``spec.backend`` says.

    Attributes:
        finished: ``(return, length)`` of the episodes completed since the last
            :meth:`pop_finished`, in completion order.
        episodes_done: number of completed episodes per env slot, ``[num_envs]`` int64 (a numpy
            array, or a tensor on the device of a torch-native backend).
    """

    _batch_locked = True
    _DONE_KEYS = ("done", "terminated", "truncated")
    # Root entries that do not carry over to the next step's input (as in ``step_mdp``).
    _NOT_CARRIED = frozenset(("next", "reward", "_reset", *_DONE_KEYS))

    def __init__(self, spec: EnvSpec, seed: int = 0, obs_norm: ObsNorm | None = None,
                 update_norm: bool = True, num_envs: int | None = None,
                 num_threads: int = 1, parts: Sequence[int] | None = None,
                 render_mode: str | None = None) -> None:
        n = spec.num_envs if num_envs is None else num_envs
        check(isinstance(n, int) and n >= 1, "num_envs", "an integer >= 1", n)
        backend_name = resolve_backend(spec)
        if render_mode and backend_name != "torchrl":
            backend_name = "gymnasium"
        make = BACKENDS[backend_name]
        if render_mode and backend_name == "gymnasium":
            make = functools.partial(GymnasiumVector, render_mode=render_mode)
        sizes = [int(k) for k in parts or () if k > 0]
        if backend_name == "envpool" and len(sizes) > 1:
            check(sum(sizes) == n, "parts", f"sizes summing to num_envs={n}", list(parts or ()))
            backend: Any = _Split(lambda k, s: make(spec, k, s, num_threads), sizes, seed)
            slot_parts = backend.slices
        else:
            backend = make(spec, n, seed, num_threads)
            slot_parts = [slice(0, n)]
        native = bool(getattr(backend, "torch_native", False))
        device = torch.device(backend.device) if native else torch.device("cpu")
        super().__init__(batch_size=torch.Size([n]), device=device)
        self.spec_ = spec
        self.num_envs = n
        self.backend_name, self.backend, self.parts = backend_name, backend, slot_parts
        self.torch_native = native
        self.info = info_from_spaces(spec.id, self.backend.observation_space,
                                      self.backend.action_space,
                                      bool(getattr(self.backend, "masked", False)))
        if self.info.obs_shapes is not None and backend_name not in NAMED_OBS_BACKENDS:
            backend.close()
            raise ConfigError("backend", f"{spec.id}: a Dict/Tuple observation runs on the "
                                         f"{' or '.join(NAMED_OBS_BACKENDS)} backend, not "
                                         f"{backend_name}")
        self._obs_dtype: Any = np.uint8 if self.info.image else np.float32
        if self.info.obs_shapes is not None:
            self._obs_dtype = {key: np.uint8 if key in self.info.images else np.float32
                               for key in self.info.obs_shapes}
        self.obs_norm, self.update_norm = obs_norm, update_norm
        self._seed: int | None = seed
        self._run = _Running(n, device if native else None)
        self._restored = False
        self._continue = False
        self._finished: list[tuple[float, int]] = []
        self.episodes_done: Any = (torch.zeros(n, dtype=torch.int64, device=device) if native
                                   else np.zeros(n, dtype=np.int64))
        self._make_specs()

    def _make_specs(self) -> None:
        n, info = self.num_envs, self.info

        def entry(shape: tuple[int, ...], image: bool) -> Any:
            if image:
                return Bounded(0, 255, shape=(n, *shape), dtype=torch.uint8)
            return Unbounded(shape=(n, *shape), dtype=torch.float32)

        if info.obs_shapes is None:
            obs = entry(info.obs_shape, info.image)
        else:  # named entries: a sub-Composite under "observation"
            obs = Composite({key: entry(shape, key in info.images)
                             for key, shape in info.obs_shapes.items()}, shape=(n,))
        self.observation_spec = Composite(observation=obs, shape=(n,))
        if info.masked:
            self.observation_spec["action_mask"] = Binary(info.act_dim, shape=(n, info.act_dim),
                                                          dtype=torch.bool)
        self._low: np.ndarray | None = None
        self._high: np.ndarray | None = None
        if info.nvec is not None:
            self.action_spec = MultiCategorical(torch.tensor(info.nvec).expand(n, -1),
                                                shape=(n, len(info.nvec)), dtype=torch.int64)
        elif info.discrete:
            self.action_spec = Categorical(info.act_dim, shape=(n,), dtype=torch.int64)
        else:
            self.action_spec = Bounded(info.action_low.expand(n, -1),
                                       info.action_high.expand(n, -1),
                                       shape=(n, info.act_dim), dtype=torch.float32)
            self._low = info.action_low.numpy()
            self._high = info.action_high.numpy()
        self.reward_spec = Unbounded(shape=(n, 1), dtype=torch.float32)
        self.done_spec = Composite(
            done=Categorical(2, shape=(n, 1), dtype=torch.bool),
            terminated=Categorical(2, shape=(n, 1), dtype=torch.bool),
            truncated=Categorical(2, shape=(n, 1), dtype=torch.bool), shape=(n,))
        if self.torch_native and self._low is not None:
            self._low_t = torch.as_tensor(self._low, device=self.device)
            self._high_t = torch.as_tensor(self._high, device=self.device)

    @property
    def finished(self) -> list[tuple[float, int]]:
        """``(return, length)`` of the episodes completed since the last :meth:`pop_finished`,
        in completion order."""
        if self._run.ended:
            self._collect_ended()
        return self._finished

    def _collect_ended(self) -> None:
        """Turn a torch-native backend's recorded episode ends into ``finished`` entries (one
        host copy for all steps since the last read)."""
        for _, done, ret, length in self._run.ended:
            idx = done.nonzero().squeeze(-1)
            self._finished.extend(zip(ret[idx].tolist(), length[idx].tolist()))
        self._run.ended.clear()

    def _as_array(self, obs: Any) -> Any:
        """Observations in the spec's dtype (a float64 → float32 copy, or ``obs`` itself); a
        dict of them for named entries."""
        if isinstance(self._obs_dtype, dict):
            return {key: np.asarray(obs[key], dtype=dtype)
                    for key, dtype in self._obs_dtype.items()}
        return np.asarray(obs, dtype=self._obs_dtype)

    def _to_tensor(self, obs: Any, update: bool) -> Any:
        if isinstance(obs, dict):
            t: Any = self._td({k: torch.from_numpy(v) for k, v in obs.items()},
                              len(next(iter(obs.values()))))
        else:
            t = torch.from_numpy(obs)
        if self.obs_norm is not None:
            if update and self.update_norm:
                self.obs_norm.update(t)
            t = self.obs_norm(t)
        return t

    def _td(self, entries: dict[str, Any], size: int | None = None) -> TensorDict:
        # Entries are built here with the env's (or a slot group's) batch size, on the env's
        # device: the validation the public constructor runs on every entry would only repeat
        # that (TorchRL's own gym/brax wrappers build their step outputs the same way).
        batch = self.batch_size if size is None else torch.Size([size])
        return TensorDict._new_unsafe(entries, batch_size=batch, device=self.device)

    def _not_done(self) -> dict[str, torch.Tensor]:
        n = self.num_envs
        if self.torch_native:
            return {key: torch.zeros((n, 1), dtype=torch.bool, device=self.device)
                    for key in self._DONE_KEYS}
        return {key: torch.from_numpy(np.zeros((n, 1), dtype=bool)) for key in self._DONE_KEYS}

    def _normed(self, obs: Any, update: bool) -> Any:
        """A torch-native backend's observations (a TensorDict for named entries), through
        ``obs_norm`` if there is one."""
        if isinstance(obs, dict):
            obs = self._td(dict(obs), len(next(iter(obs.values()))))
        if self.obs_norm is None:
            return obs
        if update and self.update_norm:
            self.obs_norm.update(obs)
        return self.obs_norm(obs)

    def _set_seed(self, seed: int | None) -> None:
        self._seed = seed

    def _reset(self, tensordict: TensorDictBase | None = None, **kwargs: Any) -> TensorDictBase:
        run = self._run
        partial = tensordict is not None and "_reset" in tensordict.keys()
        if self._continue:
            # The first reset after continue_episodes() goes on with the restored episodes.
            self._continue = False
        elif not partial or run.obs is None:
            obs = self.backend.reset(self._seed)
            self._seed = None
            run.ep_return[:] = 0.0
            run.ep_length[:] = 0
            run.obs = (self._normed(obs, update=True) if self.torch_native else
                       self._to_tensor(self._as_array(obs), update=True))
            if self.info.masked:
                run.mask = self._mask_tensor(self.backend.mask)
                if run.mask.shape[-1] != self.info.act_dim:
                    raise UserError(f"{self.spec_.id}: the env's action masks have "
                                    f"{run.mask.shape[-1]} entries; expected "
                                    f"{self.info.act_dim} (one per logit of "
                                    f"{self.info.describe_actions(masks=False)})")
        # With same-step autoreset, envs that finished were already reset in _step and their
        # first observation is waiting in run.obs.
        return self._td({"observation": run.obs, **self._masks(), **self._not_done()})

    def _mask_tensor(self, mask: Any) -> torch.Tensor:
        return (mask.to(self.device, torch.bool) if isinstance(mask, torch.Tensor)
                else torch.from_numpy(np.asarray(mask, dtype=bool)))

    def _masks(self, sl: slice | None = None) -> dict[str, torch.Tensor]:
        """``{"action_mask": ...}`` of the observations the next step starts from (all slots,
        or slots ``sl``), or nothing for an env without masks."""
        if not self.info.masked:
            return {}
        assert self._run.mask is not None, "action masks before the first reset"
        return {"action_mask": self._run.mask if sl is None else self._run.mask[sl]}

    def action_mask(self, sl: slice | None = None) -> torch.Tensor | None:
        """The action masks ``[k, A]`` of the observations the next step of slots ``sl``
        (default: all) starts from, or ``None`` for an env without masks."""
        return self._masks(sl).get("action_mask")

    def _action_array(self, action: torch.Tensor) -> Any:
        if self.torch_native:
            action = action.detach().to(self.device)
            if self._low is not None:
                action = torch.minimum(torch.maximum(action, self._low_t), self._high_t)
            return action
        action = action.numpy(force=True)  # detach, to CPU, numpy: one call
        if self._low is not None:
            # np.clip's Python-level dispatch costs more than the two ufuncs on small arrays.
            action = np.minimum(np.maximum(action, self._low), self._high)
        return action

    def _step(self, tensordict: TensorDictBase) -> TensorDictBase:
        out = self.backend.step(self._action_array(tensordict.get("action")))
        next_td, self._run.obs = self._finish(slice(0, self.num_envs), *out)
        return next_td

    def send_part(self, part: int, action: torch.Tensor) -> None:
        """Start a step of slot group ``part`` (``self.parts[part]``) and return at once."""
        backend = self.backend.parts[part] if isinstance(self.backend, _Split) else self.backend
        if hasattr(backend, "send"):
            backend.send(self._action_array(action))
        else:  # a backend without send/recv steps at recv_part
            self._run.action = action

    def recv_part(self, part: int) -> tuple[TensorDictBase, torch.Tensor]:
        """Finish the step :meth:`send_part` started: the group's ``next`` entries (as
        :meth:`step` gives them) and the observations its next step starts from."""
        backend = self.backend.parts[part] if isinstance(self.backend, _Split) else self.backend
        # The whole-env observation is not kept up to date part by part: a later reset or
        # step of the whole env starts afresh.
        self._run.obs = None
        if hasattr(backend, "recv"):
            out = backend.recv()
        else:
            action, self._run.action = self._run.action, None
            assert action is not None, "recv_part without send_part"
            out = backend.step(self._action_array(action))
        return self._finish(self.parts[part], *out)

    def _finish(self, sl: slice, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray, final: np.ndarray | None
                ) -> tuple[TensorDictBase, torch.Tensor]:
        """Book a step of slots ``sl``: the ``next`` entries and the observations the slots'
        next step starts from (the next episode's first one where an episode ended)."""
        if self.torch_native:
            return self._finish_native(sl, obs, reward, terminated, truncated, final)
        run = self._run
        done = terminated | truncated
        ep_return, ep_length = run.ep_return[sl], run.ep_length[sl]  # views
        ep_return += reward
        ep_length += 1
        first_obs = self._as_array(obs)
        last_obs = first_obs
        any_done = bool(done.any())
        if any_done:
            named = isinstance(first_obs, dict)
            last_obs = ({k: v.copy() for k, v in first_obs.items()} if named
                        else first_obs.copy())
            for i in np.flatnonzero(done):
                if named:
                    for key, value in last_obs.items():
                        value[i] = final[i][key]
                else:
                    last_obs[i] = final[i]
                self._finished.append((float(ep_return[i]), int(ep_length[i])))
            self.episodes_done[sl] += done
            ep_return[done] = 0.0
            ep_length[done] = 0
        next_obs = self._to_tensor(last_obs, update=True)
        start = self._to_tensor(first_obs, update=False) if any_done else next_obs
        # Trailing dimensions are added in numpy, where a view costs a fraction of a torch op.
        return self._td({
            "observation": next_obs, **self._step_masks(sl),
            "reward": torch.from_numpy(reward.astype(np.float32)[:, None]),
            "done": torch.from_numpy(done[:, None]),
            "terminated": torch.from_numpy(terminated[:, None]),
            "truncated": torch.from_numpy(truncated[:, None]),
        }, len(reward)), start

    def _finish_native(self, sl: slice, obs: torch.Tensor, reward: torch.Tensor,
                       terminated: torch.Tensor, truncated: torch.Tensor,
                       final: torch.Tensor | None) -> tuple[TensorDictBase, torch.Tensor]:
        """:meth:`_finish` for a torch-native backend: the same entries, in torch on the env's
        device, without a host copy (episode ends are recorded as tensors)."""
        run = self._run
        done = terminated | truncated
        ep_return, ep_length = run.ep_return[sl], run.ep_length[sl]  # views
        ep_return += reward
        ep_length += 1
        if final is None:
            next_obs = start = self._normed(obs, update=True)
        else:
            def last(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
                return torch.where(done.reshape(-1, *[1] * (now.ndim - 1)), then.to(now.dtype),
                                   now)

            ended = ({key: last(obs[key], final[key]) for key in obs}
                     if isinstance(obs, dict) else last(obs, final))
            next_obs = self._normed(ended, update=True)
            start = self._normed(obs, update=False)
            run.ended.append((sl, done.clone(), ep_return.clone(), ep_length.clone()))
            self.episodes_done[sl] += done
            ep_return.masked_fill_(done, 0.0)
            ep_length.masked_fill_(done, 0)
        return self._td({
            "observation": next_obs, **self._step_masks(sl),
            "reward": reward.to(torch.float32).unsqueeze(-1),
            "done": done.unsqueeze(-1),
            "terminated": terminated.unsqueeze(-1),
            "truncated": truncated.unsqueeze(-1),
        }, len(reward)), start

    def _step_masks(self, sl: slice) -> dict[str, torch.Tensor]:
        """After a step of slots ``sl``: record the masks its next step starts from and return
        ``{"action_mask": ...}`` of the observations it ended in (nothing without masks)."""
        if not self.info.masked:
            return {}
        run, backend = self._run, self.backend
        start = self._mask_tensor(backend.mask)
        if run.mask is None or start.shape[0] == run.mask.shape[0]:
            run.mask = start
        else:
            run.mask[sl] = start
        return {"action_mask": self._mask_tensor(backend.final_mask)}

    def _step_and_maybe_reset(
            self, tensordict: TensorDictBase) -> tuple[TensorDictBase, TensorDictBase]:
        """Step; return the step's data and the input of the next step.

        The same result as the base class's ``step`` → ``step_mdp`` → ``maybe_reset``, without
        their generic key bookkeeping: the vector env has already reset finished episodes, so the
        next input is the root entries of ``tensordict`` (action and any other policy outputs)
        with the current observations and cleared done flags.
        """
        keys = tensordict.keys()
        # Partial steps, preset "next" entries, devices to cast and post-step hooks are left to
        # the generic path; a collector's steps never need them.
        if ("_step" in keys or "next" in keys or tensordict.device != self.device
                or self._post_step_mdp_hooks is not None):
            return super()._step_and_maybe_reset(tensordict)
        if tensordict.batch_size != self.batch_size:
            raise RuntimeError(f"Expected a tensordict with batch size {self.batch_size}, "
                               f"got {tensordict.batch_size}")
        tensordict.set("next", self._step(tensordict))
        carried = {key: value.copy() if isinstance(value, TensorDictBase) else value
                   for key, value in tensordict.items() if key not in self._NOT_CARRIED}
        return tensordict, self._td({**carried, "observation": self._run.obs, **self._masks(),
                                     **self._not_done()})

    def state_dict(self) -> dict[str, Any] | None:
        """The running episodes (the backend's envs, current observations, returns so far), or
        ``None`` when the backend's envs cannot be saved (a resumed run then starts afresh)."""
        envs = self.backend.state()
        if envs is None:
            return None
        run = self._run
        return {"envs": envs, "seed": self._seed,
                # Named entries as a dict of tensors (what a weights-only checkpoint holds).
                "obs": None if run.obs is None else (
                    run.obs.clone().to_dict() if isinstance(run.obs, TensorDictBase)
                    else run.obs.clone()),
                "mask": None if run.mask is None else run.mask.clone(),
                "ep_return": _copy(run.ep_return), "ep_length": _copy(run.ep_length),
                "episodes_done": _copy(self.episodes_done), "finished": list(self.finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the sub-envs (their episodes and random
        streams), and the running episodes for :meth:`continue_episodes`."""
        self.backend.load(state["envs"])
        # The sub-envs carry their random streams; a seed still pending at the save is kept.
        self._seed = state["seed"]
        run = self._run
        run.obs, run.ep_return, run.ep_length = state["obs"], state["ep_return"], state["ep_length"]
        if isinstance(run.obs, dict):
            run.obs = self._td(run.obs)
        run.mask = state.get("mask")
        self.episodes_done = state["episodes_done"]
        run.ended.clear()
        self._finished = list(state["finished"])
        self._restored = run.obs is not None

    def continue_episodes(self) -> None:
        """Make the next full reset go on with the episodes running when the state was saved
        (what a collector built on a restored env needs); without it, a reset starts new
        episodes from the restored random streams."""
        self._continue, self._restored = self._restored, False

    def pop_finished(self) -> list[tuple[float, int]]:
        """Return and clear the (return, length) pairs of episodes completed since the last call."""
        out, self._finished = self.finished, []
        return out

    def close(self, *, raise_if_closed: bool = True) -> None:
        self.backend.close()
        super().close(raise_if_closed=raise_if_closed)


def make_env(spec: EnvSpec, seed: int, obs_norm: ObsNorm | None = None,
             update_norm: bool = True, num_envs: int | None = None,
             num_threads: int = 1, parts: Sequence[int] | None = None) -> BatchedEnv:
    """Build the batched TorchRL env for ``spec``, seeded with ``seed``.

    Args:
        spec: what to run (and on which backend).
        seed: seed of the first reset (slot ``i`` gets ``seed + i``).
        obs_norm: shared observation normalisation, or ``None``.
        update_norm: whether stepping updates ``obs_norm``.
        num_envs: slots (default ``spec.num_envs``).
        num_threads: threads EnvPool may step the envs on.
        parts: slot groups a rollout steps in a pipeline (see :class:`BatchedEnv`).
    """
    return BatchedEnv(spec, seed=seed, obs_norm=obs_norm, update_norm=update_norm,
                      num_envs=num_envs, num_threads=num_threads, parts=parts)


def halves(n: int, unit: int = 1) -> list[int]:
    """Two slot groups of ``n`` slots, split at a multiple of ``unit`` (``[n]`` if that leaves
    one empty): the split a pipelined rollout uses."""
    first = unit * math.ceil(n // unit / 2)
    return [first, n - first] if 0 < first < n else [n]

