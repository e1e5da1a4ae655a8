"""``unitrain tune``: which rule, with which settings, for an env, as one Optuna study.

The rule is a categorical hyperparameter: each recipe given is one choice, and the fields of each
recipe are searched conditionally on it, over the space of its ``tune:`` block (in the recipe
itself, else the shipped space of its rule, ``unitrain/spaces/<rule>.yaml``)::

    tune:
      optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float, log-uniform
      optimizer.epochs: {low: 5, high: 30, step: 5}          # an int (low, high, step ints)
      optimizer.population: {choices: [16, 32, 64]}          # one of these values

Every trial is one ``unitrain fit`` process run as ``unitrain compare`` runs them (the same
launcher, logs and resume from ``last.ckpt``), at one frame budget for all, in
``OUT/runs/trial<k>-<recipe>`` with its TensorBoard files. Its evaluation curve is reported to
Optuna as it is written, stepped in env frames (rounded to the evaluation grid, so that a
population rule ending its generation a few frames past a point is compared at that point), and
the pruner (median by default, or Hyperband) stops a trial whose curve falls behind. The value of
a trial is the final evaluation return of its run (``eval/return_mean`` of ``summary.json``:
``trainer.eval_episodes`` episodes of the deterministic policy after the last update).

The study lives in ``OUT/study.db`` (SQLite): a rerun of the same command resumes it until
``--trials`` trials have finished (completed or pruned). A trial that a kill left running, or
whose run was stopped by a signal, is marked failed and queued again with the same values; that
retry resumes its run from the last checkpoint. ``--jobs J`` runs J trials at a time (J worker
threads of one study, each driving one training process).

Outputs: ``OUT/best.yaml`` (the best trial's recipe with its values and the budget merged in,
runnable by ``unitrain fit``), ``OUT/results.md`` and ``OUT/results.csv`` (one row per trial),
``OUT/history.png``, ``OUT/intermediate.png`` and ``OUT/importance-<recipe>.png`` (Optuna's
plots).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitrain.app.compare import Run, ended, eval_curves, finished, launch, recipe_slug
from unitrain.errors import UserError, check_output_path

__all__ = ["tune", "TuneResult", "Param", "parse_space", "recipe_space", "RecipeSpace", "SPACES"]

# The shipped search spaces, one file per rule, each a ``tune:`` block.
SPACES = Path(__file__).resolve().parent.parent / "spaces"

_ENTRY_KEYS = ("low", "high", "log", "step", "choices")
# Keys a trial does not choose: the budget is --frames, and each trial has its own run.
_FIXED = ("seed", "run_dir", "resume", "init", "trainer.max_frames", "tune")
_EXAMPLE = "e.g. optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true} or {choices: [16, 32]}"
_PRUNERS = ("median", "hyperband", "none")
# Seconds between looks at a running trial's checkpoint (its evaluation curve is read when the
# checkpoint written after each evaluation changes).
_POLL_S = 0.5


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError("tune: needs Optuna; install it with "
                        "pip install 'unitrain[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line tells of each trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ------------------------------------------------------------------------------- search space
@dataclass(frozen=True)
class Param:
    """One searched recipe key: a range (``low``, ``high``, optional ``log`` or ``step``; an int
    when ``low``, ``high`` and ``step`` are ints) or a list of ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high)) \
            and (self.step is None or isinstance(self.step, int))

    def suggest(self, trial: Any, name: str) -> Any:
        """The value of this key in ``trial`` (Optuna parameter ``name``)."""
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """The values that must all fit the recipe: both ends of a range, or every choice."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def _number(value: Any) -> Any:
    """A YAML number, also one written as text (YAML reads ``1e-4`` without a dot as text)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_space(node: Any, src: str) -> list[Param]:
    """The :class:`Param` list of a ``tune:`` block.

    Args:
        node: the block (a mapping of dotted recipe keys to entries).
        src: where it was read, for the messages.

    Raises:
        UserError: one line naming ``src`` and the key, and what would be valid.
    """
    if node is None:
        return []
    if not isinstance(node, dict):
        raise UserError(f"{src}: tune: expected a mapping of recipe keys to ranges, {_EXAMPLE}")
    params = []
    for key, entry in node.items():
        where = f"{src}: tune.{key}"
        key = str(key)
        if key in _FIXED or key.split(".")[0] in _FIXED[:4]:
            raise UserError(f"{where}: not searched by unitrain tune (the budget is --frames, the "
                            "seed, run_dir, resume and init are each trial's own)")
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping, {_EXAMPLE}")
        unknown = [k for k in entry if k not in _ENTRY_KEYS]
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys: "
                            f"{', '.join(_ENTRY_KEYS)}")
        if "choices" in entry:
            params.append(_choices(where, key, entry))
        else:
            params.append(_range(where, key, entry))
    return params


