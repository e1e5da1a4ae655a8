"""DSAC-T against SAC and TD3, driven by the same unitrain loop, side by side in one run.

DSAC-T: Duan et al., "Distributional Soft Actor-Critic with Three Refinements", arXiv:2310.05858.
SAC: Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications" (``ut.optim.SAC``).
TD3: Fujimoto et al. 2018, "Addressing Function Approximation Error in Actor-Critic Methods"
(``ut.optim.TD3``).

The rules share everything but the loss: collection, replay memory, warm-up, update-to-data
ratio, learning rates, the actor (the module, an MLP whose output is read through the action
contract: a tanh-Gaussian with a state-dependent standard deviation for SAC and DSAC-T, its mean
for TD3) and the critics' widths (each rule's own activation: ReLU for SAC and TD3, GELU for
DSAC-T, as in their papers). SAC and DSAC-T start from the same temperature; DSAC-T's temperature
steps on every gradient update like SAC's (``alpha_every=update``) unless ``--paper-alpha`` asks
for the paper's schedule (with the delayed policy updates, every second update). The policy and
targets follow each paper (SAC: every update; DSAC-T and TD3: every second). Each (env, seed)
runs the rules back to back, so drifts in machine load hit them alike.

For every env the table gives, per rule over the seeds: the deterministic evaluation return at
the end of the budget (equal frames for both rules) and half way, the gradient updates per second
inside the update loop (median over iterations), and the wall time of a run. Run::

    python tools/bench_offpolicy.py --seeds 0 1 2
    python tools/bench_offpolicy.py --envs HalfCheetah-v5 Hopper-v5 --frames 100000 --seeds 0 1 2
    python tools/bench_offpolicy.py --frames 10000 20000 --seeds 0 1 --rules dsac_t sac

With ``--out DIR`` the runs are kept in ``DIR``: running the same command again skips the finished
runs and resumes an interrupted one from its last checkpoint (the wall time adds up the launches),
so a long table can be gathered across several sittings. With ``--record DIR`` each finished
run's outcome is also written to ``DIR/<env>-<rule>-<seed>.json`` (final and half-way return,
updates/s, wall time, the evaluation curve); a run with a record is not run again, and the table
is printed from the records, so a table can be assembled from runs made on different machines::

    python tools/bench_offpolicy.py --envs HalfCheetah-v5 Hopper-v5 --frames 100000 \
        --out /tmp/offpolicy --record docs/results/offpolicy_100k
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import lightning as L
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import unitrain as ut
from unitrain.envs import env_info
from unitrain.optim import DSACT, SAC, TD3

# Per env: the env spec, the module and the rule fields both rules get, and the default budget.
# Pendulum: the pendulum/dsac_t settings. HalfCheetah: a short CPU budget with
# 2 x 128 networks and one update per 4 frames (the paper's 3 x 256 at one update per frame is
# about ten times slower here).
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]] = {
    "Pendulum-v1": (
        dict(num_envs=4), dict(hidden=(64, 64)),
        dict(lr_actor=1e-3, lr_critic=1e-3, lr_alpha=1e-3, alpha_init=1.0, batch_size=256,
             buffer_size=20_000, warmup_frames=1000, frames_per_batch=64, utd_ratio=1.0,
             critic_hidden=(64, 64)),
        20_000),
    "HalfCheetah-v5": (
        dict(num_envs=4), dict(hidden=(128, 128)),
        dict(lr_actor=3e-4, lr_critic=3e-4, lr_alpha=3e-4, alpha_init=1.0, batch_size=256,
             buffer_size=100_000, warmup_frames=5000, frames_per_batch=64, utd_ratio=1.0,
             critic_hidden=(128, 128)),
        25_000),
    "Hopper-v5": (
        dict(num_envs=4), dict(hidden=(128, 128)),
        dict(lr_actor=3e-4, lr_critic=3e-4, lr_alpha=3e-4, alpha_init=1.0, batch_size=256,
             buffer_size=100_000, warmup_frames=5000, frames_per_batch=64, utd_ratio=1.0,
             critic_hidden=(128, 128)),
        25_000),
}
RULES = {"dsac_t": DSACT, "sac": SAC, "td3": TD3}


@dataclass
class Result:
    """One run's outcome."""

    final: float
    half: float
    updates_per_s: float
    wall_s: float
    curve: list[tuple[int, float]] | None = None


def run(env_id: str, rule_name: str, seed: int, frames: int, root: Path,
        paper_alpha: bool = False) -> Result:
    """Train one rule on one env and seed; read its evaluations and update rate back.

    Args:
        env_id: a key of :data:`SETTINGS`.
        rule_name: a key of :data:`RULES`.
        seed: the run seed.
        frames: the frame budget.
        root: where the run directory goes.
        paper_alpha: DSAC-T steps its temperature with the delayed policy updates.
    """
    env_kwargs, module_kwargs, rule_kwargs, _ = SETTINGS[env_id]
    spec = ut.EnvSpec(env_id, **env_kwargs)
    cls = RULES[rule_name]
    kwargs = {k: v for k, v in rule_kwargs.items() if k in {f.name for f in fields(cls)}}
    if rule_name == "dsac_t":
        kwargs["alpha_every"] = "delayed" if paper_alpha else "update"
    rule = cls(**kwargs)
    info = env_info(spec)
    run_dir = root / f"{env_id}-{rule_name}-{seed}"
    resume = "last" if (run_dir / "checkpoints" / "last.ckpt").is_file() else None
    # Evaluate about ten times per run (after the first iteration that reaches each tenth).
    eval_every_frames = max(1, frames // 10)
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=frames,
                         eval_every_frames=eval_every_frames,
                         eval_episodes=10, seed=seed, num_threads=1, run_dir=run_dir,
                         enable_progress_bar=False)
    L.seed_everything(seed, verbose=False)
    module = ut.MLPPolicy(info.obs_dim, info.act_dim, activation="gelu", action_std="state",
                          **module_kwargs)
    trainer.fit(module, ckpt_path=resume)
    summary = trainer.summary
    evals, rates = _scalars(run_dir, "eval/return_mean"), _scalars(run_dir, "perf/updates_per_s")
    return Result(final=summary["eval/return_mean"], half=_half_way(evals, frames),
                  updates_per_s=statistics.median(v for _, v in rates) if rates else math.nan,
                  wall_s=summary["wall_s"], curve=[(int(s), float(v)) for s, v in evals])


