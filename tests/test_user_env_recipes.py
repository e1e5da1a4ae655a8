"""Recipes naming a user's own files: a gymnasium env by ``module:id``, a TorchRL env factory by
``make:``, a module class by ``target:``, imported from the working directory by ``unitrain``;
a module that cannot be imported is one line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unitrain
from unitrain.app.cli import main

TESTS = Path(__file__).resolve().parent

MODELS = """\
import torch
from torch import nn

import unitrain as ut


class MyPolicy(ut.RLModule):
    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, 16), nn.Tanh(), nn.Linear(16, act_dim))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)
"""

ENVS = """\
from torchrl.envs import GymEnv


def make_env(g: float = 10.0):
    return GymEnv("Pendulum-v1", g=g)


def make_nothing():
    return 42
"""

RECIPE = """\
# unitrain fit recipe.yaml
seed: 0
env: {env}
module: {{target: {target}}}
optimizer: {{name: ppo, frames_per_batch: 64, minibatch_size: 64, epochs: 1}}
trainer: {{max_frames: 128, eval_episodes: 2}}
"""


def _write(where: Path, env: str, target: str = "mymodels.MyPolicy") -> Path:
    (where / "mymodels.py").write_text(MODELS)
    (where / "userenvs.py").write_text((TESTS / "userenvs.py").read_text())
    (where / "cli_user_envs.py").write_text(ENVS)
    path = where / "recipe.yaml"
    path.write_text(RECIPE.format(env=env, target=target))
    return path


def test_unitrain_fit_imports_the_users_files_from_the_working_directory(tmp_path: Path):
    _write(tmp_path, '{id: "userenvs:Reach-v0", num_envs: 2}')
    # Only unitrain itself on the path, and -P: the working directory is not put on sys.path
    # by Python, as with the installed `unitrain` command; the command puts it there.
    root = Path(unitrain.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-P", "-m", "unitrain", "fit", "recipe.yaml",
                           "run_dir=run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env"] == "userenvs:Reach-v0" and summary["frames"] == 128


@pytest.fixture
def in_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``tmp_path`` as the working directory; ``sys.path`` restored and the files' modules
    forgotten afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("mymodels", "cli_user_envs"):
        sys.modules.pop(name, None)


def test_a_make_recipe_trains_and_evaluates_from_its_checkpoint(in_dir: Path, capsys):
    _write(in_dir, '{make: "cli_user_envs:make_env", g: 9.0, num_envs: 2}')
    assert main(["fit", "recipe.yaml", "run_dir=run"]) == 0
    ckpt = in_dir / "run" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["env"] == "make_env" and result["eval/length_mean"] == 200


@pytest.mark.parametrize("env,target,expected", [
    ('{id: "nosuchenvs:Reach-v0"}', "mymodels.MyPolicy",
     ("env.id: cannot import env module 'nosuchenvs': no module named 'nosuchenvs' "
      "(working directory {cwd}, PYTHONPATH=")),
    ('{id: "userenvs:Reach-v0"}', "nosuchmodels.MyPolicy",
     ("module.target: cannot import module 'nosuchmodels': no module named 'nosuchmodels' "
      "(working directory {cwd}, PYTHONPATH=")),
    ('{make: "cli_user_envs:make_nope"}', "mymodels.MyPolicy",
     "env.make: module 'cli_user_envs' ({cwd}/cli_user_envs.py) has no attribute 'make_nope'"),
    ('{make: "cli_user_envs:make_nothing"}', "mymodels.MyPolicy",
     "env.make: 'make_nothing' returned int, not a torchrl.envs.EnvBase"),
])
def test_what_cannot_be_imported_is_one_line(in_dir: Path, capsys, env: str, target: str,
                                              expected: str):
    recipe = _write(in_dir, env, target)
    code = main(["fit", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"unitrain: error: {recipe}: "), err
    assert expected.format(cwd=os.getcwd()) in err, err
