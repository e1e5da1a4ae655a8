"""Update rules: every way of training a module, behind one interface (:mod:`.base`).

- :mod:`.gradient`: PPO, REINFORCE, and the off-policy family (DQN, DDPG, TD3, SAC, DSAC-T)
  over TorchRL losses;
- :mod:`.population`: the population service and the population rules (GA, ES, ARS, CEM,
  CSA-ES, CMA-ES, CBO) and the hybrid CEM-RL;
- :mod:`.projection`: feasibility updates by projection (supervised, elite imitation).

Importing this package registers the built-in rules (:mod:`.registry`). The public names are
also :mod:`unitrain.optim`'s (``ut.optim.PPO``).
"""

from unitrain.rules.base import RuleContext, UpdateRule
from unitrain.rules.gradient.ddpg import DDPG
from unitrain.rules.gradient.dqn import DQN
from unitrain.rules.gradient.dsac_t import DSACT
from unitrain.rules.gradient.ppo import PPO
from unitrain.rules.gradient.reinforce import REINFORCE
from unitrain.rules.gradient.sac import SAC
from unitrain.rules.gradient.td3 import TD3
from unitrain.rules.population.ars import ARS
from unitrain.rules.population.cbo import CBO
from unitrain.rules.population.cem import CEM
from unitrain.rules.population.cem_rl import CEMRL
from unitrain.rules.population.cmaes import CMAES
from unitrain.rules.population.csa_es import CSAES
from unitrain.rules.population.es import ES
from unitrain.rules.population.ga import GA
from unitrain.rules.population.strategy import Ask, PopulationRule, Strategy, Told, as_rule
from unitrain.rules.projection.elite_imitation import EliteImitation
from unitrain.rules.projection.rule import Projection
from unitrain.rules.projection.supervised import Adam
from unitrain.rules.registry import get_rule, register_rule, registered_rules

__all__ = ["UpdateRule", "RuleContext", "register_rule", "registered_rules", "get_rule",
           "Strategy", "Ask", "Told", "PopulationRule", "as_rule",
           "PPO", "REINFORCE", "DQN", "DDPG", "DSACT", "SAC", "TD3",
           "ES", "GA", "ARS", "CEM", "CSAES", "CBO", "CMAES", "CEMRL",
           "Projection", "EliteImitation", "Adam"]
