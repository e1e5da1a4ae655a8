"""The update-rule interface: the one contract every way of training implements.

An update rule decides what evidence it needs and how the module's parameters change. The
Trainer calls the same methods on every rule and never asks what kind of rule it is:

========================  ====================================================================
``check_env(env, info)``  before the run starts: settings against the env (see below).
``check_module(module)``  before the run starts: refuses a module the rule cannot train (a
                          recurrent one unless ``feedforward_only`` is ``None``).
``setup(module, ctx)``    once per process, before optimizers exist: build auxiliary networks
                          (registered with :meth:`RLModule.add_aux`), losses, buffers.
``optimizers()``          the ``torch.optim`` optimizers whose state Lightning checkpoints.
``step(ctx)``             one iteration: gather evidence through ``ctx``, change parameters,
                          return a dict of float metrics (``"frames"`` = env frames used here).
``state_dict()`` /        the rule's own state (generators, counters, populations); optimizer
``load_state_dict()``     and module state are checkpointed by Lightning.
========================  ====================================================================

Rules are dataclasses: their fields are the hyperparameters, type-checked against their
annotations on construction and range-checked in ``validate()``
(:class:`~unitrain.validation.Validated`), so one class serves the Python API
(``PPO(lr=1e-3)``) and the recipe schema (``optimizer: {name: ppo, lr: 1e-3}``), with the same
message naming ``optimizer.<field>``. ``check_env(env, info)`` checks the settings against the
run's env (a batch size against ``env.num_envs``, the action space) before anything is written.

A rule never decides what the module's output means: every rule reads it through the shared
action contract (``module.actions``, :mod:`unitrain.policy.action`), and the deterministic action used
for evaluation is ``module.act`` whichever rule trained the module. A rule adds exploration.

Every rank runs ``step`` in lock step. A rule must call the same collectives in the same order on
every rank and return the same metric keys on every rank.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from unitrain.errors import ConfigError
from unitrain.policy.recurrent import refuse_recurrent
from unitrain.validation import Validated

if TYPE_CHECKING:
    from torchrl.collectors import Collector

    from unitrain.envs.batched import BatchedEnv
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.obs_norm import ObsNorm
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule

__all__ = ["UpdateRule", "RuleFields", "RuleContext", "rule_config"]


class RuleContext(Protocol):
    """What a rule receives: the run's services, identical in shape on every rank and free of
    Lightning (implemented by :class:`unitrain.run.services.RunServices`).

    Attributes:
        rank: this process's global rank; ``world_size`` processes in all.
        seed: the run's seed (identical on every rank).
        generator: a ``torch.Generator`` (on CPU) seeded from ``seed`` and the rank; for
            randomness that must match across ranks derive one with :meth:`shared_generator`.
        env_spec, env_info: the environment and its shapes (``None`` for supervised runs).
        obs_norm: the run's observation normalisation (``None`` unless ``env.obs_norm``).
        num_threads: the process's thread budget (torch, and EnvPool's env threads).
        frames: total env frames of the run so far, all ranks summed.
        max_frames: the budget (``None``: unbounded).
        iteration: number of ``step`` calls completed before this one.
        batch: the current batch of a supervised run (a dataloader item).
    """

    rank: int
    world_size: int
    seed: int
    generator: torch.Generator
    env_spec: "EnvSpec | None"
    env_info: "EnvInfo | None"
    obs_norm: "ObsNorm | None"
    num_threads: int
    frames: int
    max_frames: int | None
    iteration: int
    batch: Any

    @property
    def device(self) -> torch.device:
        """The module's device; put tensors here."""

    @property
    def progress(self) -> float:
        """Fraction of the frame budget used, in [0, 1] (0 when unbounded)."""

    def shared_generator(self, *stream: int) -> torch.Generator:
        """A generator seeded identically on every rank from the run seed and ``stream``."""

    def train_env(self) -> "BatchedEnv":
        """This rank's training env (built on first use with this rank's seeds)."""

    def collector(self, policy: Any, frames_per_batch: int) -> "Collector":
        """A TorchRL collector over :meth:`train_env` running ``policy`` on :attr:`device`."""

    def all_reduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """In-place all-reduce (``"mean"``, ``"sum"``, ``"max"``, ``"min"``) across ranks."""

    def all_reduce_grads(self, params: Any) -> None:
        """Average the ``.grad`` of ``params`` across ranks (one flat collective)."""

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack ``tensor`` from every rank along a new leading dim of size ``world_size``."""

    def log_histogram(self, tag: str, values: torch.Tensor) -> None:
        """Log a histogram of ``values`` at the current frame count (rank 0)."""


class RuleFields(Validated):
    """What update rules and population strategies share: the name they are registered under,
    the recipe block they are read from, their hyperparameters as recipe keys, and their own
    state. Subclasses are dataclasses; their fields are type-checked on construction and
    range-checked in :meth:`validate`."""

    name: ClassVar[str] = ""
    block: ClassVar[str] = "optimizer"
    # Rules that fit (input, target) batches and take no env.
    supervised_only: ClassVar[bool] = False
    # Whether the rule trains on Dict/Tuple observations (named entries); the Trainer refuses
    # such an env for a rule that does not, naming the rules that do.
    named_observations: ClassVar[bool] = True
    # The action spaces the rule trains (``EnvInfo.action_space``: "discrete",
    # "multidiscrete", "continuous"), and whether it honours an env's action masks; the Trainer
    # refuses other envs before the run starts (:func:`unitrain.rules.registry.check_actions`).
    action_spaces: ClassVar[tuple[str, ...]] = ("discrete", "continuous")
    action_masks: ClassVar[bool] = False

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state (not the module's, not the optimizers')."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        del state

    def config(self) -> dict[str, Any]:
        """The hyperparameters, as recipe keys (``name`` first; a composed rule as a mapping)."""
        return rule_config(self)


class UpdateRule(RuleFields):
    """Base class of update rules. Subclasses are dataclasses registered by name; their fields
    are type-checked on construction and range-checked in :meth:`validate`."""

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        """Check the rule's settings against the run's env before anything runs or is written;
        raise :class:`ConfigError` naming the full keys (``optimizer.frames_per_batch``)."""
        if self.supervised_only:
            raise ConfigError("env", f"{self.name} trains on (input, target) batches of a "
                                     "supervised run: set env: null and a data: block (in "
                                     "Python, env=None and train_dataloaders)")

    # Why the rule trains feed-forward modules only, or None when it trains recurrent modules
    # too (unitrain.policy.recurrent); a recurrent module is refused with this reason.
    feedforward_only: ClassVar[str | None] = "it carries no recurrent state between steps"

    def check_module(self, module: "RLModule") -> None:
        """Raise a one-line :class:`ConfigError` for a module this rule cannot train (by
        default: a recurrent module when :attr:`feedforward_only` gives a reason)."""
        if self.feedforward_only is not None:
            refuse_recurrent(module, self.name, self.feedforward_only)

    def budget_warning(self, max_frames: int, processes: int) -> str | None:
        """A line saying why ``max_frames`` (summed over ``processes``) leaves this rule
        (almost) no updates, naming the field to change, or ``None`` when it does not (or the
        rule cannot tell). The Trainer prints it before the run starts."""
        del max_frames, processes
        return None

    def setup(self, module: "RLModule", ctx: RuleContext) -> None:
        """Build what the rule needs for ``module`` (called once per process)."""

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers whose state is checkpointed (``[]`` for gradient-free rules)."""
        return []

    def step(self, ctx: RuleContext) -> dict[str, float]:
        """Run one iteration and return its metrics (include ``"frames"`` collected here)."""
        raise NotImplementedError


def rule_config(rule: Any) -> dict[str, Any]:
    """A rule's or strategy's hyperparameters (its dataclass fields) as recipe keys, ``name``
    first; a field holding another rule becomes a mapping of its keys."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and hasattr(value, "config"):
            return {k: v for k, v in value.config().items() if k != "name"}
        return value

    return {"name": rule.name, **{f.name: plain(getattr(rule, f.name))
                                  for f in dataclasses.fields(rule)}}
