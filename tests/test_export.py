"""``unitrain export``: a standalone policy whose actions equal ``module.act`` on real observations,
loaded in a process where ``import unitrain`` fails.

The policies are the 0.1.0 fixtures: a discrete one (CartPole, ES), a continuous one (Pendulum,
SAC, actions squashed into [-2, 2]) and an observation-normalised one (CartPole, PPO with
``env.obs_norm``). The largest |difference| per policy is printed (``pytest -s``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from unitrain.app.cli import main
from unitrain.errors import UserError
from unitrain.run.checkpoint import policy_and_env
from unitrain.run.export import export

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints_0_1_0"
POLICIES = {"discrete": ("cartpole_es", "CartPole-v1"),
            "continuous": ("pendulum_sac", "Pendulum-v1"),
            "obs_norm": ("cartpole_ppo_obsnorm", "CartPole-v1")}

# Runs the exported file with unitrain made unimportable: only torch (or onnxruntime) is used.
LOADER = """\
import sys
sys.modules["unitrain"] = None
import numpy as np
import torch
path, fmt, obs_file, out_file = sys.argv[1:]
observation = torch.load(obs_file, weights_only=True)
if fmt == "pt2":
    with torch.no_grad():
        action = torch.export.load(path).module()(observation)
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path)
    action = torch.from_numpy(session.run(None, {"observation": observation.numpy()})[0])
try:
    import unitrain  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("unitrain was importable")
torch.save(action, out_file)
"""


def _observations(env_id: str, count: int = 64, seed: int = 0) -> torch.Tensor:
    """Observations of a random-action episode (resets included)."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    seen = []
    for _ in range(count):
        seen.append(obs)
        obs, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            obs, _ = env.reset()
    env.close()
    return torch.as_tensor(np.stack(seen), dtype=torch.float32)


def _expected(checkpoint: Path, obs: torch.Tensor) -> torch.Tensor:
    module, _, norm = policy_and_env(checkpoint)
    module.eval()
    with torch.no_grad():
        return module.act(norm(obs) if norm is not None else obs)


def _run_loader(tmp_path: Path, path: Path, fmt: str, obs: torch.Tensor) -> torch.Tensor:
    script, obs_file, out_file = tmp_path / "load.py", tmp_path / "obs.pt", tmp_path / "act.pt"
    script.write_text(LOADER)
    torch.save(obs, obs_file)
    proc = subprocess.run([sys.executable, str(script), str(path), fmt, str(obs_file),
                           str(out_file)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file, weights_only=True)


FORMATS = ["pt2", pytest.param("onnx", marks=pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None,
    reason="onnxruntime is not installed (pip install unitrain[export])"))]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_exported_policy_acts_as_module_act(kind: str, fmt: str, tmp_path: Path):
    name, env_id = POLICIES[kind]
    checkpoint = FIXTURES / f"{name}.ckpt"
    obs = _observations(env_id)
    out = tmp_path / f"policy.{fmt}"
    assert main(["export", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    actions = _run_loader(tmp_path, out, fmt, obs)
    expected = _expected(checkpoint, obs)
    assert actions.shape == expected.shape
    if kind == "continuous":
        diff = float((actions - expected).abs().max())
        assert diff <= 1e-5
        assert float(actions.abs().max()) <= 2.0  # squashed into Pendulum's bounds
    else:
        diff = float((actions != expected).sum())  # discrete: count of differing actions
        assert diff == 0
    print(f"\nexport parity {kind} {fmt}: max |difference| {diff:.3g}")


def test_obs_norm_is_part_of_the_exported_policy(tmp_path: Path):
    # Without the run's statistics the normalised policy acts differently on these observations,
    # so the parity above checks the normalisation.
    checkpoint = FIXTURES / "cartpole_ppo_obsnorm.ckpt"
    obs = _observations("CartPole-v1", count=256)
    module, _, norm = policy_and_env(checkpoint)
    assert norm is not None and float(norm.count) > 1
    with torch.no_grad():
        assert not torch.equal(module.act(obs), module.act(norm(obs)))


def test_export_api_and_format_errors(tmp_path: Path):
    out = export(FIXTURES / "cartpole_es.ckpt", tmp_path / "p.pt2")
    assert out.is_file()  # format from the suffix
    with pytest.raises(UserError, match="format 'tflite' is not one of pt2, onnx"):
        export(FIXTURES / "cartpole_es.ckpt", tmp_path / "p.tflite")
