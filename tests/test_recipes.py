"""Shipped recipes: every one validates; the CartPole PPO recipe solves CartPole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from unitrain.config import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates_and_names_its_command(path: Path):
    recipe = load_recipe(path)
    lines = path.read_text().splitlines()
    assert lines[0] == f"# unitrain fit recipes/{path.parent.name}/{path.name}"
    assert lines[1].startswith("# ") and len(lines[1]) > 10
    assert recipe.optimizer.name == path.stem or path.stem.startswith(recipe.optimizer.name)


def test_cartpole_ppo_recipe_reaches_475(tmp_path: Path):
    proc = run_cli("fit", str(REPO / "recipes" / "cartpole" / "ppo.yaml"),
                   f"run_dir={tmp_path / 'run'}", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["eval/episodes"] == 10
    assert summary["eval/return_mean"] >= 475, summary
    assert Path(summary["checkpoint"]).is_file()
    assert list((tmp_path / "run").glob("events.out.tfevents.*"))
