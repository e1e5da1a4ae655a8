"""The ``gymnasium`` backend: gymnasium's Python envs in one same-step synchronous vector env."""

from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import iterate

from unitrain.envs.atari import AtariFrames, register_ale
from unitrain.envs.observation import tuple_names
from unitrain.envs.spec import EnvSpec
from unitrain.errors import UserError


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


def gym_make(env_id: str, **kwargs: Any) -> gym.Env:
    """``gym.make``, with a missing optional dependency reported as one line."""
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as e:
        message = str(e).split(",")[0].strip().rstrip(".")
        hint = next((cmd for name, (_, cmd) in _EXTRAS.items() if name in message),
                    "install the package it names")
        raise UserError(f"env.id={env_id}: {message}; to use it: {hint}") from None


def make_single(spec: EnvSpec, render_mode: str | None = None) -> gym.Env:
    _route_mujoco_warnings()
    kwargs = dict(spec.kwargs)
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    if render_mode is not None:
        kwargs["render_mode"] = render_mode
    if spec.is_atari:
        register_ale()
        # AtariFrames skips frames itself (the base env must not) and reads the screen from the
        # emulator, so the base env's own observation can be the cheapest one.
        kwargs = {"repeat_action_probability": 0.25, "obs_type": "grayscale", **kwargs,
                  "frameskip": 1}
        ram = spec.obs_type == "ram"
        env = AtariFrames(gym_make(spec.id, **kwargs), noop_max=30, frame_skip=4,
                           screen_size=84, ram=ram)
        return env if ram else gym.wrappers.FrameStackObservation(env, spec.frame_stack)
    env = gym_make(spec.id, **kwargs)
    if isinstance(env.observation_space, gym.spaces.Dict) and (
            MASK_KEY in env.observation_space.spaces):
        return MaskFromObservation(env)
    return env


MASK_KEY = "action_mask"


