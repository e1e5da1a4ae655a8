"""The ceiling: how fast the simulators step with no library in between.

Raw loops over ``--num-envs`` copies of ``--env``, in one run, taking turns round by round:

* ``gym``: gymnasium's ``SyncVectorEnv`` (same-step autoreset) driven by the benchmarks' 64-64
  tanh MLP (observations to a float32 tensor, actions back to numpy) — the reference of
  ``bench_collect.py`` and ``bench_population.py``;
* ``gym/random``: the same with random actions (the simulator and gymnasium's Python only);
* ``envpool/N``: EnvPool with ``N`` threads, synchronous ``step``, the same policy;
* ``envpool/N random``: EnvPool with random actions: the physics alone, the most any path that
  steps EnvPool synchronously can reach with ``N`` env threads;
* ``mujoco``: for MuJoCo envs, the same policy driving MuJoCo directly from Python (``mj_step``
  with the env's frame skip and the env's observation function, per env; no reward, reset or
  wrapper): what a single thread can get from the physics with no env library at all.

Beside each rate, ``step only`` counts only the time spent inside the env step: the physics under
the policy's own actions (the physics runs slower under them than under uniform random ones),
which bounds every path with that many env threads even if the policy's time were
hidden completely. Figures are medians of ``--rounds`` rounds, ratios against ``gym``. Run::

    python tools/bench_physics.py --env HalfCheetah-v5 --num-envs 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch
from bench_collect import make_gym_vec, make_policy


def _loop(step: Callable[[np.ndarray], np.ndarray], obs: np.ndarray, act: Callable, steps: int,
          n: int) -> tuple[float, float, np.ndarray]:
    inside = 0.0
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            action = act(obs)
            before = time.perf_counter()
            obs = step(action)
            inside += time.perf_counter() - before
    return steps * n / (time.perf_counter() - start), steps * n / inside, obs


def _mujoco_path(env_id: str, n: int) -> tuple[Callable, np.ndarray] | None:
    """Step ``n`` copies of a gymnasium MuJoCo env's model with MuJoCo's own ``mj_step``."""
    import gymnasium as gym

    try:
        import mujoco
    except ImportError:
        return None
    probe = gym.make(env_id).unwrapped
    if not isinstance(getattr(probe, "data", None), mujoco.MjData):
        return None
    envs = [probe] + [gym.make(env_id).unwrapped for _ in range(n - 1)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    obs = np.stack([env._get_obs() for env in envs])

    def step(action: np.ndarray) -> np.ndarray:
        for i, env in enumerate(envs):
            env.data.ctrl[:] = action[i]
            mujoco.mj_step(env.model, env.data, nstep=env.frame_skip)
            obs[i] = env._get_obs()
        return obs

    return step, obs.copy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=100, help="vector steps per path and round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--env-threads", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    import envpool

    from unitrain.envs import envpool_id

    torch.set_num_threads(1)
    n = args.num_envs
    vec = make_gym_vec(args.env, n)
    obs_dim = vec.single_observation_space.shape[0]
    act_dim = vec.single_action_space.shape[0]
    net = make_policy(obs_dim, act_dim, 0)
    rng = np.random.default_rng(0)

    def policy(obs: np.ndarray) -> np.ndarray:
        return net(torch.from_numpy(obs.astype(np.float32, copy=False))).numpy()

    def random(obs: np.ndarray) -> np.ndarray:
        return rng.uniform(-1, 1, (n, act_dim)).astype(np.float32)

    paths: dict[str, tuple[Callable, Callable]] = {
        "gym": (lambda a: vec.step(a)[0], policy), "gym/random": (lambda a: vec.step(a)[0], random)}
    obs = {"gym": vec.reset(seed=0)[0]}
    obs["gym/random"] = obs["gym"]
    for threads in args.env_threads:
        pool = envpool.make_gymnasium(envpool_id(args.env), num_envs=n, batch_size=n,
                                      num_threads=threads, seed=0)
        first = pool.reset()[0]
        for name, act in ((f"envpool/{threads}", policy), (f"envpool/{threads} random", random)):
            paths[name] = (lambda a, pool=pool: pool.step(a)[0], act)
            obs[name] = first
    direct = _mujoco_path(args.env, n)
    if direct is not None:
        paths["mujoco"] = (direct[0], policy)
        obs["mujoco"] = direct[1]
    rates: dict[str, list[float]] = {name: [] for name in paths}
    inside: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (step, act) in paths.items():
            rate, physics, obs[name] = _loop(step, obs[name], act, args.steps, n)
            rates[name].append(rate)
            inside[name].append(physics)
    ref = statistics.median(rates["gym"])
    print(f"{args.env} x {n}, 64-64 MLP or random actions, 1 torch thread, "
          f"median of {args.rounds} rounds")
    print(f"{'path':<20} {'env-steps/s':>12} {'vs gym':>8} {'step only':>12} {'vs gym':>8}")
    for name, values in rates.items():
        rate, physics = statistics.median(values), statistics.median(inside[name])
        print(f"{name:<20} {rate:>12,.0f} {rate / ref:>7.2f}x {physics:>12,.0f} "
              f"{physics / ref:>7.2f}x")


if __name__ == "__main__":
    main()
