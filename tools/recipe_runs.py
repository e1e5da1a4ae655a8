"""Run shipped recipes as shipped and check their documented targets.

Each recipe runs through ``unitrain fit`` in a process of its own (seed 0 unless ``--seeds``);
the table gives the final deterministic evaluation, the frames, the first evaluation that reached
the target and ``wall_s`` from ``summary.json``, and whether the target was met:

- ``cartpole/*``: a final evaluation return >= 475;
- ``pendulum/*``: a final evaluation return >= -200 within 20,100 frames.

    python tools/recipe_runs.py pendulum/ddpg pendulum/dsac_t
    python tools/recipe_runs.py cartpole/ars cartpole/cem --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TARGETS = {"cartpole": (475.0, None), "pendulum": (-200.0, 20_100)}


def run(recipe: str, seed: int, root: Path) -> dict:
    run_dir = root / f"{recipe.replace('/', '-')}-{seed}"
    proc = subprocess.run([sys.executable, "-m", "unitrain", "fit", recipe, f"seed={seed}",
                           f"run_dir={run_dir}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{recipe} seed {seed} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    target, max_frames = TARGETS[recipe.split("/")[0]]
    first = next((e.step for e in acc.Scalars("eval/return_mean") if e.value >= target), None)
    met = summary["eval/return_mean"] >= target and (max_frames is None
                                                     or summary["frames"] <= max_frames)
    return {"recipe": recipe, "seed": seed, "return": summary["eval/return_mean"],
            "frames": summary["frames"], "first_at_target": first, "wall_s": summary["wall_s"],
            "target": target, "met": met}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="shipped recipes, e.g. pendulum/ddpg")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes:
            for seed in args.seeds:
                rows.append(run(recipe, seed, Path(tmp)))
                r = rows[-1]
                print(f"{r['recipe']:<22} seed {r['seed']}  return {r['return']:9.1f}  "
                      f"frames {r['frames']:>9,}  first >= {r['target']:g} at "
                      f"{r['first_at_target'] if r['first_at_target'] is not None else '-':>8}  "
                      f"wall {r['wall_s']:7.1f} s  {'met' if r['met'] else 'NOT MET'}",
                      flush=True)
    if not all(r["met"] for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
