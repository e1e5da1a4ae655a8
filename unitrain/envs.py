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

Atari ids get the usual preprocessing (Mnih et al. 2015; Machado et al. 2018) on either backend:
no-op starts, frame skip 4 with max-pooling, 84×84 grayscale, 4 stacked frames, sticky actions
(p = 0.25) and the minimal action set."""

from __future__ import annotations

import difflib
import functools
import math
import pickle
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector.utils import iterate
from tensordict import TensorDict, TensorDictBase
from torch import nn
from torchrl.data import Bounded, Categorical, Composite, Unbounded
from torchrl.envs import EnvBase

from unitrain.errors import ConfigError, UserError, check
from unitrain.validation import Validated

__all__ = ["EnvSpec", "EnvInfo", "ObsNorm", "BatchedEnv", "make_env", "env_info",
           "derive_seed", "resolve_backend", "envpool_id", "BACKENDS"]


@dataclass
class EnvSpec(Validated):
    """What to collect from.

    Args:
        id: a registered gymnasium id, e.g. ``"CartPole-v1"``, ``"HalfCheetah-v5"``,
            ``"ALE/Pong-v5"``.
        num_envs: copies run vectorised in one process (per rank).
        obs_norm: normalise observations with running mean/std (clipped to ±5), statistics
            merged across ranks and saved in checkpoints.
        max_episode_steps: override the env's time limit (``None`` keeps the registered one).
        frame_stack: frames stacked for Atari ids (ignored otherwise).
        kwargs: extra keyword arguments for ``gymnasium.make`` (such an env runs on gymnasium).
        backend: who simulates the envs: ``"gymnasium"`` (Python envs in this process),
            ``"envpool"`` (EnvPool's C++ envs on their own threads, for the ids it provides) or
            ``"auto"``: EnvPool for the MuJoCo and Atari ids it provides when it is installed,
            gymnasium otherwise (see :func:`resolve_backend`).
    """

    id: str = "CartPole-v1"
    num_envs: int = 8
    obs_norm: bool = False
    max_episode_steps: int | None = None
    frame_stack: int = 4
    kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"

    block: ClassVar[str] = "env"

    def validate(self) -> None:
        check(isinstance(self.num_envs, int) and self.num_envs >= 1, "num_envs",
              "an integer >= 1", self.num_envs)
        check(self.max_episode_steps is None or self.max_episode_steps >= 1,
              "max_episode_steps", "an integer >= 1 or null", self.max_episode_steps)
        check(self.frame_stack >= 1, "frame_stack", "an integer >= 1", self.frame_stack)
        check(self.backend in BACKEND_CHOICES, "backend", "one of " + ", ".join(BACKEND_CHOICES),
              self.backend)
        validate_env_id(self.id)
        if self.backend == "envpool":
            resolve_backend(self)  # says now if EnvPool cannot run this id

    @property
    def is_atari(self) -> bool:
        return self.id.startswith("ALE/")


def _register_ale() -> None:
    try:
        import ale_py
    except ImportError:  # pragma: no cover - ale-py is a declared dependency
        return
    gym.register_envs(ale_py)


def validate_env_id(env_id: str) -> None:
    """Raise a :class:`ConfigError` naming close matches if ``env_id`` is not registered."""
    if env_id.startswith("ALE/"):
        _register_ale()
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see gymnasium.registry for valid ids"
    raise ConfigError("id", f"unknown gymnasium env {env_id!r}; {hint}")


BACKEND_CHOICES = ("auto", "gymnasium", "envpool")
_warned_missing_envpool = False


@functools.lru_cache(maxsize=None)
def _envpool_ids() -> frozenset[str] | None:
    try:
        import envpool
    except ImportError:
        return None
    return frozenset(envpool.list_all_envs())


def envpool_id(env_id: str) -> str | None:
    """EnvPool's name for a gymnasium id (``ALE/Pong-v5`` is ``Pong-v5``), or ``None`` when
    EnvPool is not installed or does not provide the env."""
    ids = _envpool_ids()
    name = env_id[len("ALE/"):] if env_id.startswith("ALE/") else env_id
    return name if ids is not None and name in ids else None


def _is_mujoco(env_id: str) -> bool:
    entry = gym.spec(env_id).entry_point if env_id in gym.registry else None
    return isinstance(entry, str) and ".mujoco." in entry


def resolve_backend(spec: "EnvSpec") -> str:
    """The backend that runs ``spec``: ``"gymnasium"`` or ``"envpool"``.

    ``"auto"`` picks EnvPool for MuJoCo and Atari ids when EnvPool provides them (their physics
    and emulation are where the time goes, and EnvPool runs them in C++ on its own threads) and
    gymnasium for everything else (classic control steps in microseconds either way, and envs
    built with extra ``kwargs`` are gymnasium's). If EnvPool is not installed, ``"auto"`` falls
    back to gymnasium with one warning.

    Raises:
        ConfigError: ``"envpool"`` asked for an id EnvPool cannot run here.
    """
    global _warned_missing_envpool
    if spec.backend == "gymnasium":
        return "gymnasium"
    native = envpool_id(spec.id) if not spec.kwargs else None
    if spec.backend == "envpool":
        if _envpool_ids() is None:
            raise ConfigError("backend", "envpool is not installed (pip install envpool); "
                                         "use backend: gymnasium or auto")
        if native is None:
            why = "extra kwargs need gymnasium" if spec.kwargs else "EnvPool does not provide it"
            raise ConfigError("backend", f"envpool cannot run {spec.id} ({why}); use "
                                         "backend: gymnasium or auto")
        return "envpool"
    heavy = spec.is_atari or _is_mujoco(spec.id)
    if heavy and native is None and _envpool_ids() is None and not _warned_missing_envpool:
        _warned_missing_envpool = True
        warnings.warn("envpool is not installed: MuJoCo and Atari envs run on gymnasium "
                      "(slower); pip install envpool", stacklevel=2)
    return "envpool" if heavy and native is not None else "gymnasium"


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed derived from integers (run seed, rank, stream, ...), collision-resistant."""
    return int(np.random.SeedSequence([abs(int(e)) for e in entropy]).generate_state(1)[0] >> 1)


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights that average each output cell's span of input pixels.

    Downscaling with them on both axes is area interpolation (OpenCV's ``INTER_AREA``).
    """
    scale = size_in / size_out
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(math.floor(lo), min(math.ceil(hi), size_in)):
            weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    return weights


class _AtariFrames(gym.Wrapper):
    """Atari preprocessing (Mnih et al. 2015) without an OpenCV dependency.

    The same steps as ``gymnasium.wrappers.AtariPreprocessing`` with ``grayscale_obs=True`` and
    ``terminal_on_life_loss=False``: 1 to ``noop_max`` no-op actions after each reset, every
    action repeated ``frame_skip`` times with rewards summed, the last two grayscale screens
    max-pooled and area-resized to ``screen_size × screen_size`` uint8.
    """

    def __init__(self, env: gym.Env, noop_max: int = 30, frame_skip: int = 4,
                 screen_size: int = 84) -> None:
        super().__init__(env)
        self.noop_max, self.frame_skip = noop_max, frame_skip
        self._ale = env.unwrapped.ale
        height, width = self._ale.getScreenDims()
        self._screens = np.zeros((2, height, width), dtype=np.uint8)
        self._rows = _area_weights(height, screen_size)
        self._cols = np.ascontiguousarray(_area_weights(width, screen_size).T)
        self.observation_space = gym.spaces.Box(0, 255, (screen_size, screen_size), np.uint8)

    def _observation(self) -> np.ndarray:
        frame = self._screens[0]
        if self.frame_skip > 1:
            frame = np.maximum(frame, self._screens[1])
        small = self._rows @ frame.astype(np.float32) @ self._cols
        return np.rint(small).astype(np.uint8)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        noops = 0
        if self.noop_max > 0:
            noops = int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))
        for _ in range(noops):
            _, _, terminated, truncated, step_info = self.env.step(0)
            info.update(step_info)
            if terminated or truncated:
                _, info = self.env.reset(seed=seed, options=options)
        self._ale.getScreenGrayscale(self._screens[0])
        self._screens[1].fill(0)
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total, terminated, truncated, info = 0.0, False, False, {}
        for t in range(self.frame_skip):
            _, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
            if t >= self.frame_skip - 2:
                self._ale.getScreenGrayscale(self._screens[self.frame_skip - 1 - t])
        return self._observation(), total, terminated, truncated, info


def _route_mujoco_warnings() -> None:
    """Send MuJoCo's C-level warnings through :mod:`warnings`, so a model-compiler warning shows
    once per run instead of once per env on stderr."""
    try:
        import mujoco
    except ImportError:  # pragma: no cover - MuJoCo is a declared dependency
        return
    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(lambda message: warnings.warn(f"MuJoCo: {message}",
                                                                  stacklevel=2))


# Optional dependencies of gymnasium's env families, by the name gymnasium's message gives, and
# the extra of unitrain that installs each.
_EXTRAS = {"Box2D": ("box2d", "pip install swig && pip install 'unitrain[box2d]'")}


def _gym_make(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make``, with a missing optional dependency reported as one line."""
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        message = str(e).split(",")[0].strip().rstrip(".")
        hint = next((cmd for name, (_, cmd) in _EXTRAS.items() if name in message),
                    "install the package it names")
        raise UserError(f"env.id={env_id}: {message}; to use it: {hint}") from None


def _make_single(spec: EnvSpec, render_mode: str | None = None) -> gym.Env:
    _route_mujoco_warnings()
    kwargs = dict(spec.kwargs)
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if spec.is_atari:
        _register_ale()
        # _AtariFrames skips frames itself (the base env must not) and reads the screen from the
        # emulator, so the base env's own observation can be the cheapest one.
        kwargs = {"repeat_action_probability": 0.25, "obs_type": "grayscale", **kwargs,
                  "frameskip": 1}
        env = _AtariFrames(_gym_make(spec.id, **kwargs), noop_max=30, frame_skip=4,
                           screen_size=84)
        return gym.wrappers.FrameStackObservation(env, spec.frame_stack)
    return _gym_make(spec.id, **kwargs)


@dataclass
class EnvInfo:
    """The shapes a module needs, read from the env's spaces.

    ``obs_dim`` is the flattened observation size; ``act_dim`` is the number of actions (discrete)
    or the action vector size (continuous).
    """

    id: str
    obs_shape: tuple[int, ...]
    obs_dim: int
    act_dim: int
    discrete: bool
    action_low: torch.Tensor | None = None
    action_high: torch.Tensor | None = None
    image: bool = False

    def module_kwargs(self) -> dict[str, Any]:
        """Constructor arguments a module may take by name."""
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "obs_shape": self.obs_shape,
                "discrete": self.discrete}


def env_info(spec: EnvSpec) -> EnvInfo:
    """Read observation and action shapes for ``spec`` from one env instance."""
    env = _make_single(spec)
    try:
        return _info_from_spaces(spec.id, env.observation_space, env.action_space)
    finally:
        env.close()


def _info_from_spaces(env_id: str, obs_space: gym.Space, act_space: gym.Space) -> EnvInfo:
    if not isinstance(obs_space, gym.spaces.Box):
        raise ConfigError("id", f"{env_id}: observation space {obs_space} is not supported; "
                                "unitrain supports Box observations")
    obs_shape = tuple(int(s) for s in obs_space.shape)
    image = obs_space.dtype == np.uint8
    if isinstance(act_space, gym.spaces.Discrete):
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.n), True, image=image)
    if isinstance(act_space, gym.spaces.Box) and len(act_space.shape) == 1:
        return EnvInfo(env_id, obs_shape, math.prod(obs_shape), int(act_space.shape[0]), False,
                       torch.as_tensor(act_space.low, dtype=torch.float32),
                       torch.as_tensor(act_space.high, dtype=torch.float32), image=image)
    raise ConfigError("id", f"{env_id}: action space {act_space} is not supported; "
                            "unitrain supports Discrete and 1-D Box actions")


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
        if self.count <= 1:
            return x
        std = (self.m2 / self.count).sqrt().to(x.dtype) + self.eps
        return ((x - self.mean.to(x.dtype)) / std).clamp(-self.clip, self.clip)


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


