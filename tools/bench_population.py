"""Population-evaluation throughput: unitrain against a raw gymnasium loop, and 1 vs 2 processes.

Part 1 (one process) steps ``--population`` HalfCheetah-v5 envs, one per individual, each driven
by its own parameters of the same 64-64 tanh MLP, with the same batched policy
(:class:`unitrain.rules.population.service.PopulationPolicy`: ``torch.func.vmap(functional_call)`` over the
stacked parameters) on two paths:

* ``raw``: a plain gymnasium ``SyncVectorEnv`` loop (same-step autoreset); observations become a
  float32 tensor, actions go back as numpy; nothing is recorded;
* ``unitrain``: :class:`unitrain.rules.population.service.PopulationEvaluator` (a ``BatchedEnv`` on the
  gymnasium backend, seeded episodes, returns, lengths, caps), episodes cut at ``--steps`` steps;
* ``envpool/N``: the same evaluator on the EnvPool backend with ``N`` env threads
  (``--env-threads``).

The paths take turns chunk by chunk so that changes in machine load hit both alike; each figure
is the median over rounds.

Part 2 trains ES (``unitrain.optim.ES``, the same population and network) through
``unitrain.Trainer`` in each configuration of ``--configs`` (``PxT``: ``P`` processes, each with
``T`` torch and EnvPool threads; default ``1x1 1x2 2x1``), and reports env steps per second of
the generations (population evaluation, gathering and the update), timed on rank 0, and env steps
per CPU-second of all processes (on a machine whose cores are shared with other jobs, the
wall-clock ratio understates what a second process adds). In the same run it measures the
ceiling those configurations share: EnvPool stepping the same ``population`` HalfCheetah envs on
as many threads as the machine has cores, under the 64-64 MLP's actions, counting only the time
inside the step (``bench_physics.py``'s ``step only`` column), and gives each configuration's
rate as a fraction of it. Run::

    python tools/bench_population.py                 # both parts
    python tools/bench_population.py --skip-ddp      # part 1 only
    python tools/bench_population.py --only-ddp      # part 2 only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from speed_table import print_speed_table

ENV = "HalfCheetah-v5"


def population_policy(population: int, seed: int, env: str = ENV):
    """The benchmark's batched policy and a population of parameters for it: the 64-64 MLP, or
    on Atari the Nature-DQN network of Deep GA."""
    import unitrain as ut
    from unitrain.envs import EnvSpec, env_info
    from unitrain.policy.models import NatureCNN
    from unitrain.rules.population.service import ParamLayout, PopulationPolicy

    info = env_info(EnvSpec(env))
    torch.manual_seed(seed)
    if info.image:
        module: ut.RLModule = NatureCNN(obs_shape=info.obs_shape, act_dim=info.act_dim)
    else:
        module = ut.MLPPolicy(info.obs_dim, info.act_dim, hidden=[64, 64], out_scale=1.0)
    module.bind_env(info)
    module.eval()
    layout = ParamLayout.of(module)
    params = layout.flatten(module) + 0.1 * torch.randn(population, layout.numel)
    return PopulationPolicy(module, layout), params, info


def raw_runner(population: int, policy, params: torch.Tensor, seed: int) -> Callable[[int], int]:
    """``steps -> env steps``: the raw gymnasium loop."""
    vec = gym.make_vec(ENV, num_envs=population, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    state = {"obs": vec.reset(seed=seed)[0]}

    def run(steps: int) -> int:
        obs = state["obs"]
        for _ in range(steps):
            x = torch.from_numpy(obs.astype(np.float32, copy=False)).reshape(population, 1, -1)
            action = policy(params, x).reshape(population, -1).numpy()
            obs, _reward, _terminated, _truncated, _info = vec.step(action)
        state["obs"] = obs
        return steps * population

    return run


def policy_runner(population: int, policy, params: torch.Tensor,
                  info) -> Callable[[int], int]:
    """``steps -> env steps``: the batched policy alone on stored observations (no env)."""
    gen = torch.Generator().manual_seed(0)
    shape = (population, 1, *info.obs_shape)
    obs = (torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8) if info.image
           else torch.randn(shape, generator=gen))
    stacked = policy.stack(params)

    def run(steps: int) -> int:
        for _ in range(steps):
            policy.apply(stacked, obs)
        return steps * population

    return run


def unitrain_runner(population: int, policy, params: torch.Tensor, seed: int,
                    steps: int, backend: str = "gymnasium",
                    env_threads: int = 1, env: str = ENV) -> Callable[[int], int]:
    """``steps -> env steps``: one evaluation of the population with episodes cut at ``steps``."""
    from unitrain.envs import EnvSpec
    from unitrain.rules.population.service import PopulationEvaluator

    evaluator = PopulationEvaluator(policy, EnvSpec(env, backend=backend),
                                    policy.module.env_info.obs_shape, max_episode_steps=steps,
                                    num_threads=env_threads)
    calls = [0]

    def run(_: int) -> int:
        calls[0] += 1
        res = evaluator.play(range(population), lambda idx: params[list(idx)],
                                 lambda i, e: seed + 1000 * calls[0] + i)
        return res.steps

    return run


def _timed(run: Callable[[int], int], steps: int) -> np.ndarray:
    """``[env steps, wall seconds, CPU seconds]`` of one call of ``run``."""
    wall, cpu = time.perf_counter(), time.process_time()
    done = run(steps)
    return np.array([done, time.perf_counter() - wall, time.process_time() - cpu])


def in_process(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    policy, params, info = population_policy(args.population, args.seed, args.env)
    # Atari has no raw gymnasium loop with the same preprocessing: there the gymnasium path of
    # unitrain is the baseline.
    runners = {} if info.image else {"raw": raw_runner(args.population, policy, params,
                                                       args.seed)}
    runners["unitrain"] = unitrain_runner(args.population, policy, params, args.seed,
                                          args.steps, env=args.env)
    for threads in args.env_threads:
        runners[f"envpool/{threads}"] = unitrain_runner(args.population, policy, params,
                                                        args.seed, args.steps, "envpool", threads,
                                                        args.env)
    if args.policy_only:
        runners["policy"] = policy_runner(args.population, policy, params, info)
    baseline = "unitrain" if info.image else "raw"
    for run in runners.values():  # warm-up: env construction, first resets, vmap tracing
        run(args.steps)
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(args.rounds):
        # [env steps, wall seconds, CPU seconds] per path; the paths alternate chunk by chunk,
        # rotating who goes first.
        totals = {name: np.zeros(3) for name in runners}
        for c in range(args.chunks):
            for name in names[c % len(names):] + names[:c % len(names)]:
                totals[name] += _timed(runners[name], args.steps)
        for name, (steps, wall_s, cpu_s) in totals.items():
            wall[name].append(steps / wall_s)
            cpu[name].append(steps / cpu_s)
        print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in wall.items())
              + " env-steps/s", flush=True)
    network = "Nature-DQN CNN" if info.image else "64-64 MLP"
    print_speed_table(f"{args.env}, population {args.population} (one env each), {network}, "
                      f"{args.threads} thread(s), {args.chunks * args.steps * args.population:,} "
                      f"env steps per path and round, median of {args.rounds} rounds", wall, cpu,
                      baseline=baseline)

TRAIN_SCRIPT = '''
import json, sys, time
import lightning as L
import unitrain as ut


class Clock(L.Callback):
    """Wall and CPU time of this process inside training steps (generations), and their frames."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.frames0 = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.frames0 is None:
            self.frames0 = module._ctx.services.frames
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.wall += time.perf_counter() - self.start[0]
        self.cpu += time.process_time() - self.start[1]
        self.frames = module._ctx.services.frames


