"""Reading unitrain checkpoints: the module they hold and its deterministic evaluation.

A checkpoint (``last.ckpt``, ``best.ckpt``) holds the module's parameters (``state_dict``), and
under ``"unitrain"`` the run's counters, rule state, env spec, observation statistics and the
module's class path and constructor arguments. :func:`evaluate` plays a module's deterministic
policy (``module.act``) on fresh seeded episodes, from a module or from a checkpoint, without a
Trainer; ``unitrain evaluate CKPT`` calls it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unitrain.errors import ConfigError, UserError, check_file
from unitrain.policy.ckpt_file import load_checkpoint_file, recorded_class

if TYPE_CHECKING:
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule

__all__ = ["read_checkpoint", "load_module", "evaluate", "evaluate_checkpoint"]


# What a checkpoint is, for the messages about a file that is not one.
_CHECKPOINT = "expected a .ckpt file written by `unitrain fit` (runs/<run>/checkpoints/last.ckpt)"


def _is_text(path: Path) -> bool:
    """Whether the file's first KiB is UTF-8 text (a recipe or a log given as a checkpoint)."""
    with path.open("rb") as f:
        head = f.read(1024)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # a character cut at the end of the KiB
    return b"\0" not in head


def read_checkpoint(path: str | os.PathLike, what: str | None = None) -> dict[str, Any]:
    """Load a unitrain checkpoint (format 2 safely; a 0.1.0 one is a full pickle, see
    :func:`~unitrain.policy.ckpt_file.load_checkpoint_file`).

    Args:
        path: the ``.ckpt`` file.
        what: how the user named it, for error messages (default: the path).

    Raises:
        UserError: the file is missing, a directory, empty, unreadable, or not a unitrain
            checkpoint.
    """
    path = Path(path)
    what = what or str(path)
    if str(path) not in what:  # resume=last: name the file it stands for
        what = f"{what}: {path}"
    path = check_file(path, what, "checkpoint file", _CHECKPOINT,
                      inside=("*.ckpt", "checkpoints/*.ckpt"))
    try:
        ckpt = load_checkpoint_file(path)
    except OSError as e:
        raise UserError(f"{what}: cannot read it ({e.strerror or type(e).__name__}); "
                        f"{_CHECKPOINT}") from None
    except Exception as e:  # a truncated or foreign file: any unpickling error
        if _is_text(path):
            raise UserError(f"{what}: a text file, not a checkpoint; {_CHECKPOINT}") from None
        raise UserError(f"{what}: not a readable checkpoint ({type(e).__name__}); "
                        f"{_CHECKPOINT}") from None
    if not isinstance(ckpt, dict) or "unitrain" not in ckpt or "state_dict" not in ckpt:
        raise UserError(f"{what}: not a unitrain checkpoint (no unitrain state inside); "
                        f"{_CHECKPOINT}")
    return ckpt


def load_module(checkpoint: str | os.PathLike, module: "RLModule | None" = None) -> "RLModule":
    """The checkpoint's module with its trained policy (and ``aux.log_std``).

    Args:
        checkpoint: a unitrain checkpoint.
        module: a module to load into (e.g. an instance of a class defined in a script); by
            default the checkpoint's recorded class is imported and rebuilt from its recorded
            constructor arguments.

    Raises:
        UserError: the class cannot be imported (pass ``module=``) or the parameters do not fit.
    """
    ckpt = read_checkpoint(checkpoint)
    state = ckpt["unitrain"]
    if module is None:
        cls = recorded_class(state, str(checkpoint), "from Python pass an instance: "
                             "unitrain.evaluate(checkpoint, module=MyModule(...))")
        module = cls(**state["module_hparams"])
    module.load_policy(checkpoint)
    return module


