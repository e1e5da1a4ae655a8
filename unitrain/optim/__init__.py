"""Update rules: every way of training a module, behind one interface (see :mod:`.base`)."""

from unitrain.optim.base import RuleContext, UpdateRule, get_rule, register_rule, registered_rules
from unitrain.optim.ppo import PPO
from unitrain.optim.reinforce import REINFORCE
from unitrain.optim.ddpg import DDPG
from unitrain.optim.dsac_t import DSACT
from unitrain.optim.sac import SAC
from unitrain.optim.td3 import TD3
from unitrain.optim.es import ES
from unitrain.optim.ga import GA
from unitrain.optim.ars import ARS
from unitrain.optim.cem import CEM
from unitrain.optim.csa_es import CSAES
from unitrain.optim.cbo import CBO
from unitrain.optim.cmaes import CMAES
from unitrain.optim.cem_rl import CEMRL
from unitrain.optim.projection import Projection
from unitrain.optim.elite_imitation import EliteImitation
from unitrain.optim.supervised import Adam

__all__ = ["UpdateRule", "RuleContext", "register_rule", "registered_rules", "get_rule",
           "PPO", "REINFORCE"]
__all__ += ["DDPG", "DSACT", "SAC", "TD3"]
__all__ += ["ES", "GA", "ARS", "CEM", "CSAES", "CBO", "CMAES", "CEMRL"]
__all__ += ["Projection", "EliteImitation", "Adam"]
