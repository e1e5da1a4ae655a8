"""The registry of update rules by name: ``optimizer: {name: ppo}`` in a recipe.

A rule registers itself where it is defined (``@register_rule("ppo")``); importing
:mod:`unitrain.rules` imports the built-in rules and so registers them. A user's rule in their
own file registers itself when that file is imported, or is named by its class path in a recipe
(``optimizer: {target: mypkg.rules:MyRule}``) without registering at all.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from unitrain.errors import ConfigError

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.rules.base import UpdateRule

__all__ = ["register_rule", "registered_rules", "get_rule", "check_actions"]

_REGISTRY: dict[str, type[UpdateRule]] = {}


def register_rule(name: str):
    """Class decorator: make a rule dataclass available as ``optimizer: {name: <name>}``.

    Args:
        name: the rule's name in recipes and in :func:`get_rule`.
    """

    def wrap(cls: type[UpdateRule]) -> type[UpdateRule]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"update rule {cls.__name__} must be a dataclass")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def registered_rules() -> dict[str, type[UpdateRule]]:
    """All registered rules by name (the built-in ones once :mod:`unitrain.rules` is imported)."""
    return dict(sorted(_REGISTRY.items()))


def get_rule(name: str) -> type[UpdateRule]:
    """The rule class registered as ``name``; a :class:`ConfigError` lists valid names."""
    rules = registered_rules()
    if name not in rules:
        raise ConfigError("name", f"unknown update rule {name!r}; valid: {', '.join(rules)}")
    return rules[name]


def check_actions(rule: Any, info: "EnvInfo") -> None:
    """Refuse, in one line, an env whose action space (or action masks) ``rule`` does not train,
    naming the space and the registered rules that do (read from their ``action_spaces`` and
    ``action_masks``)."""
    if getattr(rule, "supervised_only", False):
        return  # refused by its own check_env, for taking no env at all
    space = info.action_space
    spaces = getattr(rule, "action_spaces", ())
    if space not in spaces:
        able = [n for n, r in registered_rules().items()
                if space in r.action_spaces and not r.supervised_only]
        raise ConfigError("env.id", f"{info.id} has {space} actions "
                                    f"({info.describe_actions()}), which {rule.name} does not "
                                    f"train; rules that do: {', '.join(able)}")
    if info.masked and not getattr(rule, "action_masks", False):
        able = [n for n, r in registered_rules().items()
                if r.action_masks and space in r.action_spaces and not r.supervised_only]
        raise ConfigError("env.id", f"{info.id} has action masks "
                                    f"({info.describe_actions()}), which {rule.name} does not "
                                    f"honour; rules that do: {', '.join(able)}")
