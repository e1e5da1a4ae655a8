"""Collection throughput: unitrain's collector against a raw gymnasium loop, in one run.

Three paths step the same kind of vector env (``num_envs`` copies, synchronous, same-step
autoreset) with the same batched MLP policy (``obs_dim → 64 → 64 → act_dim``, tanh):

* ``raw``: a plain gymnasium loop; observations become a float32 tensor, the policy runs under
  ``torch.no_grad()``, actions go back as numpy. Nothing is stored.
* ``unitrain``: :func:`unitrain.envs.collect.make_collector` over :func:`unitrain.envs.make_env` on
  the gymnasium backend, the policy wrapped in a ``TensorDictModule``; every transition is kept
  in the batch.
* ``envpool``: the same on the EnvPool backend (``--env-threads`` threads of EnvPool's own).
* ``torchrl``: TorchRL's stock ``Collector(GymWrapper(vec_env))`` with the same module, for
  reference.

Within each round the paths take turns one batch (``--steps-per-batch`` vector steps) at a time,
so that drifts in machine load hit all of them alike; rates are medians over rounds, and the
headline ratio is the median of the per-round unitrain/raw ratios.
Run::

    python tools/bench_collect.py --env HalfCheetah-v5 --num-envs 32 --env-threads 1 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import TYPE_CHECKING, Callable

import gymnasium as gym
import numpy as np
import torch
from speed_table import print_speed_table
from tensordict.nn import TensorDictModule
from torch import nn

if TYPE_CHECKING:
    from torchrl.collectors import Collector


def make_policy(obs_dim: int, act_dim: int, seed: int) -> nn.Module:
    """The benchmark policy: a deterministic tanh MLP with actions squashed to ``[-1, 1]``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                         nn.Linear(64, act_dim), nn.Tanh())


def make_gym_vec(env_id: str, num_envs: int) -> gym.vector.VectorEnv:
    """A synchronous gymnasium vector env with same-step autoreset (what ``GymWrapper`` takes)."""
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})


def raw_runner(env_id: str, num_envs: int, net: nn.Module, seed: int) -> Callable[[int], int]:
    """A function that steps a raw gymnasium loop for ``steps`` vector steps."""
    vec = make_gym_vec(env_id, num_envs)
    state = {"obs": vec.reset(seed=seed)[0]}

    def run(steps: int) -> int:
        obs = state["obs"]
        with torch.no_grad():
            for _ in range(steps):
                action = net(torch.from_numpy(obs.astype(np.float32, copy=False))).numpy()
                obs, _reward, _terminated, _truncated, _info = vec.step(action)
        state["obs"] = obs
        return steps * num_envs

    return run


def collector_runner(collector: Collector) -> Callable[[int], int]:
    """A function that draws batches from ``collector`` until ``steps`` vector steps are done."""
    iterator = iter(collector)

    def run(steps: int) -> int:
        frames = 0
        target = steps * collector.env.batch_size.numel()
        while frames < target:
            batch = next(iterator)
            frames += batch.numel()
        return frames

    return run


def unitrain_runner(env_id: str, num_envs: int, module: TensorDictModule, seed: int,
                    frames_per_batch: int, backend: str = "gymnasium",
                    env_threads: int = 1) -> Callable[[int], int]:
    """unitrain's path: ``make_collector`` over ``make_env`` on ``backend``."""
    from unitrain.envs import EnvSpec, make_env
    from unitrain.envs.collect import make_collector

    env = make_env(EnvSpec(env_id, num_envs=num_envs, backend=backend), seed,
                   num_threads=env_threads)
    return collector_runner(make_collector(env, module, frames_per_batch=frames_per_batch))


