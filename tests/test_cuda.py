"""Training on a CUDA device: the envs step on the CPU, the networks and their updates run on the GPU.

The GPU tests are marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is false (CI's
machines), so the suite reports them as skipped there; ``tools/device_check.sh`` runs them on a
GPU machine (``pytest -m cuda tests/test_cuda.py``). The last test runs on the CPU: it takes the
collector's device-casting path that a GPU run takes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import unitrain as ut
from unitrain.envs.info import env_info
from unitrain.policy.models import NatureCNN

from conftest import child_env
from policies import TinyPolicy

# The device the tests train on (a CPU dry run of this file may set "cpu" and "cpu").
ACCELERATOR, DEVICE_TYPE = "gpu", "cuda"



def needs_cuda(test):
    """Marked ``cuda`` and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(),
                                               reason="needs a CUDA device")(test))


class Devices(L.Callback):
    """Records where the module's parameters are while it trains (Lightning moves the module
    back to the CPU when ``fit`` ends)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen |= {p.device.type for p in pl_module.parameters()}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.batches += 1
        self.seen |= {p.device.type for p in pl_module.parameters()}


def _gpu_trainer(tmp_path: Path, env: ut.EnvSpec, rule: ut.optim.UpdateRule, max_frames: int,
                 devices: Devices, **kwargs) -> ut.Trainer:
    return ut.Trainer(env=env, optimizer=rule, max_frames=max_frames, accelerator=ACCELERATOR,
                      devices=1, seed=0, num_threads=1, run_dir=tmp_path, logger=False,
                      enable_progress_bar=False, callbacks=[devices], **kwargs)


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


@needs_cuda
def test_ppo_updates_on_the_gpu(tmp_path: Path):
    devices = Devices()
    trainer = _gpu_trainer(tmp_path, ut.EnvSpec("CartPole-v1", num_envs=8),
                           ut.optim.PPO(frames_per_batch=256, minibatch_size=64, epochs=4),
                           max_frames=4096, devices=devices, eval_episodes=2)
    module = TinyPolicy(4, 2)
    trainer.fit(module)
    assert devices.seen == {DEVICE_TYPE}
    assert devices.batches >= 4096 // 256
    assert trainer.summary["frames"] >= 4096
    assert math.isfinite(trainer.summary["eval/return_mean"])
    assert _finite(module)


@needs_cuda
def test_sac_updates_on_the_gpu(tmp_path: Path):
    devices = Devices()
    # 256 warm-up frames, then one update per frame: about 300 updates.
    rule = ut.optim.SAC(batch_size=64, buffer_size=5000, warmup_frames=256, frames_per_batch=16,
                        utd_ratio=1.0, critic_hidden=(64, 64))
    trainer = _gpu_trainer(tmp_path, ut.EnvSpec("Pendulum-v1", num_envs=2), rule,
                           max_frames=576, devices=devices, eval_every_frames=10_000,
                           eval_episodes=2)
    module = TinyPolicy(3, 1)
    trainer.fit(module)
    assert devices.seen == {DEVICE_TYPE}
    assert trainer.summary["frames"] >= 576
    assert math.isfinite(trainer.summary["eval/return_mean"])
    assert _finite(module)


@needs_cuda
def test_ga_evaluates_a_pong_population_with_the_nature_cnn_on_the_gpu(tmp_path: Path):
    """One short generation of Deep GA: the Atari emulators (gymnasium + ale-py) on the CPU, the
    population's Nature-CNN forward passes batched on the GPU."""
    spec = ut.EnvSpec("ALE/Pong-v5", backend="gymnasium", max_episode_steps=25)
    info = env_info(spec)
    devices = Devices()
    rule = ut.optim.GA(population=6, truncation=2, sigma=0.002, elite_candidates=2,
                       elite_episodes=1, episodes=1, max_episode_steps=25, max_envs=4)
    trainer = _gpu_trainer(tmp_path, spec, rule, max_frames=150, devices=devices,
                           eval_episodes=1)
    module = NatureCNN(info.obs_shape, info.act_dim)
    trainer.fit(module)
    assert devices.seen == {DEVICE_TYPE}
    assert trainer.summary["iterations"] >= 1
    assert math.isfinite(trainer.summary["eval/return_mean"])
    assert _finite(module)


