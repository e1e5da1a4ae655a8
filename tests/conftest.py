"""Shared helpers for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment of a fresh process: it imports the test helpers here and the unitrain
    this process imported (not another installed copy)."""
    import unitrain

    package_root = Path(unitrain.__file__).resolve().parent.parent
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent),
                                                        str(package_root)]))


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m unitrain ARGS`` in a fresh process."""
    env = child_env()
    return subprocess.run([sys.executable, "-m", "unitrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_script(path: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process (its directory is the working directory)."""
    env = child_env()
    return subprocess.run([sys.executable, str(path), *args], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_ranks(tmp_path: Path, script: str, *args: str, prefix: str = "") -> tuple[dict, dict]:
    """Write ``script`` to ``tmp_path``, run it, and load the two ranks' ``Dump`` records
    (``{prefix}rank{r}.pt``)."""
    path = tmp_path / "train.py"
    if not path.exists():
        path.write_text(script)
        proc = run_script(path, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tuple(torch.load(tmp_path / f"{prefix}rank{r}.pt", weights_only=False) for r in (0, 1))


@pytest.fixture
def small_recipe(tmp_path: Path) -> Path:
    """A fast CartPole PPO recipe (a few seconds per run)."""
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_RECIPE)
    return path


SMALL_RECIPE = """\
# unitrain fit small.yaml
# A fast CartPole PPO run for tests.
seed: 3
env: {id: CartPole-v1, num_envs: 4}
module: {target: unitrain.MLPPolicy, hidden: [32, 32]}
optimizer: {name: ppo, lr: 1.0e-3, frames_per_batch: 128, minibatch_size: 128, epochs: 4,
            gamma: 0.98, gae_lambda: 0.8}
trainer: {max_frames: 2048, eval_every_frames: 512, eval_episodes: 4}
"""
