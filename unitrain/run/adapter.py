"""The Lightning side of a run: how Lightning's loop drives an update rule.

:class:`RunAdapter` is what an :class:`~unitrain.RLModule`'s Lightning hooks delegate to:

- one ``training_step`` is one rule iteration (``rule.step(services)``); its metrics are reduced
  across ranks in one collective and logged against the frame count;
- cadence is counted in env frames: an "epoch" lasts until the frame count reaches the next
  multiple of ``eval_every_frames`` (or the budget), then Lightning's validation runs one
  deterministic evaluation and the checkpoint callbacks write ``last.ckpt``/``best.ckpt``;
  supervised runs keep Lightning's epochs over their dataloader and measure ``test/accuracy``;
- the frame budget stops the run after the iteration that reaches it (the overshoot is kept);
- checkpoints carry the rule's state and the services' counters and RNG states.

The services themselves (:class:`~unitrain.run.services.RunServices`) know nothing of Lightning.
"""

from __future__ import annotations

import dataclasses

import datetime as _dt
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unitrain.run.lightning_compat import advance_global_step
from unitrain.run.safety import RunStopped, StopSignals, slurm_requeue, slurm_requeue_signal
from unitrain.run.services import RunServices, episode_stats

if TYPE_CHECKING:
    import lightning as L

    from unitrain.policy.module import RLModule
    from unitrain.rules.base import UpdateRule

__all__ = ["RunAdapter", "default_eval_every"]

# Evaluations over a budget when the Trainer is not told their cadence.
EVALS_PER_BUDGET = 10
EVAL_EVERY_UNBOUNDED = 100_000


def default_eval_every(max_frames: int | None) -> int:
    """Frames between evaluations when none is given: a tenth of the budget (100k unbounded)."""
    if not max_frames:
        return EVAL_EVERY_UNBOUNDED
    return max(1, math.ceil(max_frames / EVALS_PER_BUDGET))


class _EvalPeriod:
    """What Lightning iterates over in an env run: ticks until the next evaluation is due.

    An epoch ends when this iterator does; the training step ends it right after the iteration
    that made an evaluation due, so Lightning's validation (the evaluation and the checkpoints)
    runs then. It has no length: Lightning validates at the end of each such epoch.
    """

    def __init__(self, adapter: "RunAdapter") -> None:
        self.adapter = adapter

    def __iter__(self) -> Iterator[int]:
        while not self.adapter.period_over():
            yield 0


