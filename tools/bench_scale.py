"""The population update split across processes: per-rank update cost at W = 1, 2, 4, and a
generation through ``unitrain fit`` at ``devices=1`` and ``2``.

Part 1 launches ``W`` processes (gloo on loopback) that compute OpenAI-ES's search gradient
``Σₖ wₖ·εₖ`` for ``P`` candidates (``P/2`` mirrored seeds) of ``n`` parameters two ways, side by
side in the same processes:

* ``replicated``: every rank regenerates all ``P/2`` perturbations and sums them in float64 (what
  every rank did before the update was split);
* ``split``: :func:`unitrain.rules.population.reduce.noise_sum` — each rank regenerates its share,
  rounds it onto the fixed-point grid and one float64 all-reduce combines the shares;
* ``split, table``: the same with the perturbations read from the machine's shared
  :class:`~unitrain.rules.population.service.NoiseTable` instead of regenerated;

and times the all-reduce of ``n`` float64 values alone.

It prints wall and CPU seconds per rank (the slowest rank), the ratio to ``W = 1``, the bytes a
rank sends per generation for the update (a ring all-reduce of ``n`` float64 values
sends ``2·(W−1)/W·8n``), and checks that the split sum has the same bits on every rank and for every
``W``. On a machine with fewer cores than ranks, wall time cannot fall below ``1/cores``; the CPU
seconds per rank show the per-rank work.

Part 2 runs ES through ``unitrain fit`` (CartPole-v1, a 1024-1024 MLP, population 256, 5-step
episodes: a case where the update dominates) with ``trainer.devices=1`` and ``2`` and reports the
median seconds per generation from the run's TensorBoard scalars. Run::

    python tools/bench_scale.py                      # both parts, n ≈ 1.7 M (the Nature CNN)
    python tools/bench_scale.py --skip-fit --params 400000 --population 256
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

NATURE_CNN_PARAMS = 1_686_180  # NatureCNN on 84×84×4 frames with 6 actions


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, population: int, numel: int, repeats: int,
            out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from unitrain.rules.population.reduce import noise_sum
    from unitrain.rules.population.service import NoiseTable, centered_ranks, noise, noise_source
    from unitrain.run.services import Collectives

    ctx = Collectives(rank, world)
    ctx.device = torch.device("cpu")  # type: ignore[attr-defined]  (what a RuleContext adds)
    gen = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**31 - 1, (population // 2,), generator=gen).tolist()
    shaped = centered_ranks(torch.randn(population, generator=gen, dtype=torch.float64))
    weights = (shaped[0::2] - shaped[1::2]).tolist()

    def replicated() -> torch.Tensor:
        total = torch.zeros(numel, dtype=torch.float64)
        for s, w in zip(seeds, weights, strict=True):
            total.add_(noise(s, numel).to(torch.float64), alpha=w)
        return total

    table = NoiseTable(max(1 << 26, numel))  # the first rank of the machine writes it

    def from_table() -> torch.Tensor:
        with noise_source(table):
            return noise_sum(ctx, seeds, weights, numel)

    def all_reduce() -> torch.Tensor:
        return ctx.all_reduce_(torch.zeros(numel, dtype=torch.float64), "sum")

    timings: dict[str, tuple[float, float]] = {}
    for _ in range(repeats):  # the ways take turns; the fastest of each is kept
        for name, fn in (("replicated", replicated),
                         ("split", lambda: noise_sum(ctx, seeds, weights, numel)),
                         ("split, table", from_table), ("all-reduce", all_reduce)):
            dist.barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn()
            took = (time.perf_counter() - wall, time.process_time() - cpu)
            timings[name] = min(timings.get(name, took), took)
            if name == "split":
                split = result
    dist.barrier()
    torch.save({"timings": timings, "split": split}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def part1(worlds: list[int], population: int, numel: int, repeats: int) -> None:
    print(f"Part 1: ES update, P = {population}, n = {numel:,} (one thread per rank, gloo)\n")
    rows, reference = [], None
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_worker, args=(world, _free_port(), population, numel, repeats, out),
                               nprocs=world, start_method="spawn")
            ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
        for r in ranks:
            reference = r["split"] if reference is None else reference
            assert torch.equal(r["split"], reference), "split sums differ across ranks or W"
        ways = ("replicated", "split", "split, table", "all-reduce")
        slowest = {k: tuple(max(r["timings"][k][i] for r in ranks) for i in (0, 1)) for k in ways}
        sent = 0 if world == 1 else 2 * (world - 1) / world * 8 * numel + 8
        rows.append((world, slowest, sent))
    base = rows[0][1]
    print("seconds per update on the slowest rank, wall / CPU; ratio to W = 1 (wall / CPU)\n")
    print(f"{'W':>3} | {'replicated':>13} | {'split':>13} {'÷W=1':>11} | {'split, table':>13} "
          f"{'÷W=1':>11} | {'all-reduce':>10} | {'sent/rank':>9}")
    for world, t, sent in rows:
        def pair(k: str) -> str:
            return f"{t[k][0]:>6.2f}/{t[k][1]:<6.2f}"

        def ratio(k: str) -> str:
            return f"{t[k][0] / base[k][0]:>5.2f}/{t[k][1] / base[k][1]:<5.2f}"
        print(f"{world:>3} | {pair('replicated')} | {pair('split')} {ratio('split')} | "
              f"{pair('split, table')} {ratio('split, table')} | {t['all-reduce'][0]:>10.3f} | "
              f"{sent / 1e6:>6.1f} MB")
    print("\nsplit sums: identical bits on every rank and for every W\n")


def _generation_seconds(run_dir: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    times = []
    for events in run_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "perf/frames_per_s" in acc.Tags()["scalars"]:
            times = [e.wall_time for e in acc.Scalars("perf/frames_per_s")]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if gaps else float("nan")


def part2(generations: int) -> None:
    print("Part 2: unitrain fit, ES on CartPole-v1, 1024-1024 MLP, population 256, 5-step episodes")
    frames = 256 * 5 * generations
    results = {}
    for devices in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = Path(tmp) / "es.yaml"
            recipe.write_text(
                "seed: 0\n"
                "env: {id: CartPole-v1}\n"
                "module: {target: unitrain.MLPPolicy, hidden: [1024, 1024]}\n"
                "optimizer: {name: es, population: 256, max_episode_steps: 5}\n"
                f"trainer: {{max_frames: {frames}, devices: {devices},"
                " eval_every_frames: 100000000, num_threads: 1}\n")
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "unitrain.app.cli", "fit", str(recipe),
                                   f"run_dir={tmp}/run"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            results[devices] = (_generation_seconds(Path(tmp) / "run"),
                                time.perf_counter() - start)
    for devices, (gen_s, wall) in results.items():
        print(f"  devices={devices}: {gen_s:.3f} s per generation (median), {wall:.1f} s in all")
    print(f"  ratio devices=2 / devices=1: {results[2][0] / results[1][0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--population", type=int, default=1024)
    parser.add_argument("--params", type=int, default=NATURE_CNN_PARAMS)
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--only-fit", action="store_true")
    args = parser.parse_args()
    if not args.only_fit:
        part1([int(w) for w in args.worlds.split(",")], args.population, args.params,
              args.repeats)
    if not args.skip_fit:
        part2(args.generations)


if __name__ == "__main__":
    main()
