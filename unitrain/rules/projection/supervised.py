"""Supervised gradient training: cross-entropy on the dataloader's batches with Adam.

The baseline against which gradient-free supervised rules (:mod:`unitrain.rules.projection.rule`)
are compared through the same Trainer. Adam: Kingma and Ba 2015, "Adam: A Method for Stochastic
Optimization".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch.nn import functional as F

from unitrain.rules.base import UpdateRule
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["Adam"]


@register_rule("adam")
@dataclass
class Adam(UpdateRule):
    """One Adam step on the cross-entropy of the current batch (``ctx.batch``) per iteration.

    Runs without an env: pass ``train_dataloaders`` of ``(inputs, labels)`` to
    :meth:`unitrain.Trainer.fit` (or use a recipe with a ``data:`` block). With several
    processes each rank takes its share of the batches and gradients are averaged.

    Args:
        lr: step size.
        weight_decay: L2 penalty coefficient (Adam's coupled form).
    """

    supervised_only: ClassVar[bool] = True

    lr: float = bounded(1e-3, "(0, inf]")
    weight_decay: float = bounded(0.0, "[0, inf]")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.module = module
        self.optimizer = torch.optim.Adam(module.policy_parameters(), lr=self.lr,
                                          weight_decay=self.weight_decay)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        inputs, labels = ctx.batch
        inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
        logits = self.module(inputs)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        ctx.all_reduce_grads(params)
        self.optimizer.step()
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return {"loss/cross_entropy": float(loss.detach()), "train/accuracy": float(accuracy),
                "frames": 0.0}
