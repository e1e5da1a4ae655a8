"""Loss modules (TorchRL :class:`~torchrl.objectives.LossModule` subclasses)."""

from unitrain.objectives.dsac_t import DSACTActor, DSACTCritic, DSACTLoss, make_dsac_t_networks

__all__ = ["DSACTActor", "DSACTCritic", "DSACTLoss", "make_dsac_t_networks"]
