"""Update rules by their public names: ``ut.optim.PPO(...)``, ``ut.optim.GA(...)``, ...

The rules live in :mod:`unitrain.rules` (the interface, the registry, and the gradient,
population and projection families); this namespace is where users find them, as they find
optimizers in ``torch.optim``.
"""

from unitrain.rules import *  # noqa: F403  (the public names of unitrain.rules)
from unitrain.rules import __all__  # noqa: F401

