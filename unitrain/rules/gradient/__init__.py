"""Gradient rules: on-policy (PPO, REINFORCE) and off-policy (DDPG, TD3, SAC, DSAC-T) over
TorchRL losses, sharing the off-policy loop of :mod:`.offpolicy`; DSAC-T's loss is a TorchRL
``LossModule`` of ours (:mod:`.dsac_t_loss`)."""

from unitrain.rules.gradient.dsac_t_loss import (DSACTActor, DSACTCritic, DSACTLoss,
                                                 make_dsac_t_networks)

__all__ = ["DSACTActor", "DSACTCritic", "DSACTLoss", "make_dsac_t_networks"]