def _choices(where: str, key: str, entry: dict[str, Any]) -> Param:
    others = [k for k in entry if k != "choices"]
    if others:
        raise UserError(f"{where}: choices or a range (low, high), not both; remove {others[0]}")
    choices = entry["choices"]
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: choices: expected a non-empty list, got {choices!r}")
    for c in choices:
        if c is not None and not isinstance(c, (bool, int, float, str)):
            raise UserError(f"{where}: choices: {c!r} is not a number, a string, true/false or "
                            "null (the values Optuna can choose between)")
    if len(set(map(repr, choices))) != len(choices):
        raise UserError(f"{where}: choices: {choices!r} holds a value twice")
    return Param(key, choices=tuple(choices))


def _range(where: str, key: str, entry: dict[str, Any]) -> Param:
    missing = [k for k in ("low", "high") if k not in entry]
    if missing:
        raise UserError(f"{where}: missing {missing[0]}; a range needs low and high, {_EXAMPLE}")
    low, high, step = (_number(entry.get(k)) for k in ("low", "high", "step"))
    for name, value in (("low", low), ("high", high), ("step", step)):
        if name == "step" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise UserError(f"{where}: {name}: expected a number, got {entry.get(name)!r}")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log: expected true or false, got {log!r}")
    if not low < high:
        raise UserError(f"{where}: low must be below high, got low={low!r}, high={high!r}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got low={low!r}")
    if step is not None:
        if step <= 0:
            raise UserError(f"{where}: step: expected a number > 0, got {step!r}")
        if log:
            raise UserError(f"{where}: log and step cannot be combined; give one of them")
    return Param(key, low, high, log, step)


def _override(key: str, value: Any) -> str:
    """``key=value`` as the recipe loader reads it back (null, true/false, quoted text)."""
    if value is None:
        return f"{key}=null"
    return f"{key}={json.dumps(value) if isinstance(value, (bool, str)) else repr(value)}"


@dataclass
class RecipeSpace:
    """One recipe of a study: where it is, its search space and its settings."""

    label: str            # the recipe as given (the value of the ``recipe`` parameter)
    path: str
    slug: str
    seed: int
    grid: int             # frames between evaluations: the steps intermediate values sit on
    params: list[Param]
    source: str | None    # where the space was read


def recipe_space(label: str, extra: list[str]) -> RecipeSpace:
    """Read and check one recipe and its search space: every value of the space must fit the
    recipe (both ends of each range, every choice), so a mistake is reported before any trial."""
    from omegaconf import OmegaConf

    from unitrain.app.config import find_recipe, load_recipe, read_recipe
    from unitrain.run.adapter import default_eval_every

    path = find_recipe(label)
    recipe = load_recipe(path, extra)
    raw = read_recipe(path)
    if "tune" in raw:
        source: str | None = path
        node = OmegaConf.to_container(raw.tune, resolve=True)
    else:
        shipped = SPACES / f"{recipe.optimizer.name}.yaml"
        source = str(shipped) if shipped.is_file() else None
        node = None
        if source is not None:
            node = OmegaConf.to_container(read_recipe(shipped), resolve=True).get("tune")
    params = parse_space(node, source or path)
    for p in params:
        for value in p.extremes():
            try:
                load_recipe(path, [*extra, _override(p.key, value)])
            except UserError as e:
                reason = str(e).removeprefix(f"{path}: ")
                raise UserError(f"{source}: tune.{p.key}: {value!r} does not fit {label}: "
                                f"{reason}") from None
    grid = recipe.trainer.eval_every_frames or default_eval_every(recipe.trainer.max_frames)
    return RecipeSpace(label, path, recipe_slug(label), recipe.seed, grid, params, source)


