"""What unitrain relies on in Lightning, each against the real Lightning objects: the one use of
its internals (:mod:`unitrain.run.lightning_compat`) and the public arguments that replaced the
others. Each test fails when Lightning stops doing what unitrain relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from policies import TinyPolicy
from rulecheck import scalar_steps
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import unitrain as ut
from unitrain.run.trainer import run_logger
from unitrain.policy.ckpt_file import load_checkpoint_file

HIDDEN = 7  # the module's one constructor argument that is not filled in from the env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ut.Trainer, list[dict[str, Any]]]:
    """A two-iteration CartPole run, and the parameters of every ``log_hyperparams`` call."""
    logged: list[dict[str, Any]] = []
    original = TensorBoardLogger.log_hyperparams

    def recording(self: TensorBoardLogger, params: Any, *args: Any, **kwargs: Any) -> None:
        logged.append(dict(params))
        original(self, params, *args, **kwargs)

    trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1", num_envs=2), max_frames=32,
                         eval_every_frames=32, eval_episodes=1, seed=0, num_threads=1,
                         run_dir=tmp_path_factory.mktemp("run"), enable_progress_bar=False,
                         optimizer=ut.optim.PPO(frames_per_batch=16, minibatch_size=16, epochs=1))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TensorBoardLogger, "log_hyperparams", recording)
        trainer.fit(TinyPolicy(obs_dim=4, act_dim=2, hidden=HIDDEN))
    return trainer, logged


def test_each_rule_iteration_is_one_global_step(tiny_run):
    """lightning_compat.advance_global_step: ``global_step`` counts rule iterations, and the
    checkpoint keeps the count (a resumed run continues it)."""
    trainer, _ = tiny_run
    assert trainer.summary["iterations"] == 2
    assert trainer.global_step == 2
    ckpt = load_checkpoint_file(trainer.summary["checkpoint"])
    assert ckpt["global_step"] == 2


def test_lightning_logs_no_module_hyperparameters(tiny_run):
    """``save_hyperparameters(logger=False)`` in RLModule: Lightning sends the module's arguments
    to no logger; the only hyperparameters logged are the Trainer's run configuration."""
    trainer, logged = tiny_run
    assert len(logged) == 1, [sorted(p) for p in logged]
    assert logged[0]["module/hidden"] == HIDDEN and "hidden" not in logged[0]
    saved = yaml.safe_load((trainer.run_dir / "hparams.yaml").read_text())
    assert saved["module/hidden"] == HIDDEN
    assert not {"obs_dim", "act_dim", "hidden", "activation"} & set(saved)


def test_the_purge_step_hides_what_earlier_launches_logged_from_it(tmp_path: Path):
    """run_logger(purge_step=...): Lightning's TensorBoardLogger hands ``purge_step`` to
    TensorBoard, which hides the earlier launch's events at that step or later."""
    first = run_logger(tmp_path)
    for step in (1, 2, 3, 4):
        first.log_metrics({"x": float(step)}, step=step)
    first.finalize("success")
    resumed = run_logger(tmp_path, purge_step=3)
    for step in (3, 4, 5):
        resumed.log_metrics({"x": 10.0 * step}, step=step)
    resumed.finalize("success")
    assert scalar_steps(tmp_path) == {"x": [1, 2, 3, 4, 5]}
    board = EventAccumulator(str(tmp_path))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("x")] == [
        (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
