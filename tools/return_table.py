"""Run recipes at the same budget and print their evaluation return against frames, side by side.

Each recipe runs through ``unitrain fit`` in a process of its own with the given overrides (the
same for all); the table has one row per evaluation (the Trainer evaluates every tenth of the
budget unless told otherwise), the frames of that evaluation and each recipe's deterministic
evaluation mean return there, then the final return and ``wall_s`` of each.

    python tools/return_table.py halfcheetah/es_linear halfcheetah/cmaes_linear halfcheetah/ars_linear
    python tools/return_table.py cartpole/cmaes cartpole/csa_es --set trainer.max_frames=50000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def run(recipe: str, seed: int, overrides: list[str], root: Path) -> dict:
    run_dir = root / f"{recipe.replace('/', '-')}-{seed}"
    proc = subprocess.run([sys.executable, "-m", "unitrain", "fit", recipe, f"seed={seed}",
                           f"run_dir={run_dir}", *overrides], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    curve = [(e.step, e.value) for e in acc.Scalars("eval/return_mean")]
    return {"curve": curve, "final": summary["eval/return_mean"], "frames": summary["frames"],
            "wall_s": summary["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every recipe")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            results[recipe] = run(recipe, args.seed, args.set, Path(tmp))
            print(f"{recipe}: final {results[recipe]['final']:.1f} at "
                  f"{results[recipe]['frames']:,} frames, wall {results[recipe]['wall_s']:.0f} s",
                  flush=True)
    rows = max(len(r["curve"]) for r in results.values())
    print("\n| evaluation | " + " | ".join(f"{r} (frames: return)" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for i in range(rows):
        cells = [f"{r['curve'][i][0]:,}: {r['curve'][i][1]:.1f}" if i < len(r["curve"]) else ""
                 for r in results.values()]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    print("| final | " + " | ".join(f"{r['final']:.1f} ({r['wall_s']:.0f} s)"
                                    for r in results.values()) + " |")


if __name__ == "__main__":
    main()
