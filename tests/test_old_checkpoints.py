"""Checkpoints written by unitrain 0.1.0 (before the package was split into layers) still load,
evaluate identically and resume.

The fixtures were written by ``unitrain fit`` of 0.1.0: ``cartpole/ppo env.obs_norm=true`` (2,048
frames), ``cartpole/es`` (3,000 frames) and ``pendulum/sac optimizer.warmup_frames=512
optimizer.buffer_size=2000`` (1,280 frames). They record the module class as
``unitrain.module:MLPPolicy``, the path of 0.1.0.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

import unitrain as ut

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints_0_1_0"

# ut.evaluate(path, episodes=3, seed=5) as 0.1.0 computed it on the fixtures.
RETURNS = {
    "cartpole_ppo_obsnorm": 16.666666666666668,
    "cartpole_es": 25.666666666666668,
    "pendulum_sac": -1693.8845975001652,
}


@pytest.mark.parametrize("name", sorted(RETURNS))
def test_an_old_checkpoint_evaluates_as_it_did(name: str):
    result = ut.evaluate(FIXTURES / f"{name}.ckpt", episodes=3, seed=5)
    assert result["return_mean"] == pytest.approx(RETURNS[name], rel=1e-9, abs=1e-9)


RESUME = {
    "cartpole_ppo_obsnorm": ("cartpole/ppo", 2048, 2560, ["env.obs_norm=true"]),
    "cartpole_es": ("cartpole/es", 3009, 6000, []),
    "pendulum_sac": ("pendulum/sac", 1280, 1600,
                     ["optimizer.warmup_frames=512", "optimizer.buffer_size=2000"]),
}


@pytest.mark.parametrize("name", sorted(RESUME))
def test_an_old_checkpoint_resumes(name: str, tmp_path: Path):
    recipe, saved, budget, overrides = RESUME[name]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURES / f"{name}.ckpt", run / "checkpoints" / "last.ckpt")
    proc = run_cli("fit", recipe, f"run_dir={run}", "resume=last",
                   f"trainer.max_frames={budget}", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frames"] >= budget
    # The run continued from the checkpoint's frames: its new segment starts there.
    assert summary["segments"][-1]["from_frames"] == saved
