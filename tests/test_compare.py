"""`unitrain compare`: its statistics against hand computation, its files, resume and failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from unitrain.app.cli import main
from unitrain.app.compare import compare, figure, results_table, write_results
from unitrain.errors import UserError
from unitrain.stats import (auc, bootstrap_ci, first_reaching, iqm, performance_profile,
                            probability_of_improvement, probability_of_improvement_ci)


# ---------------------------------------------------------------------------------- statistics
def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([1, 2, 3, 4, 5, 6, 7, 8]) == 4.5          # drops 1, 2 and 7, 8
    assert iqm([100, 1, 2, 3, -50]) == 2.0               # n = 5: drops one at each end
    assert iqm([3.0, 1.0, 2.0]) == 2.0                   # n = 3: nothing dropped
    assert iqm([5.0]) == 5.0
    with pytest.raises(ValueError):
        iqm([])


def test_bootstrap_interval_matches_the_exact_distribution():
    # Two runs: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles are 0 and 1, and the 30 % and 70 % quantiles are 0.5.
    assert bootstrap_ci([0.0, 1.0], np.mean, reps=4000) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], np.mean, reps=4000, level=0.4) == (0.5, 0.5)
    assert bootstrap_ci([7.0, 7.0, 7.0]) == (7.0, 7.0)
    assert bootstrap_ci([1.0, 5.0, 2.0], seed=3) == bootstrap_ci([1.0, 5.0, 2.0], seed=3)


def test_bootstrap_interval_of_the_iqm_matches_the_exact_distribution():
    # Four runs 0, 0, 1, 1; a resample holds K ones, K ~ Binomial(4, 1/2). Its IQM (n = 4: drop
    # one at each end, average the middle two) is 0 for K <= 1, 0.5 for K = 2 and 1 for K >= 3:
    # probabilities 5/16, 6/16, 5/16. So the 25 % quantile is 0 and the 75 % quantile 1 (level
    # 0.5), and the 40 % and 60 % quantiles are 0.5 (level 0.2). The mean of a resample, K/4, has
    # its 25 % and 75 % quantiles at 0.25 and 0.75 instead: the interval is the IQM's by default.
    values = [0.0, 0.0, 1.0, 1.0]
    assert bootstrap_ci(values, level=0.5) == (0.0, 1.0)
    assert bootstrap_ci(values, level=0.2) == (0.5, 0.5)
    assert bootstrap_ci(values, np.mean, level=0.5) == (0.25, 0.75)


def _percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile of sorted values, interpolating linearly between order statistics."""
    position = q * (len(sorted_values) - 1)
    below = int(position)
    above = min(below + 1, len(sorted_values) - 1)
    return sorted_values[below] + (position - below) * (sorted_values[above] - sorted_values[below])


def test_bootstrap_interval_resample_by_resample():
    # Five runs with an outlier; the resamples are rows of runs drawn with replacement by the
    # seeded generator; each row's IQM by hand (n = 5: drop the lowest and the highest, average
    # the middle three); the interval is the (1 - level)/2 and (1 + level)/2 quantiles of those.
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    for reps, level, seed in ((4, 0.5, 0), (7, 0.8, 1), (200, 0.95, 2)):
        rows = np.random.default_rng(seed).integers(0, 5, size=(reps, 5))
        iqms = sorted(sum(sorted(values[i] for i in row)[1:4]) / 3 for row in rows)
        expected = (_percentile(iqms, (1 - level) / 2), _percentile(iqms, (1 + level) / 2))
        assert bootstrap_ci(values, reps=reps, level=level, seed=seed) == pytest.approx(expected)


def test_area_under_the_curve_and_first_reaching_by_hand():
    curve = [(100.0, 0.0), (200.0, 10.0), (400.0, 10.0)]
    # Flat 0 until 100, a ramp to 10 at 200, flat 10 until 400:
    # (100·0 + 100·5 + 200·10) / 400 = 6.25
    assert auc(curve, 0.0, 400.0) == pytest.approx(6.25)
    assert auc(curve, 0.0, 500.0) == pytest.approx((500 + 2000 + 1000) / 500)
    assert first_reaching(curve, 5.0) == 200.0
    assert first_reaching(curve, 11.0) is None