# ------------------------------------------------------------------------------- the study
@dataclass
class TuneResult:
    """What :func:`tune` found.

    Attributes:
        study: the Optuna study (``OUT/study.db``).
        best_value: the best trial's final evaluation return (``None``: no trial completed).
        best_recipe: ``OUT/best.yaml`` (``None``: no trial completed).
        best_trial: the best trial's number.
        best_params: the best recipe (``"recipe"``) and its searched keys' values.
        out: the output directory.
    """

    study: Any
    best_value: float | None
    best_recipe: Path | None
    best_trial: int | None
    best_params: dict[str, Any] = field(default_factory=dict)
    out: Path = Path("tune")


class _Interrupted(Exception):
    """A trial's run was stopped by a signal (its checkpoint kept): queued again on a rerun."""


class _RunFailed(Exception):
    """A trial's run ended with an error (its last line)."""


def tune(recipes: Sequence[str], trials: int = 20, frames: int = 100_000, jobs: int = 1,
         out: str | os.PathLike = "tune", pruner: str | Any = "median", seed: int = 0,
         overrides: Sequence[str] = (), progress: bool = True) -> TuneResult:
    """Search the rule (one choice per recipe) and its fields at equal frame budgets.

    Args:
        recipes: shipped recipe names (``cartpole/ppo``) or YAML paths; each is one choice of
            the ``recipe`` parameter, its ``tune:`` space searched when it is chosen.
        trials: finished trials (completed or pruned) the study should hold; a rerun adds only
            what is missing.
        frames: the frame budget of every trial (``trainer.max_frames``).
        jobs: trials at a time (each one training process).
        out: the output directory (``study.db``, runs, results, ``best.yaml``).
        pruner: ``"median"`` (Optuna's median rule, from the sixth trial on, after a quarter of
            the budget), ``"hyperband"``, ``"none"``, or an ``optuna.pruners`` object.
        seed: the sampler's seed (TPE); each run's seed is its recipe's.
        overrides: ``key=value`` overrides for every recipe.
        progress: print one line per finished trial on stderr.

    Returns:
        A :class:`TuneResult`.

    Raises:
        UserError: a recipe, a space, an override or the output directory is invalid (checked
            before any trial starts), or Optuna is not installed.
    """
    optuna = _optuna()
    out = check_output_path(out, f"--out {out}", "expected a directory for the study "
                                                  "(created if missing)", directory=True)
    if not recipes:
        raise UserError("tune: give at least one recipe")
    if trials < 1:
        raise UserError(f"tune: --trials must be >= 1, got {trials}")
    if frames < 1:
        raise UserError(f"tune: --frames must be >= 1, got {frames}")
    if jobs < 1:
        raise UserError(f"tune: --jobs must be >= 1, got {jobs}")
    if isinstance(pruner, str) and pruner not in _PRUNERS:
        raise UserError(f"tune: --pruner {pruner}: expected one of {', '.join(_PRUNERS)}")
    if len(set(recipes)) != len(recipes):
        raise UserError("tune: a recipe is given twice")
    extra = [*overrides, f"trainer.max_frames={frames}"]
    spaces = {label: recipe_space(label, extra) for label in recipes}
    if len({s.slug for s in spaces.values()}) != len(spaces):
        raise UserError("tune: two recipes have the same name; copy one to a file of its own name")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"recipes": list(recipes), "frames": frames, "overrides": list(overrides)}
    study, storage = _open_study(optuna, out, spaces, settings, pruner, seed)
    lock = _lock(out)
    try:
        if lock is not None and lock[1]:  # no other process works on this study
            _requeue_interrupted(optuna, study, storage)
        done = _count(optuna, study)
        if done < trials:
            objective = _Objective(optuna, spaces, out, extra, frames, progress)
            from optuna.study import MaxTrialsCallback

            states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
            study.optimize(objective, n_trials=trials - done, n_jobs=jobs,
                           catch=(_RunFailed, _Interrupted),
                           callbacks=[MaxTrialsCallback(trials, states=states)])
    finally:
        if lock is not None:
            lock[0].close()
    return write_results(study, spaces, out, frames)


