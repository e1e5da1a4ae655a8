"""One validation path for settings built in Python and read from recipes.

Every block of settings (an update rule, :class:`~unitrain.envs.EnvSpec`,
:class:`~unitrain.envs.data.DataSpec`, the Trainer's own arguments) is a dataclass deriving from
:class:`Validated`. Constructing one checks each field against its annotation (``int``, ``float``,
``bool``, ``str``, ``X | None``, ``tuple[int, ...]``, nested blocks) and then runs the class's
:meth:`Validated.validate` range checks, so ``PPO(epochs=2.5)`` fails where it is written, with
the same message a recipe gets::

    ConfigError: optimizer.epochs: got 2.5; expected an integer

A field declared with :func:`bounded` or :func:`one_of` carries its range or its choices, checked
on construction with the message :func:`~unitrain.errors.check` gives
(``optimizer.gamma: got 0; expected a number in (0, 1]``): a fixed range or the choices before
:meth:`Validated.validate`, a range bounded by other fields (``[1, buffer_size]``) after it. A
subclass that only changes the default keeps the bound. ``validate`` holds the other checks.

Errors name the field's full recipe key (``block`` + field name). A block nested in another
(``trainer.early_stop``, elite imitation's ``optimizer.fit``) is named by its path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import os
import re
import types
import typing
from typing import Any, ClassVar

from unitrain.errors import ConfigError, check

__all__ = ["Validated", "bounded", "describe", "import_module", "import_object", "one_of",
           "where_imports_look"]


class Validated:
    """Base of settings dataclasses: type checks on construction, then :meth:`validate`.

    Attributes:
        block: the recipe block this class is read from (``"optimizer"``, ``"env"``, ...);
            errors are named ``<block>.<field>``.
    """

    block: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            for name, hint in _field_hints(type(self)).items():
                value = getattr(self, name)
                try:
                    conformed = _conform(value, hint)
                except _Mismatch:
                    raise ConfigError(name, f"got {value!r}; expected {describe(hint)}") from None
                except ConfigError as e:  # a nested block's own error
                    raise ConfigError(f"{name}.{e.field}", e.detail) from None
                if conformed is not value:
                    setattr(self, name, conformed)
            hints = _field_hints(type(self))
            own, bounded_by_others = _constraints(type(self))
            for name, constraint in own.items():
                constraint.check(self, name, hints[name])
            self.validate()
            # After every other check, so that a bad bound is reported as itself.
            for name, constraint in bounded_by_others.items():
                constraint.check(self, name, hints[name])
        except ConfigError as e:
            raise e.prefixed(self.block) if self.block else e from None

    def validate(self) -> None:
        """Range and cross-field checks of this block's fields (raise :class:`ConfigError`
        with the field's name; the block's prefix is added)."""


class _Mismatch(Exception):
    pass


_CONSTRAINT = "unitrain.constraint"
_ENDS = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")


@dataclasses.dataclass(frozen=True)
class _Interval:
    """``low``/``high``: a number, ``inf``/``-inf``, or the name of another field."""

    low: str
    high: str
    closed_low: bool
    closed_high: bool
    null: bool

    @property
    def cross(self) -> bool:
        return any(end.isidentifier() and end != "inf" for end in (self.low, self.high))

    def _end(self, block: Any, end: str) -> tuple[float, str]:
        if end.isidentifier() and end != "inf":
            value = getattr(block, end)
            return value, f"{end}={value}"
        return float(end), end

    def check(self, block: Any, name: str, hint: Any) -> None:
        value = getattr(block, name)
        if value is None and self.null:
            return
        low, low_text = self._end(block, self.low)
        high, high_text = self._end(block, self.high)
        items = value if isinstance(value, tuple) else (value,)
        ok = all((low <= v if self.closed_low else low < v)
                 and (v <= high if self.closed_high else v < high) for v in items)
        if math.isinf(high):
            where = f"{'>=' if self.closed_low else '>'} {low_text}"
        elif math.isinf(low):
            where = f"{'<=' if self.closed_high else '<'} {high_text}"
        else:
            where = (f"in {'[' if self.closed_low else '('}{low_text}, "
                     f"{high_text}{']' if self.closed_high else ')'}")
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        kind = " or ".join(describe(a) for a in kinds)
        valid = f"{kind} {where}" + (" or null" if self.null else "")
        check(ok, name, valid, list(value) if isinstance(value, tuple) else value)


@dataclasses.dataclass(frozen=True)
class _Choice:
    """``options``: the valid values; never bounded by another field."""

    options: tuple[str, ...]
    cross: bool = False

    def check(self, block: Any, name: str, hint: Any) -> None:
        del hint
        value = getattr(block, name)
        check(value in self.options, name, " or ".join(repr(o) for o in self.options), value)


def bounded(default: Any, interval: str, *, null: bool = False) -> Any:
    """A dataclass field whose value must lie in ``interval``.

    Args:
        default: the field's default.
        interval: ``"(low, high]"``, ``[``/``]`` closed and ``(``/``)`` open ends; an end is a
            number, ``inf``/``-inf``, or the name of another field of the block, whose value
            bounds this one. ``"(0, inf]"`` admits every number above 0, ``"(0, inf)"`` only
            finite ones. A list field (``tuple[int, ...]``) bounds every item.
        null: ``None`` is valid too.

    Returns:
        A ``dataclasses.field``; a bad value raises ``got <value>; expected <kind> in (0, 1]``
        (or ``>= 1``, ``< 0``, ``in [1, buffer_size=256]``; ``or null``).
    """
    match = _ENDS.match(interval)
    if match is None:
        raise ValueError(f"interval {interval!r}: expected the form '(low, high]'")
    opening, low, high, closing = match.groups()
    return dataclasses.field(default=default, metadata={_CONSTRAINT: _Interval(
        low, high, opening == "[", closing == "]", null)})


def one_of(default: str, *options: str) -> Any:
    """A dataclass field whose value must be one of ``options`` (``got 'x'; expected 'a' or 'b'``).

    Args:
        default: the field's default.
        options: the valid values.

    Returns:
        A ``dataclasses.field``.
    """
    return dataclasses.field(default=default, metadata={_CONSTRAINT: _Choice(options)})


@functools.cache
def _constraints(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """The declared constraints of ``cls``'s fields, own ranges first, then cross-field ones; a
    field redeclared without one keeps its base class's."""
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for f in getattr(klass, "__dataclass_fields__", {}).values():
            if _CONSTRAINT in f.metadata:
                found[f.name] = f.metadata[_CONSTRAINT]
    names = [f.name for f in dataclasses.fields(cls) if f.name in found]
    return ({n: found[n] for n in names if not found[n].cross},
            {n: found[n] for n in names if found[n].cross})


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` describes it (ints as floats, lists as tuples), or raise."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        nested_error: ConfigError | None = None
        for arg in args:
            try:
                return _conform(value, arg)
            except _Mismatch:
                continue
            except ConfigError as e:
                nested_error = e
        if nested_error is not None:
            raise nested_error
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise _Mismatch
            items = [_conform(v, a) for v, a in zip(value, args)]
        else:
            item_hint = args[0] if args else Any
            items = [_conform(v, item_hint) for v in value]
        return tuple(items) if origin is tuple else list(items)
    if origin is dict or hint is dict:
        if isinstance(value, typing.Mapping):
            return value
        raise _Mismatch
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, typing.Mapping):
            names = [f.name for f in dataclasses.fields(hint) if f.init]
            for key in value:
                if key not in names:
                    raise ConfigError(str(key), f"unknown key; valid keys: {', '.join(names)}")
            return hint(**value)
        raise _Mismatch
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          type(None): "null"}


def describe(hint: Any) -> str:
    """What values ``hint`` admits, in recipe words (``"an integer or null"``)."""
    if hint in _NAMES:
        return _NAMES[hint]
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values ({', '.join(describe(a) for a in args)})"
        item = describe(args[0]) if args and args[0] is not Any else "values"
        plural = {"an integer": "integers", "a number": "numbers", "a string": "strings"}
        return f"a list of {plural.get(item, item)}"
    if origin is dict or hint is dict:
        return "a mapping"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} fields"
    if isinstance(hint, type):
        return f"a {hint.__name__}"
    return str(hint).replace("typing.", "")


def where_imports_look() -> str:
    """Where Python looks for a user's modules, for messages: the working directory and
    ``PYTHONPATH``."""
    return (f"working directory {os.getcwd()}, "
            f"PYTHONPATH={os.environ.get('PYTHONPATH') or '(unset)'}")


def import_module(name: str, key: str, what: str = "module") -> types.ModuleType:
    """Import module ``name`` for the setting ``key``; a failure is a one-line
    :class:`ConfigError` naming the module, the working directory and ``PYTHONPATH``.

    An error raised while the module itself runs (a bug in the user's file) is named too, with
    the module's own exception, so the user sees which file to fix.
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name != e.name and not name.startswith(e.name + "."):
            raise ConfigError(key, f"importing {what} {name!r} failed: {type(e).__name__}: "
                                   f"{e}") from None
        raise ConfigError(key, f"cannot import {what} {name!r}: no module named {e.name!r} "
                               f"({where_imports_look()})") from None
    except Exception as e:  # noqa: BLE001 - the module's own code failed, whatever it raised
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(key, f"importing {what} {name!r} failed: {type(e).__name__}"
                               f"{': ' + first if first else ''}") from None


def import_object(path: str, key: str = "module.target") -> Any:
    """Import ``package.module.Name`` (or ``package.module:Name``).

    Raises:
        ConfigError: one line naming the module that cannot be imported (with the working
            directory and ``PYTHONPATH``) or the attribute it lacks.
    """
    if ":" in path:
        modname, _, attr = path.partition(":")
    else:
        modname, _, attr = path.rpartition(".")
    if not modname or not attr:
        raise ConfigError(key, f"got {path!r}; expected a class path such as "
                               "unitrain.MLPPolicy or mypackage.models:Policy")
    module = import_module(modname, key)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(key, f"module {modname!r} ({getattr(module, '__file__', '?')}) "
                                   f"has no attribute {attr!r}") from None
    return obj
