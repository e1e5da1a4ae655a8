"""Seconds per epoch of the digits projection recipe: uncompiled vs compiled solver, side by side.

Projection training (Bergmeister et al., "A projection-based framework for gradient-free and
parallel learning", arXiv:2506.05878) spends its time in the solver's iterations: 50 per batch
of 64, over copies of every weight per sample. This runs ``unitrain fit digits/projection`` (MLP
64-64-10, Douglas-Rachford, cross-entropy output, 3 epochs, one torch thread) once per mode, each
in a fresh process with an empty ``torch.compile`` cache, and prints per mode: the first epoch
(from the creation of the run's event file, so for ``compile`` it includes the compilation), the mean of the later epochs, the test accuracy
after each epoch, and the ratio of the later epochs' times. Epoch times are the wall-clock gaps
between the ``test/accuracy`` events (training, evaluation and logging included). Run::

    python tools/bench_projection.py
    python tools/bench_projection.py --modes false true --repeats 2
    python tools/bench_projection.py --recipe digits/projection_cnn --modes true
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def run(compile_: str, root: Path, index: int, recipe: str = "digits/projection",
        ) -> tuple[list[float], list[float], float]:
    """One fit; returns its epoch durations, accuracies and total wall seconds."""
    run_dir = root / f"run-{compile_}-{index}"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(root / f"cache-{compile_}-{index}"))
    start = time.time()
    subprocess.run([sys.executable, "-m", "unitrain", "fit", recipe,
                    f"optimizer.compile={compile_}", "trainer.num_threads=1",
                    f"run_dir={run_dir}"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    events = acc.Scalars("test/accuracy")
    started = acc.FirstEventTimestamp()
    times = [e.wall_time for e in events]
    epochs = [times[0] - started] + [b - a for a, b in zip(times, times[1:], strict=False)]
    return epochs, [e.value for e in events], time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["false", "true"],
                        choices=["false", "true"], help="values of optimizer.compile")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--recipe", default="digits/projection",
                        help="a projection recipe (e.g. digits/projection_cnn)")
    args = parser.parse_args()
    later: dict[str, list[float]] = {m: [] for m in args.modes}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.repeats):
            for mode in args.modes:
                epochs, accuracy, wall = run(mode, Path(tmp), index, args.recipe)
                later[mode] += epochs[1:]
                print(f"compile={mode:<5} first epoch {epochs[0]:6.2f} s, later epochs "
                      + ", ".join(f"{e:.2f}" for e in epochs[1:]) + " s; test accuracy "
                      + " / ".join(f"{a:.4f}" for a in accuracy) + f"; process {wall:.1f} s",
                      flush=True)
    if "false" in later and "true" in later:
        ratio = statistics.mean(later["false"]) / statistics.mean(later["true"])
        print(f"later epochs: uncompiled {statistics.mean(later['false']):.2f} s, compiled "
              f"{statistics.mean(later['true']):.2f} s: {ratio:.2f}x")


if __name__ == "__main__":
    main()