class RunAdapter:
    """Drives an update rule from an :class:`~unitrain.RLModule`'s Lightning hooks.

    Args:
        module: the module being trained.
        rule: the update rule.
        services: the run's services.
        eval_every_frames: env frames between evaluations and checkpoints.
        eval_episodes: episodes per evaluation (split across ranks).
        num_threads: torch threads per process.
        video_every_frames: env frames between episode videos logged to TensorBoard (each the
            first episode of the evaluation due then), or ``None``.
    """

    def __init__(self, module: "RLModule", rule: "UpdateRule", services: RunServices,
                 eval_every_frames: int, eval_episodes: int, num_threads: int,
                 video_every_frames: int | None = None) -> None:
        self.module, self.rule, self.services = module, rule, services
        self.eval_every_frames, self.eval_episodes = eval_every_frames, eval_episodes
        self.num_threads = num_threads
        self.next_eval = eval_every_frames
        self.video_every_frames = video_every_frames
        self.next_video = video_every_frames or 0
        self.last_eval: dict[str, float] | None = None
        self.final_eval: dict[str, float] | None = None
        self.last_return = math.nan
        self.frames_per_s = math.nan
        self._eval_frames: int | None = None
        self._correct = self._seen = 0.0
        self._clock: float | None = None
        self.signals = StopSignals(on_abort=self._flush_loggers)
        # Earlier segments of a resumed run, and when and where this one started.
        self._past_segments: list[dict[str, Any]] = []
        self._started = time.perf_counter()
        self._started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
        self._from_frames = 0

    @property
    def env_run(self) -> bool:
        return self.services.env_spec is not None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Called from ``RLModule.setup("fit")`` once ranks are known."""
        trainer = self.module.trainer
        # One thread per process by default: with more, small matrix products collapse as soon
        # as another process shares the cores.
        torch.set_num_threads(self.num_threads)
        self.services.start(trainer.global_rank, trainer.world_size, self.num_threads)
        self.services.histogram = self._histogram
        self.rule.setup(self.module, self.services)

    def train_iterable(self) -> _EvalPeriod:
        return _EvalPeriod(self)

    def val_iterable(self) -> list[int]:
        return [0]

    def period_over(self) -> bool:
        """Whether the current evaluation period (epoch) of an env run is over."""
        s = self.services
        budget = s.max_frames is not None and s.frames >= s.max_frames
        return budget or s.frames >= self.next_eval

    # ------------------------------------------------------------------ training
    def training_step(self, ticks: Iterator[Any]) -> None:
        item = next(ticks, None)
        s = self.services
        if item is None:
            # A period that was over when it began (a run resumed where an evaluation was due,
            # or at its budget): Lightning validates now; at the budget the run ends.
            if s.max_frames is not None and s.frames >= s.max_frames:
                self.module.trainer.should_stop = True
            return
        s.batch = item[0]
        if self._clock is None:
            self._clock = time.perf_counter()
        metrics = {k: float(v) for k, v in self.rule.step(s).items()}
        local_frames = metrics.pop("frames", 0.0)
        s.sync_obs_norm()
        metrics.update(episode_stats(s.pop_episodes()))
        keys = sorted(metrics)
        # A stop requested by a signal on any rank rides on the gather every iteration makes.
        values = torch.tensor([local_frames, float(self.signals.requested)]
                              + [metrics[k] for k in keys], dtype=torch.float64)
        rows = s.comm.gather_cpu(values)
        frames = int(rows[:, 0].sum().item())
        stop = int(rows[:, 1].max().item())
        reduced = {k: _reduce(k, rows[:, i + 2]) for i, k in enumerate(keys)}
        s.frames += frames
        s.iteration += 1
        trainer = self.module.trainer
        advance_global_step(trainer)  # one rule iteration is one global step
        now = time.perf_counter()
        self.frames_per_s = frames / max(now - self._clock, 1e-9)
        reduced["perf/frames_per_s"] = self.frames_per_s
        reduced["perf/iteration"] = float(s.iteration)
        self._clock = now
        if not math.isnan(reduced.get("episode/return_mean", math.nan)):
            self.last_return = reduced["episode/return_mean"]
        self._log({k: v for k, v in reduced.items() if not math.isnan(v)})
        if s.max_frames is not None and s.frames >= s.max_frames:
            trainer.should_stop = True
        if stop:
            # The checkpoint keeps an evaluation that this iteration made due: a resumed run
            # makes it first, where this run would have.
            self._stop(trainer, stop)
        if self.env_run and self.period_over():
            next(ticks, None)  # ends the epoch: Lightning validates (evaluates, checkpoints)

    def _stop(self, trainer: "L.Trainer", signum: int) -> None:
        """Write ``last.ckpt`` (every rank takes part) and stop the run (asking SLURM to
        requeue the job on its requeue signal)."""
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        s = self.services
        note = ""
        if signum == self.signals.requeue_signal and trainer.global_rank == 0:
            note = slurm_requeue()
        raise RunStopped(signum, s.frames if self.env_run else s.iteration, str(path), note)

    def on_train_start(self) -> None:
        self.signals.install(slurm_requeue_signal(self.module.trainer.strategy))

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Any) -> None:
        if not self.env_run:
            self._count_correct(batch)
            return
        res = self.run_evaluation()
        # For the progress bar and the callbacks that monitor it (best.ckpt, early stopping).
        self.module.log("eval/return_mean", res["return_mean"], prog_bar=True, logger=False,
                        on_step=False, on_epoch=True, batch_size=1)

    def run_evaluation(self) -> dict[str, float]:
        """One deterministic evaluation, logged, and the next one scheduled (the last one again
        if nothing was trained since)."""
        s = self.services
        if self._eval_frames == s.frames and self.last_eval is not None:
            return self.last_eval
        res = s.play_evaluation(self.eval_episodes)
        self.last_eval, self._eval_frames = res, s.frames
        self.next_eval = (s.frames // self.eval_every_frames + 1) * self.eval_every_frames
        self._log({f"eval/{k}": v for k, v in res.items()})
        if self.video_every_frames and s.frames >= self.next_video:
            self.next_video = (s.frames // self.video_every_frames + 1) * self.video_every_frames
            self._log_video(evaluation=s.eval_count - 1)
        return res

    def _log_video(self, evaluation: int) -> None:
        """Film the first episode of evaluation number ``evaluation`` into TensorBoard (rank 0)."""
        from lightning.pytorch.loggers import TensorBoardLogger

        from unitrain.run.video import log_episode

        s = self.services
        writers = [lg.experiment for lg in self.module.trainer.loggers
                   if isinstance(lg, TensorBoardLogger)]
        if s.rank != 0 or not writers or s.env_spec is None:
            return
        log_episode(writers[0], self.module, s.env_spec, s.obs_norm, s.seed, evaluation, s.frames)

    @torch.no_grad()
    def _count_correct(self, batch: Any) -> None:
        """Accumulate correct predictions of a supervised ``(inputs, labels)`` batch."""
        inputs, labels = batch
        predicted = self.module(inputs.to(self.module.device)).argmax(-1)
        self._correct += float((predicted.cpu() == labels.cpu()).sum())
        self._seen += float(labels.numel())

    def on_validation_epoch_end(self) -> None:
        """Log ``test/accuracy`` of a supervised run over the whole test set (all ranks)."""
        if self.env_run:
            return
        counts = torch.tensor([self._correct, self._seen], dtype=torch.float64)
        counts = self.services.comm.all_reduce_(counts.to(self.module.device), "sum").cpu()
        self._correct = self._seen = 0.0
        if counts[1] == 0:
            return
        accuracy = float(counts[0] / counts[1])
        self._log({"test/accuracy": accuracy})
        self.module.log("test/accuracy", accuracy, prog_bar=True, logger=False, on_step=False,
                        on_epoch=True, batch_size=1)

    def on_train_end(self) -> None:
        if self.env_run:
            self.final_eval = self.run_evaluation()
            self._log({f"final/{k}": v for k, v in self.final_eval.items()})

    # ------------------------------------------------------------------ logging
    def _flush_loggers(self) -> None:
        for logger in self.module.trainer.loggers:
            logger.save()

    def _log(self, metrics: dict[str, float]) -> None:
        # Scalars are stepped by env frames; supervised runs have none and step by iteration.
        s = self.services
        step = s.frames if self.env_run else s.iteration
        for logger in self.module.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.module.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_histogram(tag, values, global_step=step)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        s, module = self.services, self.module
        # What was logged up to this checkpoint reaches the disk with it: a run killed later
        # resumes with its curves whole up to here.
        self._flush_loggers()
        return {
            **s.state_dict(), "rule": self.rule.state_dict(), "rule_config": self.rule.config(),
            "env": None if s.env_spec is None else s.env_spec.record(),
            "module_class": f"{type(module).__module__}:{type(module).__qualname__}",
            "module_hparams": dict(module.hparams), "action_std": module.action_std,
            "env_info": None if module.env_info is None else dataclasses.asdict(module.env_info),
            "next_eval": self.next_eval, "eval_every_frames": self.eval_every_frames,
            "next_video": self.next_video,
            "last_eval": self.last_eval, "eval_frames": self._eval_frames,
            "segments": self.segments(time.perf_counter() - self._started),
        }

    def segments(self, wall_s: float) -> list[dict[str, Any]]:
        """The run's segments (one per process launch that trained it), this one ``wall_s``
        seconds long so far. A segment killed without warning counts up to its last checkpoint."""
        s = self.services
        current = {"started": self._started_at, "from_frames": self._from_frames,
                   "to_frames": s.frames, "iterations": s.iteration, "wall_s": round(wall_s, 2)}
        return [*self._past_segments, current]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.services.load_state_dict(state)
        self.rule.load_state_dict(state["rule"])
        s = self.services
        if state.get("eval_every_frames") == self.eval_every_frames and "next_eval" in state:
            # A checkpoint written between evaluations (a run stopped by a signal) keeps the
            # evaluation that was due: the resumed run makes it where the run would have.
            self.next_eval = state["next_eval"]
        else:
            self.next_eval = (s.frames // self.eval_every_frames + 1) * self.eval_every_frames
        # An evaluation already made at these frames is not made again (a run resumed from
        # its final checkpoint, say).
        self.last_eval, self._eval_frames = state.get("last_eval"), state.get("eval_frames")
        if self.video_every_frames:
            self.next_video = state.get("next_video") or (
                (s.frames // self.video_every_frames + 1) * self.video_every_frames)
        self._past_segments = list(state.get("segments", []))
        self._from_frames = s.frames


def _reduce(key: str, column: torch.Tensor) -> float:
    """Combine one metric across ranks: ``*_max`` by max, ``*_min`` by min, else mean (NaN-aware)."""
    valid = column[~column.isnan()]
    if len(valid) == 0:
        return float("nan")
    if key.endswith("_max"):
        return valid.max().item()
    if key.endswith("_min"):
        return valid.min().item()
    return valid.mean().item()
