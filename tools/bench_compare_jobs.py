"""How many runs `unitrain compare` should run at once here: runs per minute at --jobs 1, 2, ...

Runs the same compare (RECIPE x SEEDS seeds) once per job count, side by side in one process
(fresh output directories), and prints the wall time of the whole compare, the mean training
seconds of a run (`wall_s` of its summary: how much the runs slowed each other down) and the
throughput relative to --jobs 1.

    python tools/bench_compare_jobs.py --recipe cartpole/es --seeds 4 --frames 100000 --jobs 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(recipe: str, seeds: int, frames: int, jobs: int, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "unitrain", "compare", recipe, "--seeds", str(seeds),
                    "--frames", str(frames), "--jobs", str(jobs), "--out", str(out)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    entry = next(iter(results["recipes"].values()))
    walls = [w for w in entry["wall_s"].values() if w is not None]
    return wall, sum(walls) / len(walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cartpole/es")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    print(f"cores available: {len(os.sched_getaffinity(0))}; {args.recipe} x {args.seeds} seeds, "
          f"{args.frames:,} frames each")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in args.jobs:
            wall, per_run = run(args.recipe, args.seeds, args.frames, jobs, Path(tmp) / f"j{jobs}")
            rate = args.seeds / wall * 60
            base = base or rate
            print(f"--jobs {jobs}: {wall:6.1f} s for all runs, {per_run:5.1f} s of training per "
                  f"run, {rate:5.2f} runs/min = {rate / base:.2f}x --jobs {args.jobs[0]}")


if __name__ == "__main__":
    main()
