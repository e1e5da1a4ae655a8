"""The ``unitrain`` command.

::

    unitrain fit RECIPE [key=value ...]       train; ends with a summary and summary.json
    unitrain evaluate CHECKPOINT [env.KEY=VALUE ...] [--episodes N]
    unitrain compare RECIPE [RECIPE ...] [--seeds N] [--frames F] [--jobs J] [--out DIR]
                     [--threshold T] [--python MODULE:CLASS] [key=value ...]
    unitrain tune RECIPE [RECIPE ...] --frames F [--trials N] [--jobs J] [--out DIR]
                  [--pruner {median,hyperband,none}] [--seed S] [key=value ...]
    unitrain export CHECKPOINT --format {onnx,pt2} --out FILE
    unitrain recipes                          list the shipped recipes

User mistakes (a missing file, a bad key or value, an unknown env or rule, an unreadable
checkpoint, a path that is a directory, an empty file or a binary one where text belongs, a
module that cannot be imported) print one line on stderr and exit with code 2.

Modules a recipe names (``module: {target: mymodels.MyPolicy}``, ``env: {id: mypkg:Env-v0}``,
``env: {make: mypkg.envs:make_env}``) are imported from the working directory first, as
``python -m`` does, then from ``PYTHONPATH`` and the installed packages.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    import os

    # As `python -m` does: the user's modules next to their recipes import by name.
    cwd = os.getcwd()
    if sys.path[:1] not in ([cwd], [""]):
        sys.path.insert(0, cwd)
    parser = argparse.ArgumentParser(prog="unitrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train from a recipe")
    fit.add_argument("recipe", help="a recipe YAML (see `unitrain recipes`)")
    fit.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.devices=2")
    ev = sub.add_parser("evaluate", help="evaluate a checkpoint's deterministic policy")
    ev.add_argument("checkpoint")
    ev.add_argument("overrides", nargs="*", metavar="env.KEY=VALUE",
                    help="change the run's env, e.g. env.backend=gymnasium")
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--video", default=None, metavar="PATH",
                    help="also film the first episodes into PATH (.mp4 or .gif)")
    ev.add_argument("--video-episodes", type=int, default=1, metavar="N",
                    help="episodes in the video (default 1)")
    cmp = sub.add_parser("compare", help="run recipes x seeds at equal budgets and compare them")
    cmp.add_argument("items", nargs="+", metavar="RECIPE|key=value",
                     help="recipes to compare, then key=value overrides for all of them")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per recipe (default 3)")
    cmp.add_argument("--frames", type=int, default=None, help="one frame budget for every recipe")
    cmp.add_argument("--jobs", type=int, default=None,
                     help="runs at a time (default: one per CPU core)")
    cmp.add_argument("--out", default="compare", help="output directory (default: compare)")
    cmp.add_argument("--threshold", type=float, default=None,
                     help="report frames and seconds to reach this evaluation return")
    cmp.add_argument("--python", default=None, metavar="MODULE:CLASS",
                     help="train this module class in every recipe instead of its module block")
    tn = sub.add_parser("tune", help="search rules and their settings (Optuna) at equal budgets")
    tn.add_argument("items", nargs="+", metavar="RECIPE|key=value",
                    help="recipes to choose between (each with its tune: search space), then "
                         "key=value overrides for all of them")
    tn.add_argument("--frames", type=int, required=True, help="the frame budget of every trial")
    tn.add_argument("--trials", type=int, default=20,
                    help="finished trials the study should hold (default 20; a rerun resumes)")
    tn.add_argument("--jobs", type=int, default=1, help="trials at a time (default 1)")
    tn.add_argument("--out", default="tune", help="output directory (default: tune)")
    tn.add_argument("--pruner", choices=("median", "hyperband", "none"), default="median",
                    help="stops trials whose evaluation curve falls behind (default median)")
    tn.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    exp = sub.add_parser("export", help="write a checkpoint's policy as a standalone file")
    exp.add_argument("checkpoint")
    exp.add_argument("--format", choices=("onnx", "pt2"), default=None,
                     help="default: from --out's suffix")
    exp.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    sub.add_parser("recipes", help="list the shipped recipes")
    # compare and tune take key=value overrides after their options too
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("compare", "tune") or not all("=" in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.items += extra

    from unitrain.errors import UserError

    try:
        if args.command == "fit":
            return _fit(args.recipe, args.overrides)
        if args.command == "evaluate":
            return _evaluate(args.checkpoint, args.episodes, args.seed, args.overrides, args.video,
                             args.video_episodes)
        if args.command == "compare":
            return _compare(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "export":
            return _export(args.checkpoint, args.format, args.out)
        return _recipes()
    except UserError as e:
        print(f"unitrain: error: {e}", file=sys.stderr)
        return 2


def _fit(recipe_path: str, overrides: list[str]) -> int:
    import lightning as L

    from unitrain.app.config import build_module, find_recipe, load_recipe
    from unitrain.envs.data import load_data
    from unitrain.errors import ConfigError, UserError
    from unitrain.run.safety import RunStopped, exit_code
    from unitrain.run.trainer import Trainer, quiet_console

    quiet_console()
    recipe = load_recipe(find_recipe(recipe_path), overrides)
    run_dir, ckpt = _resolve_resume(recipe.resume, recipe.run_dir, recipe)
    if recipe.init is not None:
        from unitrain.run.checkpoint import read_checkpoint

        read_checkpoint(recipe.init, f"init={recipe.init}")
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    try:
        # Builds nothing on disk: every check across blocks runs here, before the run starts.
        trainer = Trainer(recipe.env, recipe.optimizer, seed=recipe.seed, run_dir=run_dir,
                          **recipe.trainer.trainer_kwargs())
        loaders: dict[str, Any] = {}
        if recipe.data is not None:
            train, test, info = load_data(recipe.data)
            loaders = {"train_dataloaders": train, "val_dataloaders": test}
        else:
            info = trainer.env_info
        module = build_module(recipe.module, info)
        trainer.fit(module, ckpt_path=ckpt, init=recipe.init, **loaders)
    except ConfigError as e:
        raise UserError(f"{recipe.source}: {e}") from None
    except RunStopped as e:
        if trainer.global_rank == 0:
            args = " ".join(shlex.quote(a) for a in [recipe_path, *overrides]
                            if not a.startswith(("resume=", "run_dir=")))
            print(f"\nunitrain: {e}; resume with: unitrain fit {args} "
                  f"run_dir={shlex.quote(str(trainer.run_dir))} resume=last", file=sys.stderr)
        return exit_code(e.signum)
    if trainer.summary is not None and trainer.summary.get("finished"):
        s = trainer.summary
        print(f"unitrain: the run in {trainer.run_dir} is finished ({s['frames']:,} frames, "
              f"budget {s['max_frames']:,}); nothing to do (raise trainer.max_frames to go on)")
        return 0
    return 0


def _compare(args: argparse.Namespace) -> int:
    from unitrain.app.compare import compare
    from unitrain.errors import UserError

    recipes = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    if args.seeds < 1:
        raise UserError(f"compare: --seeds must be >= 1, got {args.seeds}")
    if args.frames is not None and args.frames < 1:
        raise UserError(f"compare: --frames must be >= 1, got {args.frames}")
    results = compare(recipes, seeds=args.seeds, frames=args.frames, jobs=args.jobs, out=args.out,
                      threshold=args.threshold, overrides=overrides, module=args.python)
    from unitrain.app.compare import results_table

    print(results_table(results), end="")
    out = Path(args.out)
    print(f"unitrain: results {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}; "
          f"tensorboard --logdir {out / 'tensorboard'}")
    failed = sum(len(e["failed"]) for e in results["recipes"].values())
    return 1 if failed else 0


def _tune(args: argparse.Namespace) -> int:
    from unitrain.app.tune import tune

    recipes = [a for a in args.items if "=" not in a]
    overrides = [a for a in args.items if "=" in a]
    try:
        result = tune(recipes, trials=args.trials, frames=args.frames, jobs=args.jobs,
                      out=args.out, pruner=args.pruner, seed=args.seed, overrides=overrides)
    except KeyboardInterrupt:
        print("\nunitrain tune: interrupted; run the same command again to resume the study",
              file=sys.stderr)
        return 130
    out = Path(args.out)
    print((out / "results.md").read_text(), end="")
    print(f"unitrain: study {out / 'study.db'}; results {out / 'results.md'}, "
          f"{out / 'results.csv'}; plots {out}/*.png; tensorboard --logdir {out / 'runs'}")
    if result.best_recipe is None:
        print("unitrain: no trial completed", file=sys.stderr)
        return 1
    print(f"unitrain: best {result.best_value:.2f}: unitrain fit {result.best_recipe}")
    return 0


def _resolve_resume(resume: str | None, run_dir: str | None, recipe: Any) -> tuple[str | None, str | None]:
    """The run directory and checkpoint path for ``resume=`` (validated before anything runs)."""
    from unitrain.errors import UserError

    if resume is None:
        return run_dir, None
    if resume == "last":
        if run_dir is not None:
            path = Path(run_dir) / "checkpoints" / "last.ckpt"
        else:
            env_id = recipe.env.id if recipe.env is not None else "supervised"
            env_name = "".join(c if c.isalnum() else "-" for c in env_id).strip("-").lower()
            candidates = sorted(Path("runs").glob(f"{env_name}-{recipe.optimizer.name}/*/checkpoints/last.ckpt"))
            if not candidates:
                raise UserError("resume=last: no earlier run of this recipe under runs/ "
                                "(give run_dir=... or resume=PATH to a .ckpt file)")
            path = candidates[-1]
    else:
        path = Path(resume)
    if not path.exists():
        raise UserError(f"resume={resume}: no checkpoint at {path}; give resume=PATH to a .ckpt "
                        "file, or leave resume= out to start a new run")
    from unitrain.run.checkpoint import read_checkpoint

    read_checkpoint(path, f"resume={resume}")
    if run_dir is None:
        run_dir = str(path.parent.parent)
    return run_dir, str(path)


def _evaluate(checkpoint: str, episodes: int, seed: int, overrides: list[str],
              video: str | None = None, video_episodes: int = 1) -> int:
    import yaml

    from unitrain.errors import UserError
    from unitrain.run.checkpoint import evaluate_checkpoint

    if episodes < 1:
        raise UserError(f"--episodes {episodes}: expected an integer >= 1")
    env: dict[str, object] = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("env.") or "." in key[4:] or not key[4:]:
            raise UserError(f"{item}: evaluate takes env overrides, env.KEY=VALUE (e.g. "
                            "env.backend=gymnasium)")
        env[key[4:]] = yaml.safe_load(value) if value else value
    if video is not None:
        from unitrain.run.video import check_video_path, record

        check_video_path(video)  # before the evaluation: a bad path costs no episodes
    result = evaluate_checkpoint(checkpoint, episodes=episodes, seed=seed, env_overrides=env)
    if video is not None:
        filmed = record(checkpoint, video, episodes=video_episodes, seed=seed)
        result["video"] = {k: filmed[k] for k in ("path", "frames", "fps", "returns", "lengths")}
    print(json.dumps(result, indent=2))
    return 0


def _export(checkpoint: str, format: str | None, out: str) -> int:
    from unitrain.run.export import export

    path = export(checkpoint, out, format)
    loader = ("torch.export.load(path).module()(observation)"
              if (format or path.suffix.lstrip(".")) == "pt2" else
              "onnxruntime.InferenceSession(path).run(None, {'observation': observation})")
    print(f"unitrain: policy {path}; actions = {loader}")
    return 0


def _recipes() -> int:
    from unitrain.app.config import SHIPPED

    rows = []
    for path in sorted(SHIPPED.glob("*/*.yaml")):
        comments = [line.lstrip("# ").strip() for line in path.read_text().splitlines()[:2]
                    if line.startswith("#")]
        rows.append((f"{path.parent.name}/{path.stem}", comments[1] if len(comments) > 1 else ""))
    width = max((len(name) for name, _ in rows), default=0)
    for name, note in rows:
        print(f"{name:<{width}}  {note}")
    print(f"\n(in {SHIPPED}; run one with `unitrain fit <env>/<rule>`, copy one to change it; "
          f"the search spaces of `unitrain tune` are in {SHIPPED.parent / 'spaces'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