def test_probability_of_improvement_by_hand():
    # X = [1, 2, 3], Y = [2, 2, 0]: nine pairs (x, y).
    # x = 1: above 0 only                       -> 1 win, 0 ties
    # x = 2: ties with both 2s, above 0          -> 1 win, 2 ties
    # x = 3: above all three                     -> 3 wins
    # P(X > Y) = (5 + 0.5·2) / 9 = 2/3; P(Y > X) = (2 + 0.5·2) / 9 = 1/3 (the two 2s beat 1).
    assert probability_of_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(2 / 3)
    assert probability_of_improvement([2, 2, 0], [1, 2, 3]) == pytest.approx(1 / 3)
    assert probability_of_improvement([5, 5], [5]) == 0.5           # all ties
    assert probability_of_improvement([4, 5], [1, 2, 3]) == 1.0
    with pytest.raises(ValueError):
        probability_of_improvement([], [1.0])


def test_probability_of_improvement_interval_matches_the_exact_distribution():
    # X = [1], Y = [0, 1]: the stratified resample keeps X = [1] and draws two Ys: {0, 0} gives
    # P = 1 (probability 1/4), {0, 1} P = 0.75 (1/2), {1, 1} P = 0.5 (1/4). So the 2.5 % and
    # 97.5 % quantiles are 0.5 and 1, and the 30 % and 70 % quantiles are 0.75.
    assert probability_of_improvement_ci([1.0], [0.0, 1.0], reps=4000) == (0.5, 1.0)
    assert probability_of_improvement_ci([1.0], [0.0, 1.0], reps=4000, level=0.4) == (0.75, 0.75)
    assert probability_of_improvement_ci([1, 2, 3], [2, 2, 0], seed=5) == \
        probability_of_improvement_ci([1, 2, 3], [2, 2, 0], seed=5)


def test_performance_profile_by_hand():
    # Runs 1, 2, 3, 4: above τ = 0 all four, above 1 three (strictly), above 2.5 two, above 4
    # none.
    profile, low, high = performance_profile([1, 2, 3, 4], [0, 1, 2.5, 4])
    assert profile.tolist() == [1.0, 0.75, 0.5, 0.0]
    assert low[0] == high[0] == 1.0 and low[-1] == high[-1] == 0.0   # every resample agrees
    # Runs 0, 1 at τ = 0.5: a resample's fraction is 0, 0.5 or 1 with probabilities 1/4, 1/2,
    # 1/4, so the 95 % band is [0, 1] and the 40 % band (30 % and 70 % quantiles) is [0.5, 0.5].
    _, low, high = performance_profile([0.0, 1.0], [0.5], reps=4000)
    assert (low[0], high[0]) == (0.0, 1.0)
    _, low, high = performance_profile([0.0, 1.0], [0.5], reps=4000, level=0.4)
    assert (low[0], high[0]) == (0.5, 0.5)


def _results(budget=8000):
    """Results as ``summarise`` writes them, for two recipes of two seeds, without any run."""
    from unitrain.app.compare import compare_recipes

    def entry(slug, finals, frames, seconds):
        curves = {str(k): {"frames": [(1000.0, f / 2), (float(frames), f)],
                           "seconds": [(0.0, 0.0), (seconds / 2, f / 2), (seconds, f)]}
                  for k, f in enumerate(finals)}
        return {"slug": slug, "seeds": [0, 1], "final": {"0": finals[0], "1": finals[1]},
                "frames": {"0": frames, "1": frames}, "wall_s": {"0": seconds, "1": seconds},
                "auc": {"0": 1.0, "1": 1.0}, "failed": {}, "curves": curves,
                "mean": float(np.mean(finals)), "iqm": float(np.mean(finals)),
                "iqm_ci95": [min(finals), max(finals)], "auc_iqm": 1.0,
                "frames_used": float(frames)}

    results = {"threshold": None, "budget": budget,
               "recipes": {"pendulum/cmaes": entry("pendulum-cmaes", [-900.0, -800.0], 11600, 3.0),
                           "pendulum/sac": entry("pendulum-sac", [-200.0, -800.0], 8000, 900.0)}}
    results.update(compare_recipes({r: list(e["final"].values())
                                    for r, e in results["recipes"].items()}))
    return results


