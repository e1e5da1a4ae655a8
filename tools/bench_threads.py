"""Torch threads per process when another process shares the cores: 1 (the default) vs 2.

Runs a shipped recipe (default: ``pendulum/ddpg``, 256-unit updates) for a fixed budget with
``trainer.num_threads=1`` and ``=2`` in alternating rounds while a second CPU-bound process spins
beside it, and prints gradient updates per second (off-policy rules) or frames per second of
each, with their ratio. Two threads was the previous default on a 2-core machine (cores divided
among the run's processes).

    python tools/bench_threads.py                       # pendulum/ddpg, 4k frames, 2 rounds
    python tools/bench_threads.py --recipe cartpole/ppo --frames 20000 --no-busy
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unitrain.app.config import build_module, find_recipe, load_recipe
from unitrain.envs import env_info
from unitrain.run.trainer import Trainer


def _spin(stop: "mp.synchronize.Event") -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def _run(recipe: str, threads: int, frames: int, run_dir: Path) -> tuple[float, float, float]:
    r = load_recipe(find_recipe(recipe), [f"trainer.max_frames={frames}",
                                           f"trainer.num_threads={threads}"])
    module = build_module(r.module, env_info(r.env))
    trainer = Trainer(r.env, r.optimizer, seed=r.seed, run_dir=run_dir, logger=False,
                      enable_progress_bar=False, **r.trainer.trainer_kwargs())
    start = time.perf_counter()
    trainer.fit(module)
    wall = time.perf_counter() - start
    updates = float(trainer.rule.state_dict().get("updates", 0)) if hasattr(
        trainer.rule, "loop") else 0.0
    return wall, updates / wall, trainer.summary["frames"] / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pendulum/ddpg")
    parser.add_argument("--frames", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-busy", action="store_true", help="no competing process")
    args = parser.parse_args()
    stop = mp.Event()
    busy = None if args.no_busy else mp.Process(target=_spin, args=(stop,), daemon=True)
    if busy is not None:
        busy.start()
    results: dict[int, list[tuple[float, float, float]]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in range(args.rounds):
                for threads in (1, 2) if k % 2 == 0 else (2, 1):
                    results[threads].append(
                        _run(args.recipe, threads, args.frames, Path(tmp) / f"{threads}-{k}"))
                    print(f"round {k}: {threads} thread(s): {results[threads][-1]}", flush=True)
    finally:
        stop.set()
        if busy is not None:
            busy.join(timeout=5)
    torch.set_num_threads(1)
    med = {t: [statistics.median(col) for col in zip(*results[t])] for t in (1, 2)}
    print(f"\n{args.recipe}, {args.frames} frames, "
          f"{'no other process' if args.no_busy else 'one CPU-bound process beside it'}; "
          f"medians over {args.rounds} rounds")
    print(f"{'threads':<9} {'updates/s':>10} {'frames/s':>10} {'wall s':>8}")
    for t in (2, 1):
        wall, ups, fps = med[t]
        print(f"{t:<9} {ups:>10,.1f} {fps:>10,.1f} {wall:>8.1f}")
    print(f"1 thread vs 2: {med[1][1] / max(med[2][1], 1e-9):.2f}x updates/s, "
          f"{med[1][2] / med[2][2]:.2f}x frames/s")


if __name__ == "__main__":
    main()
