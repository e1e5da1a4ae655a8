"""What to collect from: :class:`EnvSpec`, its validation, and which backend runs it."""

from __future__ import annotations

import difflib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from unitrain.envs.atari import register_ale
from unitrain.errors import ConfigError, check
from unitrain.validation import Validated


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


def validate_env_id(env_id: str) -> None:
    """Raise a :class:`ConfigError` naming close matches if ``env_id`` is not registered."""
    if env_id.startswith("ALE/"):
        register_ale()
    if env_id in gym.registry:
        return
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see gymnasium.registry for valid ids"
    raise ConfigError("id", f"unknown gymnasium env {env_id!r}; {hint}")


BACKEND_CHOICES = ("auto", "gymnasium", "envpool")
_warned_missing_envpool = False


@functools.lru_cache(maxsize=None)
def envpool_ids() -> frozenset[str] | None:
    try:
        import envpool
    except ImportError:
        return None
    return frozenset(envpool.list_all_envs())


def envpool_id(env_id: str) -> str | None:
    """EnvPool's name for a gymnasium id (``ALE/Pong-v5`` is ``Pong-v5``), or ``None`` when
    EnvPool is not installed or does not provide the env."""
    ids = envpool_ids()
    name = env_id[len("ALE/"):] if env_id.startswith("ALE/") else env_id
    return name if ids is not None and name in ids else None


def is_mujoco(env_id: str) -> bool:
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
        if envpool_ids() is None:
            raise ConfigError("backend", "envpool is not installed (pip install envpool); "
                                         "use backend: gymnasium or auto")
        if native is None:
            why = "extra kwargs need gymnasium" if spec.kwargs else "EnvPool does not provide it"
            raise ConfigError("backend", f"envpool cannot run {spec.id} ({why}); use "
                                         "backend: gymnasium or auto")
        return "envpool"
    heavy = spec.is_atari or is_mujoco(spec.id)
    if heavy and native is None and envpool_ids() is None and not _warned_missing_envpool:
        _warned_missing_envpool = True
        warnings.warn("envpool is not installed: MuJoCo and Atari envs run on gymnasium "
                      "(slower); pip install envpool", stacklevel=2)
    return "envpool" if heavy and native is not None else "gymnasium"


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed derived from integers (run seed, rank, stream, ...), collision-resistant."""
    return int(np.random.SeedSequence([abs(int(e)) for e in entropy]).generate_state(1)[0] >> 1)
