"""Fault injection: runs killed with SIGKILL at random moments, resumed each time, end exactly
where an uninterrupted run of the same seed ends.

For each recipe, an uninterrupted ``unitrain fit`` run gives the reference final checkpoint.
Then a second run is killed with SIGKILL ``--kills`` times at random moments (a delay drawn
from ``--seed``, uniform in 0-1.5 s, after the run writes a checkpoint, so that each killed run
has made progress and dies somewhere in the iteration after it), one of them half-way through
writing a checkpoint (the test hook ``UNITRAIN_FAULT=kill-in-save:N`` of
:mod:`unitrain.run.safety`), and resumed with ``resume=last`` each time (started afresh if it was
killed before its first checkpoint), until it finishes. Reported per recipe: kills survived (the run resumed and
finished) out of kills made, and whether the final parameters, optimizer state, frames and
evaluation are bit-identical to the reference (``--exact``) or only the budget was reached.

    python tools/fault_injection.py                           # GA and ES on CartPole, 5 kills
    python tools/fault_injection.py --recipes cartpole/ppo --kills 3 --no-exact \\
        trainer.devices=2

Population rules (GA, ES) are deterministic given the seed, whatever the interruptions; PPO and
the off-policy rules are too in one process, but their evaluations and training episodes run on
gymnasium envs whose state a resume restores only where it can be pickled.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from unitrain.policy.ckpt_file import load_checkpoint_file

REPO = Path(__file__).resolve().parent.parent


def fit(recipe: str, run_dir: Path, overrides: list[str], resume: bool = False,
        kill_delay: float | None = None, fault: str | None = None,
        signals: tuple[int, ...] = (signal.SIGKILL,), group: bool = True,
        env: dict[str, str] | None = None) -> tuple[int, float, str]:
    """Run ``unitrain fit``; ``(exit code, seconds, stderr)``.

    With ``kill_delay``, the run is sent ``signals`` (SIGKILL by default; to its whole process
    group, or with ``group=False`` to the first process only) that many seconds after it writes
    its next ``last.ckpt``, so every killed run has made progress and dies at a random moment of
    the iteration after it. ``env`` adds environment variables.
    """
    env = {**os.environ, **(env or {})}
    env.pop("UNITRAIN_FAULT", None)
    if fault is not None:
        env["UNITRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "unitrain", "fit", recipe, f"run_dir={run_dir}", *overrides]
    if resume:
        cmd.append("resume=last")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
    start = time.perf_counter()
    # A session of its own, so that a kill reaches every process of a multi-process run.
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        while kill_delay is not None and proc.poll() is None:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                time.sleep(kill_delay)
                for i, sig in enumerate(signals):
                    if i:
                        time.sleep(0.1)  # signals arriving together are handled once
                    if proc.poll() is None:
                        (os.killpg if group else os.kill)(proc.pid, sig)
                break
            time.sleep(0.02)
        proc.wait()
        if signals != (signal.SIGKILL,):  # the process group's other processes end too
            _wait_for_group(proc.pid)
        err.seek(0)
        text = err.read()
        if fault is None and kill_delay is None and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{text[-2000:]}")
    return proc.returncode, time.perf_counter() - start, text


def _wait_for_group(pgid: int, timeout: float = 60.0) -> None:
    """Wait until no process of group ``pgid`` is left."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise RuntimeError(f"processes of group {pgid} still running after {timeout} s")


def final_state(run_dir: Path) -> dict:
    """What must match: parameters, optimizer states, the rule's state and the counters."""
    ckpt = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    u = ckpt["unitrain"]
    return {"state_dict": ckpt["state_dict"], "optimizer_states": ckpt.get("optimizer_states"),
            "rule": u["rule"], "frames": u["frames"], "iteration": u["iteration"],
            "eval_count": u["eval_count"]}


def same(a: object, b: object) -> bool:
    """Bit-identical nested tensors, arrays, numbers and containers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    try:
        import numpy as np

        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and np.array_equal(a, b)
    except ImportError:  # pragma: no cover
        pass
    return a == b


def killed_run(recipe: str, run_dir: Path, overrides: list[str], kills: int,
               rng: random.Random) -> tuple[int, int]:
    """Run ``recipe`` to the end through up to ``kills`` SIGKILLs; ``(kills, resumes)``."""
    made = resumes = 0
    in_save = rng.randrange(kills) if kills else -1
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    while True:
        resume = ckpt.exists()
        resumes += resume
        if made == kills:
            fit(recipe, run_dir, overrides, resume)
            return made, resumes
        if made == in_save:
            # The second checkpoint file this process writes dies half-way.
            code, _, _ = fit(recipe, run_dir, overrides, resume, fault="kill-in-save:2")
        else:
            code, _, _ = fit(recipe, run_dir, overrides, resume,
                             kill_delay=rng.uniform(0.0, 1.5))
        if code == 0:  # finished before the kill came
            return made, resumes
        made += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=["cartpole/ga", "cartpole/es"])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--no-exact", dest="exact", action="store_false",
                        help="check only that the budget is reached")
    parser.add_argument("--keep", help="run in this directory and keep the runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
        for recipe in args.recipes:
            ref_dir, run_dir = Path(tmp) / recipe / "reference", Path(tmp) / recipe / "killed"
            fit(recipe, ref_dir, args.overrides)
            made, resumes = killed_run(recipe, run_dir, args.overrides, args.kills, rng)
            ref, got = final_state(ref_dir), final_state(run_dir)
            exact = same(ref, got)
            if not exact:
                print(f"{recipe}: differs in " + ", ".join(k for k in ref if not same(ref[k], got[k])))
            reached = got["frames"] >= ref["frames"] if not args.exact else exact
            print(f"{recipe}: {made} kills survived of {made} made (one during a checkpoint "
                  f"write), {resumes} resumes, "
                  f"finished at {got['frames']:,} frames (reference {ref['frames']:,}); "
                  f"{'bit-identical to' if exact else 'differs from'} the uninterrupted run; "
                  f"{'PASS' if reached else 'FAIL'}", flush=True)


if __name__ == "__main__":
    main()
