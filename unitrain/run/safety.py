"""Nothing lost when a run is stopped: atomic checkpoint files and clean stops on signals.

**Atomic files.** Every file a resume reads (checkpoints, ``summary.json``) is written to a
temporary file in the same directory, flushed and fsynced, then renamed over the old one, and the
directory is fsynced: a crash at any moment leaves the previous complete file (or the new one),
never a truncated one. :class:`AtomicCheckpointIO` does this for Lightning's checkpoints.

**Signals.** :class:`StopSignals` turns SIGINT (Ctrl-C) and SIGTERM (schedulers, ``kill``) into
a request that the adapter reads after each iteration; in a multi-process run the request rides
on the iteration's metric gather, so every rank stops after the same iteration. The run then
writes ``last.ckpt`` and raises :class:`RunStopped`; the command line prints one line and exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C exits at once
(the checkpoint files on disk stay complete).

**SLURM.** In a SLURM job with auto-requeue (Lightning's ``SLURMEnvironment``, detected in a
SLURM job or passed as a plugin; ``#SBATCH --signal=SIGUSR1@90`` makes SLURM send its requeue
signal 90 s before the time limit), the requeue signal is a stop request too: the run stops
after the iteration, writes ``last.ckpt``, and asks ``scontrol requeue``; the requeued job
(``SLURM_RESTART_COUNT`` > 0) resumes from ``last.ckpt`` in the same ``run_dir``. This replaces
Lightning's own handler, which writes a checkpoint from within the signal handler, in the middle
of an iteration (and, with several processes, outside the collectives the others are in).

**Test hook.** ``UNITRAIN_FAULT=kill-in-save:N`` makes the N-th checkpoint write of a process
stop half-way with SIGKILL; ``UNITRAIN_FAULT=no-space:N`` makes it fail as on a full disk. The
fault-injection tests and ``tools/fault_injection.py`` use them; nothing else reads the variable.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unitrain.errors import UserError
from unitrain.policy.ckpt_file import FORMAT, FORMAT_KEY, encode, load_checkpoint_file

__all__ = ["AtomicCheckpointIO", "RunStopped", "StopSignals", "atomic_write", "exit_code",
           "slurm_requeue", "slurm_requeue_signal", "slurm_restarted"]

FAULT_ENV = "UNITRAIN_FAULT"
_saves = 0  # checkpoint writes of this process (for the fault hook)


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class RunStopped(Exception):
    """A run stopped on a signal after writing its checkpoint.

    Attributes:
        signum: the signal.
        frames: env frames (or iterations of a supervised run) done.
        checkpoint: the checkpoint written, from which ``resume=last`` continues.
    """

    def __init__(self, signum: int, frames: int, checkpoint: str, note: str = "") -> None:
        self.signum, self.frames, self.checkpoint = signum, frames, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after {frames:,} frames; saved {checkpoint}"
                         + (f"; {note}" if note else ""))


def _fault(kind: str) -> bool:
    """Whether the fault hook asks for ``kind`` at this checkpoint write."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith(kind + ":"):
        return False
    return _saves == int(spec.split(":", 1)[1])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform whose directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync directory).

    Raises:
        UserError: the file cannot be written (read-only directory, disk full, ...); the old
            file, if any, is untouched.
    """
    global _saves
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _saves += what == "checkpoint"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if what == "checkpoint" and _fault("no-space"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if what == "checkpoint" and _fault("kill-in-save"):
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror or type(e).__name__
        raise UserError(f"cannot write {what} {path}: {reason}; the last complete one is kept "
                        "(free space or choose a writable run_dir=)") from None
    _fsync_dir(path.parent)


def slurm_requeue_signal(strategy: Any) -> int | None:
    """The signal SLURM sends before a job's time limit when the job is to be requeued, or
    ``None``: the strategy's ``SLURMEnvironment`` (``auto_requeue``, ``requeue_signal``), or
    Lightning's defaults (SIGUSR1) in a SLURM job whose strategy has no cluster environment."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = getattr(strategy, "cluster_environment", None)
    if isinstance(env, SLURMEnvironment):
        return int(env.requeue_signal) if env.auto_requeue and env.requeue_signal else None
    return int(signal.SIGUSR1) if SLURMEnvironment.detect() else None


def slurm_requeue() -> str:
    """Ask SLURM to requeue this job (``scontrol requeue``); a line saying what happened."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        return f"SLURM job {job} not requeued: scontrol not found"
    if done.returncode != 0:
        return f"SLURM job {job} not requeued: {done.stderr.strip() or done.returncode}"
    return f"SLURM job {job} requeued"


def slurm_restarted() -> bool:
    """Whether this process belongs to a SLURM job that was requeued (and should resume)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with :func:`atomic_write` (serialised in memory first), in the
    safe format of :mod:`unitrain.policy.ckpt_file` (``torch.load(weights_only=True)`` reads it).

    Args:
        upgrade: applied to every checkpoint read (older checkpoints' contents made current).
    """

    def __init__(self, upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.upgrade = upgrade

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save({**encode(checkpoint), FORMAT_KEY: FORMAT}, buffer)
        atomic_write(path, buffer.getvalue(), what="checkpoint")

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint of either format (``weights_only`` is decided by the format)."""
        del weights_only  # format 2 is always read safely; format 1 needs a full unpickling
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint = load_checkpoint_file(path, map_location=map_location or "cpu")
        return self.upgrade(checkpoint) if self.upgrade is not None else checkpoint


class StopSignals:
    """SIGINT, SIGTERM and SLURM's requeue signal as a stop request read between iterations.

    :meth:`install` replaces the handlers (Lightning's own included) until :meth:`restore` (or
    Lightning's teardown, which puts back what was there before the run). The first signal
    sets :attr:`requested`; a second SIGINT runs ``on_abort`` (flush what can be flushed) and
    exits at once with code 130. Repeated SIGTERMs (a scheduler signalling every process of a
    job) only repeat the request. ``requeue_signal`` (SLURM's, when the job asks to be
    requeued) also sets :attr:`requeue`.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, on_abort: Callable[[], None] | None = None) -> None:
        self.requested = 0
        self.requeue = False
        self.requeue_signal: int | None = None
        self.on_abort = on_abort
        self._previous: dict[int, Any] = {}

    def install(self, requeue_signal: int | None = None) -> None:
        if self._previous:
            return
        self.requeue_signal = requeue_signal
        signals = [*self.SIGNALS, *([requeue_signal] if requeue_signal else [])]
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals stay with whoever handles them
            self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested and signum == signal.SIGINT:
            if self.on_abort is not None:
                try:
                    self.on_abort()
                except Exception:
                    pass
            sys.stderr.write("\nunitrain: second interrupt, exiting now; the last complete "
                             "checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(exit_code(signum))
        if signum == self.requeue_signal:
            self.requeue = True
        if not self.requested:
            self.requested = int(signum)
            if signum == signal.SIGINT:
                sys.stderr.write("\nunitrain: interrupted; stopping after this iteration "
                                 "(Ctrl-C again to exit now)\n")
                sys.stderr.flush()
