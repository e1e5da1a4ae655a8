"""``unitrain compare``: recipes × seeds at equal budgets, with interval estimates and plots.

Every (recipe, seed) is its own ``unitrain fit`` process, ``jobs`` at a time, in
``OUT/runs/<recipe>/seed<k>``; overrides apply to every recipe and ``frames`` sets one budget for
all. Re-running the same command skips finished runs and resumes interrupted ones from their
last checkpoint, so a compare can be stopped and started at will. A run that fails is reported
with its error line and does not stop the others.

Results (see :func:`summarise`): ``OUT/results.json``, ``OUT/results.md`` (a table ready for a
README), ``OUT/curves.png`` (mean evaluation return against frames and against wall-clock
seconds, with 95 % bootstrap bands) and ``OUT/tensorboard/<recipe>`` (one TensorBoard run per
recipe: its mean and IQM curves, so ``tensorboard --logdir OUT/tensorboard`` shows one line per
recipe). Statistics: :mod:`unitrain.stats` (rliable's estimators).
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unitrain.errors import UserError, check_output_path
from unitrain.stats import (auc, bootstrap_ci, first_reaching, iqm, performance_profile,
                            probability_of_improvement, probability_of_improvement_ci)

__all__ = ["compare", "Run", "summarise", "launch", "ended", "finished", "eval_curves", "cores",
           "recipe_slug"]


@dataclass
class Run:
    """One (recipe, seed) of a compare."""

    recipe: str
    slug: str
    seed: int
    run_dir: Path
    log: Path
    error: str | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.slug}/seed{self.seed}"


def cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one): the default
    number of runs at a time, one torch thread each."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def recipe_slug(recipe: str) -> str:
    """A name for ``recipe`` fit for a directory: ``cartpole/ppo`` -> ``cartpole-ppo``."""
    stem = recipe[:-5] if recipe.endswith(".yaml") else recipe
    stem = stem.split("recipes/", 1)[-1]
    return "".join(c if c.isalnum() or c in "_." else "-" for c in stem).strip("-")


def finished(run: Run, frames: int | None) -> bool:
    """Whether ``run`` ended at the budget ``frames`` (``None``: its recipe's own)."""
    path = run.run_dir / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    budget = frames if frames is not None else summary.get("max_frames")
    return budget is None or summary.get("frames", 0) >= budget


def _module_recipe(recipe_file: str, target: str, out: Path, slug: str) -> str:
    """A copy of ``recipe_file`` whose module block is ``{target: target}``."""
    from omegaconf import OmegaConf

    from unitrain.app.config import read_recipe

    raw = read_recipe(recipe_file)
    raw.module = {"target": target}
    path = out / "recipes" / f"{slug}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {recipe_file} with module {target} (unitrain compare)\n"
                    + OmegaConf.to_yaml(raw))
    return str(path)


def _target(module: str | type | None) -> str | None:
    if module is None or isinstance(module, str):
        if isinstance(module, str) and ":" in module:
            mod, _, cls = module.partition(":")
            return f"{mod}.{cls}"
        return module
    if module.__module__ == "__main__":
        raise UserError(f"compare: module {module.__qualname__} is defined in __main__; the runs "
                        "are separate processes, so define it in an importable module")
    return f"{module.__module__}.{module.__qualname__}"