def torchrl_runner(env_id: str, num_envs: int, module: TensorDictModule, seed: int,
                   frames_per_batch: int) -> Callable[[int], int]:
    """TorchRL's stock path: ``Collector(GymWrapper(vector env))``."""
    from torchrl.collectors import Collector
    from torchrl.envs import DoubleToFloat, GymWrapper

    env = GymWrapper(make_gym_vec(env_id, num_envs))
    env.set_seed(seed)
    if any(spec.dtype == torch.float64 for spec in env.observation_spec.values(True, True)):
        # The policy is float32; MuJoCo observations are float64.
        env = env.append_transform(DoubleToFloat())
    # auto_register_policy_transforms=False only silences a FutureWarning: it is what 0.14 does.
    collector = Collector(env, module, frames_per_batch=frames_per_batch, total_frames=-1,
                          auto_register_policy_transforms=False)
    return collector_runner(collector)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="HalfCheetah-v5",
                        help="gymnasium id of an env with Box observations and actions")
    parser.add_argument("--num-envs", type=int, default=32, help="vectorised env copies")
    parser.add_argument("--frames", type=int, default=32_768,
                        help="env steps (summed over envs) per path and round")
    parser.add_argument("--steps-per-batch", type=int, default=64,
                        help="vector steps per collector batch (frames_per_batch / num_envs)")
    parser.add_argument("--rounds", type=int, default=5, help="repetitions (median taken)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torchrl", action="store_true",
                        help="leave out the stock TorchRL reference")
    parser.add_argument("--env-threads", type=int, nargs="*", default=[1],
                        help="EnvPool thread counts to measure (none: leave EnvPool out)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    import torchrl  # noqa: F401  (configures the "torchrl" logger, which is quietened next)

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    probe = gym.make(args.env)
    obs_dim = int(np.prod(probe.observation_space.shape))
    act_dim = int(probe.action_space.shape[0])
    probe.close()

    net = make_policy(obs_dim, act_dim, args.seed)
    module = TensorDictModule(net, in_keys=["observation"], out_keys=["action"])
    frames_per_batch = args.num_envs * args.steps_per_batch

    runners = {
        "raw": raw_runner(args.env, args.num_envs, net, args.seed),
        "unitrain": unitrain_runner(args.env, args.num_envs, module, args.seed,
                                    frames_per_batch),
    }
    for threads in args.env_threads:
        runners[f"envpool/{threads}"] = unitrain_runner(args.env, args.num_envs, module,
                                                        args.seed, frames_per_batch, "envpool",
                                                        threads)
    if not args.skip_torchrl:
        runners["torchrl"] = torchrl_runner(args.env, args.num_envs, module, args.seed,
                                            frames_per_batch)

    for run in runners.values():  # warm-up: first batches allocate buffers, first resets
        run(args.steps_per_batch)

    chunks = max(args.frames // frames_per_batch, 1)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(args.rounds):
        frames = dict.fromkeys(runners, 0)
        wall_s = dict.fromkeys(runners, 0.0)
        cpu_s = dict.fromkeys(runners, 0.0)
        # Within a round the paths take turns one batch at a time (rotating who goes first), so
        # a change in machine load lands on all of them alike.
        names = list(runners)
        for c in range(chunks):
            for name in names[c % len(names):] + names[:c % len(names)]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                frames[name] += runners[name](args.steps_per_batch)
                wall_s[name] += time.perf_counter() - start_wall
                cpu_s[name] += time.process_time() - start_cpu
        for name in runners:
            wall[name].append(frames[name] / wall_s[name])
            cpu[name].append(frames[name] / cpu_s[name])
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in wall.items())
              + f"; unitrain/raw {wall['unitrain'][-1] / wall['raw'][-1]:.3f}", flush=True)

    wall_med, cpu_med = print_speed_table(f"{args.env}, {args.num_envs} envs, "
                                          f"{args.threads} thread(s), "
                                          f"{chunks * frames_per_batch:,} frames per path and "
                                          f"round, median of {args.rounds} rounds", wall, cpu)
    # Rounds pair the paths under the same load, so the per-round ratio is the steadier figure.
    for name in [n for n in runners if n.startswith(("unitrain", "envpool"))]:
        paired = statistics.median(u / r for u, r in zip(wall[name], wall["raw"]))
        print(f"ratio {name}/raw: {paired:.3f} (median of per-round ratios; ratio of the "
              f"medians {wall_med[name] / wall_med['raw']:.3f}, per CPU-second of this process "
              f"{cpu_med[name] / cpu_med['raw']:.3f})")


if __name__ == "__main__":
    main()
