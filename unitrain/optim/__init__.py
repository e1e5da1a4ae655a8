"""Update rules: every way of training a module, behind one interface (see :mod:`.base`)."""

from unitrain.optim.base import RuleContext, UpdateRule, get_rule, register_rule, registered_rules
from unitrain.optim.ppo import PPO, REINFORCE

__all__ = ["UpdateRule", "RuleContext", "register_rule", "registered_rules", "get_rule",
           "PPO", "REINFORCE"]