class MaskFromObservation(gym.Wrapper):
    """A ``Dict`` observation's ``"action_mask"`` entry handed over as ``info["action_mask"]``.

    The entry leaves the observation (and its space), so the module's ``forward`` never
    receives it and observation statistics never see it; the mask then reaches the policy by
    the same route as an env that puts it in its info (:func:`probe_mask`,
    :class:`SameStepSyncVectorEnv`). The entry's space may be any (a ``MultiBinary``, a ``Box``
    of 0/1) as long as its values are what ``info["action_mask"]`` would hold (:func:`flat_mask`).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        entries = OrderedDict((key, space) for key, space in env.observation_space.spaces.items()
                              if key != MASK_KEY)
        if not entries:
            raise UserError(f"{env.spec.id if env.spec else type(env).__name__}: the Dict "
                            f"observation holds only {MASK_KEY!r}; an env gives an observation "
                            "besides its action mask")
        self.observation_space = gym.spaces.Dict(entries)

    @staticmethod
    def _split(obs: dict[str, Any], info: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        obs = dict(obs)
        return obs, {**info, MASK_KEY: obs.pop(MASK_KEY)}

    def reset(self, **kwargs: Any) -> tuple[dict[str, Any], dict]:
        return self._split(*self.env.reset(**kwargs))

    def step(self, action: Any) -> tuple[dict[str, Any], Any, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        obs, info = self._split(obs, info)
        return obs, reward, terminated, truncated, info


def flat_mask(mask: Any) -> np.ndarray:
    """One env's ``info["action_mask"]`` as a flat ``bool`` array: an array of allowed actions
    (``Discrete``: ``n`` entries; ``MultiDiscrete``: ``sum(nvec)``, sub-action ``i``'s entries
    the ``i``-th block), or a tuple with one array per sub-action (gymnasium's
    ``MultiDiscrete.sample(mask=...)`` form), concatenated."""
    if isinstance(mask, tuple):
        return np.concatenate([np.asarray(m).reshape(-1) for m in mask]).astype(bool)
    return np.asarray(mask).reshape(-1).astype(bool)


def probe_mask(env: gym.Env) -> bool:
    """Whether a gymnasium env gives action masks: a discrete action space and an
    ``"action_mask"`` entry in the info of a reset (continuous envs are not reset)."""
    if not isinstance(env.action_space, (gym.spaces.Discrete, gym.spaces.MultiDiscrete)):
        return False
    _, info = env.reset(seed=0)
    return "action_mask" in info


def _missing_mask(env: gym.Env) -> UserError:
    return UserError(f"{env.spec.id if env.spec else type(env).__name__}: the env gave "
                     "info['action_mask'] at its first reset and none at a later step or reset; "
                     "an env with action masks gives one with every observation")


class SameStepSyncVectorEnv(gym.vector.SyncVectorEnv):
    """A gymnasium ``SyncVectorEnv`` with same-step autoreset whose step skips the info dicts.

    ``SyncVectorEnv.step`` merges every sub-env's info dict into batched arrays, one small numpy
    write per env and key: with 32 MuJoCo envs that is about a tenth of the whole vector step.
    :class:`BatchedEnv` reads only the final observation of finished episodes, so this step
    returns just ``{"final_obs", "_final_obs"}`` (as gymnasium does, and only when an episode
    ended). Observations, rewards and flags are the same as the parent's; reset is the parent's.

    With ``masked``, each env's ``info["action_mask"]`` is kept too: :attr:`masks` ``[n, A]``
    holds the masks of the observations the next step starts from and the step's infos hold
    ``"final_action_mask"``, those of the observations the step ended in.
    """

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], masked: bool = False) -> None:
        super().__init__(env_fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        self.masked = masked
        self.masks: np.ndarray | None = None

    def reset(self, *, seed: Any = None, options: Any = None) -> tuple[np.ndarray, dict]:
        obs, infos = super().reset(seed=seed, options=options)
        if self.masked:
            if "action_mask" not in infos or not bool(np.all(infos["_action_mask"])):
                raise _missing_mask(self.envs[0])
            self.masks = np.stack([flat_mask(m) for m in infos["action_mask"]])
        return obs, infos

    def step(self, actions: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                          dict[str, Any]]:
        n = self.num_envs
        observations = []
        rewards = np.zeros(n)
        terminated = np.zeros(n, dtype=bool)
        truncated = np.zeros(n, dtype=bool)
        final_obs: np.ndarray | None = None
        # Rows of this step's masks (a restored env has none from a reset of its own).
        masks: list[np.ndarray] = []
        final_masks: list[np.ndarray] = []
        for i, (env, action) in enumerate(zip(self.envs, iterate(self.action_space, actions))):
            obs, rewards[i], terminated[i], truncated[i], info = env.step(action)
            if self.masked:
                if "action_mask" not in info:
                    raise _missing_mask(env)
                final_masks.append(flat_mask(info["action_mask"]))
                masks.append(final_masks[-1])
            if terminated[i] or truncated[i]:
                if final_obs is None:
                    final_obs = np.full(n, None, dtype=object)
                final_obs[i] = obs
                obs, info = env.reset()
                if self.masked:
                    if "action_mask" not in info:
                        raise _missing_mask(env)
                    masks[-1] = flat_mask(info["action_mask"])
            observations.append(obs)
        infos: dict[str, Any] = {}
        if final_obs is not None:
            infos = {"final_obs": final_obs, "_final_obs": terminated | truncated}
        if self.masked:
            self.masks = np.stack(masks)
            infos["final_action_mask"] = np.stack(final_masks)
        return _stack(observations), rewards, terminated, truncated, infos


def _stack(observations: list[Any]) -> Any:
    """One slot's observations stacked: an array, or a dict/tuple of arrays for a
    ``Dict``/``Tuple`` observation."""
    first = observations[0]
    if isinstance(first, dict):
        return {key: np.stack([o[key] for o in observations]) for key in first}
    if isinstance(first, tuple):
        return tuple(np.stack([o[j] for o in observations]) for j in range(len(first)))
    return np.stack(observations)


class GymnasiumVector:
    """The ``gymnasium`` backend: one same-step :class:`SameStepSyncVectorEnv` in this process.

    ``step`` returns the first observation of the next episode for slots whose episode ended
    (autoreset in the same step) and, separately, the observations the step ended in.

    A ``Dict`` observation comes as a dict of arrays; a ``Tuple`` one too, its entries named
    ``obs0``, ``obs1``, ... (:attr:`observation_space` is then the ``Dict`` of those names).

    An env whose reset's info holds ``"action_mask"`` (probed once, on a discrete action space)
    is ``masked``: :attr:`mask` ``[n, A]`` is the mask of the observations the next step starts
    from, :attr:`final_mask` that of the observations the last step ended in.
    """

    name = "gymnasium"

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int,
                 render_mode: str | None = None) -> None:
        del seed, num_threads  # seeded at the first reset; steps in this thread
        self.vec = SameStepSyncVectorEnv([lambda: make_single(spec, render_mode)
                                           for _ in range(num_envs)])
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space
        self._names: list[str] | None = None
        if isinstance(self.observation_space, gym.spaces.Tuple):
            self._names = tuple_names(len(self.observation_space.spaces))
            self.observation_space = gym.spaces.Dict(
                OrderedDict(zip(self._names, self.observation_space.spaces)))
        # ALE gives no masks: an Atari env is not reset to find out.
        self.masked = self.vec.masked = not spec.is_atari and probe_mask(self.vec.envs[0])
        self.final_mask: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray | None:
        return self.vec.masks

    def _named(self, obs: Any) -> Any:
        """A ``Tuple`` observation's entries by name (anything else as it is)."""
        return obs if self._names is None else dict(zip(self._names, obs))

    def reset(self, seed: int | list[int] | None) -> np.ndarray:
        obs, _ = self.vec.reset(seed=seed)
        self.final_mask = self.vec.masks
        return self._named(obs)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        """``(obs, reward, terminated, truncated, final)``: ``final[i]`` is the observation slot
        ``i``'s ended episode ended in (``None`` when no episode ended)."""
        obs, reward, terminated, truncated, infos = self.vec.step(action)
        self.final_mask = infos.get("final_action_mask")
        final = infos.get("final_obs")
        if final is not None and self._names is not None:
            final = np.array([None if f is None else self._named(f) for f in final], dtype=object)
        return self._named(obs), reward, terminated, truncated, final

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
