"""unitrain: one Lightning Trainer for every way of training a network.

Gradient rules (PPO, REINFORCE, DDPG, TD3, SAC, DSAC-T), population rules (GA, ES, ARS, CEM, CSA-ES,
CMA-ES, CBO) and projection updates are interchangeable update rules in :mod:`unitrain.optim`, run by :class:`unitrain.Trainer` on a user's
:class:`unitrain.RLModule` over TorchRL collection from gymnasium environments.
"""

from unitrain import functions, optim
from unitrain.checkpoint import evaluate
from unitrain.compare import compare
from unitrain.envs import EnvSpec
from unitrain.errors import ConfigError, UserError
from unitrain.module import MLPPolicy, RLModule
from unitrain.trainer import EarlyStop, Trainer

__all__ = ["Trainer", "RLModule", "MLPPolicy", "EnvSpec", "EarlyStop", "optim", "evaluate",
           "compare", "UserError", "ConfigError"]
__version__ = "0.1.0"