def _check_module(target: Any, recipe: str) -> None:
    """The module class must import here (as it will in each run) and be an RLModule."""
    from unitrain.errors import ConfigError
    from unitrain.policy.module import RLModule
    from unitrain.validation import import_object

    if not isinstance(target, str):
        return
    try:
        cls = import_object(target)
    except ConfigError as e:
        raise UserError(f"{recipe}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, RLModule)):
        raise UserError(f"{recipe}: module.target: {target!r} is not a unitrain.RLModule subclass")


def compare(recipes: Sequence[str], seeds: int | Sequence[int] = 3, frames: int | None = None,
            jobs: int | None = None, out: str | os.PathLike = "compare",
            threshold: float | None = None, overrides: Sequence[str] = (),
            module: str | type | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every recipe with every seed at equal budgets and summarise them.

    Args:
        recipes: shipped recipe names (``cartpole/ppo``) or YAML paths.
        seeds: a number of seeds (``0..N-1``) or the seeds themselves.
        frames: one frame budget for every recipe (``trainer.max_frames``; ``None``: each
            recipe's own).
        jobs: runs at a time (``None``: one per CPU core; each run uses one torch thread).
        out: the output directory.
        threshold: an evaluation return to report frames and seconds to reach.
        overrides: ``key=value`` overrides for every recipe.
        module: a module class (importable) or ``"package.module:Class"`` to train in every
            recipe instead of the recipe's own module block.
        progress: show one progress bar over all runs.

    Returns:
        The content of ``results.json``.

    Raises:
        UserError: a recipe, override or the output directory is invalid (checked before any
            run starts).
    """
    from unitrain.app.config import find_recipe, load_recipe

    out = check_output_path(out, f"--out {out}", "expected a directory for the results "
                                                  "(created if missing)", directory=True)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not recipes or not seed_list:
        raise UserError("compare: give at least one recipe and one seed")
    jobs = jobs or cores()
    if jobs < 1:
        raise UserError(f"compare: --jobs must be >= 1, got {jobs}")
    target = _target(module)
    extra = [*overrides, *([f"trainer.max_frames={frames}"] if frames is not None else [])]
    runs: list[Run] = []
    slugs: dict[str, str] = {}
    for recipe in recipes:
        path = find_recipe(recipe)
        slug = recipe_slug(recipe)
        if slug in slugs.values():
            raise UserError(f"compare: recipe {recipe} is given twice")
        if target is not None:
            path = _module_recipe(path, target, out, slug)
        spec = load_recipe(path, extra)  # every mistake is reported before anything runs
        _check_module(spec.module.get("target"), path)
        slugs[recipe] = slug
        for seed in seed_list:
            runs.append(Run(path, slug, seed, out / "runs" / slug / f"seed{seed}",
                            out / "logs" / f"{slug}-seed{seed}.log", extra=extra))
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(
        {"recipes": list(recipes), "seeds": seed_list, "frames": frames, "overrides": list(overrides),
         "module": target, "threshold": threshold}, indent=2))
    _execute(runs, frames, jobs, progress)
    results = summarise(runs, {r: slugs[r] for r in recipes}, threshold, frames)
    write_results(results, out)
    return results


def _execute(runs: list[Run], frames: int | None, jobs: int, progress: bool) -> None:
    todo = [r for r in runs if not finished(r, frames)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="compare", unit="run",
                   file=sys.stderr, dynamic_ncols=True)
    running: dict[subprocess.Popen, tuple[Run, Any]] = {}
    shown = ""
    try:
        while todo or running:
            while todo and len(running) < jobs:
                run = todo.pop(0)
                proc, log = launch(run)
                running[proc] = (run, log)
            names = ", ".join(r.name for r, _ in running.values())
            if bar is not None and names != shown:
                bar.set_postfix_str(names)
                shown = names
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                run, log = running.pop(proc)
                ended(run, proc, log)
                if bar is not None:
                    bar.update(1)
    finally:
        for proc, (_, log) in running.items():
            proc.terminate()
            log.close()
        if bar is not None:
            bar.close()


def launch(run: Run) -> tuple[subprocess.Popen, Any]:
    """Start ``unitrain fit`` for ``run`` (resuming from its ``last.ckpt`` where one exists),
    its output going to ``run.log``; returns the process and the open log."""
    cmd = [sys.executable, "-m", "unitrain", "fit", run.recipe, f"seed={run.seed}",
           f"run_dir={run.run_dir}", "trainer.num_threads=1", *run.extra]
    if (run.run_dir / "checkpoints" / "last.ckpt").is_file():
        cmd.append("resume=last")
    run.log.parent.mkdir(parents=True, exist_ok=True)
    log = run.log.open("w")
    log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def ended(run: Run, proc: subprocess.Popen, log: Any) -> None:
    """Close the log of a run whose process has exited; ``run.error`` is the error line of a
    run that failed (the last ``unitrain: error:`` line, else its last line)."""
    log.close()
    if proc.returncode != 0:
        lines = [ln for ln in run.log.read_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("unitrain: error:")]
        run.error = (errors or lines or [f"exit code {proc.returncode}"])[-1]


def eval_curves(run_dir: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(frames, return)`` and ``(seconds, return)`` of a run's evaluations.

    Seconds are training time: within each launch of the run (``summary.json`` ``segments``),
    the time since that launch started plus the ``wall_s`` of the launches before it, so the
    pause of an interrupted and resumed run does not count.
    """
    from datetime import datetime

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events: dict[int, tuple[float, float]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if "eval/return_mean" not in acc.Tags()["scalars"]:
            continue
        for e in acc.Scalars("eval/return_mean"):
            events[e.step] = (e.wall_time, e.value)  # a resumed run's later value wins
    summary_path = run_dir / "summary.json"
    segments = []
    if summary_path.is_file():
        segments = json.loads(summary_path.read_text()).get("segments") or []
    frames_curve = sorted((float(step), value) for step, (_, value) in events.items())
    seconds_curve = []
    for step, (wall, value) in sorted(events.items()):
        before, started = 0.0, None
        for seg in segments:
            if step <= seg.get("to_frames", 0) or seg is segments[-1]:
                started = datetime.fromisoformat(seg["started"]).timestamp()
                break
            before += seg.get("wall_s", 0.0)
        if started is None:  # no segments recorded: time since the first evaluation's launch
            started = min(w for w, _ in events.values())
        seconds_curve.append((before + max(0.0, wall - started), value))
    return frames_curve, sorted(seconds_curve)


def summarise(runs: list[Run], slugs: dict[str, str], threshold: float | None = None,
              budget: int | None = None) -> dict[str, Any]:
    """Per recipe: final returns per seed, their mean, IQM with a 95 % bootstrap interval, the
    normalised area under the return-vs-frames curve, frames and seconds to ``threshold``, the
    mean frames used (``frames_used``; a population rule ends its last generation, so it may
    exceed ``budget``). Across recipes (:func:`compare_recipes`): the probability of improvement
    of each pair and the performance profiles of the final returns."""
    results: dict[str, Any] = {"threshold": threshold, "budget": budget, "recipes": {}}
    for recipe, slug in slugs.items():
        mine = [r for r in runs if r.slug == slug]
        entry: dict[str, Any] = {"slug": slug, "seeds": [r.seed for r in mine], "final": {},
                                 "frames": {}, "wall_s": {}, "auc": {}, "failed": {},
                                 "curves": {}}
        if threshold is not None:
            entry["frames_to_threshold"], entry["seconds_to_threshold"] = {}, {}
        for run in mine:
            key = str(run.seed)
            summary_path = run.run_dir / "summary.json"
            if run.error is not None or not summary_path.is_file():
                entry["failed"][key] = run.error or "no summary.json (the run did not finish)"
                continue
            summary = json.loads(summary_path.read_text())
            frames_curve, seconds_curve = eval_curves(run.run_dir)
            entry["final"][key] = summary["eval/return_mean"]
            entry["frames"][key] = summary["frames"]
            entry["wall_s"][key] = summary.get("wall_s")
            entry["auc"][key] = auc(frames_curve, 0.0, float(summary["frames"]))
            entry["curves"][key] = {"frames": frames_curve, "seconds": seconds_curve}
            if threshold is not None:
                entry["frames_to_threshold"][key] = first_reaching(frames_curve, threshold)
                entry["seconds_to_threshold"][key] = first_reaching(seconds_curve, threshold)
        finals = list(entry["final"].values())
        if finals:
            low, high = bootstrap_ci(finals)
            entry.update({"mean": float(np.mean(finals)), "iqm": iqm(finals),
                          "iqm_ci95": [low, high], "auc_iqm": iqm(list(entry["auc"].values())),
                          "frames_used": float(np.mean(list(entry["frames"].values())))})
        results["recipes"][recipe] = entry
    results.update(compare_recipes({r: list(e["final"].values())
                                    for r, e in results["recipes"].items()}))
    return results


def compare_recipes(finals: dict[str, list[float]], points: int = 51) -> dict[str, Any]:
    """Across recipes, from final returns (Agarwal et al. 2021, rliable's estimators):

    ``probability_of_improvement``: for each pair ``"X > Y"`` (X before Y in the given order),
    ``{"x", "y", "p", "ci"}``: ``P(X > Y)`` with a stratified 95 % bootstrap interval
    (``P(Y > X) = 1 − P(X > Y)``). ``profiles``: ``{"taus", "recipes": {recipe: {"profile",
    "low", "high"}}}``, the fraction of runs with final return ``> τ`` on ``points`` values of
    ``τ`` from the lowest to the highest final return, with a 95 % bootstrap band.
    """
    done = {r: v for r, v in finals.items() if v}
    names = list(done)
    pairs: dict[str, Any] = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            low, high = probability_of_improvement_ci(done[x], done[y])
            pairs[f"{x} > {y}"] = {"x": x, "y": y,
                                   "p": probability_of_improvement(done[x], done[y]),
                                   "ci": [low, high]}
    profiles: dict[str, Any] = {"taus": [], "recipes": {}}
    if done:
        every = np.concatenate([np.asarray(v, dtype=np.float64) for v in done.values()])
        taus = np.linspace(every.min(), every.max(), points)
        profiles["taus"] = taus.tolist()
        for r, v in done.items():
            profile, low, high = performance_profile(v, taus)
            profiles["recipes"][r] = {"profile": profile.tolist(), "low": low.tolist(),
                                      "high": high.tolist()}
    return {"probability_of_improvement": pairs, "profiles": profiles}


def _median_reached(values: dict[str, float | None]) -> str:
    reached = [v for v in values.values() if v is not None]
    if not reached:
        return "—"
    return f"{np.median(reached):,.0f} ({len(reached)}/{len(values)})"


def results_table(results: dict[str, Any]) -> str:
    """``results.md``: one row per recipe, then ``P(X > Y)`` for each pair of recipes."""
    threshold = results.get("threshold")
    budget = results.get("budget")
    head = ["recipe", "runs", "final return, mean", "IQM [95% CI]", "AUC (IQM)",
            "frames used (mean)", "wall s (mean)"]
    if threshold is not None:
        head += [f"frames to {threshold:g} (median, reached)",
                 f"seconds to {threshold:g} (median, reached)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for recipe, e in results["recipes"].items():
        done = len(e["final"])
        runs = f"{done}/{len(e['seeds'])}"
        if not done:
            row = [recipe, runs] + ["failed: " + "; ".join(sorted(set(e["failed"].values())))] \
                + [""] * (len(head) - 3)
        else:
            walls = [w for w in e["wall_s"].values() if w is not None]
            row = [recipe, runs, f"{e['mean']:.1f}",
                   f"{e['iqm']:.1f} [{e['iqm_ci95'][0]:.1f}, {e['iqm_ci95'][1]:.1f}]",
                   f"{e['auc_iqm']:.1f}", _frames_used(e, budget),
                   f"{np.mean(walls):.0f}" if walls else "—"]
            if threshold is not None:
                row += [_median_reached(e["frames_to_threshold"]),
                        _median_reached(e["seconds_to_threshold"])]
            if e["failed"]:
                row[1] += " (failed: " + "; ".join(
                    f"seed {k}: {v}" for k, v in sorted(e["failed"].items())) + ")"
        lines.append("| " + " | ".join(row) + " |")
    pairs = results.get("probability_of_improvement") or {}
    if pairs:
        note = ("Probability of improvement P(X > Y) of the final returns (a run of X scores "
                "above a run of Y, ties half; 0.5: no difference), 95% stratified bootstrap CI:")
        lines += ["", note, "", "| X | Y | P(X > Y) [95% CI] |", "|---|---|---|"]
        for pair in pairs.values():
            lines.append(f"| {pair['x']} | {pair['y']} | {pair['p']:.2f} "
                         f"[{pair['ci'][0]:.2f}, {pair['ci'][1]:.2f}] |")
    return "\n".join(lines) + "\n"


def _frames_used(entry: dict[str, Any], budget: int | None) -> str:
    """Mean frames used; beside the budget where a run went past it (a population rule finishes
    the generation in which it reaches the budget)."""
    frames = list(entry["frames"].values())
    used = entry.get("frames_used", float(np.mean(frames)))
    text = f"{used:,.0f}"
    if budget is not None and max(frames) > budget:
        text += f" (budget {budget:,}: population rules finish their generation)"
    return text


def _band(curves: list[list[tuple[float, float]]], grid: np.ndarray,
          reps: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of the curves on ``grid`` and a 95 % bootstrap band over runs."""
    ys = np.stack([np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(curves), size=(reps, len(curves)))
    means = ys[idx].mean(1)
    return ys.mean(0), np.quantile(means, 0.025, axis=0), np.quantile(means, 0.975, axis=0)


def _grid(curves: list[list[tuple[float, float]]]) -> np.ndarray | None:
    curves = [c for c in curves if c]
    if not curves:
        return None
    end = min(c[-1][0] for c in curves)
    begin = max(c[0][0] for c in curves)
    return np.linspace(begin, end, 60) if end > begin else np.array([end])


def write_results(results: dict[str, Any], out: Path) -> None:
    """Write ``results.json``, ``results.md``, ``curves.png`` and the TensorBoard runs."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_table(results))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    fig = figure(results)
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    for e in results["recipes"].values():
        curves = [c["frames"] for c in e["curves"].values() if c["frames"]]
        grid = _grid(curves)
        if grid is not None:
            mean, _, _ = _band(curves, grid, reps=1)
            ys = np.stack([np.interp(grid, [x for x, _ in c], [y for _, y in c]) for c in curves])
            with SummaryWriter(str(out / "tensorboard" / e["slug"])) as writer:
                for x, m, col in zip(grid, mean, ys.T):
                    writer.add_scalar("compare/return_mean", float(m), int(x))
                    writer.add_scalar("compare/return_iqm", iqm(col), int(x))


def figure(results: dict[str, Any]) -> Any:
    """``curves.png``'s figure: return against frames, against wall-clock seconds (log scale, so
    a rule hundreds of times faster than another still shows), and the performance profiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = results["recipes"]
    profiles = (results.get("profiles") or {}).get("recipes") or {}
    taus = (results.get("profiles") or {}).get("taus") or []
    rows = math.ceil(len(recipes) / 4)  # legend rows under the panels
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5 + 0.2 * rows))
    palette = plt.get_cmap("tab10")
    for i, (recipe, e) in enumerate(recipes.items()):
        # Ten colours, then the same colours dashed, dash-dotted, dotted.
        style = {"color": palette(i % 10), "linestyle": ("-", "--", "-.", ":")[(i // 10) % 4]}
        for ax, axis in zip(axes, ("frames", "seconds")):
            curves = [c[axis] for c in e["curves"].values() if c[axis]]
            if axis == "seconds":  # a log axis has no 0
                curves = [p for p in ([pt for pt in c if pt[0] > 0] for c in curves) if p]
            grid = _grid(curves)
            if grid is None:
                continue
            if axis == "seconds" and grid.size > 1:  # evenly spaced on the log axis
                grid = np.geomspace(grid[0], grid[-1], grid.size)
            mean, low, high = _band(curves, grid)
            ax.plot(grid, mean, label=f"{recipe} ({len(curves)} seeds)", **style)
            ax.fill_between(grid, low, high, color=style["color"], alpha=0.15)
        if recipe in profiles and taus:
            prof = profiles[recipe]
            axes[2].step(taus, prof["profile"], where="post", **style)
            axes[2].fill_between(taus, prof["low"], prof["high"], step="post",
                                 color=style["color"], alpha=0.15)
    axes[1].set_xscale("log")
    for ax, xlabel in zip(axes, ("environment frames", "wall-clock seconds (log scale)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation return (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("final evaluation return τ")
    axes[2].set_ylabel("fraction of runs with return > τ")
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    bottom = 0.0
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8,
                   frameon=False)
        bottom = (0.1 + 0.2 * math.ceil(len(handles) / 4)) / fig.get_figheight()
    fig.suptitle("unitrain compare: mean with 95% bootstrap band over seeds")
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig
