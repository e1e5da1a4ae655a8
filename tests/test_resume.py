"""Checkpoint and resume: a resumed run starts from exactly the saved state and finishes the budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from policies import TinyPolicy
from rulecheck import CaptureStart, assert_same, checkpoint_state, scalar_steps

import unitrain as ut
from unitrain.policy.ckpt_file import load_checkpoint_file


def _trainer(run_dir: Path, budget: int, callbacks=()) -> ut.Trainer:
    return ut.Trainer(env=ut.EnvSpec("CartPole-v1", num_envs=4), max_frames=budget, eval_every_frames=512,
                      eval_episodes=2, seed=11, num_threads=1, run_dir=run_dir,
                      callbacks=list(callbacks),
                      optimizer=ut.optim.PPO(frames_per_batch=128, minibatch_size=64, epochs=2))


def test_resume_restores_exact_state(tmp_path: Path):
    run = tmp_path / "run"
    first = _trainer(run, 1024)
    first.fit(TinyPolicy(4, 2))
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["unitrain"]["frames"] == 1024 and ckpt["unitrain"]["iteration"] == 8
    assert ckpt["optimizer_states"][0]["state"], "the optimizer has moments to restore"

    capture = CaptureStart()
    second = _trainer(run, 2048, [capture])
    second.fit(TinyPolicy(4, 2), ckpt_path="last")
    assert_same(capture.state, checkpoint_state(ckpt))
    assert second.summary["frames"] == 2048
    assert second.global_step == 16  # iterations continue from the checkpoint's count
    final = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert final["unitrain"]["frames"] == 2048 and final["unitrain"]["iteration"] == 16
    assert json.loads((run / "summary.json").read_text())["frames"] == 2048


def test_resume_via_cli_continues_run_dir(tmp_path: Path, small_recipe: Path):
    from unitrain.app.cli import main

    run = tmp_path / "run"
    assert main(["fit", str(small_recipe), f"run_dir={run}", "trainer.max_frames=1024"]) == 0
    assert main(["fit", str(small_recipe), f"run_dir={run}", "resume=last"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["frames"] == 2048 and summary["iterations"] == 16


def test_resume_of_a_finished_run_changes_nothing(tmp_path: Path, small_recipe: Path, capsys):
    from unitrain.app.cli import main

    run = tmp_path / "run"
    assert main(["fit", str(small_recipe), f"run_dir={run}", "trainer.max_frames=1024"]) == 0
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["fit", str(small_recipe), f"run_dir={run}", "trainer.max_frames=1024",
                 "resume=last"]) == 0
    assert "is finished (1,024 frames, budget 1,024); nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files


class _KeepFirstCheckpoint(L.Callback):
    """Copies the first ``last.ckpt`` aside (a checkpoint the run went on past)."""

    def __init__(self, run: Path) -> None:
        self.src, self.dst = run / "checkpoints" / "last.ckpt", run / "first.ckpt"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.src.exists() and not self.dst.exists():
            shutil.copy(self.src, self.dst)


def test_a_run_resumed_from_an_earlier_checkpoint_reads_as_one_run(tmp_path: Path):
    """Resumed from a checkpoint it logged past, a run's curves continue without duplicated
    steps (the later events are hidden) and summary.json counts both segments."""
    run = tmp_path / "run"
    _trainer(run, 1024, [_KeepFirstCheckpoint(run)]).fit(TinyPolicy(4, 2))
    uninterrupted = scalar_steps(run)
    assert uninterrupted["eval/return_mean"] == [512, 1024]
    resumed = _trainer(run, 1024)
    resumed.fit(TinyPolicy(4, 2), ckpt_path=str(run / "first.ckpt"))
    assert scalar_steps(run) == uninterrupted
    segments = resumed.summary["segments"]
    assert [(s["from_frames"], s["to_frames"]) for s in segments] == [(0, 512), (512, 1024)]
    assert resumed.summary["wall_s"] == pytest.approx(sum(s["wall_s"] for s in segments),
                                                      abs=0.02)
