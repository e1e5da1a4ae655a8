"""GPU against CPU for the networks of unitrain's rules, the envs on the CPU in both columns.

Rows (each: what, GPU figure, CPU figure, GPU/CPU ratio):

- Deep GA population evaluation on ``ALE/Pong-v5`` (gymnasium + ale-py emulators on the CPU) with
  the Nature CNN (1.7 M parameters per individual), agent steps/s, at P = 64 and P = 1,024: the
  whole evaluation (seeded resets, emulator steps, the vmapped forward pass of every individual),
  short episodes, at most 128 emulators at a time (P = 1,024 plays in waves of 128, alike: one is
  timed); and the network alone (one batched forward of P individuals on one frame each).
- PPO (CartPole, 2x256 MLP) and SAC (Pendulum, 2x256 actor and critics) gradient updates/s, timed
  around the updates (collection not counted), the same settings in both columns.
- ``torch.compile``: skipped; mjwarp: the hook below runs ``tools/bench_mjwarp.py`` when that file
  exists and ``import warp`` works, else the row says why it was skipped.

Without CUDA the GPU column says "no CUDA" and only the CPU runs. The CPU column uses every core
(``torch.set_num_threads(os.cpu_count())``), the GPU column the same thread count. Run::

    python tools/bench_device.py              # the full sizes (planned for about two minutes)
    python tools/bench_device.py --quick      # tiny sizes: checks the script end to end
    python tools/bench_device.py --rows rows.md   # also append each row to rows.md as it is measured
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "no CUDA"


def log(msg: str) -> None:
    print(f"[bench_device] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(x: float | str) -> str:
    if isinstance(x, str):
        return x
    if not math.isfinite(x):
        return "failed"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def row(what: str, gpu: float | str, cpu: float | str) -> str:
    ratio = (f"{gpu / cpu:.2f}x" if isinstance(gpu, float) and isinstance(cpu, float)
             and math.isfinite(gpu) and math.isfinite(cpu) and cpu > 0 else "-")
    return f"| {what} | {fmt(gpu)} | {fmt(cpu)} | {ratio} |"


def both(devices: list[torch.device], measure: Callable[[torch.device], float]
         ) -> tuple[float | str, float | str]:
    """``measure`` on the GPU (if any) and the CPU; a failure reads as ``nan`` (shown "failed")."""
    out: dict[str, float | str] = {"cuda": NO_CUDA}
    for device in devices:
        try:
            out[device.type] = measure(device)
        except Exception as e:  # a failing measurement is a row, not the end of the table
            log(f"{device}: {type(e).__name__}: {e}")
            out[device.type] = math.nan
    return out["cuda"], out["cpu"]


# ------------------------------------------------------------------------------ Deep GA, Pong
class PongPopulation:
    """A Nature CNN, its population policy and one evaluator (its emulators are made once and
    serve both columns; the module moves between devices)."""

    def __init__(self, max_steps: int, max_envs: int) -> None:
        from unitrain.envs.info import env_info
        from unitrain.envs.spec import EnvSpec
        from unitrain.policy.models import NatureCNN
        from unitrain.rules.population.service import (ParamLayout, PopulationEvaluator,
                                                       PopulationPolicy)

        spec = EnvSpec("ALE/Pong-v5", backend="gymnasium")
        info = env_info(spec)
        torch.manual_seed(0)
        self.module = NatureCNN(info.obs_shape, info.act_dim)
        self.module.bind_env(info)
        self.layout = ParamLayout.of(self.module)
        self.policy = PopulationPolicy(self.module, self.layout)
        self.obs_shape = info.obs_shape
        self.evaluator = PopulationEvaluator(self.policy, spec, info.obs_shape, episodes=1,
                                             max_episode_steps=max_steps, max_envs=max_envs)
        self.numel = self.layout.flatten(self.module).numel()

    def _params(self, device: torch.device) -> Callable:
        theta = self.layout.flatten(self.module).to(device)
        pool = torch.randn(4, theta.numel(), generator=torch.Generator().manual_seed(1)).to(device)

        def params(idx) -> torch.Tensor:  # GA's children: the parent plus one mutation each
            # One [len(idx), numel] allocation (6.9 GB at P = 1,024): built in place.
            out = pool[torch.as_tensor(list(idx), device=device) % 4]
            return out.mul_(0.002).add_(theta)
        return params

    def evaluate(self, population: int, device: torch.device) -> float:
        """Agent steps/s of one evaluation of ``population`` individuals (1 episode each)."""
        self.module.to(device)
        make = self._params(device)
        built = [0.0]

        def params(idx):
            start = time.perf_counter()
            out = make(idx)
            sync(device)
            built[0] += time.perf_counter() - start
            return out

        start = time.perf_counter()
        res = self.evaluator.play(list(range(population)), params, lambda i, e: 1000 + i,
                                  behaviour=False)
        sync(device)
        elapsed = time.perf_counter() - start - built[0]
        assert torch.isfinite(res.returns).all()
        return res.steps / elapsed

    def forward(self, population: int, device: torch.device, reps: int) -> float:
        """Agent steps/s of the network alone: one forward of ``population`` individuals, one
        frame each (what a step of the evaluation asks of the network)."""
        self.module.to(device)
        params = self._params(device)(range(population))
        stacked = self.policy.stack(params)
        obs = torch.randint(0, 256, (population, 1, *self.obs_shape), dtype=torch.uint8,
                            device=device)
        with torch.no_grad():
            self.policy.apply(stacked, obs)  # warm-up (cuDNN picks its kernels)
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                self.policy.apply(stacked, obs)
            sync(device)
        return population * reps / (time.perf_counter() - start)


def bench_ga(args, devices: list[torch.device], emit: Callable[[str], None]) -> None:
    pong = PongPopulation(args.ga_steps, args.max_envs)
    for p in args.population:
        log(f"Pong network forward P={p}")
        gpu, cpu = both(devices, lambda d: pong.forward(p, d, args.forward_reps))
        emit(row(f"Deep GA Nature CNN forward alone, P={p} (vmapped, "
                 f"{pong.numel / 1e6:.2f} M params each): agent steps/s", gpu, cpu))
    for p in args.population:
        # A population larger than max_envs plays in waves of max_envs individuals, one after
        # another and alike: one wave is timed.
        wave = min(p, args.max_envs)
        steps = args.ga_steps if p <= args.max_envs else args.ga_steps_large
        pong.evaluator.max_episode_steps = steps
        log(f"Pong GA evaluation P={p}: making {wave} emulators")
        pong.evaluator._env(wave, 1)  # the emulators are made before the clock starts
        log(f"Pong GA evaluation P={p}: {wave} emulators, {steps} steps")
        gpu, cpu = both(devices, lambda d: pong.evaluate(wave, d))
        waves = "" if wave == p else f", waves of {wave} (one timed)"
        emit(row(f"Deep GA Pong evaluation, P={p}{waves}, {steps}-step episodes (seeded resets "
                 "included), emulators on the CPU: agent steps/s", gpu, cpu))


# ------------------------------------------------------------------------------ PPO and SAC
def _mlp_policy(obs_dim: int, act_dim: int):
    from unitrain.policy.models import MLPPolicy
    return MLPPolicy(obs_dim, act_dim, hidden=[256, 256], activation="tanh")


def _fit(rule, env, max_frames: int, device: torch.device, threads: int) -> None:
    import unitrain as ut
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = ut.Trainer(env=env, optimizer=rule, max_frames=max_frames,
                             accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                             seed=0, num_threads=threads, eval_every_frames=10**9,
                             eval_episodes=1, run_dir=run_dir, logger=False,
                             enable_progress_bar=False)
        discrete = env.id == "CartPole-v1"
        module = _mlp_policy(4, 2) if discrete else _mlp_policy(3, 1)
        trainer.fit(module)


def ppo_updates_per_s(args, device: torch.device, threads: int) -> float:
    """PPO gradient updates/s, timed around each update (the collection is not counted)."""
    import unitrain as ut
    import unitrain.rules.gradient.ppo as ppo

    spent, count = [0.0], [0]
    original = ppo.gradient_step

    def timed(*a, **kw):
        start = time.perf_counter()
        original(*a, **kw)
        sync(device)
        spent[0] += time.perf_counter() - start
        count[0] += 1

    ppo.gradient_step = timed
    try:
        rule = ut.optim.PPO(frames_per_batch=args.ppo_batch, minibatch_size=args.ppo_minibatch,
                            epochs=args.ppo_epochs)
        _fit(rule, ut.EnvSpec("CartPole-v1", num_envs=8), args.ppo_frames, device, threads)
    finally:
        ppo.gradient_step = original
    return count[0] / spent[0]


def sac_updates_per_s(args, device: torch.device, threads: int) -> float:
    """SAC gradient updates/s inside the update loop (the loop's own ``perf/updates_per_s``,
    weighted by the updates of each iteration)."""
    import unitrain as ut
    from unitrain.rules.gradient.offpolicy import OffPolicyLoop

    updates, spent = [0.0], [0.0]
    original = OffPolicyLoop.step

    def step(self, *a, **kw):
        metrics = original(self, *a, **kw)
        due, rate = metrics.get("optim/updates", 0.0), metrics.get("perf/updates_per_s", math.nan)
        if due and math.isfinite(rate):
            updates[0] += due
            spent[0] += due / rate
        return metrics

    OffPolicyLoop.step = step
    try:
        rule = ut.optim.SAC(batch_size=256, buffer_size=100_000, warmup_frames=256,
                            frames_per_batch=32, utd_ratio=1.0, critic_hidden=(256, 256))
        _fit(rule, ut.EnvSpec("Pendulum-v1", num_envs=4), 256 + args.sac_updates, device,
             threads)
    finally:
        OffPolicyLoop.step = original
    return updates[0] / spent[0]


def bench_gradient(args, devices: list[torch.device], threads: int,
                   emit: Callable[[str], None]) -> None:
    log("PPO updates")
    gpu, cpu = both(devices, lambda d: ppo_updates_per_s(args, d, threads))
    emit(row(f"PPO CartPole, 2x256 MLP, minibatch {args.ppo_minibatch}: updates/s", gpu, cpu))
    log("SAC updates")
    gpu, cpu = both(devices, lambda d: sac_updates_per_s(args, d, threads))
    emit(row("SAC Pendulum, 2x256 actor and twin critics, batch 256: updates/s", gpu, cpu))


# ------------------------------------------------------------------------------ mjwarp hook
def bench_mjwarp(has_cuda: bool) -> list[str]:
    """HOOK: MuJoCo Warp (``unitrain/envs/mjwarp.py``, written separately). When
    ``tools/bench_mjwarp.py`` exists and ``import warp`` works, it is run as
    ``python tools/bench_mjwarp.py --device cuda --batches 1024,8192`` and its stdout lines that
    start with ``|`` are taken as table rows."""
    script = ROOT / "tools" / "bench_mjwarp.py"
    try:
        import warp  # noqa: F401
    except Exception:
        return ["| mjwarp | skipped (warp not importable) | - | - |"]
    if not script.exists():
        return ["| mjwarp | skipped (tools/bench_mjwarp.py missing) | - | - |"]
    if not has_cuda:
        return ["| mjwarp | no CUDA | - | - |"]
    proc = subprocess.run([sys.executable, str(script), "--device", "cuda",
                           "--batches", "1024,8192"], capture_output=True, text=True,
                          timeout=300)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    if proc.returncode != 0 or not rows:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:120]
        return [f"| mjwarp | failed (rc {proc.returncode}: {tail}) | - | - |"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check of the script)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto",
                        help="auto: GPU and CPU columns where CUDA is present; cpu: CPU only")
    parser.add_argument("--rows", type=Path, help="append the table rows to this file")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ga", "gradient", "mjwarp"])
    parser.add_argument("--population", type=int, nargs="+",
                        help="population sizes of the Deep GA rows (default 64 1024; quick: 4 16)")
    args = parser.parse_args(argv)
    population = args.population
    if args.quick:
        args.population, args.max_envs = [4, 16], 8
        args.ga_steps, args.ga_steps_large, args.forward_reps = 5, 3, 2
        args.ppo_batch, args.ppo_minibatch, args.ppo_epochs, args.ppo_frames = 256, 128, 2, 512
        args.sac_updates = 32
    else:
        args.population, args.max_envs = [64, 1024], 128
        args.ga_steps, args.ga_steps_large, args.forward_reps = 30, 8, 3
        args.ppo_batch, args.ppo_minibatch, args.ppo_epochs, args.ppo_frames = 2048, 256, 4, 4096
        args.sac_updates = 256

    args.population = population or args.population
    has_cuda = args.device == "auto" and torch.cuda.is_available()
    devices = ([torch.device("cuda")] if has_cuda else []) + [torch.device("cpu")]
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    gpu_name = torch.cuda.get_device_name(0) if has_cuda else NO_CUDA
    log(f"GPU: {gpu_name}; CPU threads: {threads}; quick: {args.quick}")

    def emit(line: str) -> None:
        """Print a table row at once (and append it to --rows): a run stopped part way still
        leaves the rows it measured."""
        print(line, flush=True)
        if args.rows is not None:
            with args.rows.open("a") as f:
                f.write(line + "\n")

    emit(f"| bench{' (quick sizes)' if args.quick else ''}: devices | {gpu_name} "
         f"| {threads} CPU threads | - |")
    start = time.perf_counter()
    # The quick rows first: a run stopped at its time limit keeps them.
    if "gradient" not in args.skip:
        bench_gradient(args, devices, threads, emit)
    if "ga" not in args.skip:
        bench_ga(args, devices, emit)
    emit("| torch.compile rows | skipped | - | - |")
    if "mjwarp" not in args.skip:
        for line in bench_mjwarp(has_cuda):
            emit(line)
    log(f"done in {time.perf_counter() - start:.0f} s")

if __name__ == "__main__":
    main()
