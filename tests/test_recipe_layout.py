"""Recipes for one env differ only in their optimizer: one trainer block apart from the budget,
one module apart from its action-head options (``action_std``).

A recipe named ``<rule>_<variant>.yaml`` trains a deliberately different network (a linear
policy, say) and is compared with the other recipes of that variant.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from unitrain.app.config import SHIPPED
from unitrain.optim import registered_rules

RECIPES = sorted(SHIPPED.glob("*/*.yaml"))


def _variant(path: Path) -> str:
    """``""`` for ``<rule>.yaml``; the suffix of ``<rule>_<variant>.yaml``."""
    stem = path.stem
    if stem in registered_rules():
        return ""
    rule = max((name for name in registered_rules() if stem.startswith(name + "_")), key=len)
    return stem[len(rule) + 1:]


def _groups() -> dict[tuple[str, str], list[Path]]:
    groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for path in RECIPES:
        groups[(path.parent.name, _variant(path))].append(path)
    return groups


def test_every_env_shares_one_trainer_block_apart_from_the_budget():
    blocks = defaultdict(dict)
    for path in RECIPES:
        trainer = OmegaConf.to_container(OmegaConf.load(path).get("trainer") or {})
        for budget in ("max_frames", "max_epochs"):
            trainer.pop(budget, None)
        blocks[path.parent.name][path.name] = trainer
    for env, by_recipe in blocks.items():
        assert len({repr(sorted(b.items())) for b in by_recipe.values()}) == 1, (env, by_recipe)


@pytest.mark.parametrize("group", sorted(_groups()), ids=lambda g: "/".join(filter(None, g)))
def test_recipes_of_an_env_share_one_module(group: tuple[str, str]):
    modules = {}
    for path in _groups()[group]:
        module = OmegaConf.to_container(OmegaConf.load(path).get("module") or {})
        module.pop("action_std", None)
        modules[path.name] = module
    assert len({repr(sorted(m.items())) for m in modules.values()}) == 1, modules
