"""The recurrent-module contract: a module with a memory, and the one place its state passes.

A module declares itself recurrent by defining ``initial_state(batch) -> state``; its
``forward`` then takes the state and returns the next one::

    def initial_state(self, batch: int) -> State        # a tensor, or a tuple/list/dict of them
    def forward(self, observation, state) -> (output, state)

The state's tensors have the batch first (``[batch, ...]``, one row per env slot) and the
initial state is a constant (zeros, say: no trained parameter in it), because every loop starts a
new episode from it: the state is reset to ``initial_state`` where an episode starts.
``output`` means what a feed-forward module's output means (:mod:`unitrain.policy.action`).
A ``Dict``/``Tuple`` observation's entries are passed by name as for a feed-forward module
(:mod:`unitrain.policy.inputs`), and the state then by the keyword ``state``:
``forward(self, image, vector, state) -> (output, state)``.

:func:`module_step` is the only call of a user's module that passes a state: evaluation,
population evaluation, videos, collection and the sequence losses all go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from unitrain.envs.carry import State, leaves
from unitrain.envs.observation import is_named
from unitrain.errors import ConfigError
from unitrain.policy.inputs import module_inputs

__all__ = ["is_recurrent", "initial_state_of", "module_step", "check_recurrent", "recurrent_layer",
           "refuse_recurrent", "observation_batch", "RECURRENT_DOC"]

# Where users read about the contract (quoted by its errors).
RECURRENT_DOC = "docs/guide.md, 'Recurrent policies'"


def is_recurrent(module: nn.Module) -> bool:
    """Whether ``module`` declares the recurrent contract (an ``initial_state`` method)."""
    return callable(getattr(module, "initial_state", None))


def initial_state_of(module: nn.Module) -> Callable[[int], State] | None:
    """``module.initial_state`` of a recurrent module, ``None`` for a feed-forward one (what
    :func:`unitrain.envs.rollout.evaluate_policy` takes beside ``module.act``)."""
    return module.initial_state if is_recurrent(module) else None  # type: ignore[return-value]


def observation_batch(observation: Any) -> int:
    """The batch size (first dimension) of an observation: a tensor, or named entries."""
    if is_named(observation):
        if hasattr(observation, "batch_size") and len(observation.batch_size):
            return int(observation.batch_size[0])
        return int(next(iter(observation.values())).shape[0])
    return int(observation.shape[0])


def module_step(module: nn.Module, observation: Any,
                state: State | None) -> tuple[torch.Tensor, State | None]:
    """One step of the user's module: ``(output, next state)``.

    A recurrent module is called as ``module(observation, state)`` (named entries:
    ``module(**entries, state=state)``); a feed-forward one as ``module(observation)`` (named
    entries: ``module(**entries)``), with ``state`` ``None`` in and out.

    Raises:
        ConfigError: a recurrent module returned something else than ``(output, state)``.
    """
    args, kwargs = module_inputs(observation)
    if state is None:
        return module(*args, **kwargs), None
    result = module(*args, state, **kwargs) if args else module(**kwargs, state=state)
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and isinstance(result[0], torch.Tensor)):
        raise ConfigError("module", f"{type(module).__name__}.forward(observation, state) must "
                                    f"return (output, state), got {_kind(result)} (see "
                                    f"{RECURRENT_DOC})")
    return result[0], result[1]


def _kind(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def check_recurrent(module: nn.Module, observation: Any) -> torch.Tensor:
    """Run the module once on ``observation`` ``[1, ...]`` and check the contract; return its
    output (for the action contract's size check).

    Raises:
        ConfigError: one line naming what is wrong: a tuple returned by a module without
            ``initial_state``, a state of another structure, shape or dtype than the initial
            one, or an initial state holding trained parameters.
    """
    name = type(module).__name__
    if not is_recurrent(module):
        out, _ = module_step(module, observation, None)
        if isinstance(out, (tuple, list)):
            raise ConfigError("module", f"{name}.forward returns {_kind(out)}; a recurrent module "
                                        "declares initial_state(batch) -> state and "
                                        "forward(observation, state) -> (output, state) (see "
                                        f"{RECURRENT_DOC}); a feed-forward one returns a tensor")
        return out
    batch = observation_batch(observation)
    try:
        initial = module.initial_state(batch)
        first = leaves(initial)
    except TypeError as e:
        raise ConfigError("module", f"{name}.initial_state(batch) must return a tensor or a "
                                    f"tuple/list/dict of tensors ({e})") from None
    if not first:
        raise ConfigError("module", f"{name}.initial_state(batch) returned no tensor")
    if any(t.requires_grad for t in first):
        raise ConfigError("module", f"{name}.initial_state must be a constant (e.g. zeros), not "
                                    "computed from trained parameters: every episode starts "
                                    "from it")
    if any(t.ndim == 0 or t.shape[0] != batch for t in first):
        raise ConfigError("module", f"{name}.initial_state({batch}) must give "
                                    f"tensors whose first dimension is the batch "
                                    f"({batch}); got shapes "
                                    f"{[tuple(t.shape) for t in first]}")
    out, state = module_step(module, observation, initial)
    try:
        after = leaves(state)
    except TypeError:
        after = []
    shapes = [(tuple(t.shape), t.dtype) for t in first]
    if [(tuple(t.shape), t.dtype) for t in after] != shapes:
        raise ConfigError("module", f"{name}.forward must return a state like its "
                                    f"initial_state: tensors {shapes}, got "
                                    f"{[(tuple(t.shape), t.dtype) for t in after] or _kind(state)}")
    return out


def recurrent_layer(module: nn.Module) -> str:
    """The name of the module's first recurrent layer (``nn.RNNBase`` or an RNN cell), or its
    class name when it keeps its memory some other way."""
    from unitrain.policy.nn import GRUCell

    for name, child in module.named_modules():
        if isinstance(child, (nn.RNNBase, nn.RNNCellBase, GRUCell)):
            return f"{name} ({type(child).__name__})"
    return type(module).__name__


def refuse_recurrent(module: nn.Module, rule: str, why: str) -> None:
    """Raise a one-line :class:`ConfigError` when a rule that trains feed-forward modules only is
    given a recurrent one.

    Args:
        module: the user's module.
        rule: the rule's name.
        why: what in the rule needs a feed-forward module.
    """
    if is_recurrent(module):
        raise ConfigError("optimizer", f"{rule} trains feed-forward modules only ({why}); "
                                       f"{type(module).__name__} is recurrent (initial_state); "
                                       "train it with ppo, reinforce or a population rule")
