"""unitrain: one Lightning Trainer for every way of training a network.

Gradient rules (PPO, REINFORCE, DDPG, TD3, SAC, DSAC-T), population rules (GA, ES, ARS, CEM, CSA-ES,
CMA-ES, CBO) and projection updates are interchangeable update rules in :mod:`unitrain.optim`, run
by :class:`unitrain.Trainer` on a user's :class:`unitrain.RLModule` over TorchRL collection from
gymnasium environments.

The package is layered; each layer imports only the layers below it (checked in CI by
import-linter, see ``.importlinter``):

- :mod:`unitrain.app`: recipes, the command line, ``unitrain compare``, ``unitrain tune``;
- :mod:`unitrain.run`: the Trainer, its Lightning adapter, services, checkpoints, callbacks;
- :mod:`unitrain.rules`: the update-rule interface, the registry and every rule;
- :mod:`unitrain.policy`: :class:`RLModule`, the action contract, ready-made models;
- :mod:`unitrain.envs`: env specs and backends, rollouts, collection, replay;
- leaves: :mod:`unitrain.errors`, :mod:`unitrain.validation`, :mod:`unitrain.stats`.
"""

from unitrain import aliases, functions, optim  # noqa: F401  (public namespaces)
from unitrain.app.compare import compare
from unitrain.app.tune import tune
from unitrain.envs import EnvSpec
from unitrain.errors import ConfigError, UserError
from unitrain.policy import GRUPolicy, MLPPolicy, RLModule
from unitrain.run.checkpoint import evaluate
from unitrain.run.export import export
from unitrain.run.trainer import EarlyStop, Trainer

aliases.install()

__all__ = ["Trainer", "RLModule", "MLPPolicy", "GRUPolicy", "EnvSpec", "EarlyStop", "optim", "evaluate",
           "export", "compare", "tune", "UserError", "ConfigError"]
__version__ = "0.2.0"
