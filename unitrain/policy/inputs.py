"""How the user's module is called on an observation: the one place that decides it.

A Box observation is passed as it is, ``module(observation)``. A named observation (a ``Dict`` or
``Tuple`` space; :mod:`unitrain.envs.observation`) is passed by name,
``module(**{name: entry})``, so a module over an image and a vector writes
``forward(self, image, vector)``. Every caller goes through :func:`call_module`: ``module.act``,
the rules' actors (:func:`~unitrain.policy.action.stochastic_actor`, the off-policy actors), the
population evaluator (``functional_call`` of :func:`call_module` under ``vmap``), evaluation,
video and export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unitrain.envs.observation import is_named

__all__ = ["ModuleCall", "call_module", "module_inputs"]


def module_inputs(observation: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments the module's ``forward`` receives for
    ``observation``: ``((observation,), {})`` for a tensor, ``((), {name: entry})`` for named
    entries (a TensorDict or a mapping)."""
    if is_named(observation):
        return (), {str(key): observation[key] for key in observation.keys()}
    return (observation,), {}


def call_module(module: nn.Module, observation: Any, method: str | None = None) -> torch.Tensor:
    """The module's output for ``observation`` (see the module docstring for how it is passed).

    Args:
        module: the user's module.
        observation: a tensor, or named entries (a TensorDict or a mapping).
        method: another method of the module to call the same way (``"value"``), instead of
            ``forward``.
    """
    args, kwargs = module_inputs(observation)
    fn = module if method is None else getattr(module, method)
    return fn(*args, **kwargs)


class ModuleCall(nn.Module):
    """``observation -> call_module(module, observation)`` as a module (for TensorDict
    modules that read ``"observation"`` whole, a sub-TensorDict for named entries)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, observation: Any) -> torch.Tensor:
        return call_module(self.module, observation)
