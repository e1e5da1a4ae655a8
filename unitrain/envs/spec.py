"""What to collect from: :class:`EnvSpec`, its validation, and which backend runs it."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from unitrain.envs.atari import register_ale
from unitrain.errors import ConfigError, UserError, check
from unitrain.validation import Validated, import_module, import_object

# The id of a spec that names none.
DEFAULT_ID = "CartPole-v1"


@dataclass
class EnvSpec(Validated):
    """What to collect from: a gymnasium id, or a TorchRL env of the user's.

    Args:
        id: a registered gymnasium id, e.g. ``"CartPole-v1"``, ``"HalfCheetah-v5"``,
            ``"ALE/Pong-v5"``, or gymnasium's ``"module:id"`` form (``"mypkg.envs:Reach-v0"``
            imports ``mypkg.envs``, which registers ``Reach-v0``). With ``make``, only the env's
            name (run directories, logs; default: the factory's or the env class's name).
        num_envs: copies run vectorised in one process (per rank).
        obs_norm: normalise observations with running mean/std (clipped to ±5), statistics
            merged across ranks and saved in checkpoints.
        max_episode_steps: override the env's time limit (``None`` keeps the registered one;
            with ``make``, a TorchRL ``StepCounter`` truncates episodes at this length).
        frame_stack: frames stacked for Atari screens (ignored otherwise).
        obs_type: what an Atari id observes: ``"image"`` (84×84 grayscale screens, the last
            ``frame_stack`` of them) or ``"ram"`` (the console's 128 bytes of memory after each
            agent step, scaled to [0, 1] floats: ``byte / 255``; no frame stack). Frame skip,
            sticky actions and no-op starts are the same for both. The RAM runs on the
            gymnasium backend (EnvPool's Atari does not expose it; ``"auto"`` picks gymnasium).
        kwargs: extra keyword arguments for ``gymnasium.make`` (such an env runs on gymnasium),
            or for the ``make`` factory.
        backend: who simulates the envs: ``"gymnasium"`` (Python envs in this process),
            ``"envpool"`` (EnvPool's C++ envs on their own threads, for the ids it provides),
            ``"mjwarp"`` (MuJoCo Warp: the five v5 locomotion tasks of :data:`MJWARP_IDS`
            simulated in batched worlds on the CPU or a GPU, :mod:`unitrain.envs.mjwarp`) or
            ``"auto"``: EnvPool for the MuJoCo and Atari ids it provides when it is installed,
            gymnasium otherwise (see :func:`resolve_backend`). A spec with ``make`` runs on
            the ``"torchrl"`` backend (:mod:`unitrain.envs.torchrl_env`) whatever this says.
        make: a TorchRL env of the user's instead of a gymnasium id: a factory returning a
            :class:`~torchrl.envs.EnvBase` (a callable, or its import path
            ``"mypkg.envs:make_env"``) or an ``EnvBase`` instance. A factory is called with
            ``kwargs``, plus ``num_envs=<slots>`` when it takes a ``num_envs`` argument (then
            it returns an env of batch size ``[slots]``); an env without a batch size is copied
            into a ``SerialEnv`` of ``num_envs`` slots. See :mod:`unitrain.envs.torchrl_env`.
    """

    id: str = DEFAULT_ID
    num_envs: int = 8
    obs_norm: bool = False
    max_episode_steps: int | None = None
    frame_stack: int = 4
    obs_type: str = "image"
    kwargs: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"
    make: Any = None

    block: ClassVar[str] = "env"

    def validate(self) -> None:
        check(isinstance(self.num_envs, int) and self.num_envs >= 1, "num_envs",
              "an integer >= 1", self.num_envs)
        check(self.max_episode_steps is None or self.max_episode_steps >= 1,
              "max_episode_steps", "an integer >= 1 or null", self.max_episode_steps)
        check(self.frame_stack >= 1, "frame_stack", "an integer >= 1", self.frame_stack)
        check(self.obs_type in OBS_TYPES, "obs_type", "one of " + ", ".join(OBS_TYPES),
              self.obs_type)
        if self.obs_type == "ram" and not self.is_atari:
            raise ConfigError("obs_type", f"ram is the Atari console's memory; {self.id} is not "
                                          "an Atari id (ALE/...): use obs_type: image")
        check(self.backend in BACKEND_CHOICES, "backend", "one of " + ", ".join(BACKEND_CHOICES),
              self.backend)
        if self.make is not None:
            check(self.backend in ("auto", "torchrl"), "backend",
                  "auto or torchrl with make (a TorchRL env runs as itself)", self.backend)
            self.make = resolve_make(self.make)
            if self.id == DEFAULT_ID:
                self.id = make_name(self.make)
            return
        check(self.backend != "torchrl", "backend", "auto, gymnasium or envpool for a gymnasium "
              "id (torchrl runs a make: factory or env)", self.backend)
        validate_env_id(self.id)
        if self.backend in ("envpool", "mjwarp"):
            resolve_backend(self)  # says now if that backend cannot run this id

    @classmethod
    def from_env(cls, env: Any, **fields: Any) -> EnvSpec:
        """The spec of a TorchRL env instance (or factory): ``make=env``, and ``num_envs``
        the env's batch size (1 for an env without one) unless ``fields`` say otherwise.

        Args:
            env: a :class:`~torchrl.envs.EnvBase` instance, a factory returning one, or the
                factory's import path.
            fields: further :class:`EnvSpec` fields (``obs_norm``, ``max_episode_steps``, ...).
        """
        if "num_envs" not in fields and _is_env_base(env):
            fields["num_envs"] = max(1, math.prod(env.batch_size))
        return cls(make=env, **fields)

    @property
    def is_atari(self) -> bool:
        return self.make is None and self.id.startswith("ALE/")

    @property
    def make_path(self) -> str | None:
        """The import path of ``make`` (``None`` without ``make``, or for a live object that
        has none: an instance, a lambda, a ``functools.partial``)."""
        if self.make is None:
            return None
        if isinstance(self.make, str):
            return self.make
        return import_path(self.make)

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of this spec: its fields, with ``make`` as its import path.

        A spec whose ``make`` is a live object without an import path records ``make: None``
        and ``make_passed: True``: such a run's env must be passed again to resume or evaluate
        it (``env=`` of the Trainer, :func:`unitrain.evaluate`).
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["kwargs"] = dict(self.kwargs)
        if self.make is not None:
            path = self.make_path
            out["make"] = path
            out["make_passed"] = path is None
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any], where: str = "checkpoint") -> EnvSpec:
        """The spec a checkpoint recorded (see :meth:`record`).

        Raises:
            UserError: the run's env was a live object that must be passed again.
        """
        record = dict(record)
        if record.pop("make_passed", False):
            raise UserError(f"{where}: this run's env was a TorchRL env passed as an object "
                            f"({record.get('id')}), which a checkpoint cannot hold; pass it "
                            "again: unitrain.evaluate(checkpoint, env=...) or "
                            "Trainer(env=...)")
        return cls(**record)


def _is_env_base(obj: Any) -> bool:
    from torchrl.envs import EnvBase

    return isinstance(obj, EnvBase)


def resolve_make(make: Any) -> Any:
    """``make`` checked: an import path is imported (one-line error naming the module, the
    working directory and ``PYTHONPATH``); the result must be an ``EnvBase`` or a callable."""
    obj = import_object(make, "make") if isinstance(make, str) else make
    if not (_is_env_base(obj) or callable(obj)):
        raise ConfigError("make", f"got {make!r}; expected a torchrl.envs.EnvBase, a callable "
                                  "returning one, or its import path (mypkg.envs:make_env)")
    return make if isinstance(make, str) else obj


def import_path(obj: Any) -> str | None:
    """``module:qualname`` of a function or class that importing that path gives back, else
    ``None`` (instances, lambdas, closures, partials, objects defined in ``__main__``)."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        return None
    target: Any = sys.modules.get(module)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return f"{module}:{qualname}" if target is obj else None


def make_name(make: Any) -> str:
    """A name for a spec's ``make`` (its import path's last part, or the class's name)."""
    if isinstance(make, str):
        return make.replace(":", ".").rpartition(".")[2]
    name = getattr(make, "__name__", None) or getattr(getattr(make, "func", None), "__name__",
                                                       None)
    if name == "<lambda>":
        return "torchrl-env"
    return name or type(make).__name__


def validate_env_id(env_id: str) -> None:
    """Raise a :class:`ConfigError` naming close matches if ``env_id`` is not registered.

    ``"module:id"`` (gymnasium's form) imports ``module`` first, which registers ``id``; a
    module that cannot be imported is one line naming it, the working directory and
    ``PYTHONPATH``.
    """
    if env_id.startswith("ALE/"):
        register_ale()
    if env_id in gym.registry:
        return
    name = env_id
    if ":" in env_id:
        module, _, name = env_id.partition(":")
        check(bool(module) and bool(name), "id", "a gymnasium id or module:id", env_id)
        import_module(module, "id", what="env module")
        if name in gym.registry:
            return
        close = difflib.get_close_matches(name, list(gym.registry), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "it should call gymnasium.register"
        raise ConfigError("id", f"module {module!r} registers no gymnasium env {name!r}; {hint}")
    close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see gymnasium.registry for valid ids"
    raise ConfigError("id", f"unknown gymnasium env {env_id!r}; {hint}")


BACKEND_CHOICES = ("auto", "gymnasium", "envpool", "torchrl", "mjwarp")
# What an Atari id observes (EnvSpec.obs_type).
OBS_TYPES = ("image", "ram")
# The ids the MuJoCo Warp backend simulates (unitrain.envs.mjwarp.TASKS).
MJWARP_IDS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
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
    """The backend that runs ``spec``: ``"gymnasium"``, ``"envpool"``, ``"mjwarp"`` (MuJoCo Warp,
    asked for by name), or ``"torchrl"`` for a spec with ``make`` (a TorchRL env of the user's).

    ``"auto"`` picks EnvPool for MuJoCo and Atari ids when EnvPool provides them (their physics
    and emulation are where the time goes, and EnvPool runs them in C++ on its own threads) and
    gymnasium for everything else (classic control steps in microseconds either way, and envs
    built with extra ``kwargs`` are gymnasium's). If EnvPool is not installed, ``"auto"`` falls
    back to gymnasium with one warning.

    Raises:
        ConfigError: ``"envpool"`` asked for an id EnvPool cannot run here.
    """
    global _warned_missing_envpool
    if spec.make is not None or spec.backend == "torchrl":
        return "torchrl"
    if spec.backend == "gymnasium":
        return "gymnasium"
    if spec.backend == "mjwarp":
        if spec.id not in MJWARP_IDS:
            raise ConfigError("backend", f"mjwarp runs {', '.join(MJWARP_IDS)}, not {spec.id}; "
                                         "use backend: gymnasium, envpool or auto")
        return "mjwarp"
    native = envpool_id(spec.id) if not spec.kwargs and spec.obs_type == "image" else None
    if spec.backend == "envpool" and spec.obs_type == "ram":
        raise ConfigError("backend", "EnvPool's Atari envs do not expose the RAM; use backend: "
                                     "gymnasium or auto for obs_type: ram")
    if spec.backend == "envpool":
        if envpool_ids() is None:
            raise ConfigError("backend", "envpool is not installed (pip install envpool); "
                                         "use backend: gymnasium or auto")
        if native is None:
            why = "extra kwargs need gymnasium" if spec.kwargs else "EnvPool does not provide it"
            raise ConfigError("backend", f"envpool cannot run {spec.id} ({why}); use "
                                         "backend: gymnasium or auto")
        return "envpool"
    heavy = (spec.is_atari and spec.obs_type == "image") or is_mujoco(spec.id)
    if heavy and native is None and envpool_ids() is None and not _warned_missing_envpool:
        _warned_missing_envpool = True
        warnings.warn("envpool is not installed: MuJoCo and Atari envs run on gymnasium "
                      "(slower); pip install envpool", stacklevel=2)
    return "envpool" if heavy and native is not None else "gymnasium"


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed derived from integers (run seed, rank, stream, ...), collision-resistant."""
    return int(np.random.SeedSequence([abs(int(e)) for e in entropy]).generate_state(1)[0] >> 1)


def as_env_spec(env: Any, num_envs: int | None = None) -> EnvSpec | None:
    """The :class:`EnvSpec` of what a user passed as ``env=``: a spec as it is, a gymnasium id
    (``"CartPole-v1"``, ``"mypkg.envs:Reach-v0"``), a TorchRL ``EnvBase`` instance or a
    factory returning one (:meth:`EnvSpec.from_env`); ``None`` stays ``None``.

    Args:
        env: what was passed.
        num_envs: slots per process for an id or a factory (default: the spec's default; an
            instance's own batch size).

    Raises:
        ConfigError: ``env`` is none of these.
    """
    if env is None or isinstance(env, EnvSpec):
        return env
    if isinstance(env, str):
        return EnvSpec(id=env, num_envs=num_envs or EnvSpec.num_envs)
    if _is_env_base(env) or callable(env):
        return EnvSpec.from_env(env, **({} if num_envs is None else {"num_envs": num_envs}))
    raise ConfigError("env", f"got {env!r}; expected a gymnasium id, a unitrain.EnvSpec, a "
                             "torchrl.envs.EnvBase or a callable returning one")
