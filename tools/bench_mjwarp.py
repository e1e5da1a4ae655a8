"""MuJoCo Warp (the ``mjwarp`` backend) beside EnvPool: env steps per second by batch size.

For each batch size ``B`` of ``--batches``, in one run:

* ``mjwarp physics``: :meth:`MJWarpVector.simulate` with random actions: the controls written
  and the frame skip stepped (``mujoco_warp.step`` per substep; on CUDA one replayed graph);
* ``mjwarp e2e``: a 64-64 tanh MLP over the ``[B, obs_dim]`` observations on the device, then
  :meth:`MJWarpVector.step`: the physics, observations, rewards, terminations and same-step
  autoreset, all in torch on the device;
* ``envpool physics``: EnvPool (``num_envs = batch_size = B``, ``--threads`` threads, on the
  CPU) stepped with random numpy actions;
* ``envpool e2e``: the same MLP on the CPU over EnvPool's observations.

Rates are env steps per second (``B`` times vector steps per second), medians of ``--rounds``
timed runs of ``--steps`` vector steps after a warm-up; ratios are mjwarp over EnvPool. Warp
compiles its kernels on the first run (about a minute on the CPU; cached after). Run::

    python tools/bench_mjwarp.py --device cuda --batches 64,1024,8192,32768
    python tools/bench_mjwarp.py --batches 64,1024            # the CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from unitrain.envs.mjwarp import MJWarpVector
from unitrain.envs.spec import EnvSpec


def mlp(obs_dim: int, act_dim: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(obs_dim, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, act_dim), torch.nn.Tanh()).to(device)


def rate(run: Callable[[], None], batch: int, steps: int, rounds: int,
         sync: Callable[[], None]) -> float:
    """Median env steps per second of ``rounds`` timings of ``steps`` calls of ``run``."""
    for _ in range(2):
        run()
    sync()
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_mjwarp(env_id: str, batch: int, device: str, steps: int,
                 rounds: int) -> tuple[float, float]:
    venv = MJWarpVector(EnvSpec(id=env_id, num_envs=batch), batch, seed=0, device=device)
    dev = venv.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    act_dim = venv.action_space.shape[0]
    low = torch.as_tensor(venv.action_space.low, device=dev)
    high = torch.as_tensor(venv.action_space.high, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    obs = [venv.reset(seed=0)]

    def physics() -> None:
        venv.simulate(low + (high - low) * torch.rand(batch, act_dim, generator=gen, device=dev))

    policy = mlp(obs[0].shape[1], act_dim, dev)

    def e2e() -> None:
        with torch.no_grad():
            action = policy(obs[0]).clamp(low, high)
        obs[0] = venv.step(action)[0]

    physics_rate = rate(physics, batch, steps, rounds, sync)
    venv.reset(seed=0)
    e2e_rate = rate(e2e, batch, steps, rounds, sync)
    venv.close()
    return physics_rate, e2e_rate


def bench_envpool(env_id: str, batch: int, threads: int, steps: int,
                  rounds: int) -> tuple[float, float] | None:
    try:
        import envpool
    except ImportError:
        return None
    pool = envpool.make(env_id, env_type="gymnasium", num_envs=batch, batch_size=batch,
                        num_threads=threads, seed=0)
    space = pool.action_space
    rng = np.random.default_rng(0)
    obs = [pool.reset()[0]]

    def physics() -> None:
        pool.step(rng.uniform(space.low, space.high, (batch, space.shape[0])).astype(np.float32))

    policy = mlp(obs[0].shape[1], space.shape[0], torch.device("cpu"))

    def e2e() -> None:
        with torch.no_grad():
            action = policy(torch.as_tensor(obs[0], dtype=torch.float32)).numpy()
        obs[0] = pool.step(np.clip(action, space.low, space.high))[0]

    physics_rate = rate(physics, batch, steps, rounds, lambda: None)
    e2e_rate = rate(e2e, batch, steps, rounds, lambda: None)
    pool.close()
    return physics_rate, e2e_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--device", default="cpu", help="mjwarp's device: cpu, cuda, cuda:1")
    parser.add_argument("--batches", default="64,1024,8192,32768",
                        help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=10, help="vector steps per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="EnvPool's threads")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch's CPU threads (the policy; EnvPool's threads have the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    rows = []
    print(f"{args.env}: mjwarp on {args.device}, EnvPool on the CPU with {args.threads} threads "
          f"(env steps/s, median of {args.rounds} x {args.steps} vector steps)")
    header = (f"{'batch':>7} {'mjwarp phys':>12} {'mjwarp e2e':>11} {'envpool phys':>13} "
              f"{'envpool e2e':>12} {'phys ratio':>11} {'e2e ratio':>10}")
    print(header, flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        mjw_phys, mjw_e2e = bench_mjwarp(args.env, batch, args.device, args.steps, args.rounds)
        pool = bench_envpool(args.env, batch, args.threads, args.steps, args.rounds)
        pool_phys, pool_e2e = pool if pool is not None else (float("nan"), float("nan"))
        row = (f"{batch:>7} {mjw_phys:>12,.0f} {mjw_e2e:>11,.0f} {pool_phys:>13,.0f} "
               f"{pool_e2e:>12,.0f} {mjw_phys / pool_phys:>10.2f}x {mjw_e2e / pool_e2e:>9.2f}x")
        rows.append(row)
        print(row, flush=True)


if __name__ == "__main__":
    main()
