"""Nothing lost when a run is stopped: atomic checkpoints, signals, SLURM requeue, kills, full
disks (``unitrain.run.safety``; the driver is ``tools/fault_injection.py``)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch
from rulecheck import scalar_steps

from unitrain.errors import UserError
from unitrain.run.safety import FAULT_ENV, atomic_write
from unitrain.policy.ckpt_file import load_checkpoint_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from fault_injection import final_state, fit, killed_run, same  # noqa: E402

GA = ["trainer.max_frames=60000", "trainer.eval_every_frames=10000"]
ES = ["trainer.max_frames=40000", "trainer.eval_every_frames=8000"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """Uninterrupted GA and ES runs (one process) and GA with two processes."""
    out = {}
    for name, recipe, overrides in (("ga", "cartpole/ga", GA), ("es", "cartpole/es", ES),
                                    ("ga2", "cartpole/ga", [*GA, "trainer.devices=2"])):
        run = tmp_path_factory.mktemp(name)
        fit(recipe, run, overrides)
        out[name] = final_state(run)
        out[f"{name}_steps"] = scalar_steps(run)
    return out


def _ckpt_frames(run: Path) -> int:
    return load_checkpoint_file(run / "checkpoints" / "last.ckpt")["unitrain"]["frames"]


def test_atomic_write_keeps_the_old_file_when_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write(path, b"complete", what="checkpoint")
    import unitrain.run.safety as safety

    monkeypatch.setenv(FAULT_ENV, f"no-space:{safety._saves + 1}")
    with pytest.raises(UserError, match=r"cannot write checkpoint .*last\.ckpt: No space left"):
        atomic_write(path, b"new and longer", what="checkpoint")
    assert path.read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_sigterm_stops_after_the_iteration_and_resume_continues_exactly(tmp_path, reference):
    run = tmp_path / "run"
    code, _, err = fit("cartpole/ga", run, GA, kill_delay=0.3, signals=(signal.SIGTERM,))
    assert code == 143, err[-2000:]
    frames = _ckpt_frames(run)
    assert 0 < frames < 60000
    line = [ln for ln in err.splitlines() if "stopped by SIGTERM" in ln]
    assert len(line) == 1 and f"after {frames:,} frames" in line[0]
    assert f"run_dir={run} resume=last" in line[0]
    code, _, _ = fit("cartpole/ga", run, GA, resume=True)
    assert code == 0
    assert same(final_state(run), reference["ga"])


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    # Generations long enough (about a second) for the second Ctrl-C to come within one.
    code, _, err = fit("cartpole/es", run, [*ES, "optimizer.population=512"], kill_delay=0.2,
                       signals=(signal.SIGINT, signal.SIGINT))
    assert code == 130, err[-2000:]
    assert "exiting now" in err
    load_checkpoint_file(run / "checkpoints" / "last.ckpt")  # complete


def test_two_processes_stop_together_on_a_signal_to_one(tmp_path, reference):
    """SIGTERM to rank 0 alone: both ranks stop after the same iteration (the fit helper
    waits until no process of the run is left) and the resumed run ends as if uninterrupted."""
    run = tmp_path / "run"
    overrides = [*GA, "trainer.devices=2"]
    code, _, err = fit("cartpole/ga", run, overrides, kill_delay=0.3,
                       signals=(signal.SIGTERM,), group=False)
    assert code == 143, err[-2000:]
    assert 0 < _ckpt_frames(run) < 60000
    code, _, _ = fit("cartpole/ga", run, overrides, resume=True)
    assert code == 0
    assert same(final_state(run), reference["ga2"])


@pytest.mark.parametrize("rule", ["ga", "es"])
def test_runs_killed_at_random_moments_end_bit_identical(tmp_path, reference, rule):
    """SIGKILL three times (once half-way through writing a checkpoint), resume each time."""
    overrides = GA if rule == "ga" else ES
    run = tmp_path / "run"
    made, resumes = killed_run(f"cartpole/{rule}", run, overrides, 3, random.Random(7))
    assert made == 3 and resumes >= 2
    assert same(final_state(run), reference[rule])
    assert not list((run / "checkpoints").glob(".*.tmp-*"))
    # It reads as one run: the curves have the uninterrupted run's steps, each once, and the
    # summary counts every segment's time.
    assert scalar_steps(run) == reference[f"{rule}_steps"]
    summary = json.loads((run / "summary.json").read_text())
    segments = summary["segments"]
    # (a launch that died before it wrote a checkpoint of its own left no trace to count)
    assert resumes + 1 >= len(segments) >= 2 and segments[0]["from_frames"] == 0
    assert all(b["from_frames"] == a["to_frames"] for a, b in zip(segments, segments[1:]))
    assert segments[-1]["to_frames"] == summary["frames"]
    assert summary["wall_s"] == pytest.approx(sum(seg["wall_s"] for seg in segments), abs=0.02)


@pytest.mark.parametrize("recipe, overrides", [
    ("cartpole/ppo", ["trainer.max_frames=4096", "trainer.eval_every_frames=1024"]),
    ("pendulum/dsac_t", ["trainer.max_frames=1500", "trainer.eval_every_frames=500",
                         "trainer.eval_episodes=2", "optimizer.warmup_frames=300"]),
])
def test_gradient_rules_resume_after_sigkill_to_the_budget(tmp_path, recipe, overrides):
    run = tmp_path / "run"
    made, _ = killed_run(recipe, run, overrides, 1, random.Random(3))
    assert made == 1
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    budget = int(overrides[0].split("=")[1])
    assert ckpt["unitrain"]["frames"] >= budget
    assert len(ckpt["unitrain"]["rng"]) == 1
    # What the killed launch logged after its checkpoint is hidden: each step once, in order.
    steps = scalar_steps(run)
    assert steps["perf/frames_per_s"][-1] == ckpt["unitrain"]["frames"]
    assert all(seen == sorted(set(seen)) for seen in steps.values()), steps


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    code, _, err = fit("cartpole/ga", run, GA, fault="no-space:3")
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("unitrain: error:")]
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0]
    assert str(run / "checkpoints") in lines[0] and "Traceback" not in err
    assert _ckpt_frames(run) > 0


def test_a_slurm_requeue_signal_requeues_and_the_requeued_job_resumes(tmp_path, reference):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train",
             "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    run = tmp_path / "run"
    code, _, err = fit("cartpole/ga", run, GA, kill_delay=0.3, signals=(signal.SIGUSR1,),
                       env=slurm)
    assert code == 128 + signal.SIGUSR1, err[-2000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "SLURM job 4242 requeued" in err
    code, _, _ = fit("cartpole/ga", run, GA, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert code == 0
    assert same(final_state(run), reference["ga"])
