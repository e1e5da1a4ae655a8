"""Black-box test functions as one-step environments, and the module that plays them.

``unitrain/Sphere-v0`` and ``unitrain/Rosenbrock-v0`` (:mod:`unitrain.envs.functions`) play one
step whose reward is ``-f(action)``; :class:`ParameterVector` is the module whose action is its
parameter vector, so a population rule run on them goes through the code path of an RL run.
"""

from unitrain.envs.functions import FUNCTIONS, FunctionEnv, rosenbrock, sphere
from unitrain.policy.models import ParameterVector

__all__ = ["FunctionEnv", "ParameterVector", "sphere", "rosenbrock", "FUNCTIONS"]
