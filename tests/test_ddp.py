"""devices=2 on CPU (gloo): ranks end with identical parameters and collect with their own seeds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import SMALL_RECIPE, run_cli, run_ranks

from unitrain.envs import EnvSpec, derive_seed, make_env
from unitrain.policy.ckpt_file import load_checkpoint_file

SCRIPT = '''
import sys
import unitrain as ut
from dump import Dump
from policies import TinyPolicy

if __name__ == "__main__":
    trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1", num_envs=4, obs_norm=True),
                         devices=int(sys.argv[1]),
                         strategy="ddp", max_frames=2048, eval_every_frames=1024, eval_episodes=4, seed=5,
                         num_threads=1, run_dir="run", callbacks=[Dump()],
                         optimizer=ut.optim.PPO(frames_per_batch=128, minibatch_size=64, epochs=2))
    trainer.fit(TinyPolicy(4, 2))
'''


def test_two_processes_identical_parameters_distinct_seeds(tmp_path: Path):
    r0, r1 = run_ranks(tmp_path, SCRIPT, "2")
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["frames"] == r1["frames"] >= 2048
    last = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["unitrain"]["frames"] == r0["frames"]
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
        assert torch.equal(value, last["state_dict"][key]), key
        assert torch.equal(r0["init"][key], r1["init"][key]), key
    assert any(not torch.equal(r0["init"][k], v) for k, v in r0["params"].items())
    # Observation statistics are merged across ranks: identical, covering both ranks' frames.
    for key, value in r0["obs_norm"].items():
        assert torch.equal(value, r1["obs_norm"][key]), key
    assert r0["obs_norm"]["count"].item() >= r0["frames"]
    assert torch.equal(last["unitrain"]["obs_norm"]["mean"], r0["obs_norm"]["mean"])
    # Each rank collected from envs seeded with its own seed, so episodes differ.
    assert r0["env_seed"] == derive_seed(5, 0, 0, 0) and r1["env_seed"] == derive_seed(5, 0, 1, 0)
    spec = EnvSpec("CartPole-v1", num_envs=4)
    obs = [make_env(spec, r["env_seed"]).reset()["observation"] for r in (r0, r1)]
    assert not torch.equal(obs[0], obs[1])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["frames"] == r0["frames"]


def test_cli_ddp(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_RECIPE)
    proc = run_cli("fit", str(recipe), "trainer.devices=2", "trainer.strategy=ddp",
                   f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["frames"] >= 2048
    assert proc.stdout.count("unitrain: ppo on CartPole-v1") == 1