def test_results_show_pairs_profiles_and_frames_used_beside_the_budget(tmp_path: Path):
    results = _results()
    # cmaes [-900, -800] against sac [-200, -800]: -900 loses twice, -800 ties -800 and loses to
    # -200: (0 + 0.5·1) / 4 = 0.125.
    pair = results["probability_of_improvement"]["pendulum/cmaes > pendulum/sac"]
    assert pair["p"] == pytest.approx(0.125) and pair["x"] == "pendulum/cmaes"
    assert 0.0 <= pair["ci"][0] <= pair["p"] <= pair["ci"][1] <= 1.0
    profiles = results["profiles"]
    assert profiles["taus"][0] == -900.0 and profiles["taus"][-1] == -200.0
    # At τ = -900 (the lowest final): cmaes has one run above (-800), sac both.
    assert profiles["recipes"]["pendulum/cmaes"]["profile"][0] == 0.5
    assert profiles["recipes"]["pendulum/sac"]["profile"][0] == 1.0
    assert profiles["recipes"]["pendulum/sac"]["profile"][-1] == 0.0
    table = results_table(results)
    assert "| pendulum/cmaes | pendulum/sac | 0.12 [" in table
    assert "11,600 (budget 8,000: population rules finish their generation)" in table
    assert "| 8,000 |" in table                         # within the budget: no note
    write_results(results, tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["recipes"]["pendulum/cmaes"]["frames_used"] == 11600
    assert written["budget"] == 8000 and "profiles" in written
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_seconds_panel_is_log_scale_and_every_panel_is_drawn():
    import matplotlib.pyplot as plt

    fig = figure(_results())
    try:
        frames_ax, seconds_ax, profile_ax = fig.axes[:3]
        assert frames_ax.get_xscale() == "linear"
        assert seconds_ax.get_xscale() == "log"
        # 3 s and 900 s both span a visible part of the axis: at least a decade apart on a log
        # axis whose limits hold both curves.
        low, high = seconds_ax.get_xlim()
        assert low > 0 and low <= 1.5 and high >= 900
        assert len(seconds_ax.get_lines()) == 2 and len(profile_ax.get_lines()) == 2
        # Points evenly spaced on the log axis: constant ratio between neighbours (cmaes: 1.5 s,
        # its first time above 0, to 3 s).
        xs = seconds_ax.get_lines()[0].get_xdata()
        assert xs[0] == 1.5 and xs[-1] == pytest.approx(3.0)
        assert np.allclose(xs[1:] / xs[:-1], xs[1] / xs[0])
        assert profile_ax.get_xlabel().startswith("final evaluation return")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------- runs
TINY = ["trainer.eval_every_frames=256", "trainer.eval_episodes=2"]


def _compare(out: Path, **kwargs):
    return compare(["cartpole/ppo", "cartpole/es"], seeds=2, frames=512, jobs=2, out=out,
                   threshold=15.0, overrides=TINY, progress=False, **kwargs)


def test_tiny_compare_writes_every_file_and_resumes_to_the_same_results(tmp_path: Path):
    out = tmp_path / "cmp"
    results = _compare(out)
    for name in ("results.json", "results.md", "curves.png", "compare.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["cartpole-es",
                                                                       "cartpole-ppo"]
    for recipe in ("cartpole/ppo", "cartpole/es"):
        e = results["recipes"][recipe]
        assert sorted(e["final"]) == ["0", "1"] and not e["failed"]
        finals = list(e["final"].values())
        assert e["mean"] == pytest.approx(sum(finals) / 2)
        # Two seeds: the IQM drops nothing (n // 4 = 0 at each end), so it is their mean; a
        # resample's IQM is the lower final, their mean or the higher final with probabilities
        # 1/4, 1/2, 1/4, so the 2.5 % and 97.5 % quantiles are the lower and the higher final.
        assert e["iqm"] == pytest.approx(sum(finals) / 2)
        assert e["iqm_ci95"] == [min(finals), max(finals)]
        assert all(f >= 512 for f in e["frames"].values())
        assert all(len(c["frames"]) >= 2 for c in e["curves"].values())
    table = (out / "results.md").read_text()
    assert "| cartpole/ppo | 2/2 |" in table and "frames to 15" in table
    pair = results["probability_of_improvement"]["cartpole/ppo > cartpole/es"]
    assert pair["p"] == pytest.approx(probability_of_improvement(
        list(results["recipes"]["cartpole/ppo"]["final"].values()),
        list(results["recipes"]["cartpole/es"]["final"].values())))
    assert "| cartpole/ppo | cartpole/es | " in table
    assert results["budget"] == 512 and set(results["profiles"]["recipes"]) == {"cartpole/ppo",
                                                                              "cartpole/es"}
    for e in results["recipes"].values():
        assert e["frames_used"] == pytest.approx(sum(e["frames"].values()) / 2)

    # Interrupt: lose one finished run's summary (as if killed before its end) and delete
    # another run entirely; the same command resumes the first from its checkpoint, reruns the
    # second and ends with the same results.
    (out / "runs" / "cartpole-ppo" / "seed1" / "summary.json").unlink()
    shutil.rmtree(out / "runs" / "cartpole-es" / "seed0")
    again = _compare(out)
    log = (out / "logs" / "cartpole-ppo-seed1.log").read_text()
    assert "resume=last" in log.splitlines()[0]
    for recipe in ("cartpole/ppo", "cartpole/es"):
        assert again["recipes"][recipe]["final"] == results["recipes"][recipe]["final"], recipe
        assert again["recipes"][recipe]["iqm_ci95"] == results["recipes"][recipe]["iqm_ci95"]


def test_a_failing_recipe_is_reported_and_the_others_finish(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    # Valid as a recipe, but its module cannot be built for the env: the run itself fails.
    bad.write_text("env: {id: CartPole-v1}\nmodule: {target: unitrain.MLPPolicy, activation: nope}\n"
                   "optimizer: {name: es, population: 4}\n")
    code = main(["compare", str(bad), "cartpole/es", "--seeds", "1", "--frames", "256", "--jobs",
                 "2", "--out", str(tmp_path / "cmp"), *TINY])
    assert code == 1
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    entry = results["recipes"][str(bad)]
    assert entry["final"] == {} and "activation 'nope'" in entry["failed"]["0"]
    assert results["recipes"]["cartpole/es"]["final"].keys() == {"0"}
    table = capsys.readouterr().out
    assert "failed:" in table and "| cartpole/es | 1/1 |" in table


def test_bad_input_is_reported_before_any_run(tmp_path: Path, capsys):
    assert main(["compare", "cartpole/ppo", "optimizer.lr=fast", "--out",
                 str(tmp_path / "c")]) == 2
    assert "optimizer.lr: got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(["compare", "cartpole/nope", "--out", str(tmp_path / "c")]) == 2
    with pytest.raises(UserError, match="given twice"):
        compare(["cartpole/ppo", "cartpole/ppo"], out=tmp_path / "c", progress=False)


class LocalPolicy:  # defined in a test module: importable by name, but not an RLModule
    pass


def test_module_option_replaces_every_recipe_module(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))  # for the runs
    with pytest.raises(UserError, match="not a unitrain.RLModule subclass"):
        compare(["cartpole/ppo"], seeds=1, frames=256, out=tmp_path / "c",
                module="test_compare:LocalPolicy", progress=False)
    results = compare(["cartpole/es"], seeds=1, frames=256, out=tmp_path / "d",
                      module="policies:TinyPolicy", overrides=TINY, progress=False)
    recipe = (tmp_path / "d" / "recipes" / "cartpole-es.yaml").read_text()
    assert "target: policies.TinyPolicy" in recipe and "hidden" not in recipe
    assert results["recipes"]["cartpole/es"]["final"].keys() == {"0"}