def _open_study(optuna: Any, out: Path, spaces: dict[str, RecipeSpace], settings: dict[str, Any],
                pruner: str | Any, seed: int) -> tuple[Any, Any]:
    url = f"sqlite:///{(out / 'study.db').resolve()}"
    storage = optuna.storages.RDBStorage(url)
    name = "tune:" + "+".join(s.slug for s in spaces.values())
    others = [n for n in optuna.get_all_study_names(storage) if n != name]
    if others:
        raise UserError(f"--out {out}: holds the study {others[0]!r} of other recipes; give the "
                        "same recipes to resume it, or another --out")
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                         constant_liar=True)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                                pruner=_pruner(optuna, pruner, spaces, settings["frames"]),
                                direction="maximize", load_if_exists=True)
    before = study.user_attrs.get("settings")
    if before is None:
        study.set_user_attr("settings", settings)
    elif before != settings:
        raise UserError(f"--out {out}: its study ran with --frames {before['frames']} and "
                        f"overrides {before['overrides'] or 'none'}; rerun with the same to resume "
                        "it, or give another --out")
    return study, storage


def _pruner(optuna: Any, pruner: str | Any, spaces: dict[str, RecipeSpace], frames: int) -> Any:
    if not isinstance(pruner, str):
        return pruner
    if pruner == "none":
        return optuna.pruners.NopPruner()
    grid = min(s.grid for s in spaces.values())
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=grid, max_resource=frames)
    return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=frames // 4)


