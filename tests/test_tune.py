"""`unitrain tune`: its search spaces, its files, resume, requeued interrupted trials, pruning."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from unitrain.app.cli import main
from unitrain.app.config import load_recipe
from unitrain.app.tune import SPACES, Param, parse_space, tune
from unitrain.errors import UserError

optuna = pytest.importorskip("optuna")

TINY = ["trainer.eval_every_frames=256", "trainer.eval_episodes=2"]
FRAMES = 512

# A cheap recipe with its own search space (the shipped space of its rule is not used).
RECIPE = """\
env: {id: CartPole-v1}
module: {target: unitrain.MLPPolicy, hidden: [8]}
optimizer: {name: cem, population: 8, sigma: 0.1, episodes: 1}
trainer: {max_frames: 100000}
tune:
  optimizer.sigma: {low: 0.01, high: 0.5, log: true}
  optimizer.population: {choices: [4, 8]}
"""


def _recipe(tmp: Path, tune_block: str | None = None, name: str = "tiny.yaml") -> str:
    path = tmp / name
    text = RECIPE if tune_block is None else RECIPE.split("tune:")[0] + tune_block
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------- spaces
def test_space_entries_become_typed_parameters():
    params = parse_space({"optimizer.lr": {"low": "1e-4", "high": 1.0e-2, "log": True},
                          "optimizer.epochs": {"low": 5, "high": 30, "step": 5},
                          "optimizer.clip": {"low": 0.1, "high": 0.3},
                          "optimizer.population": {"choices": [None, 16, 32]}}, "x.yaml")
    lr, epochs, clip, population = params
    assert lr == Param("optimizer.lr", 1e-4, 1e-2, log=True) and not lr.is_int  # text 1e-4 read
    assert epochs.is_int and epochs.step == 5 and epochs.extremes() == [5, 30]
    assert not clip.is_int and not clip.log
    assert population.choices == (None, 16, 32) and population.extremes() == [None, 16, 32]
    # What each suggests, in a study of fixed values.
    study = optuna.create_study()
    trial = study.ask()
    assert 1e-4 <= lr.suggest(trial, "lr") <= 1e-2
    assert epochs.suggest(trial, "epochs") in (5, 10, 15, 20, 25, 30)
    assert population.suggest(trial, "population") in (None, 16, 32)
    assert isinstance(trial.params["epochs"], int) and isinstance(trial.params["lr"], float)


@pytest.mark.parametrize("entry, message", [
    ("optimizer.sigma: {low: 0.1, hi: 0.5}",
     "tune.optimizer.sigma: unknown key 'hi'; valid keys: low, high, log, step, choices"),
    ("optimizer.sigma: {low: 0.5, high: 0.1}", "low must be below high, got low=0.5, high=0.1"),
    ("optimizer.sigma: {low: 0.0, high: 0.5, log: true}", "a log range needs low > 0"),
    ("optimizer.sigma: {low: 0.1, high: 0.5, log: true, step: 0.1}",
     "log and step cannot be combined"),
    ("optimizer.sigma: {low: 0.1}", "missing high"),
    ("optimizer.sigma: {low: fast, high: 0.5}", "low: expected a number, got 'fast'"),
    ("optimizer.population: {choices: []}", "choices: expected a non-empty list"),
    ("optimizer.population: {choices: [[8], [16]]}", "[8] is not a number, a string"),
    ("optimizer.sigma: 0.1", "tune.optimizer.sigma: expected a mapping"),
    ("trainer.max_frames: {low: 1000, high: 2000}", "not searched by unitrain tune"),
    # Keys and values are checked against the recipe itself, both ends of every range.
    ("optimizer.sigmaa: {low: 0.1, high: 0.5}", "tune.optimizer.sigmaa: 0.1 does not fit"),
    ("optimizer.elite_fraction: {low: 0.5, high: 1.5}",
     "tune.optimizer.elite_fraction: 1.5 does not fit"),
])
def test_a_bad_space_is_one_line_naming_file_and_key_before_any_trial(tmp_path: Path, capsys,
                                                                      entry, message):
    recipe = _recipe(tmp_path, "tune:\n  " + entry + "\n")
    out = tmp_path / "t"
    assert main(["tune", recipe, "--frames", "256", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unitrain: error: {recipe}: tune") and message in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_unknown_recipe_key_names_the_valid_ones(tmp_path: Path, capsys):
    recipe = _recipe(tmp_path, "tune:\n  optimizer.sigmaa: {low: 0.1, high: 0.5}\n")
    assert main(["tune", recipe, "--frames", "256", "--out", str(tmp_path / "t")]) == 2
    assert "unknown key; valid keys: population, sigma" in capsys.readouterr().err


def test_shipped_spaces_fit_their_recipes():
    from unitrain.app.tune import recipe_space

    rules = sorted(p.stem for p in SPACES.glob("*.yaml"))
    assert {"ppo", "sac", "td3", "es", "cmaes", "cem", "ga", "ars"} <= set(rules)
    for recipe in ("cartpole/ppo", "cartpole/cmaes", "cartpole/cem", "cartpole/es", "cartpole/ga",
                   "cartpole/ars", "pendulum/sac", "pendulum/td3"):
        space = recipe_space(recipe, ["trainer.max_frames=50000"])
        assert space.source == str(SPACES / f"{recipe.split('/')[1]}.yaml") and space.params


def test_a_recipe_with_a_tune_block_still_fits(tmp_path: Path):
    recipe = load_recipe(_recipe(tmp_path))
    assert recipe.optimizer.name == "cem" and recipe.config["tune"]


def test_missing_optuna_is_one_line_naming_the_extra(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert main(["tune", "cartpole/cem", "--frames", "256", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'unitrain[tune]'" in err and len(err.strip().splitlines()) == 1


def test_bad_options_exit_2(tmp_path: Path, capsys):
    out = str(tmp_path / "t")
    assert main(["tune", "cartpole/cem", "--frames", "0", "--out", out]) == 2
    assert "--frames must be >= 1" in capsys.readouterr().err
    assert main(["tune", "cartpole/cem", "--frames", "256", "--trials", "0", "--out", out]) == 2
    assert main(["tune", "cartpole/nope", "--frames", "256", "--out", out]) == 2
    with pytest.raises(SystemExit):  # --frames is required
        main(["tune", "cartpole/cem"])


# ---------------------------------------------------------------------------------- studies
@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> tuple[Path, str, object]:
    """Two trials over a recipe with its own space and a shipped recipe (ES's shipped space)."""
    tmp = tmp_path_factory.mktemp("tune")
    recipe = _recipe(tmp)
    out = tmp / "study"
    result = tune([recipe, "cartpole/es"], trials=2, frames=FRAMES, out=out, pruner="none",
                  overrides=TINY, progress=False)
    return out, recipe, result


def _states(out: Path) -> list:
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    return study.get_trials()


def test_best_recipe_holds_the_best_values_and_loads(study_dir):
    out, _, result = study_dir
    trials = _states(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    # The highest final return; of equal ones, the higher mean evaluation curve.
    best = max(trials, key=lambda t: (t.value, sum(t.intermediate_values.values())
                                      / len(t.intermediate_values)))
    assert result.best_value == best.value and result.best_trial == best.number
    assert result.best_recipe == out / "best.yaml"
    spec = load_recipe(out / "best.yaml")
    label = best.params["recipe"]
    assert result.best_params["recipe"] == label
    for name, value in best.params.items():
        if name != "recipe":
            block, key = name.split(":", 1)[1].split(".")
            assert spec.config[block][key] == pytest.approx(value), name
    assert spec.trainer.max_frames == FRAMES and spec.trainer.eval_every_frames == 256
    assert "tune" not in spec.config
    for name in ("results.md", "results.csv", "history.png", "intermediate.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    table = (out / "results.md").read_text()
    assert f"Best: trial {best.number}, {label}" in table and "Trials: 2 complete." in table
    # Every trial's run has its TensorBoard files and reported its evaluations at frame steps.
    for t in trials:
        assert list(Path(t.user_attrs["run_dir"]).glob("events.out.tfevents.*"))
        assert t.intermediate_values and all(s % 256 == 0 for s in t.intermediate_values)


def test_a_rerun_resumes_the_study_and_retries_a_trial_a_kill_left_running(study_dir, capsys):
    out, recipe, _ = study_dir
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{out / 'study.db'}")
    first = study.get_trials()[0]
    # As a kill leaves it: a trial RUNNING in the study, its run stopped before its summary.
    study.enqueue_trial(first.params)
    killed = study.ask(first.distributions)
    killed.set_user_attr("run", killed.number)
    old = Path(first.user_attrs["run_dir"])
    run_dir = old.with_name(old.name.replace(f"trial{first.number:03d}",
                                             f"trial{killed.number:03d}"))
    shutil.copytree(old, run_dir)
    (run_dir / "summary.json").unlink()
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    code = main(["tune", recipe, "cartpole/es", "--trials", str(finished + 1), "--frames",
                 str(FRAMES), "--out", str(out), "--pruner", "none", *TINY])
    assert code == 0
    trials = _states(out)
    # One trial more: the killed one's retry, with its values, resuming its run.
    assert len(trials) == killed.number + 2
    assert trials[killed.number].state.name == "FAIL"
    assert trials[killed.number].user_attrs["interrupted"] is True
    retry = trials[-1]
    assert retry.user_attrs["retry_of"] == killed.number and retry.params == first.params
    assert retry.state.name == "COMPLETE" and retry.value == first.value
    assert retry.user_attrs["run_dir"] == str(run_dir)
    log = (out / "logs" / f"{run_dir.name}.log").read_text()
    assert "resume=last" in log.splitlines()[0]
    printed = capsys.readouterr().out
    assert f"Trials: {finished + 1} complete, 1 fail." in printed and "unitrain fit" in printed
    assert f"retry of trial {killed.number}" in (out / "results.md").read_text()
    # The same study with another budget, or other recipes, is refused.
    with pytest.raises(UserError, match="ran with --frames 512"):
        tune([recipe, "cartpole/es"], trials=1, frames=FRAMES * 2, out=out, overrides=TINY)
    with pytest.raises(UserError, match="holds the study"):
        tune(["cartpole/es"], trials=1, frames=FRAMES, out=out, overrides=TINY)


def test_a_pruned_trial_stops_its_run(tmp_path: Path):
    out = tmp_path / "pruned"
    frames = 4096
    result = tune([_recipe(tmp_path)], trials=1, frames=frames, out=out,
                  pruner=optuna.pruners.ThresholdPruner(lower=1e9), overrides=TINY,
                  progress=False)
    (trial,) = _states(out)
    assert trial.state.name == "PRUNED" and trial.intermediate_values
    assert result.best_recipe is None and not (out / "best.yaml").exists()
    run_dir = Path(trial.user_attrs["run_dir"])
    assert not (run_dir / "summary.json").exists()  # stopped before its budget's end
    assert "1 pruned" in (out / "results.md").read_text()