if __name__ == "__main__":
    devices, population, generations, out = (int(sys.argv[1]), int(sys.argv[2]),
                                             int(sys.argv[3]), sys.argv[4])
    backend, threads = sys.argv[5], int(sys.argv[6])
    clock = Clock()
    max_frames = population * 1000 * generations
    # One evaluation, at the end of the budget (outside the timed generations).
    trainer = ut.Trainer(env=ut.EnvSpec("HalfCheetah-v5", backend=backend), devices=devices,
                         strategy="ddp" if devices > 1 else "auto",
                         optimizer=ut.optim.ES(population=population),
                         max_frames=max_frames, eval_every_frames=max_frames,
                         eval_episodes=1, num_threads=threads, run_dir=out + ".run", logger=False,
                         callbacks=[clock], enable_progress_bar=False)
    trainer.fit(ut.MLPPolicy(17, 6, hidden=[64, 64]))
    with open(f"{out}.rank{trainer.global_rank}", "w") as f:
        json.dump({"frames": clock.frames - clock.frames0, "wall": clock.wall, "cpu": clock.cpu}, f)
'''


def physics_ceiling(population: int, threads: int, steps: int = 200, rounds: int = 5) -> float:
    """EnvPool's HalfCheetah physics on ``threads`` threads under the 64-64 MLP's actions:
    env steps per second of the time spent inside ``step`` (median of ``rounds``)."""
    import envpool
    from bench_physics import _loop

    from unitrain.envs import envpool_id

    torch.set_num_threads(1)
    pool = envpool.make_gymnasium(envpool_id(ENV), num_envs=population, batch_size=population,
                                  num_threads=threads, seed=0)
    obs = pool.reset()[0]
    net = population_policy_mlp(obs.shape[1], pool.action_space.shape[0])

    def act(o: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(o.astype(np.float32, copy=False))).numpy()

    inside = []
    for _ in range(rounds):
        _, physics, obs = _loop(lambda a: pool.step(a)[0], obs, act, steps, population)
        inside.append(physics)
    pool.close()
    return float(np.median(inside))


def population_policy_mlp(obs_dim: int, act_dim: int) -> torch.nn.Module:
    from bench_collect import make_policy

    return make_policy(obs_dim, act_dim, 0)


def processes(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 1
    ceiling = physics_ceiling(args.population, cores)
    wall, cpu = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "train.py")
        with open(script, "w") as f:
            f.write(TRAIN_SCRIPT)
        for config in args.configs:
            devices, threads = (int(x) for x in config.split("x"))
            out = os.path.join(tmp, f"{config}.json")
            proc = subprocess.run([sys.executable, script, str(devices), str(args.population),
                                   str(args.generations), out, args.backend, str(threads)],
                                  cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            ranks = []
            for r in range(devices):
                with open(f"{out}.rank{r}") as f:
                    ranks.append(json.load(f))
            frames = ranks[0]["frames"]
            wall[config] = frames / ranks[0]["wall"]
            # Env steps per CPU-second of all processes together: what the throughput would be
            # per core if every process had one to itself.
            cpu[config] = frames / sum(r["cpu"] for r in ranks)
            print(f"{config}: {frames:,} env steps in {ranks[0]['wall']:.1f} s of generations: "
                  f"{wall[config]:,.0f} env-steps/s; {cpu[config]:,.0f} per CPU-second",
                  flush=True)
    print(f"\nES on {ENV} ({args.backend} backend), population {args.population}, 64-64 MLP, "
          f"{args.generations} generations, {cores} CPU cores")
    print(f"ceiling: EnvPool physics on {cores} threads under the policy's actions, step time "
          f"only: {ceiling:,.0f} env-steps/s")
    print(f"{'processes x threads':<20} {'env-steps/s':>12} {'of ceiling':>11} {'per CPU-s':>10}")
    for config in args.configs:
        print(f"{config:<20} {wall[config]:>12,.0f} {wall[config] / ceiling:>10.2f}x "
              f"{cpu[config]:>10,.0f}")
    best = max(wall, key=wall.get)
    print(f"best: {best}, {wall[best] / ceiling:.2f}x the physics ceiling")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--population", type=int, default=64, help="individuals (= envs)")
    parser.add_argument("--steps", type=int, default=250,
                        help="vector steps per chunk (the evaluator's episode cap)")
    parser.add_argument("--chunks", type=int, default=2, help="chunks per path and round")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions (median taken)")
    parser.add_argument("--generations", type=int, default=3, help="ES generations per run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ddp", action="store_true", help="leave out part 2")
    parser.add_argument("--env-threads", type=int, nargs="*", default=[1, 2],
                        help="EnvPool thread counts for part 1 (none: leave EnvPool out)")
    parser.add_argument("--env", default=ENV, help="part 1's env (ALE/* uses the Nature CNN)")
    parser.add_argument("--backend", default="auto", help="part 2's env backend")
    parser.add_argument("--policy-only", action="store_true",
                        help="part 1 also times the batched policy alone (where time goes)")
    parser.add_argument("--only-ddp", action="store_true", help="leave out part 1")
    parser.add_argument("--configs", nargs="*", default=["1x1", "1x2", "2x1"],
                        help="part 2's processes x threads per process")
    args = parser.parse_args()
    if not args.only_ddp:
        in_process(args)
        print()
    if not args.skip_ddp:
        processes(args)


if __name__ == "__main__":
    main()
