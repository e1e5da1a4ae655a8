"""The update-rule interface: the one contract every way of training implements.

An update rule decides what evidence it needs and how the module's parameters change. The
Trainer calls the same five methods on every rule and never asks what kind of rule it is:

========================  ====================================================================
``setup(module, ctx)``    once per process, before optimizers exist: build auxiliary networks
                          (registered with :meth:`RLModule.add_aux`), losses, buffers.
``optimizers()``          the ``torch.optim`` optimizers whose state Lightning checkpoints.
``step(ctx)``             one iteration: gather evidence through ``ctx``, change parameters,
                          return a dict of float metrics (``"frames"`` = env frames used here).
``act(module, obs)``      the deterministic action used for evaluation.
``state_dict()`` /        the rule's own state (generators, counters, populations); optimizer
``load_state_dict()``     and module state are checkpointed by Lightning.
========================  ====================================================================

Rules are dataclasses: their fields are the hyperparameters (validated in ``__post_init__``
with messages naming the field), so one class serves the Python API (``PPO(lr=1e-3)``) and the
recipe schema (``optimizer: {name: ppo, lr: 1e-3}``).

Every rank runs ``step`` in lock step. A rule must call the same collectives in the same order on
every rank and return the same metric keys on every rank.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from unitrain.errors import ConfigError

if TYPE_CHECKING:
    from tensordict import TensorDictBase
    from torchrl.collectors import Collector

    from unitrain.envs import EnvInfo, EnvSpec, VecGymEnv
    from unitrain.module import RLModule

__all__ = ["UpdateRule", "RuleContext", "register_rule", "get_rule", "registered_rules"]

_REGISTRY: dict[str, type["UpdateRule"]] = {}


class RuleContext(Protocol):
    """What a rule receives: services of the run, identical in shape on every rank.

    Attributes:
        module: the module being trained.
        device: the module's device; put tensors here.
        rank: this process's global rank; ``world_size`` processes in all.
        seed: the run's seed (identical on every rank).
        generator: a ``torch.Generator`` (on CPU) seeded from ``seed`` and the rank; for
            randomness that must match across ranks derive one with :meth:`shared_generator`.
        env_spec, env_info: the environment and its shapes (``None`` for supervised runs).
        frames: total env frames of the run so far, all ranks summed.
        max_frames: the budget (``None``: unbounded).
        iteration: number of ``step`` calls completed before this one.
        batch: the current batch of the Lightning loop (a dataloader item in supervised runs).
    """

    module: "RLModule"
    rank: int
    world_size: int
    seed: int
    generator: torch.Generator
    env_spec: "EnvSpec | None"
    env_info: "EnvInfo | None"
    frames: int
    max_frames: int | None
    iteration: int
    batch: Any

    @property
    def device(self) -> torch.device: ...

    @property
    def progress(self) -> float:
        """Fraction of the frame budget used, in [0, 1] (0 when unbounded)."""

    def shared_generator(self, *stream: int) -> torch.Generator:
        """A generator seeded identically on every rank from the run seed and ``stream``."""

    def train_env(self) -> "VecGymEnv":
        """This rank's training env (built on first use with this rank's seeds)."""

    def collector(self, policy: Any, frames_per_batch: int) -> "Collector":
        """A TorchRL collector over :meth:`train_env` running ``policy`` on :attr:`device`."""

    def make_env(self, num_envs: int, seed: int, train: bool = False) -> "VecGymEnv":
        """A further env of this run's spec (sharing observation normalisation)."""

    def evaluate(self, episodes: int, act: Any = None) -> dict[str, float]:
        """Deterministic evaluation over ``episodes`` episodes split across ranks."""

    def all_reduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """In-place all-reduce (``"mean"``, ``"sum"``, ``"max"``, ``"min"``) across ranks."""

    def all_reduce_grads(self, params: Any) -> None:
        """Average the ``.grad`` of ``params`` across ranks (one flat collective)."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack ``tensor`` from every rank along a new leading dim of size ``world_size``."""

    def sync_obs_norm(self) -> None:
        """Merge observation-normalisation statistics gathered since the last sync across ranks."""


class UpdateRule:
    """Base class of update rules. Subclasses are dataclasses registered by name."""

    name: ClassVar[str] = ""

    def setup(self, module: "RLModule", ctx: RuleContext) -> None:
        """Build what the rule needs for ``module`` (called once per process)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose state is checkpointed (``[]`` for gradient-free rules)."""
        return []

    def step(self, ctx: RuleContext) -> dict[str, float]:
        """Run one iteration and return its metrics (include ``"frames"`` collected here)."""
        raise NotImplementedError

    def act(self, module: "RLModule", observation: torch.Tensor) -> torch.Tensor:
        """The deterministic action for ``observation`` (argmax or clamped mean by default)."""
        return module.act(observation)

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state (not the module's, not the optimizers')."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        del state

    def config(self) -> dict[str, Any]:
        """The hyperparameters, as recipe keys (``name`` first)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, **fields}


def register_rule(name: str):
    """Class decorator: make a rule dataclass available as ``optimizer: {name: <name>}``."""

    def wrap(cls: type[UpdateRule]) -> type[UpdateRule]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"update rule {cls.__name__} must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_rules() -> dict[str, type[UpdateRule]]:
    """All registered rules by name."""
    import unitrain.optim  # noqa: F401  (importing the package registers the built-in rules)

    return dict(sorted(_REGISTRY.items()))


def get_rule(name: str) -> type[UpdateRule]:
    """The rule class registered as ``name``; a :class:`ConfigError` lists valid names."""
    rules = registered_rules()
    if name not in rules:
        raise ConfigError("name", f"unknown update rule {name!r}; valid: {', '.join(rules)}")
    return rules[name]

