"""The projection update rule through the Trainer: supervised digits, two processes, elite imitation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import unitrain as ut
from conftest import run_cli, run_script
from policies import TinyPolicy
from unitrain.context import RunContext
from unitrain.data import DataSpec, load_data
from unitrain.optim import Projection

FAST = dict(iterations=20, output="cross_entropy", lam=5.0)


def test_digits_projection_trains_through_the_trainer(tmp_path: Path):
    train, test, info = load_data(DataSpec(name="digits", batch_size=128))
    trainer = ut.Trainer(env=None, optimizer=Projection(**FAST), max_epochs=1, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    module = TinyPolicy(info.obs_dim, info.act_dim, hidden=32, activation="relu")
    trainer.fit(module, train_dataloaders=train, val_dataloaders=test)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test/accuracy"] >= 0.85, summary
    assert summary["iterations"] == len(train)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_recipe_with_data_block_runs(tmp_path: Path):
    proc = run_cli("fit", "digits/projection", "trainer.max_epochs=1", "optimizer.iterations=5",
                   "data.batch_size=256", "module.hidden=[16]", f"run_dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 < summary["test/accuracy"] <= 1.0 and summary["env"] is None
    assert "test accuracy" in proc.stdout


def test_unsupported_layer_is_reported_by_the_rule(tmp_path: Path):
    train, test, info = load_data(DataSpec(name="digits", batch_size=256))
    trainer = ut.Trainer(env=None, optimizer=Projection(**FAST), max_epochs=1, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    module = TinyPolicy(info.obs_dim, info.act_dim, hidden=8, activation="tanh")
    with pytest.raises(ValueError, match=r"'net\.1'.*Tanh"):
        trainer.fit(module, train_dataloaders=train)


def test_rule_fields_are_validated():
    with pytest.raises(ut.ConfigError, match="solver"):
        Projection(solver="newton")
    with pytest.raises(ut.ConfigError, match="output"):
        Projection(output="hinge")


SCRIPT = '''
import sys
import torch
import lightning as L
import unitrain as ut
from policies import TinyPolicy
from unitrain.context import RunContext
from unitrain.data import DataSpec, load_data


class Dump(L.Callback):
    def on_train_start(self, trainer, module):
        self.init = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_end(self, trainer, module):
        torch.save({"params": {k: v.detach().clone() for k, v in module.state_dict().items()},
                    "init": self.init, "world_size": trainer.world_size,
                    "iterations": module._ctx.iteration},
                   f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    train, test, info = load_data(DataSpec(name="digits", batch_size=100))
    trainer = ut.Trainer(env=None, devices=int(sys.argv[1]), strategy="ddp", max_steps=3,
                         seed=4, num_threads=1, run_dir="run", callbacks=[Dump()],
                         enable_progress_bar=False,
                         optimizer=ut.optim.Projection(iterations=5))
    trainer.fit(TinyPolicy(info.obs_dim, info.act_dim, hidden=8, activation="relu"),
                train_dataloaders=train, val_dataloaders=test)
'''


def test_two_processes_keep_identical_parameters(tmp_path: Path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = run_script(script, "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["iterations"] == r1["iterations"] == 3
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
        assert torch.equal(r0["init"][key], r1["init"][key]), key
    assert any(not torch.equal(r0["init"][k], v) for k, v in r0["params"].items())


def test_elite_imitation_improves_cartpole(tmp_path: Path):
    spec = ut.EnvSpec("CartPole-v1", num_envs=4)
    rule = Projection(episodes=8, elite_fraction=0.25, explore=0.1, updates=2, batch_size=128,
                      iterations=20)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, activation="relu")
    before = RunContext(module, rule, spec, 0, None, 1, 8).evaluate(8)["return_mean"]
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=6000, eval_every=4,
                         eval_episodes=8, seed=0, num_threads=1, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["frames"] >= 6000
    assert trainer.summary["eval/return_mean"] > before + 20, (before, trainer.summary)
