"""Shipped recipes: every one validates; the CartPole recipes reach 475; the Pendulum and elite
imitation recipes, whose targets take minutes, run briefly here (``tools/recipe_runs.py`` checks
their targets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import run_cli

from unitrain.app.config import SHIPPED, load_recipe

RECIPES = sorted(SHIPPED.glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates_and_names_its_command(path: Path):
    recipe = load_recipe(path)
    lines = path.read_text().splitlines()
    assert lines[0] == f"# unitrain fit {path.parent.name}/{path.stem}"
    assert lines[1].startswith("# ") and len(lines[1]) > 10
    assert recipe.optimizer.name == path.stem or path.stem.startswith(recipe.optimizer.name)


def _run_recipe(recipe: str, tmp_path: Path, *overrides: str) -> dict:
    proc = run_cli("fit", str(SHIPPED / recipe), f"run_dir={tmp_path / 'run'}",
                   *overrides, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "run" / "summary.json").read_text())


def _fit_recipe(recipe: str, tmp_path: Path) -> dict:
    summary = _run_recipe(recipe, tmp_path)
    assert summary["eval/episodes"] == 10
    assert Path(summary["checkpoint"]).is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
    return summary


@pytest.mark.parametrize("recipe", ["cartpole/ppo.yaml", "cartpole/ga.yaml", "cartpole/es.yaml",
                                    "cartpole/ars.yaml", "cartpole/cem.yaml",
                                    "cartpole/csa_es.yaml", "cartpole/cmaes.yaml",
                                    "cartpole/cbo.yaml"])
def test_cartpole_recipes_reach_475(recipe: str, tmp_path: Path):
    summary = _fit_recipe(recipe, tmp_path)
    assert summary["eval/return_mean"] >= 475, summary


# Elite imitation solves CartPole on most seeds within ~50k frames (docs/projection.md), minutes:
# `python tools/recipe_runs.py cartpole/elite_imitation` checks it (the conformance suite checks
# that the rule learns). Here the recipe runs as shipped for 20k frames and fits its elites.
def test_elite_imitation_recipe_runs_and_fits_its_elites(tmp_path: Path):
    summary = _run_recipe("cartpole/elite_imitation.yaml", tmp_path, "trainer.max_frames=20000",
                          "trainer.eval_episodes=2")
    assert Path(summary["checkpoint"]).is_file() and summary["frames"] >= 20000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert min(e.value for e in acc.Scalars("train/elite_pairs")) > 0
    assert all(math.isfinite(e.value) for e in acc.Scalars("train/violation_last"))


# The Pendulum recipes' learning claim (-200 within 20k frames) takes minutes per run:
# `python tools/recipe_runs.py pendulum/ddpg pendulum/td3 pendulum/sac pendulum/dsac_t` checks it
# (the conformance suite checks that each rule learns). Here each runs as shipped, past its
# warm-up, to a checkpoint.
@pytest.mark.parametrize("recipe", ["pendulum/ddpg.yaml", "pendulum/td3.yaml", "pendulum/sac.yaml",
                                    "pendulum/dsac_t.yaml"])
def test_pendulum_recipes_run_past_their_warmup(recipe: str, tmp_path: Path):
    summary = _run_recipe(recipe, tmp_path, "trainer.max_frames=1280",
                          "trainer.eval_episodes=2")
    assert Path(summary["checkpoint"]).is_file() and summary["frames"] >= 1280
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    updates = [e.value for e in acc.Scalars("train/updates_total")]
    assert updates[-1] >= 250, updates  # one update per frame after the 1,000-frame warm-up
    assert all(math.isfinite(e.value) for e in acc.Scalars("loss/critic"))


def test_a_ram_recipe_runs_its_generations(tmp_path: Path):
    """An Atari RAM recipe runs as shipped (a linear policy over 128 scaled bytes), short."""
    summary = _run_recipe("pong/csa_es_ram.yaml", tmp_path, "trainer.max_frames=2000",
                          "optimizer.max_episode_steps=40", "trainer.eval_episodes=1")
    assert Path(summary["checkpoint"]).is_file() and summary["frames"] >= 2000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("optim/sigma")][0] != 0.1  # σ adapted


# The projection recipe is past 0.93 after its first epoch (of 3); Adam needs all 30 of its.
@pytest.mark.parametrize("recipe, epochs", [("digits/projection.yaml", 1), ("digits/adam.yaml", 30)])
def test_digits_recipes_reach_093_test_accuracy(recipe: str, epochs: int, tmp_path: Path):
    summary = _run_recipe(recipe, tmp_path, f"trainer.max_epochs={epochs}")
    assert summary["test/accuracy"] >= 0.93, summary
