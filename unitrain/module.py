"""``RLModule``: the user's networks, as a LightningModule whose iterations belong to an update rule.

Users subclass :class:`RLModule`, build their networks in ``__init__`` and write ``forward``:

- discrete actions: ``forward(observation) -> logits`` of shape ``[..., n_actions]``;
- continuous actions: ``forward(observation) -> action mean`` of shape ``[..., act_dim]`` in
  the env's units (rules that need a state-dependent spread accept ``[..., 2 * act_dim]``:
  mean, then an unconstrained scale).

Everything else (the training step, evaluation, checkpoint contents, the dataloader Lightning
expects) has defaults supplied here and by the update rule chosen on the :class:`~unitrain.Trainer`.
Networks that a rule adds (a value function, critics) live under ``module.aux``: they are moved,
checkpointed and synchronised with the module, and :meth:`RLModule.policy_parameters` leaves them
out, so population rules evolve only the policy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Sequence

import lightning as L
import torch
from torch import nn

if TYPE_CHECKING:
    from unitrain.context import RunContext
    from unitrain.envs import EnvInfo

__all__ = ["RLModule", "MLPPolicy", "mlp"]


class RLModule(L.LightningModule):
    """Base class for modules trained by unitrain's update rules.

    Constructor arguments of subclasses are recorded as hyperparameters (so a checkpoint can
    rebuild the module); recipes may leave ``obs_dim``, ``act_dim``, ``obs_shape`` and
    ``discrete`` out, and they are filled in from the environment.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Lightning logs module hparams itself; unitrain logs the whole run's configuration.
        self._log_hyperparams = False
        self.save_hyperparameters()
        self._ctx: RunContext | None = None
        self.env_info: EnvInfo | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles of the module (TorchRL losses deep-copy their networks) leave the
        # run context behind: envs, generators and the rule belong to the run, not the networks.
        state = super().__getstate__()
        state["_ctx"] = None
        return state

    # ------------------------------------------------------------------ user-facing helpers
    def add_aux(self, name: str, net: nn.Module) -> nn.Module:
        """Register an auxiliary network (value function, critic) under ``self.aux[name]``.

        An existing network of that name (from the user, or from a restored run) is kept.
        """
        if not hasattr(self, "aux"):
            self.aux = nn.ModuleDict()
        if name not in self.aux:
            self.aux[name] = net
        return self.aux[name]

    def named_policy_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters of the policy: all trainable parameters except those under ``aux``."""
        for name, p in self.named_parameters():
            if not name.startswith("aux.") and p.requires_grad:
                yield name, p

    def policy_parameters(self) -> list[nn.Parameter]:
        """See :meth:`named_policy_parameters`."""
        return [p for _, p in self.named_policy_parameters()]

    def act(self, observation: torch.Tensor) -> torch.Tensor:
        """The deterministic action: argmax of the logits, or the mean clamped to the bounds."""
        out = self(observation)
        info = self.env_info
        if info is None:
            raise RuntimeError("act() needs the env's action space; fit or evaluate the module first")
        if info.discrete:
            return out.argmax(-1)
        mean = out[..., : info.act_dim]
        return torch.clamp(mean, info.action_low.to(mean), info.action_high.to(mean))

    # ------------------------------------------------------------------ Lightning plumbing
    def setup(self, stage: str) -> None:
        if self._ctx is not None and stage == "fit":
            self._ctx.setup()

    def configure_optimizers(self) -> Any:
        if self._ctx is None:
            return None
        opts = self._ctx.rule.optimizers()
        return opts or None

    def train_dataloader(self) -> Any:
        assert self._ctx is not None, "RLModule.train_dataloader: the module is not attached to a unitrain.Trainer"
        return self._ctx.train_iterable()

    def val_dataloader(self) -> Any:
        assert self._ctx is not None
        return self._ctx.val_iterable()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        assert self._ctx is not None
        self._ctx.training_step(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert self._ctx is not None
        self._ctx.validation_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self._ctx is not None:
            self._ctx.on_validation_epoch_end()

    def on_train_end(self) -> None:
        if self._ctx is not None:
            self._ctx.on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ctx is not None:
            checkpoint["unitrain"] = self._ctx.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ctx is not None and "unitrain" in checkpoint:
            self._ctx.load_state_dict(checkpoint["unitrain"])


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (64, 64),
        activation: type[nn.Module] = nn.Tanh, out_gain: float | None = None) -> nn.Sequential:
    """A multilayer perceptron with orthogonal initialisation (√2 gain, output gain ``out_gain``).

    Args:
        in_dim: input features.
        out_dim: output features.
        hidden: sizes of the hidden layers.
        activation: activation class between layers.
        out_gain: gain of the last layer's orthogonal init (``None`` keeps PyTorch's default).
    """
    layers: list[nn.Module] = []
    dims = [in_dim, *hidden]
    for a, b in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(a, b)
        nn.init.orthogonal_(lin.weight, math.sqrt(2))
        nn.init.zeros_(lin.bias)
        layers += [lin, activation()]
    last = nn.Linear(dims[-1], out_dim)
    if out_gain is not None:
        nn.init.orthogonal_(last.weight, out_gain)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


class MLPPolicy(RLModule):
    """A multilayer-perceptron policy over flattened observations.

    Args:
        obs_dim: flattened observation size (filled in from the env by recipes).
        act_dim: number of actions (discrete) or action size (continuous).
        hidden: hidden layer sizes; ``[]`` gives a linear policy.
        activation: ``"tanh"``, ``"relu"``, ``"gelu"`` or ``"elu"``.
        out_scale: gain of the output layer's init (small values start near-uniform/zero actions).
        obs_shape: observation shape; multi-dimensional observations are flattened.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", out_scale: float = 0.01,
                 obs_shape: Sequence[int] | None = None) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
        self.obs_ndim = len(obs_shape) if obs_shape else 1
        self.net = mlp(obs_dim, act_dim, tuple(hidden), _ACTIVATIONS[activation], out_scale)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        x = observation.flatten(-self.obs_ndim) if self.obs_ndim > 1 else observation
        return self.net(x.float())
