"""Helpers to compare run states (module, optimizers, rule, frames, RNG) exactly, and what a
run logged."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive exact equality of nested dicts/lists/tuples/tensors/arrays/scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: {a.flatten()[:4]} != {b.flatten()[:4]}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class CaptureStart(L.Callback):
    """Capture the full training state at the start of training (after any checkpoint restore)."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ctx = module._ctx.services
        rule = module._ctx.rule
        self.state = {
            "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
            # What Lightning checkpoints: the rule's optimizers, or the placeholder Lightning
            # uses when a gradient-free rule has none.
            "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
            "rule": copy.deepcopy(rule.state_dict()),
            "frames": ctx.frames,
            "iteration": ctx.iteration,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "generator": ctx.generator.get_state(),
        }


def checkpoint_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The same fields as :class:`CaptureStart`, read from a checkpoint (rank 0)."""
    un = ckpt["unitrain"]
    rng = un["rng"][0]
    return {
        "params": ckpt["state_dict"],
        "optimizers": ckpt["optimizer_states"],
        "rule": un["rule"],
        "frames": un["frames"],
        "iteration": un["iteration"],
        "torch_rng": rng["torch"],
        "numpy_rng": rng["numpy"],
        "generator": rng["generator"],
    }


def scalar_steps(run: Path) -> dict[str, list[int]]:
    """The steps of every scalar curve in ``run``'s event files, in the order written, with
    only what a resumed run asks to hide (its ``purge_step``) hidden."""
    files = []
    for path in run.glob("events.out.tfevents.*"):
        events = list(EventFileLoader(str(path)).Load())
        files.append((events[0].wall_time, events))
    steps: dict[str, list[int]] = {}
    for _, events in sorted(files, key=lambda f: f[0]):
        for event in events:
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = {tag: [s for s in seen if s < event.step] for tag, seen in steps.items()}
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    steps.setdefault(value.tag, []).append(event.step)
    return steps
