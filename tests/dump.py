"""A callback for multi-process test scripts: each rank saves what the test compares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch


def _params(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Dump(L.Callback):
    """Save ``{prefix}rank{r}.pt`` at the end of training on every rank.

    It holds the module's state before and after training (``init``, ``params``), the world size,
    the run context's frame and iteration counts, its env seed and observation statistics, the
    rows of an optional recording logger, and whatever ``extra(trainer, module)`` returns.
    """

    def __init__(self, prefix: str = "", rows: Any = None,
                 extra: Callable[[L.Trainer, L.LightningModule], dict[str, Any]] | None = None):
        self.prefix, self.rows, self.extra = prefix, rows, extra
        self.init: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.init = _params(module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ctx = module._ctx.services
        record = {"params": _params(module), "init": self.init, "world_size": trainer.world_size,
                  "frames": ctx.frames, "iterations": ctx.iteration,
                  "env_seed": ctx.train_env_seed,
                  "obs_norm": ctx.obs_norm.state_dict() if ctx.obs_norm is not None else None,
                  "rows": list(self.rows.rows) if self.rows is not None else None}
        if self.extra is not None:
            record.update(self.extra(trainer, module))
        torch.save(record, f"{self.prefix}rank{trainer.global_rank}.pt")
