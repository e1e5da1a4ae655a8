"""Recurrent state carried per env slot: a tensor, or a tuple/list/dict of tensors, whose first
dimension is the slot (the batch).

A recurrent policy's state (see "Recurrent policies" in ``docs/guide.md``) travels beside the
observations: every loop that steps envs keeps one row of it per slot, hands the policy the rows
of the slots it acts for, stores what the policy returns, and puts a slot's row back to the
initial state where that slot's episode ends. These helpers do that for any nesting of tensors,
so the loops never look inside a state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["State", "map_state", "leaves", "take", "put_", "reset_", "where_start",
           "state_like", "flatten_state", "unflatten_state"]

# A tensor, or a tuple / list / dict of states.
State = Any


def map_state(fn: Callable[..., torch.Tensor], state: State, *others: State) -> State:
    """``fn`` applied to every tensor of ``state`` (and the matching tensors of ``others``)."""
    if isinstance(state, torch.Tensor):
        return fn(state, *others)
    if isinstance(state, dict):
        return {k: map_state(fn, v, *(o[k] for o in others)) for k, v in state.items()}
    if isinstance(state, (tuple, list)):
        out = [map_state(fn, v, *(o[i] for o in others)) for i, v in enumerate(state)]
        return type(state)(out) if isinstance(state, list) else tuple(out)
    raise TypeError(f"a recurrent state holds tensors, tuples, lists and dicts; got "
                    f"{type(state).__name__}")


def leaves(state: State) -> list[torch.Tensor]:
    """The tensors of ``state`` in a fixed order (dict keys in insertion order)."""
    found: list[torch.Tensor] = []
    map_state(lambda t: found.append(t) or t, state)
    return found


def take(state: State, index: slice | torch.Tensor) -> State:
    """The rows ``index`` of every tensor (a view for a slice)."""
    return map_state(lambda t: t[index if isinstance(index, slice) else index.to(t.device)], state)


def put_(state: State, index: slice | torch.Tensor, value: State) -> None:
    """Write ``value``'s rows into rows ``index`` of ``state``, in place."""
    def write(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t[index if isinstance(index, slice) else index.to(t.device)] = v.to(t.dtype)
        return t

    map_state(write, state, value)


def reset_(state: State, initial: State, index: torch.Tensor) -> None:
    """Put rows ``index`` of ``state`` back to the same rows of ``initial``, in place."""
    put_(state, index, take(initial, index))


def where_start(start: torch.Tensor, initial: State, state: State) -> State:
    """``initial`` where ``start`` ``[B]`` (bool) is true, ``state`` elsewhere (a new state)."""
    def pick(i: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        mask = start.to(s.device).reshape(-1, *[1] * (s.ndim - 1))
        return torch.where(mask, i.to(s), s)

    return map_state(pick, initial, state)


def state_like(state: State) -> State:
    """A copy of ``state`` (new tensors)."""
    return map_state(lambda t: t.clone(), state)


def flatten_state(state: State) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` under the names ``"0"``, ``"1"``, ... (for TensorDict keys)."""
    return {str(i): t for i, t in enumerate(leaves(state))}


def unflatten_state(like: State, flat: dict[str, torch.Tensor] | Any) -> State:
    """The state of the structure of ``like`` from :func:`flatten_state`'s names."""
    count = iter(range(len(leaves(like))))
    return map_state(lambda _: flat[str(next(count))], like)