def policy_and_env(policy: "RLModule | str | os.PathLike", env: Any = None,
                   module: "RLModule | None" = None) -> tuple["RLModule", "EnvSpec", Any]:
    """The module to play, the env to play it in and its frozen observation normalisation
    (``None`` without one): what :func:`evaluate` and :func:`unitrain.run.video.record` share.

    ``policy`` is a module or a checkpoint; a checkpoint brings its run's env and statistics.
    """
    from unitrain.envs.info import env_info
    from unitrain.envs.obs_norm import make_obs_norm
    from unitrain.envs.spec import EnvSpec, as_env_spec
    from unitrain.policy.module import RLModule

    norm_state = None
    if not isinstance(policy, RLModule):
        ckpt = read_checkpoint(policy)
        state = ckpt["unitrain"]
        recorded = state.get("env")
        if env is None:
            if recorded is None:
                raise UserError(f"{policy}: this run has no environment to evaluate in")
            env = EnvSpec.from_record(recorded, str(policy))
        elif (recorded is not None and not isinstance(env, (str, EnvSpec))
              and (recorded.get("make") is not None or recorded.get("make_passed"))):
            # The run's own TorchRL env passed again: its other settings (obs_norm, time
            # limit, name) are the checkpoint's.
            fields = {k: v for k, v in recorded.items() if k not in ("make", "make_passed")}
            env = EnvSpec(**fields, make=env)
        norm_state = state.get("obs_norm")
        policy = load_module(policy, module)
    if env is None:
        raise UserError("evaluate: give env= (a gymnasium id, a unitrain.EnvSpec or a TorchRL "
                        "env or factory)")
    spec = as_env_spec(env)
    info = env_info(spec)
    policy.bind_env(info)
    norm = None
    if spec.obs_norm:
        norm = make_obs_norm(info)
        if norm_state is not None:
            norm.load_state_dict(norm_state)
    return policy, spec, norm


@torch.no_grad()
def evaluate(policy: "RLModule | str | os.PathLike", env: Any = None,
             episodes: int = 10, seed: int = 0, module: "RLModule | None" = None,
             evaluation: int = 0) -> dict[str, float]:
    """Deterministic evaluation of a module, or of a checkpoint's policy, without a Trainer.

    Args:
        policy: an :class:`~unitrain.RLModule` or a checkpoint path.
        env: a gymnasium id (``"module:id"`` too), an :class:`~unitrain.EnvSpec`, or a TorchRL
            ``EnvBase`` or factory (default for a checkpoint: its run's; a run whose env was
            passed as a live object needs it passed again).
        episodes: episodes to play (each from its own seed).
        seed: the seed the episodes' seeds derive from.
        module: with a checkpoint, the module to load its policy into (a class from a script).
        evaluation: the evaluation's number (numbers play different episodes for one seed).

    Returns:
        ``return_mean``, ``return_std``, ``return_max``, ``return_min``, ``length_mean``,
        ``episodes``.
    """
    from unitrain.envs.batched import halves, make_env
    from unitrain.envs.rollout import evaluate_policy
    from unitrain.policy.recurrent import initial_state_of

    policy, spec, norm = policy_and_env(policy, env, module)
    envs: dict[int, Any] = {}

    def make(slots: int) -> Any:
        if slots not in envs:
            envs[slots] = make_env(spec, 0, norm, update_norm=False, num_envs=slots,
                                   parts=halves(slots))
        return envs[slots]

    was_training = policy.training
    policy.eval()
    try:
        return evaluate_policy(policy.act, make, episodes, seed, evaluation,
                               device=policy.device, initial_state=initial_state_of(policy))
    finally:
        policy.train(was_training)
        for e in envs.values():
            e.close()


def evaluate_checkpoint(checkpoint: str | os.PathLike, episodes: int = 10, seed: int = 0,
                        env_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`evaluate` of a checkpoint in its run's env, with the checkpoint's frame count.

    Args:
        checkpoint: the checkpoint file.
        episodes: episodes to play.
        seed: the seed the episodes' seeds derive from.
        env_overrides: :class:`~unitrain.EnvSpec` fields to change in the run's env, e.g.
            ``{"backend": "gymnasium"}`` to play a policy trained on ``mjwarp`` in gymnasium.

    Raises:
        ConfigError: an override names no env setting, or a value it does not take.
    """
    from unitrain.envs.spec import EnvSpec

    ckpt = read_checkpoint(checkpoint)
    recorded = ckpt["unitrain"].get("env")
    env = None
    if env_overrides:
        if recorded is None:
            raise UserError(f"{checkpoint}: this run has no environment to override")
        known = {f.name for f in dataclasses.fields(EnvSpec)}
        for key in env_overrides:
            if key not in known:
                raise ConfigError(f"env.{key}", "not an env setting; one of "
                                  + ", ".join(sorted(known)))
        env = EnvSpec.from_record({**recorded, **env_overrides}, str(checkpoint))
    result = evaluate(checkpoint, env=env, episodes=episodes, seed=seed)
    return {"checkpoint": str(checkpoint), "env": recorded["id"] if recorded else None,
            **({"env_overrides": dict(env_overrides)} if env_overrides else {}),
            "frames": ckpt["unitrain"]["frames"],
            **{f"eval/{k}": v for k, v in result.items()}}
