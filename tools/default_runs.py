"""Every rule with its defaults: a Python-API run with only the env, the rule and ``max_frames``.

Discrete-action rules train ``unitrain.MLPPolicy`` on CartPole-v1 for 100k frames, the
continuous-only rules (DDPG, DSAC-T) on Pendulum-v1 for 20k, each as a user would first try it:
``ut.Trainer(env=ENV, optimizer=RULE(), max_frames=N).fit(ut.MLPPolicy(obs_dim, act_dim))``
(elite imitation fits by projection, so its module has ReLU units). Prints, per rule, the wall
time of ``fit`` (all defaults: evaluation cadence, threads, envs), the frames and the final
deterministic evaluation.

    python tools/default_runs.py                  # every rule
    python tools/default_runs.py --rules ddpg es  # some
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import unitrain as ut
from unitrain.envs import env_info

RUNS = {
    "ppo": ("CartPole-v1", 100_000, {}),
    "reinforce": ("CartPole-v1", 100_000, {}),
    "ga": ("CartPole-v1", 100_000, {}),
    "es": ("CartPole-v1", 100_000, {}),
    "elite_imitation": ("CartPole-v1", 100_000, {"activation": "relu"}),
    "ddpg": ("Pendulum-v1", 20_000, {}),
    "dsac_t": ("Pendulum-v1", 20_000, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rules:
            env, frames, module_kwargs = RUNS[name]
            info = env_info(ut.EnvSpec(env))
            trainer = ut.Trainer(env=env, optimizer=ut.optim.get_rule(name)(),
                                 max_frames=frames, seed=args.seed, run_dir=Path(tmp) / name,
                                 enable_progress_bar=False)
            start = time.perf_counter()
            trainer.fit(ut.MLPPolicy(info.obs_dim, info.act_dim, **module_kwargs))
            wall = time.perf_counter() - start
            s = trainer.summary
            rows.append({"rule": name, "env": env, "max_frames": frames, "frames": s["frames"],
                         "eval/return_mean": round(s["eval/return_mean"], 1),
                         "wall_s": round(wall, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| rule | env | budget | frames | final eval return | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['env']} | {r['max_frames']:,} | {r['frames']:,} | "
              f"{r['eval/return_mean']} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
