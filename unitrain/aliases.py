"""The module paths of unitrain 0.1.0, kept importable for one release.

0.2.0 split the package into layers (``envs``, ``policy``, ``rules``, ``run``, ``app``; see
CHANGELOG.md). An import of an old path (``import unitrain.trainer``,
``from unitrain.optim.ppo import PPO``) gets the module at its new path, with a
:class:`DeprecationWarning` naming it; a checkpoint of 0.1.0 that records its module class as
``unitrain.module:MLPPolicy`` still loads. The table :data:`MOVED` is the whole list.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED: dict[str, str] = {
    "unitrain.action": "unitrain.policy.action",
    "unitrain.adapter": "unitrain.run.adapter",
    "unitrain.checkpoint": "unitrain.run.checkpoint",
    "unitrain.cli": "unitrain.app.cli",
    "unitrain.collect": "unitrain.envs.collect",
    "unitrain.compare": "unitrain.app.compare",
    "unitrain.config": "unitrain.app.config",
    "unitrain.data": "unitrain.envs.data",
    "unitrain.models": "unitrain.policy.models",
    "unitrain.module": "unitrain.policy",
    "unitrain.nn": "unitrain.policy.nn",
    "unitrain.objectives": "unitrain.rules.gradient",
    "unitrain.objectives.dsac_t": "unitrain.rules.gradient.dsac_t_loss",
    "unitrain.optim.base": "unitrain.rules",
    "unitrain.optim.ppo": "unitrain.rules.gradient.ppo",
    "unitrain.optim.reinforce": "unitrain.rules.gradient.reinforce",
    "unitrain.optim.offpolicy": "unitrain.rules.gradient.offpolicy",
    "unitrain.optim.ddpg": "unitrain.rules.gradient.ddpg",
    "unitrain.optim.td3": "unitrain.rules.gradient.td3",
    "unitrain.optim.sac": "unitrain.rules.gradient.sac",
    "unitrain.optim.dsac_t": "unitrain.rules.gradient.dsac_t",
    "unitrain.optim.es": "unitrain.rules.population.es",
    "unitrain.optim.ga": "unitrain.rules.population.ga",
    "unitrain.optim.ars": "unitrain.rules.population.ars",
    "unitrain.optim.cem": "unitrain.rules.population.cem",
    "unitrain.optim.csa_es": "unitrain.rules.population.csa_es",
    "unitrain.optim.cbo": "unitrain.rules.population.cbo",
    "unitrain.optim.cmaes": "unitrain.rules.population.cmaes",
    "unitrain.optim.cem_rl": "unitrain.rules.population.cem_rl",
    "unitrain.optim.projection": "unitrain.rules.projection.rule",
    "unitrain.optim.elite_imitation": "unitrain.rules.projection.elite_imitation",
    "unitrain.optim.supervised": "unitrain.rules.projection.supervised",
    "unitrain.population": "unitrain.rules.population.service",
    "unitrain.progress": "unitrain.run.progress",
    "unitrain.projection": "unitrain.rules.projection",
    "unitrain.projection.graph": "unitrain.rules.projection.graph",
    "unitrain.projection.operators": "unitrain.rules.projection.operators",
    "unitrain.projection.solvers": "unitrain.rules.projection.solvers",
    "unitrain.replay": "unitrain.envs.replay",
    "unitrain.rollout": "unitrain.envs.rollout",
    "unitrain.safety": "unitrain.run.safety",
    "unitrain.services": "unitrain.run.services",
    "unitrain.trainer": "unitrain.run.trainer",
    "unitrain.video": "unitrain.run.video",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of :data:`MOVED` and loads each as the module at its new path."""

    def __init__(self) -> None:
        self._spec: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        del path, target
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new} in unitrain 0.2.0; the old path goes in "
                      "0.3.0", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._spec[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name; the import system has just set the old name's
        # spec on it, which would make it look like a different module.
        module.__spec__ = self._spec[module.__spec__.name]
        module.__loader__ = module.__spec__.loader


class _Package(ModuleType):
    """The ``unitrain`` package's module type: importing an old path whose last name is also a
    public function of the package (``unitrain.compare``) must not replace that function with
    the module, which the import system would otherwise do once the old path is loaded."""

    def __setattr__(self, name: str, value: object) -> None:
        current = self.__dict__.get(name)
        if (isinstance(value, ModuleType) and current is not None
                and not isinstance(current, ModuleType)
                and f"{self.__name__}.{name}" in MOVED):
            return
        super().__setattr__(name, value)


def install() -> None:
    """Make the old paths importable (once per process; :mod:`unitrain` calls it)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
    package = sys.modules[__name__.rpartition(".")[0]]
    if type(package) is ModuleType:
        package.__class__ = _Package