def _half_way(curve: list[tuple[int, float]] | None, frames: int) -> float:
    """The first evaluation at or after half the budget (evaluations follow the iteration that
    crosses each tenth, so they land a little after it)."""
    later = [value for step, value in curve or [] if step >= frames // 2]
    return later[0] if later else math.nan


def _record_path(record: Path | None, env_id: str, rule_name: str, seed: int) -> Path | None:
    return None if record is None else record / f"{env_id}-{rule_name}-{seed}.json"


def _load(path: Path | None, frames: int, paper_alpha: bool) -> Result | None:
    if path is None or not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data["frames"] != frames:
        raise SystemExit(f"{path}: recorded at {data['frames']} frames, not {frames}; "
                         "give --record a directory for this budget")
    if data["paper_alpha"] != paper_alpha:
        raise SystemExit(f"{path}: recorded with paper_alpha={data['paper_alpha']}; give "
                         "--record a directory for this temperature schedule")
    curve = data.get("curve")
    return Result(final=data["final"], half=_half_way(curve, frames),
                  updates_per_s=data["updates_per_s"], wall_s=data["wall_s"],
                  curve=data.get("curve"))


def _save(path: Path, res: Result, frames: int, paper_alpha: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"frames": frames, "paper_alpha": paper_alpha, "final": res.final,
            "half": None if math.isnan(res.half) else res.half,
            "updates_per_s": res.updates_per_s, "wall_s": res.wall_s, "curve": res.curve}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def _mean_std(values: list[float]) -> str:
    """Mean ± standard deviation of the known values; ``(k/n)`` when only k of n are known."""
    known = [v for v in values if not math.isnan(v)]
    if not known:
        return "—"
    part = "" if len(known) == len(values) else f" ({len(known)}/{len(values)})"
    if len(known) == 1:
        return f"{known[0]:8.1f}{part}"
    return f"{statistics.mean(known):8.1f} ± {statistics.stdev(known):6.1f}{part}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--paper-alpha", action="store_true",
                        help="DSAC-T steps its temperature with the policy (the paper's schedule)")
    parser.add_argument("--frames", nargs="+", type=int, default=None,
                        help="frame budget per run: one for every env, or one per env in the "
                             "order of --envs (default: per env, see SETTINGS)")
    parser.add_argument("--record", type=Path, default=None,
                        help="write each finished run's outcome here as JSON and skip runs "
                             "already recorded")
    parser.add_argument("--recorded-only", action="store_true",
                        help="with --record: print the table of the recorded runs, run nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the runs here and resume them when run again (default: a "
                             "temporary directory)")
    args = parser.parse_args()
    budgets = args.frames or [SETTINGS[env_id][3] for env_id in args.envs]
    if len(budgets) == 1:
        budgets = budgets * len(args.envs)
    if len(budgets) != len(args.envs) or min(budgets) < 1:
        parser.error("--frames: give one positive budget, or one per env")
    if args.recorded_only and args.record is None:
        parser.error("--recorded-only needs --record")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for env_id, frames in zip(args.envs, budgets):
            results: dict[str, list[Result]] = {name: [] for name in args.rules}
            for seed in args.seeds:
                for rule_name in results:
                    record = _record_path(args.record, env_id, rule_name, seed)
                    res = _load(record, frames, args.paper_alpha)
                    if res is None and args.recorded_only:
                        continue
                    if res is None:
                        res = run(env_id, rule_name, seed, frames, root, args.paper_alpha)
                        if record is not None:
                            _save(record, res, frames, args.paper_alpha)
                    results[rule_name].append(res)
                    print(f"{env_id} {rule_name} seed {seed}: return {res.final:.1f} "
                          f"(half way {res.half:.1f}), {res.updates_per_s:.1f} updates/s, "
                          f"{res.wall_s:.0f} s", flush=True)
            rows.append((env_id, frames, results))

    print(f"\n{'env':<15} {'frames':>7} {'rule':<7} {'return (final)':>17} "
          f"{'return (half)':>17} {'runs':>8} {'updates/s':>10} {'wall s':>7}")
    for env_id, frames, results in rows:
        for rule_name, res in results.items():
            if not res:
                continue
            print(f"{env_id:<15} {frames:>7} {rule_name:<7} "
                  f"{_mean_std([r.final for r in res]):>17} {_mean_std([r.half for r in res]):>17} "
                  f"{len(res):>2} seeds "
                  f"{statistics.median(r.updates_per_s for r in res):>10.1f} "
                  f"{statistics.mean(r.wall_s for r in res):>7.0f}")
        if results.get("dsac_t") and results.get("sac"):
            ratio = (statistics.median(r.updates_per_s for r in results["dsac_t"])
                     / statistics.median(r.updates_per_s for r in results["sac"]))
            print(f"{'':<15} {'':>7} DSAC-T/SAC update rate: {ratio:.2f}")


if __name__ == "__main__":
    main()