def _lock(out: Path) -> tuple[Any, bool] | None:
    """Hold ``OUT/.tune.lock`` shared for this process's life; whether it was free first (then
    no other ``unitrain tune`` works on this study, and its running trials are leftovers)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no leftovers are requeued
        return None
    handle = (out / ".tune.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except OSError:
        alone = False
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle, alone


def _requeue_interrupted(optuna: Any, study: Any, storage: Any) -> None:
    """Mark the trials a kill left running as failed, and queue every interrupted trial again
    with its values; the retry resumes the same run directory from its last checkpoint."""
    state = optuna.trial.TrialState
    all_trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in all_trials}
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in all_trials:
        if t.state == state.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, state.FAIL)
        elif not (t.state == state.FAIL and t.user_attrs.get("interrupted")):
            continue
        if t.number in retried or "run" not in t.user_attrs:
            continue  # retried already, or killed before its run started
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number,
                                                  "run": t.user_attrs["run"]})


def _count(optuna: Any, study: Any) -> int:
    state = optuna.trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))


class _Objective:
    """One trial: choose a recipe and its values, train it in its own process, report its
    evaluation curve as it grows, stop it when pruned."""

    def __init__(self, optuna: Any, spaces: dict[str, RecipeSpace], out: Path, extra: list[str],
                 frames: int, progress: bool) -> None:
        self.optuna, self.spaces, self.out = optuna, spaces, out
        self.extra, self.frames, self.progress = extra, frames, progress
        self._print = threading.Lock()

    def __call__(self, trial: Any) -> float:
        label = trial.suggest_categorical("recipe", list(self.spaces))
        space = self.spaces[label]
        values = {p.key: p.suggest(trial, f"{label}:{p.key}") for p in space.params}
        number = int(trial.user_attrs.get("run", trial.number))  # a retry runs in its first's dir
        trial.set_user_attr("run", number)
        name = f"trial{number:03d}-{space.slug}"
        run = Run(space.path, space.slug, space.seed, self.out / "runs" / name,
                  self.out / "logs" / f"{name}.log",
                  extra=[*self.extra, *(_override(k, v) for k, v in values.items())])
        trial.set_user_attr("run_dir", str(run.run_dir))
        reported: set[int] = set()
        try:
            if not finished(run, self.frames):
                self._train(trial, run, space.grid, reported)
            summary = json.loads((run.run_dir / "summary.json").read_text())
            self._report(trial, run, space.grid, reported)
            value = summary.get("eval/return_mean")
            if value is None or not math.isfinite(value):
                raise _RunFailed(f"no final evaluation return in {run.run_dir / 'summary.json'}")
        except self.optuna.TrialPruned as e:
            self._say(trial, label, values, f"pruned {e}")
            raise
        except (_RunFailed, _Interrupted, KeyboardInterrupt) as e:
            if not isinstance(e, _RunFailed):
                trial.set_user_attr("interrupted", True)
            else:
                trial.set_user_attr("error", str(e))
            self._say(trial, label, values, "interrupted" if not isinstance(e, _RunFailed)
                      else f"failed: {e}")
            raise
        trial.set_user_attr("frames", summary.get("frames"))
        self._say(trial, label, values, f"{value:.2f}")
        return float(value)

    def _train(self, trial: Any, run: Run, grid: int, reported: set[int]) -> None:
        proc, log = launch(run)
        ckpt = run.run_dir / "checkpoints" / "last.ckpt"
        stamp: float | None = None
        pruned_at: int | None = None
        try:
            while proc.poll() is None:
                time.sleep(_POLL_S)
                now = ckpt.stat().st_mtime if ckpt.is_file() else None
                if now == stamp:
                    continue
                stamp = now
                step = self._report(trial, run, grid, reported)
                if step is not None and trial.should_prune():
                    pruned_at = step
                    proc.terminate()  # the run writes its checkpoint and stops
                    proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            ended(run, proc, log)
        if pruned_at is not None:
            raise self.optuna.TrialPruned(f"at {pruned_at:,} frames")
        if proc.returncode in (130, 143) or proc.returncode < 0:
            raise _Interrupted(f"stopped by signal ({proc.returncode})")
        if run.error is not None:
            raise _RunFailed(run.error.removeprefix("unitrain: error: "))

    def _report(self, trial: Any, run: Run, grid: int, reported: set[int]) -> int | None:
        """Report the evaluations not in ``reported`` yet; returns the last step (frames,
        rounded to the evaluation grid, at most the budget)."""
        frames_curve, _ = eval_curves(run.run_dir)
        step = None
        for frames, value in frames_curve:
            # The last generation of a population rule may end past the budget: its value is
            # the one at the budget.
            step = min(round(frames / grid) * grid, self.frames)
            if step not in reported and math.isfinite(value):
                trial.report(value, step)
                reported.add(step)
        return step

    def _say(self, trial: Any, label: str, values: dict[str, Any], what: str) -> None:
        if not self.progress:
            return
        shown = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        with self._print:
            print(f"unitrain tune: trial {trial.number} {label} {shown}: {what}", file=sys.stderr,
                  flush=True)


def _short(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------- results
def write_results(study: Any, spaces: dict[str, RecipeSpace], out: Path, frames: int) -> TuneResult:
    """Write ``results.md``, ``results.csv``, ``best.yaml`` and the plots of ``study``."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    rows = _rows(study)
    (out / "results.csv").write_text(_csv(rows))
    complete = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    best = max(complete, key=_rank) if complete else None
    best_path = None
    if best is not None:
        overrides = study.user_attrs.get("settings", {}).get("overrides", [])
        best_path = write_best(best, spaces[best.params["recipe"]], out, frames, overrides)
    (out / "results.md").write_text(_table(rows, best, best_path, frames))
    _plots(optuna, study, spaces, out)
    return TuneResult(study, None if best is None else float(best.value), best_path,
                      None if best is None else best.number,
                      {} if best is None else _values(best), out)


def _rank(trial: Any) -> tuple[float, float]:
    """The best trial has the highest final return; of equal ones (a return at the env's cap),
    the one with the higher mean evaluation curve, which got there sooner."""
    curve = list(trial.intermediate_values.values())
    return trial.value, sum(curve) / len(curve) if curve else -math.inf


def _values(trial: Any) -> dict[str, Any]:
    """``{"recipe": label, key: value, ...}`` of a trial."""
    label = trial.params.get("recipe")
    values = {"recipe": label}
    values.update({k.split(":", 1)[1]: v for k, v in trial.params.items()
                   if k.startswith(f"{label}:")})
    return values