class _SameStepSyncVectorEnv(gym.vector.SyncVectorEnv):
    """A gymnasium ``SyncVectorEnv`` with same-step autoreset whose step skips the info dicts.

    ``SyncVectorEnv.step`` merges every sub-env's info dict into batched arrays, one small numpy
    write per env and key: with 32 MuJoCo envs that is about a tenth of the whole vector step.
    :class:`BatchedEnv` reads only the final observation of finished episodes, so this step
    returns just ``{"final_obs", "_final_obs"}`` (as gymnasium does, and only when an episode
    ended). Observations, rewards and flags are the same as the parent's; reset is the parent's.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]]) -> None:
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          dict[str, Any]]:
        n = self.num_envs
        observations = []
        rewards = np.zeros(n)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        final_obs: np.ndarray | None = None
        for i, (env, action) in enumerate(zip(self.envs, iterate(self.action_space, actions))):
            obs, rewards[i], terminated[i], truncated[i], _ = env.step(action)
            if terminated[i] or truncated[i]:
                if final_obs is None:
                    final_obs = np.full(n, None, dtype=object)
                final_obs[i] = obs
                obs, _ = env.reset()
            observations.append(obs)
        infos: dict[str, Any] = {}
        if final_obs is not None:
            infos = {"final_obs": final_obs, "_final_obs": terminated | truncated}
        return np.stack(observations), rewards, terminated, truncated, infos


class _Running:
    """Per-step mutable state of a :class:`BatchedEnv`.

    Kept off the env itself: every attribute assignment on an ``EnvBase`` (an ``nn.Module``),
    including ``self.x += ...`` on an array, goes through two ``__setattr__`` overrides, and a
    step makes several.
    """

    __slots__ = ("obs", "ep_return", "ep_length")

    def __init__(self, num_envs: int) -> None:
        self.obs: torch.Tensor | None = None  # what the next step starts from
        self.ep_return = np.zeros(num_envs)
        self.ep_length = np.zeros(num_envs, dtype=np.int64)


class _GymnasiumVector:
    """The ``gymnasium`` backend: one same-step :class:`_SameStepSyncVectorEnv` in this process.

    ``step`` returns the first observation of the next episode for slots whose episode ended
    (autoreset in the same step) and, separately, the observations the step ended in.
    """

    name = "gymnasium"

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int,
                 render_mode: str | None = None) -> None:
        del seed, num_threads  # seeded at the first reset; steps in this thread
        self.vec = _SameStepSyncVectorEnv([lambda: _make_single(spec, render_mode)
                                           for _ in range(num_envs)])
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space

    def reset(self, seed: int | list[int] | None) -> np.ndarray:
        obs, _ = self.vec.reset(seed=seed)
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        """``(obs, reward, terminated, truncated, final)``: ``final[i]`` is the observation slot
        ``i``'s ended episode ended in (``None`` when no episode ended)."""
        obs, reward, terminated, truncated, infos = self.vec.step(action)
        return obs, reward, terminated, truncated, infos.get("final_obs")

    def send(self, action: np.ndarray) -> None:
        """Start a step (gymnasium steps in this thread: at :meth:`recv`)."""
        self._action = action

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Finish the step :meth:`send` started; what :meth:`step` returns."""
        return self.step(self._action)

    def state(self) -> bytes | None:
        """Every sub-env pickled, or ``None`` when they cannot be restored from a pickle.

        Envs pickled by re-construction (``gymnasium.utils.EzPickle``: MuJoCo, Atari, Box2D)
        would come back at their initial state, so they are not saved.
        """
        for env in self.vec.envs:
            layer: Any = env
            while layer is not None:
                if isinstance(layer, gym.utils.EzPickle):
                    return None
                layer = getattr(layer, "env", None)
        try:
            return pickle.dumps(list(self.vec.envs))
        except Exception:  # an env holding an unpicklable resource
            return None

    def load(self, state: bytes) -> None:
        envs = pickle.loads(state)
        if len(envs) != len(self.vec.envs):
            raise ValueError(f"saved env state has {len(envs)} envs, this env {len(self.vec.envs)}")
        for old in self.vec.envs:
            old.close()
        self.vec.envs = envs

    def close(self) -> None:
        self.vec.close()


class _EnvPoolVector:
    """The ``envpool`` backend: EnvPool's C++ pool of ``num_envs`` envs (stepped on up to
    ``num_threads`` threads of its own), made to autoreset in the same step.

    EnvPool autoresets on the step *after* an episode ends (that step ignores its action and
    returns reward 0); here the slots whose episode ended are reset right away with a partial
    ``reset(env_id=...)``, so every step is a real step of every slot, as with gymnasium.
    EnvPool seeds each env once, when the pool is made (a seed per env); a seeded reset
    therefore makes a new pool with those seeds (about 0.1 s for 64 MuJoCo envs), so an episode
    seeded with ``s`` is the same whichever slot plays it.
    Atari ids get the settings of the gymnasium path (no-op starts, frame skip 4 with
    max-pooling, 84×84 grayscale, ``frame_stack`` frames, sticky actions 0.25, no fire reset, no
    episodic life, unclipped rewards), the preprocessing done in C++.
    """

    name = "envpool"

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int) -> None:
        self.kwargs: dict[str, Any] = {"num_envs": num_envs, "batch_size": num_envs,
                                       "num_threads": num_threads}
        if spec.max_episode_steps is not None:
            self.kwargs["max_episode_steps"] = spec.max_episode_steps
        if spec.is_atari:
            self.kwargs.update(repeat_action_probability=0.25, noop_max=30, frame_skip=4,
                               episodic_life=False, reward_clip=False, use_fire_reset=False,
                               stack_num=spec.frame_stack, img_height=84, img_width=84,
                               gray_scale=True)
        self.task = envpool_id(spec.id)
        self.num_envs = num_envs
        self.seeds = self._seeds(seed or 0)
        self.pool = self._make()
        self.stepped = False
        self.observation_space = self.pool.observation_space
        self.action_space = self.pool.action_space

    def _seeds(self, seed: int | list[int]) -> list[int]:
        return [int(s) for s in seed] if isinstance(seed, list) else [
            int(seed) + i for i in range(self.num_envs)]

    def _make(self) -> Any:
        import envpool

        return envpool.make_gymnasium(self.task, seed=self.seeds, **self.kwargs)

    def reset(self, seed: int | list[int] | None) -> np.ndarray:
        if seed is not None:
            seeds = self._seeds(seed)
            if seeds != self.seeds or self.stepped:
                self.pool.close()
                self.seeds = seeds
                self.pool = self._make()
        self.stepped = True
        obs, _ = self.pool.reset()
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        self.send(action)
        return self.recv()

    def send(self, action: np.ndarray) -> None:
        """Hand the actions to EnvPool's threads and return at once."""
        self.pool.send(action)

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Wait for the step :meth:`send` started; reset the slots whose episode ended."""
        obs, reward, terminated, truncated, _ = self.pool.recv()
        done = terminated | truncated
        if not done.any():
            return obs, reward, terminated, truncated, None
        ended = np.flatnonzero(done)
        first, _ = self.pool.reset(env_id=ended)
        final = obs
        obs = obs.copy()
        obs[ended] = first
        return obs, reward, terminated, truncated, final

    def state(self) -> None:
        """EnvPool's envs cannot be saved: a resumed run starts their episodes afresh."""
        return None

    def load(self, state: bytes) -> None:
        raise ValueError("an EnvPool env has no saved state to load")

    def close(self) -> None:
        self.pool.close()


