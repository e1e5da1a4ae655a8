"""Update rules by their public names: ``ut.optim.PPO(...)``, ``ut.optim.GA(...)``, ...

The rules live in :mod:`unitrain.rules` (the interface, the registry, and the gradient,
population and projection families); this namespace is where users find them, as they find
optimizers in ``torch.optim``.
"""

from unitrain.rules import (
                            ARS,
                            CBO,
                            CEM,
                            CEMRL,
                            CMAES,
                            CSAES,
                            DDPG,
                            DSACT,
                            ES,
                            GA,
                            PPO,
                            REINFORCE,
                            SAC,
                            TD3,
                            Adam,
                            EliteImitation,
                            Projection,
                            RuleContext,
                            UpdateRule,
                            get_rule,
                            register_rule,
                            registered_rules,
)

__all__ = ["UpdateRule", "RuleContext", "register_rule", "registered_rules", "get_rule",
           "PPO", "REINFORCE", "DDPG", "DSACT", "SAC", "TD3",
           "ES", "GA", "ARS", "CEM", "CSAES", "CBO", "CMAES", "CEMRL",
           "Projection", "EliteImitation", "Adam"]
