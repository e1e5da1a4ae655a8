"""Every use unitrain makes of Lightning's internals: one function each.

The rest of unitrain uses Lightning's public API only. Each function here names the Lightning
release it was written against and what breaks if Lightning changes what it reaches into;
``tests/test_lightning_compat.py`` has one test per function that runs it against the real
Lightning objects and fails when it stops having its effect. After upgrading Lightning, those
tests say what (if anything) to rewrite here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning as L

__all__ = ["WRITTEN_AGAINST", "advance_global_step"]

# The Lightning release the functions below were written against (and tested with).
WRITTEN_AGAINST = "2.6.6"


def advance_global_step(trainer: "L.Trainer") -> None:
    """Count one optimizer step in ``trainer.global_step`` (unitrain counts one per rule iteration).

    Written against Lightning 2.6.6, where a module with manual optimization (every
    :class:`~unitrain.RLModule`) reads ``trainer.global_step`` from
    ``trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress``, a counter that
    Lightning advances only when an optimizer it wrapped steps, and saves with the loops' state
    in every checkpoint. Rules step their own ``torch.optim`` optimizers any number of times per
    iteration (or none), and Lightning offers no public way to advance the counter.

    If Lightning moves the counter, this raises ``AttributeError`` on a run's first iteration; if
    ``global_step`` stops reading it, ``global_step`` stays 0: ``max_steps`` and step-based
    callbacks (``ModelCheckpoint(every_n_train_steps=...)``) never fire, and a resumed run does
    not continue the checkpoint's count.

    Args:
        trainer: the Trainer running the module, inside a training step.
    """
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()
