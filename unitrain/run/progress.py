"""One progress bar over the run's budget: env frames (or epochs of a supervised run).

Lightning's bars count batches per epoch and add one per validation; a unitrain epoch is an
evaluation period of varying length, so :class:`FrameProgressBar` shows the frame count against
``max_frames`` instead, with the latest training-episode return, the latest evaluation return,
frames per second and the time left (tqdm's rate and estimate). It is a Lightning ``ProgressBar`` callback: pass your
own progress bar (or ``enable_progress_bar=False``) to replace it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

__all__ = ["FrameProgressBar"]


class FrameProgressBar(ProgressBar):
    """A tqdm bar over frames (env runs) or epochs (supervised runs), on rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.trainer.is_global_zero

    def print(self, *args: Any, **kwargs: Any) -> None:
        (tqdm.write if self._bar is not None else print)(" ".join(map(str, args)), **kwargs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.is_enabled:
            return
        run = pl_module._ctx
        env_run = run is not None and run.env_run
        total = run.services.max_frames if env_run else trainer.max_epochs
        self._bar = tqdm(total=total if total and total > 0 else None,
                         unit=" frames" if env_run else " epochs", unit_scale=env_run,
                         dynamic_ncols=True, file=sys.stdout, leave=True,
                         initial=run.services.frames if env_run else trainer.current_epoch,
                         smoothing=0.1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
                           ) -> None:
        run = pl_module._ctx
        if self._bar is None or run is None or not run.env_run:
            return
        self._bar.update(run.services.frames - self._bar.n)
        self._bar.set_postfix(self._postfix(run), refresh=False)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = pl_module._ctx
        if self._bar is None or run is None:
            return
        if run.env_run:
            self._bar.set_postfix(self._postfix(run))
        else:
            self._bar.update(1)
            accuracy = trainer.callback_metrics.get("test/accuracy")
            if accuracy is not None:
                self._bar.set_postfix({"test accuracy": f"{float(accuracy):.4f}"})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    @staticmethod
    def _postfix(run: Any) -> dict[str, str]:
        post = {}
        if not math.isnan(run.last_return):
            post["return"] = f"{run.last_return:.1f}"
        if run.last_eval is not None:
            post["eval"] = f"{run.last_eval['return_mean']:.1f}"
        return post
