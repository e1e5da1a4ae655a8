"""Helpers to compare run states (module, optimizers, rule, frames, RNG) exactly, and what a
run logged. The state comparisons are :mod:`unitrain.testing`'s, for users' suites too."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto.event_pb2 import SessionLog

from unitrain.testing import CaptureStart, assert_same, checkpoint_state

__all__ = ["CaptureStart", "assert_same", "checkpoint_state", "scalar_steps"]


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