def write_best(trial: Any, space: RecipeSpace, out: Path, frames: int,
               overrides: Sequence[str] = ()) -> Path:
    """``OUT/best.yaml``: the trial's recipe with its values, the study's ``overrides`` and the
    budget merged in, and without its ``tune:`` block; checked by the recipe loader."""
    from omegaconf import OmegaConf

    from unitrain.app.config import load_recipe, read_recipe

    raw = read_recipe(space.path)
    values = _values(trial)
    del values["recipe"]
    overrides = [*overrides, *(_override(k, v) for k, v in values.items()),
                 f"trainer.max_frames={frames}"]
    merged = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides))
    if "tune" in merged:
        del merged["tune"]
    path = out / "best.yaml"
    head = (f"# unitrain fit {path}\n"
            f"# The best trial of `unitrain tune` in {out}: {space.label}, trial {trial.number}, "
            f"final evaluation return {trial.value:.2f} at {frames:,} frames.\n")
    path.write_text(head + OmegaConf.to_yaml(merged))
    load_recipe(path)
    return path


def _rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = _values(t)
        label = values.pop("recipe")
        steps = sorted(t.intermediate_values)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "recipe": label,
                     "params": " ".join(f"{k}={_short(v)}" for k, v in values.items()),
                     "value": t.value if t.state.name == "COMPLETE" else None,
                     "rank": _rank(t) if t.state.name == "COMPLETE" else (0.0, 0.0),
                     "frames": t.user_attrs.get("frames", steps[-1] if steps else None),
                     "note": _note(t), "run_dir": t.user_attrs.get("run_dir", "")})
    return rows


def _note(t: Any) -> str:
    if t.state.name == "PRUNED" and t.intermediate_values:
        step = max(t.intermediate_values)
        return f"pruned at {step:,} frames, return {t.intermediate_values[step]:.1f}"
    if "retry_of" in t.user_attrs:
        return f"retry of trial {t.user_attrs['retry_of']}"
    if t.user_attrs.get("interrupted"):
        return "interrupted"
    return t.user_attrs.get("error", "")


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    names = ["trial", "state", "recipe", "params", "value", "frames", "note", "run_dir"]
    writer = csv.DictWriter(buf, fieldnames=names, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _table(rows: list[dict[str, Any]], best: Any, best_path: Path | None, frames: int) -> str:
    lines = []
    if best is not None:
        values = _values(best)
        label = values.pop("recipe")
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items()) or "its own values"
        lines += [(f"Best: trial {best.number}, {label} with {shown}: final evaluation return "
                   f"{best.value:.2f} at {frames:,} frames (`unitrain fit {best_path}`)."), ""]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines += ["Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ".", ""]
    lines += ["Final return: the last evaluation; curve mean: the mean of the evaluations, which "
              "orders equal final returns (the higher got there sooner).", "",
              "| trial | recipe | values | state | final return | curve mean | frames | note |",
              "|---|---|---|---|---|---|---|---|"]
    order = {"complete": 0, "pruned": 1}
    for r in sorted(rows, key=lambda r: (order.get(r["state"], 2), -r["rank"][0],
                                         -r["rank"][1], r["trial"])):
        value = "" if r["value"] is None else f"{r['value']:.2f}"
        curve = "" if r["value"] is None else f"{r['rank'][1]:.1f}"
        done = "" if r["frames"] is None else f"{r['frames']:,}"
        lines.append(f"| {r['trial']} | {r['recipe']} | {r['params']} | {r['state']} | {value} "
                     f"| {curve} | {done} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _plots(optuna: Any, study: Any, spaces: dict[str, RecipeSpace], out: Path) -> None:
    """Optuna's history, intermediate values and the importances of each recipe's fields over
    the trials of that recipe (the importance of the recipe itself, the only parameter common
    to every trial, would always be 1); a plot that cannot be drawn yet (too few completed
    trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    state = optuna.trial.TrialState
    complete = study.get_trials(deepcopy=False, states=(state.COMPLETE,))
    plots: list[tuple[str, Any]] = [("intermediate.png",
                                     lambda: vis.plot_intermediate_values(study))]
    if complete:
        plots.append(("history.png", lambda: vis.plot_optimization_history(study)))
    for label, space in spaces.items():
        mine = [t for t in complete if t.params.get("recipe") == label]
        names = [f"{label}:{p.key}" for p in space.params]
        if len(mine) > 2 and names:
            plots.append((f"importance-{space.slug}.png",
                          lambda names=names: vis.plot_param_importances(study, params=names)))
    for name, draw in plots:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue
        fig = ax.figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
