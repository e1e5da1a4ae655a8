"""Policies: :class:`RLModule` (the user's networks, a ``LightningModule``), the action contract
(:mod:`.action`: what a module's output means, decided by the action space) and ready-made
models (:mod:`.models`). Imports only :mod:`unitrain.envs` and the leaves below it."""

from unitrain.policy.action import ActionHead
from unitrain.policy.models import (ACTIVATIONS, ConvNet, GRUPolicy, MLPPolicy, NatureCNN,
                                    ParameterVector, mlp)
from unitrain.policy.module import RLModule

__all__ = ["RLModule", "ActionHead", "MLPPolicy", "GRUPolicy", "ConvNet", "NatureCNN", "ParameterVector", "mlp",
           "ACTIVATIONS"]