class _Split:
    """Slots split into groups, each with a backend (and, on EnvPool, threads) of its own.

    :meth:`step` steps every group (all started before any is waited for); a rollout can instead
    :meth:`send` to one group and run the policy of another while the first one's envs step
    (:func:`unitrain.rollout.rollout`). Slot ``i`` is the same env, with the same seed, as in an
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


# Backends by name (EnvSpec.backend, after resolve_backend).
BACKENDS: dict[str, Callable[[EnvSpec, int, int | None, int], Any]] = {
    "gymnasium": _GymnasiumVector, "envpool": _EnvPoolVector}


class BatchedEnv(EnvBase):
    """``num_envs`` copies of an env, stepped together, as a batched TorchRL env.

    The copies come from a backend (:data:`BACKENDS`): gymnasium's envs in this process, or
    EnvPool's C++ pool with its own threads. Either way the env autoresets in the same step, so
    when episode ``i`` ends,
    ``("next", "observation")[i]`` is the episode's final observation (for bootstrapping) and the
    first observation of the next episode is what the env delivers as ``"observation"`` on the
    following step: directly from :meth:`step_and_maybe_reset` (the collector's path), or from
    the partial reset that :meth:`~torchrl.envs.EnvBase.maybe_reset` issues after :meth:`step`.

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
        episodes_done: number of completed episodes per env slot, ``[num_envs]`` int64.
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
        super().__init__(batch_size=torch.Size([n]), device=torch.device("cpu"))
        self.spec_ = spec
        self.num_envs = n
        self.backend_name = "gymnasium" if render_mode else resolve_backend(spec)
        make = BACKENDS[self.backend_name]
        if render_mode:
            make = functools.partial(_GymnasiumVector, render_mode=render_mode)
        sizes = [int(k) for k in parts or () if k > 0]
        if self.backend_name == "envpool" and len(sizes) > 1:
            check(sum(sizes) == n, "parts", f"sizes summing to num_envs={n}", list(parts or ()))
            self.backend = _Split(lambda k, s: make(spec, k, s, num_threads), sizes, seed)
            self.parts = self.backend.slices
        else:
            self.backend = make(spec, n, seed, num_threads)
            self.parts = [slice(0, n)]
        self.info = _info_from_spaces(spec.id, self.backend.observation_space,
                                      self.backend.action_space)
        self._obs_dtype = np.uint8 if self.info.image else np.float32
        self.obs_norm, self.update_norm = obs_norm, update_norm
        self._seed: int | None = seed
        self._run = _Running(n)
        self._restored = False
        self._continue = False
        self.finished: list[tuple[float, int]] = []
        self.episodes_done = np.zeros(n, dtype=np.int64)
        self._make_specs()

    def _make_specs(self) -> None:
        n, info = self.num_envs, self.info
        if info.image:
            obs = Bounded(0, 255, shape=(n, *info.obs_shape), dtype=torch.uint8)
        else:
            obs = Unbounded(shape=(n, *info.obs_shape), dtype=torch.float32)
        self.observation_spec = Composite(observation=obs, shape=(n,))
        self._low: np.ndarray | None = None
        self._high: np.ndarray | None = None
        if info.discrete:
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

    def _as_array(self, obs: np.ndarray) -> np.ndarray:
        """Observations in the spec's dtype (a float64 → float32 copy, or ``obs`` itself)."""
        return np.asarray(obs, dtype=self._obs_dtype)

    def _to_tensor(self, obs: np.ndarray, update: bool) -> torch.Tensor:
        t = torch.from_numpy(obs)
        if self.obs_norm is not None:
            if update and self.update_norm:
                self.obs_norm.update(t)
            t = self.obs_norm(t).to(torch.float32)
        return t

    def _td(self, entries: dict[str, Any], size: int | None = None) -> TensorDict:
        # Entries are built here with the env's (or a slot group's) batch size, on the env's
        # device: the validation the public constructor runs on every entry would only repeat
        # that (TorchRL's own gym/brax wrappers build their step outputs the same way).
        batch = self.batch_size if size is None else torch.Size([size])
        return TensorDict._new_unsafe(entries, batch_size=batch, device=self.device)

    def _not_done(self) -> dict[str, torch.Tensor]:
        n = self.num_envs
        return {key: torch.from_numpy(np.zeros((n, 1), dtype=bool)) for key in self._DONE_KEYS}

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
            run.obs = self._to_tensor(self._as_array(obs), update=True)
        # With same-step autoreset, envs that finished were already reset in _step and their
        # first observation is waiting in run.obs.
        return self._td({"observation": run.obs, **self._not_done()})

    def _action_array(self, action: torch.Tensor) -> np.ndarray:
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
        backend.send(self._action_array(action))

    def recv_part(self, part: int) -> tuple[TensorDictBase, torch.Tensor]:
        """Finish the step :meth:`send_part` started: the group's ``next`` entries (as
        :meth:`step` gives them) and the observations its next step starts from."""
        backend = self.backend.parts[part] if isinstance(self.backend, _Split) else self.backend
        # The whole-env observation is not kept up to date part by part: a later reset or
        # step of the whole env starts afresh.
        self._run.obs = None
        return self._finish(self.parts[part], *backend.recv())

    def _finish(self, sl: slice, obs: np.ndarray, reward: np.ndarray, terminated: np.ndarray,
                truncated: np.ndarray, final: np.ndarray | None
                ) -> tuple[TensorDictBase, torch.Tensor]:
        """Book a step of slots ``sl``: the ``next`` entries and the observations the slots'
        next step starts from (the next episode's first one where an episode ended)."""
        run = self._run
        done = terminated | truncated
        ep_return, ep_length = run.ep_return[sl], run.ep_length[sl]  # views
        ep_return += reward
        ep_length += 1
        first_obs = self._as_array(obs)
        last_obs = first_obs
        any_done = bool(done.any())
        if any_done:
            last_obs = first_obs.copy()
            for i in np.flatnonzero(done):
                last_obs[i] = final[i]
                self.finished.append((float(ep_return[i]), int(ep_length[i])))
            self.episodes_done[sl] += done
            ep_return[done] = 0.0
            ep_length[done] = 0
        next_obs = self._to_tensor(last_obs, update=True)
        start = self._to_tensor(first_obs, update=False) if any_done else next_obs
        # Trailing dimensions are added in numpy, where a view costs a fraction of a torch op.
        return self._td({
            "observation": next_obs,
            "reward": torch.from_numpy(reward.astype(np.float32)[:, None]),
            "done": torch.from_numpy(done[:, None]),
            "terminated": torch.from_numpy(terminated[:, None]),
            "truncated": torch.from_numpy(truncated[:, None]),
        }, len(reward)), start

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
        return tensordict, self._td({**carried, "observation": self._run.obs, **self._not_done()})

    def state_dict(self) -> dict[str, Any] | None:
        """The running episodes (the backend's envs, current observations, returns so far), or
        ``None`` when the backend's envs cannot be saved (a resumed run then starts afresh)."""
        envs = self.backend.state()
        if envs is None:
            return None
        run = self._run
        return {"envs": envs, "seed": self._seed,
                "obs": None if run.obs is None else run.obs.clone(),
                "ep_return": run.ep_return.copy(), "ep_length": run.ep_length.copy(),
                "episodes_done": self.episodes_done.copy(), "finished": list(self.finished)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved: the sub-envs (their episodes and random
        streams), and the running episodes for :meth:`continue_episodes`."""
        self.backend.load(state["envs"])
        # The sub-envs carry their random streams; a seed still pending at the save is kept.
        self._seed = state["seed"]
        run = self._run
        run.obs, run.ep_return, run.ep_length = state["obs"], state["ep_return"], state["ep_length"]
        self.episodes_done = state["episodes_done"]
        self.finished = list(state["finished"])
        self._restored = run.obs is not None

    def continue_episodes(self) -> None:
        """Make the next full reset go on with the episodes running when the state was saved
        (what a collector built on a restored env needs); without it, a reset starts new
        episodes from the restored random streams."""
        self._continue, self._restored = self._restored, False

    def pop_finished(self) -> list[tuple[float, int]]:
        """Return and clear the (return, length) pairs of episodes completed since the last call."""
        out, self.finished = self.finished, []
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