DETERMINISM = """\
import sys
import torch
import unitrain as ut
from policies import TinyPolicy

torch.use_deterministic_algorithms(True)
params = []
for run in ("a", "b"):
    torch.manual_seed(0)
    module = TinyPolicy(4, 2)
    trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1", num_envs=8),
                         optimizer=ut.optim.PPO(frames_per_batch=256, minibatch_size=64, epochs=4),
                         max_frames=2048, accelerator="gpu", devices=1, seed=3, num_threads=1,
                         eval_episodes=2, run_dir=run, logger=False, enable_progress_bar=False)
    trainer.fit(module)
    params.append(torch.cat([p.detach().cpu().reshape(-1) for p in module.parameters()]))
torch.save(params, sys.argv[1])
"""


@needs_cuda
def test_seeded_ppo_runs_on_cuda_are_bit_identical(tmp_path: Path):
    """Two PPO runs with the same seed on one CUDA device end with bit-identical parameters.

    What we chose: deterministic mode, not a tolerance. The runs use
    ``torch.use_deterministic_algorithms(True)`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (set
    before CUDA starts, hence the fresh process): cuBLAS then reduces in a fixed order, and an op
    without a deterministic CUDA kernel raises instead of varying. The library's CUDA path (MLP
    forward and backward, categorical log-probs, GAE, Adam, minibatch indexing) needs no such
    op, so the guarantee is exact equality; the env side (CPU, seeded) was deterministic already.
    """
    script = tmp_path / "determinism.py"
    script.write_text(DETERMINISM)
    out = tmp_path / "params.pt"
    env = dict(child_env(), CUBLAS_WORKSPACE_CONFIG=":4096:8")
    # Packages installed beside the image's own (tools/device_check.sh's /tmp/site) stay visible.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env["PYTHONPATH"],
                                                      os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(out)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b), f"max |a - b| = {(a - b).abs().max().item():.3g}"




@pytest.mark.parametrize("rule", [
    lambda: ut.optim.PPO(frames_per_batch=32, minibatch_size=16, epochs=1),
    lambda: ut.optim.SAC(batch_size=16, buffer_size=200, warmup_frames=32, frames_per_batch=8,
                         utd_ratio=0.25, critic_hidden=(16, 16)),
], ids=["ppo", "sac"])
def test_collection_with_the_policy_on_another_device_than_the_envs(rule, tmp_path: Path,
                                                                     monkeypatch):
    """A GPU run collects with the policy on the module's device and the envs on the CPU, the
    path of TorchRL's collector that casts between the two devices (and that failed for a policy
    declaring its output spec, the off-policy explorer's). Taken on the CPU by a training device
    that compares unequal to the envs' ``cpu``: ``cpu:0``. The off-policy loop keeps the
    training device for its replay batches (Lightning shows it to the rules' setup)."""
    from lightning.pytorch.strategies import SingleDeviceStrategy

    marked = torch.device("cpu", 0)
    monkeypatch.setattr(SingleDeviceStrategy, "root_device", property(lambda self: marked))
    rule = rule()
    env = ut.EnvSpec("CartPole-v1" if rule.name == "ppo" else "Pendulum-v1", num_envs=2)
    trainer = ut.Trainer(env=env, optimizer=rule, max_frames=64, accelerator="cpu", devices=1,
                         eval_every_frames=10_000, eval_episodes=1, seed=0, num_threads=1,
                         run_dir=tmp_path, logger=False, enable_progress_bar=False)
    module = TinyPolicy(4, 2) if rule.name == "ppo" else TinyPolicy(3, 1)
    trainer.fit(module)
    assert trainer.summary["frames"] >= 64
    if rule.name == "sac":
        assert rule.loop.replay.device == marked
