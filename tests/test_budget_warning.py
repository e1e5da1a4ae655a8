"""A frame budget that leaves a rule (almost) no updates is one warning line before the run,
naming the field to change."""

from __future__ import annotations

from pathlib import Path

import pytest

import unitrain as ut


def _warnings(capsys, tmp_path: Path, rule, max_frames: int, **kwargs) -> list[str]:
    ut.Trainer("Pendulum-v1", rule, max_frames=max_frames, run_dir=tmp_path / "run", **kwargs)
    return [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def test_a_budget_inside_the_warm_up_is_named(capsys, tmp_path: Path):
    lines = _warnings(capsys, tmp_path, ut.optim.TD3(), 20_000)
    assert len(lines) == 1
    assert "td3 makes no update in 20,000 frames" in lines[0]
    assert "optimizer.warmup_frames" in lines[0]


def test_too_few_updates_are_counted(capsys, tmp_path: Path):
    lines = _warnings(capsys, tmp_path, ut.optim.DSACT(), 20_000)
    assert len(lines) == 1
    assert "about 500 updates" in lines[0] and "optimizer.utd_ratio" in lines[0]


def test_the_warm_up_is_per_process(capsys, tmp_path: Path):
    # One process past the warm-up by 20,000 frames; two processes with 15,000 each by 5,000.
    assert _warnings(capsys, tmp_path, ut.optim.SAC(), 30_000) == []
    rule = ut.optim.SAC()
    assert rule.budget_warning(30_000, processes=1) is None
    assert rule.budget_warning(30_000, processes=2) is None
    assert "no update" in (rule.budget_warning(20_000, processes=2) or "")


@pytest.mark.parametrize("rule", [ut.optim.SAC(), ut.optim.PPO()], ids=["sac", "ppo"])
def test_an_ample_budget_warns_nothing(capsys, tmp_path: Path, rule):
    assert _warnings(capsys, tmp_path, rule, 100_000) == []
