"""Policies: :class:`RLModule` (the user's networks, a ``LightningModule``), the action contract
(:mod:`.action`: what a module's output means, decided by the action space), how the module is
called on an observation (:func:`~.inputs.call_module`: a ``Dict`` observation's entries by
name) and ready-made models (:mod:`.models`). Imports only :mod:`unitrain.envs` and the leaves
below it."""

from unitrain.policy.action import ActionHead
from unitrain.policy.inputs import call_module
from unitrain.policy.models import (ACTIVATIONS, ConvNet, DuelingMLP, GRUPolicy, MLPPolicy,
                                    NatureCNN, ParameterVector, mlp)
from unitrain.policy.module import RLModule

__all__ = ["RLModule", "ActionHead", "MLPPolicy", "GRUPolicy", "ConvNet", "NatureCNN",
           "DuelingMLP", "ParameterVector", "mlp", "ACTIVATIONS", "call_module"]
