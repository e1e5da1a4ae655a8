"""``unitrain.Trainer``: a ``lightning.Trainer`` that runs an update rule over an environment.

The Trainer owns the loop, the processes, callbacks, loggers and checkpoints; the module owns the
networks; the rule owns how parameters change. Defaults added on top of Lightning's:

- a TensorBoard logger writing into the run directory, scalars stepped by env frames;
- ``max_frames``: the env-frame budget, summed over all processes, and ``eval_every_frames``: the
  cadence of deterministic evaluations and checkpoints, also in env frames (a tenth of the
  budget by default), so one set of Trainer arguments serves every rule;
- ``ModelCheckpoint``: ``last.ckpt`` after every evaluation and ``best.ckpt`` (``eval/return_mean``);
- optional ``EarlyStopping`` on ``eval/return_mean`` (``early_stop=``);
- one progress bar over the frame budget (:class:`~unitrain.run.progress.FrameProgressBar`), and none
  of Lightning's banner lines;
- checkpoints and ``summary.json`` written atomically, and SIGINT/SIGTERM stopping the run
  after the current iteration with ``last.ckpt`` written (:mod:`unitrain.run.safety`);
- one torch thread per process unless told otherwise (more threads per process collapse when
  another process shares the cores);
- ``strategy="ddp"``: one process per device; ranks collect with their own env seeds and the
  rule synchronises what it needs (gradients, fitness) with explicit collectives. The module is
  not wrapped in ``DistributedDataParallel``: rules run any number of backward passes per
  iteration (or none), through losses whose parameters live outside the forward pass.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_only

from unitrain.envs.info import EnvInfo, env_info
from unitrain.envs.spec import EnvSpec, as_env_spec
from unitrain.errors import ConfigError, UserError, check
from unitrain.policy.ckpt_file import load_checkpoint_file
from unitrain.policy.module import RLModule
from unitrain.rules.base import UpdateRule
from unitrain.rules.population.strategy import Strategy, as_rule
from unitrain.rules.registry import check_actions, registered_rules
from unitrain.run.adapter import RunAdapter, default_eval_every
from unitrain.run.loggers import check_callback, check_logger, make_callback, make_logger
from unitrain.run.progress import FrameProgressBar
from unitrain.run.safety import AtomicCheckpointIO, atomic_write, slurm_restarted
from unitrain.run.services import RunServices
from unitrain.validation import Validated

__all__ = ["Trainer", "RuleDDPStrategy", "EarlyStop", "TrainerConfig", "RunCheckpoint",
           "print_summary", "upgrade_callback_states"]

_RUN_DIR_ENV = "UNITRAIN_RUN_DIR"


class RuleDDPStrategy(DDPStrategy):
    """Lightning's DDP process launch and process group, without the ``DistributedDataParallel``
    wrapper: rank 0's parameters and buffers are broadcast once, then the rule synchronises."""

    strategy_name = "unitrain_ddp"

    def configure_ddp(self) -> None:
        assert self.model is not None
        with torch.no_grad():
            for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
                torch.distributed.broadcast(tensor, src=0)

    def setup_distributed(self) -> None:
        super().setup_distributed()
        # The group outlives fit (a script may fit again), but gloo's threads must be stopped
        # before the interpreter exits, or the process can abort on the way out.
        atexit.unregister(_destroy_process_group)
        atexit.register(_destroy_process_group)


# Lightning warnings about choices unitrain makes on purpose, with the reason for each.
_EXPECTED_WARNINGS = (
    # The adapter takes the training iterator itself to end an evaluation period on time.
    r".*`dataloader_iter`.*",
    # A resumed run writes its checkpoints where the interrupted run wrote them.
    r"Checkpoint directory .* exists and is not empty",
    # Lightning's own use of a torch pytree API deprecated in newer torch releases.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
    # gymnasium's own MuJoCo model files use an attribute MuJoCo deprecates.
    r"MuJoCo: compiler attribute 'settotalmass' is deprecated.*",
    # eval/* and test/* are computed from every process's episodes or samples already, so
    # Lightning's own reduction across processes would only repeat that.
    r"It is recommended to use `self.log\('(eval|test)/.*sync_dist=True.*",
    # EnvPool declares float64 bounds for float32 spaces; gymnasium notes the cast.
    r".*Box (low|high)'s precision lowered by casting to float32.*",
)


def quiet_console() -> None:
    """No banner, tips or warnings about unitrain's own choices on the console."""
    # Lightning's banner (accelerators available and used) and tips, and TorchRL's notes on
    # storage it allocates, are INFO records.
    for name in ("lightning.pytorch", "lightning.fabric", "torchrl"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _just_below(value: float | None) -> float | None:
    """The next float32 below ``value`` (metrics are compared as float32 tensors)."""
    if value is None:
        return None
    below = torch.nextafter(torch.tensor(float(value), dtype=torch.float32),
                            torch.tensor(-math.inf))
    return float(below)


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@dataclass
class EarlyStop(Validated):
    """Stop when the evaluation return reaches ``threshold`` or stops improving.

    Args:
        threshold: stop once ``eval/return_mean`` ≥ this value (``None``: no threshold).
        patience: evaluations without improvement before stopping.
    """

    threshold: float | None = None
    patience: int = 1_000_000

    block: ClassVar[str] = "trainer.early_stop"

    def validate(self) -> None:
        check(self.patience >= 1, "patience", "an integer >= 1", self.patience)


@dataclass
class TrainerConfig(Validated):
    """The ``trainer:`` block: arguments of :class:`unitrain.Trainer`.

    Args:
        max_frames: env-frame budget summed over processes.
        devices: processes (one per device).
        strategy: ``"auto"`` or ``"ddp"``.
        accelerator: ``"auto"``, ``"cpu"``, ``"gpu"``.
        num_nodes: machines (launched by torchrun/SLURM).
        eval_every_frames: env frames between evaluations and checkpoints (null: a tenth of
            ``max_frames``).
        eval_episodes: episodes per evaluation.
        early_stop: stop on ``eval/return_mean`` (``threshold``, ``patience``), or null.
        num_threads: torch threads per process (null: 1).
        max_epochs: passes over the training data of a supervised run (null: unbounded).
        video_every_frames: env frames between episode videos in TensorBoard (null: none).
        loggers: the run's loggers (:mod:`unitrain.run.loggers`): names (``tensorboard``,
            ``csv``, ``mlflow``) or mappings (``{name: csv, ...}``, ``{target: pkg.mod:Logger,
            ...}``); TensorBoard, the run's own record, is always written.
        callbacks: Lightning callbacks, ``{target: pkg.mod:Callback, **arguments}`` each.
    """

    max_frames: int | None = 100_000
    devices: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    num_nodes: int = 1
    eval_every_frames: int | None = None
    eval_episodes: int = 10
    early_stop: EarlyStop | None = None
    num_threads: int | None = None
    max_epochs: int | None = None
    video_every_frames: int | None = None
    loggers: list[Any] = field(default_factory=lambda: ["tensorboard"])
    callbacks: list[Any] = field(default_factory=list)

    block: ClassVar[str] = "trainer"

    def validate(self) -> None:
        check(self.max_frames is None or self.max_frames > 0, "max_frames", "an integer > 0 or null",
              self.max_frames)
        check(self.devices >= 1, "devices", "an integer >= 1", self.devices)
        check(self.strategy in ("auto", "ddp"), "strategy", "'auto' or 'ddp'", self.strategy)
        check(self.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"), "accelerator",
              "one of auto, cpu, gpu, cuda, mps", self.accelerator)
        check(self.num_nodes >= 1, "num_nodes", "an integer >= 1", self.num_nodes)
        check(self.eval_every_frames is None or self.eval_every_frames >= 1, "eval_every_frames",
              "an integer >= 1 or null", self.eval_every_frames)
        check(self.eval_episodes >= 1, "eval_episodes", "an integer >= 1", self.eval_episodes)
        check(self.max_epochs is None or self.max_epochs >= 1, "max_epochs",
              "an integer >= 1 or null", self.max_epochs)
        check(self.num_threads is None or self.num_threads >= 1, "num_threads",
              "an integer >= 1 or null", self.num_threads)
        check(self.video_every_frames is None or self.video_every_frames >= 1,
              "video_every_frames", "an integer >= 1 or null", self.video_every_frames)
        for i, spec in enumerate(self.loggers):
            check_logger(spec, f"loggers[{i}]")
        for i, spec in enumerate(self.callbacks):
            check_callback(spec, f"callbacks[{i}]")

    def trainer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`unitrain.Trainer`."""
        return {"max_frames": self.max_frames, "devices": self.devices, "strategy": self.strategy,
                "accelerator": self.accelerator, "num_nodes": self.num_nodes,
                "eval_every_frames": self.eval_every_frames, "eval_episodes": self.eval_episodes,
                "early_stop": self.early_stop, "num_threads": self.num_threads,
                "video_every_frames": self.video_every_frames,
                **({} if self.loggers == ["tensorboard"] else {"logger": list(self.loggers)}),
                "callbacks": [make_callback(spec, f"trainer.callbacks[{i}]")
                              for i, spec in enumerate(self.callbacks)],
                **({} if self.max_epochs is None else {"max_epochs": self.max_epochs})}


class Trainer(L.Trainer):
    """Train an :class:`~unitrain.RLModule` with an update rule.

    Args:
        env: a gymnasium id (``"module:id"`` imports ``module`` first), an
            :class:`~unitrain.envs.EnvSpec`, or a TorchRL ``EnvBase`` instance or a factory
            returning one (:meth:`EnvSpec.from_env`); ``None`` for supervised runs that pass a
            dataloader to :meth:`fit`.
        optimizer: the update rule, e.g. ``unitrain.optim.PPO()``.
        max_frames: env-frame budget summed over processes (``None``: no budget). The run stops
            after the iteration that reaches it; ``summary["frames_over_budget"]`` says by how
            many frames that iteration went past it.
        num_envs: shortcut for ``EnvSpec.num_envs`` when ``env`` is an id or a TorchRL env.
        eval_every_frames: env frames between deterministic evaluations (and checkpoints);
            ``None``: a tenth of ``max_frames`` (100,000 without a budget).
        eval_episodes: episodes per evaluation, split across processes.
        video_every_frames: env frames between videos of an evaluation episode logged to
            TensorBoard (``eval/video``, an animated GIF under Images; see :mod:`unitrain.run.video`);
            ``None`` (default): no videos.
        early_stop: an :class:`EarlyStop` (or dict of its fields) on ``eval/return_mean``.
        seed: seeds networks, envs (per rank) and the rule.
        num_threads: torch intra-op threads per process (default 1).
        run_dir: where logs, checkpoints and ``summary.json`` go (default ``runs/<env>-<rule>/<time>``).
        logger: as for ``lightning.Trainer``; ``True`` (default): TensorBoard in ``run_dir``,
            whose curves a resumed run continues without repeating steps. Loggers passed here
            are used as given, with that TensorBoard logger added unless one of them is a
            ``TensorBoardLogger`` or ``tensorboard=False``. A logger may also be named, as in a
            recipe's ``trainer.loggers`` (``"csv"``, ``"mlflow"``, ``{"name": "csv", ...}``,
            ``{"target": "pkg.mod:MyLogger", ...}``; :mod:`unitrain.run.loggers`): it then
            writes inside ``run_dir``.
        tensorboard: add the run's TensorBoard logger to loggers passed as ``logger=``.
        callbacks: as for ``lightning.Trainer``; a ``ModelCheckpoint`` given here writes its
            files besides unitrain's own ``last.ckpt`` and ``best.ckpt``, which resuming
            (``ckpt_path="last"``) and ``summary["checkpoint"]`` read.
        devices, strategy, accelerator, **kwargs: as for ``lightning.Trainer``;
            ``strategy="ddp"`` selects unitrain's DDP launch. With ``enable_progress_bar=False``
            :meth:`fit` prints no summary lines either.
    """

    def __init__(self, env: Any = None, optimizer: UpdateRule | Strategy | None = None, *,
                 max_frames: int | None = None, num_envs: int | None = None,
                 eval_every_frames: int | None = None, eval_episodes: int = 10,
                 early_stop: EarlyStop | dict | None = None, seed: int = 0,
                 num_threads: int | None = None, video_every_frames: int | None = None,
                 run_dir: str | os.PathLike | None = None, devices: Any = 1, strategy: Any = "auto",
                 accelerator: str = "auto", callbacks: list | None = None, logger: Any = True,
                 tensorboard: bool = True, **kwargs: Any) -> None:
        optimizer = as_rule(optimizer)  # a population strategy runs under the population service
        if not isinstance(optimizer, UpdateRule):
            raise UserError("Trainer: optimizer= must be an update rule or a population strategy, "
                            "e.g. unitrain.optim.PPO() or unitrain.optim.ES(); "
                            f"got {type(optimizer).__name__}")
        if "eval_every" in kwargs:
            raise UserError("Trainer: eval_every (rule iterations) is now eval_every_frames "
                            "(env frames between evaluations)")
        env = as_env_spec(env, num_envs)
        check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "seed",
              "an integer >= 0", seed)
        # The same checks as a recipe's trainer: block, with the same keys in the messages.
        settings = TrainerConfig(max_frames=max_frames, eval_every_frames=eval_every_frames,
                                 eval_episodes=eval_episodes, early_stop=early_stop,
                                 num_threads=num_threads, video_every_frames=video_every_frames)
        # Checks across blocks (a batch size against env.num_envs, a rule against the action
        # space), before anything is written.
        self.env_info = env_info(env) if env is not None else None
        if env is not None:
            _check_named_observations(optimizer, self.env_info)
            check_actions(optimizer, self.env_info)
            optimizer.check_env(env, self.env_info)
            if max_frames is not None:
                _warn_budget(optimizer.budget_warning(max_frames, _processes(devices, kwargs)))
        elif not optimizer.supervised_only:
            supervised = [n for n, r in registered_rules().items() if r.supervised_only]
            raise ConfigError("env", f"{optimizer.name} needs an env (a gymnasium id or a "
                                     f"unitrain.EnvSpec); only {', '.join(supervised)} train on "
                                     "a dataloader")
        if video_every_frames is not None:
            if env is None:
                raise ConfigError("video_every_frames", "videos need an env; this run has none")
            from unitrain.run.video import prepare_rendering

            prepare_rendering(env)
        early_stop = settings.early_stop
        self.env_spec, self.rule = env, optimizer
        self.video_every_frames = video_every_frames
        self.max_frames, self.seed, self.num_threads = max_frames, seed, num_threads or 1
        self.eval_every_frames = eval_every_frames or default_eval_every(max_frames)
        self.eval_episodes = eval_episodes
        self.run_dir = _resolve_run_dir(run_dir, env, optimizer)
        _check_writable(self.run_dir)
        self._created_dir: Path | None = None
        self.summary: dict[str, Any] | None = None
        L.seed_everything(seed, workers=True, verbose=False)
        quiet_console()

        callbacks = list(callbacks or [])
        # unitrain's own checkpoints, beside any the caller adds: resume and summary["checkpoint"]
        # read last.ckpt whatever other ModelCheckpoints write.
        ckpt_dir = self.run_dir / "checkpoints"
        self._run_checkpoints = [RunCheckpoint("last", ckpt_dir)]
        if env is not None:
            self._run_checkpoints.append(RunCheckpoint("best", ckpt_dir))
        callbacks += self._run_checkpoints
        if early_stop is not None:
            callbacks.append(EarlyStopping(monitor="eval/return_mean", mode="max",
                                           patience=early_stop.patience,
                                           # Lightning stops when the value *exceeds* its
                                           # threshold; EarlyStop's is reached at equality
                                           # (CartPole's 500 is a maximum).
                                           stopping_threshold=_just_below(early_stop.threshold),
                                           check_on_train_epoch_end=False))
        if kwargs.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(FrameProgressBar())
        # The Trainer's own logger; a resumed run replaces it (_continue_logs).
        self._own_logger: TensorBoardLogger | None = None
        logger = _named_loggers(logger, self.run_dir)
        if logger is True:
            logger = self._own_logger = run_logger(self.run_dir)
        elif tensorboard and logger not in (False, None):
            loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
            if not any(isinstance(lg, TensorBoardLogger) for lg in loggers):
                self._own_logger = run_logger(self.run_dir)
                logger = [*loggers, self._own_logger]
        self.summary_lines = bool(kwargs.get("enable_progress_bar", True))
        if strategy == "ddp" or (strategy == "auto" and _many(devices)):
            strategy = RuleDDPStrategy()
        if accelerator == "auto" and not torch.cuda.is_available():
            accelerator = "cpu"
        kwargs.setdefault("max_epochs", -1)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("log_every_n_steps", 1)
        # Supervised runs split their dataloader's batches across ranks with Lightning's
        # distributed sampler; env runs feed an iteration counter that every rank must see whole.
        kwargs.setdefault("use_distributed_sampler", env is None)
        kwargs.setdefault("enable_model_summary", False)
        # Checkpoints are written atomically (unitrain.run.safety), unless the caller brings its own
        # checkpoint I/O.
        plugins = list(kwargs.pop("plugins", None) or [])
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO(upgrade=upgrade_callback_states))
        kwargs["plugins"] = plugins
        super().__init__(devices=devices, strategy=strategy, accelerator=accelerator,
                         callbacks=callbacks, logger=logger, default_root_dir=str(self.run_dir),
                         **kwargs)

    def fit(self, model: RLModule, train_dataloaders: Any = None, val_dataloaders: Any = None,
            datamodule: Any = None, ckpt_path: str | None = None, init: str | None = None,
            **kwargs: Any) -> None:
        """Train ``model``; ``ckpt_path`` resumes a run from a checkpoint (``"last"`` allowed).

        A supervised run (no env) passes ``train_dataloaders`` of ``(input, target)`` pairs and
        optionally ``val_dataloaders``, on which ``test/accuracy`` is measured after every epoch.
        ``init`` starts from the policy of another run's checkpoint (any rule's; see
        :meth:`RLModule.load_policy`) with this run's rule, counters and optimizers fresh.
        Afterwards :attr:`summary` holds the final evaluation, frames, wall time and checkpoint
        path, also written to ``summary.json`` in the run directory.
        """
        if not isinstance(model, RLModule):
            raise UserError(f"Trainer.fit: {type(model).__name__} is not a unitrain.RLModule; "
                            "subclass unitrain.RLModule to train it with an update rule")
        if self.env_spec is None and train_dataloaders is None and datamodule is None:
            raise UserError("Trainer.fit: give the Trainer an env= or pass train_dataloaders")
        if self.env_spec is None and self.max_epochs in (None, -1) and self.max_steps == -1:
            raise UserError("Trainer.fit: a supervised run needs max_epochs= or max_steps=")
        start = time.perf_counter()
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if ckpt_path is None and init is None and slurm_restarted() and last.is_file():
            ckpt_path = "last"  # a requeued SLURM job goes on where it was stopped
        if ckpt_path == "last":
            if not last.is_file():
                raise UserError(f"Trainer.fit: ckpt_path='last': no checkpoint at {last}; leave "
                                "ckpt_path out to start a new run, or give a .ckpt path")
            ckpt_path = str(last)
        resumed = None if ckpt_path is None else _run_state(ckpt_path)
        if resumed is not None and self._finished(resumed):
            return
        self._created_dir = _probe_run_dir(self.run_dir)
        if self.local_rank == 0:
            # Temporary files of checkpoint writes that a killed run left half-way.
            for stale in (self.run_dir / "checkpoints").glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        try:
            services = RunServices(model, self.env_spec, self.seed, self.max_frames,
                                   env_info=self.env_info)
            self.rule.check_module(model)
            if init is not None:
                _init_from(model, services, init)
            run = RunAdapter(model, self.rule, services, self.eval_every_frames,
                             self.eval_episodes, self.num_threads, self.video_every_frames)
            model._ctx = run
            if self.env_spec is not None and train_dataloaders is None:
                train_dataloaders, val_dataloaders = run.train_iterable(), run.val_iterable()
            if resumed is None:
                self._log_run_config(model)
            else:
                self._continue_logs(resumed)
            # Training randomness starts from the seed however the module was built.
            L.seed_everything(self.seed, workers=True, verbose=False)
            super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)
        except BaseException:
            self._clean_failed_start()
            raise
        self.summary = self._summarize(run, time.perf_counter() - start)
        if self.summary_lines and self.global_rank == 0:
            print_summary(self.summary)

    def _finished(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` (a checkpoint's) is the end of a run that finished within this
        budget; then :attr:`summary` is that run's summary, marked ``"finished": True``."""
        summary_path = self.run_dir / "summary.json"
        if self.env_spec is None or self.max_frames is None or not summary_path.is_file():
            return False
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            return False
        if (summary.get("frames") or -1) < self.max_frames or state.get("frames") != summary["frames"]:
            return False
        self.summary = {**summary, "finished": True}
        return True

    def _continue_logs(self, state: dict[str, Any]) -> None:
        """Make a resumed run's TensorBoard curves continue the interrupted ones: the Trainer's
        own logger is replaced by one that hides what the interrupted run logged after its
        checkpoint (TensorBoard's ``purge_step``); the run configuration was logged by the first
        segment. A logger passed to the Trainer is used as it was given."""
        own = self._own_logger
        if own is None or not any(logger is own for logger in self.loggers):
            return
        step = state.get("frames", 0) if self.env_spec is not None else state.get("iteration", 0)
        fresh = run_logger(self.run_dir, purge_step=int(step) + 1)
        self.loggers = [fresh if logger is own else logger for logger in self.loggers]
        self._own_logger = fresh

    def _clean_failed_start(self) -> None:
        """Remove the run directory this Trainer created if no checkpoint was written in it."""
        created = self._created_dir
        if created is None or not created.exists():
            return
        if any(created.rglob("*.ckpt")):
            return
        shutil.rmtree(created, ignore_errors=True)

    def _log_run_config(self, model: RLModule) -> None:
        hp: dict[str, Any] = {"seed": self.seed, "max_frames": self.max_frames,
                              "eval_every_frames": self.eval_every_frames,
                              "eval_episodes": self.eval_episodes,
                              "num_threads": self.num_threads,
                              "devices": self.num_devices if hasattr(self, "num_devices") else 1}
        hp.update({f"module/{k}": v for k, v in dict(model.hparams).items()})
        hp["module/class"] = type(model).__qualname__
        hp.update({f"optimizer/{k}": v for k, v in self.rule.config().items()})
        if self.env_spec is not None:
            hp.update({f"env/{k}": v for k, v in self.env_spec.record().items()
                       if k not in ("kwargs", "make_passed")})
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(
                    {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hp.items()},
                    metrics={"final/return_mean": float("nan")})
            else:
                logger.log_hyperparams(hp)

    def _summarize(self, run: RunAdapter, wall_s: float) -> dict[str, Any]:
        paths = {c.role: c.best_model_path or None for c in self._run_checkpoints}
        last, best = paths.get("last"), paths.get("best")
        final = run.final_eval or {}
        s = run.services
        segments = run.segments(wall_s)
        summary = {
            "eval/return_mean": final.get("return_mean"),
            "eval/return_std": final.get("return_std"),
            "eval/episodes": final.get("episodes"),
            "frames": s.frames,
            "max_frames": self.max_frames,
            "frames_over_budget": (max(0, s.frames - self.max_frames)
                                   if self.max_frames is not None else None),
            "iterations": s.iteration,
            "wall_s": round(sum(seg["wall_s"] for seg in segments), 2),
            "segments": segments,
            "checkpoint": last,
            "best_checkpoint": best,
            "run_dir": str(self.run_dir),
            "optimizer": self.rule.name,
            "env": self.env_spec.id if self.env_spec else None,
            "seed": self.seed,
            "world_size": s.world_size,
        }
        # Numeric test metrics of supervised runs (``test/accuracy``) from the last evaluation.
        for key, value in self.callback_metrics.items():
            if key.startswith("test/"):
                summary[key] = float(value)
        _write_summary(self.run_dir, summary)
        return summary


class RunCheckpoint(ModelCheckpoint):
    """One of unitrain's own checkpoints in ``checkpoints/``: ``last`` (after every evaluation)
    or ``best`` (highest ``eval/return_mean``).

    Two callbacks, because Lightning's ``save_last`` only fires when the monitored checkpoint is
    rewritten, and a resumable run needs the latest state after every evaluation. Their state
    keys are their own, so a caller's ``ModelCheckpoint`` of any settings runs beside them.
    """

    def __init__(self, role: str, dirpath: Path) -> None:
        self.role = role
        settings: dict[str, Any] = dict(dirpath=dirpath, filename=role, save_top_k=1,
                                        enable_version_counter=False)
        if role == "best":
            settings.update(monitor="eval/return_mean", mode="max")
        super().__init__(**settings)
        # The key a plain ModelCheckpoint of these settings had (checkpoints before 0.2.0).
        self.legacy_key = ModelCheckpoint(**settings).state_key

    @property
    def state_key(self) -> str:
        return f"unitrain.{self.role}"


def upgrade_callback_states(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Give the states of unitrain's checkpoint callbacks in a checkpoint written before 0.2.0
    (keyed as plain ``ModelCheckpoint``\ s) the keys of :class:`RunCheckpoint`."""
    states = checkpoint.get("callbacks")
    if isinstance(states, dict):
        for role in ("last", "best"):
            cb = RunCheckpoint(role, Path("."))
            if cb.state_key not in states and cb.legacy_key in states:
                states[cb.state_key] = states.pop(cb.legacy_key)
    return checkpoint


def print_summary(summary: dict[str, Any]) -> None:
    """The lines that end a run on the console: its result, checkpoint and outputs."""
    ret = summary.get("eval/return_mean")
    if ret is None and "test/accuracy" in summary:
        print(f"\nunitrain: {summary['optimizer']}: test accuracy {summary['test/accuracy']:.4f} "
              f"after {summary['iterations']} iterations, {summary['wall_s']:.1f} s")
    else:
        ret_s = "n/a" if ret is None else f"{ret:.1f} ± {summary.get('eval/return_std') or 0:.1f}"
        over = summary.get("frames_over_budget") or 0
        over_s = f" ({over} past the budget: the last iteration's)" if over else ""
        print(f"\nunitrain: {summary['optimizer']} on {summary['env']}: eval return {ret_s} "
              f"over {int(summary.get('eval/episodes') or 0)} episodes, {summary['frames']} "
              f"frames{over_s}, {summary['wall_s']:.1f} s")
    print(f"unitrain: checkpoint {summary['checkpoint']}")
    print(f"unitrain: summary {Path(summary['run_dir']) / 'summary.json'}; "
          f"tensorboard --logdir {summary['run_dir']}")


def _check_named_observations(rule: Any, info: EnvInfo) -> None:
    """Refuse, in one line, a Dict/Tuple observation for a rule that cannot train on one."""
    if info.obs_shapes is None or getattr(rule, "named_observations", True):
        return
    able = [n for n, r in registered_rules().items()
            if r.named_observations and not r.supervised_only]
    raise ConfigError("env", f"{rule.name} does not train on Dict/Tuple observations ({info.id} "
                             f"has entries {', '.join(info.obs_shapes)}); rules that do: "
                             f"{', '.join(able)}")


def _run_state(ckpt_path: str) -> dict[str, Any]:
    """The ``unitrain`` state of a checkpoint (memory-mapped: its tensors are not read)."""
    return load_checkpoint_file(ckpt_path, mmap=True).get("unitrain", {})


def _init_from(module: RLModule, services: RunServices, checkpoint: str) -> None:
    """Start ``module`` (and the run's observation statistics) from another run's checkpoint."""
    module.load_policy(checkpoint)
    norm = services.obs_norm
    if norm is not None:
        state = load_checkpoint_file(checkpoint).get("unitrain", {})
        if state.get("obs_norm") is not None:
            norm.load_state_dict(state["obs_norm"])


def _named_loggers(logger: Any, run_dir: Path) -> Any:
    """``logger`` with the loggers it names (:mod:`unitrain.run.loggers`) built in ``run_dir``;
    the name ``tensorboard`` stands for the run's own logger, added by the Trainer."""
    if isinstance(logger, (str, dict)):
        logger = [logger]
    if not (isinstance(logger, (list, tuple)) and any(isinstance(x, (str, dict)) for x in logger)):
        return logger
    built = [make_logger(x, run_dir, f"logger[{i}]") if isinstance(x, (str, dict)) else x
             for i, x in enumerate(logger)]
    return [x for x in built if x is not None] or True


def run_logger(run_dir: Path, purge_step: int | None = None) -> TensorBoardLogger:
    """The Trainer's own logger: TensorBoard event files and ``hparams.yaml`` in ``run_dir``.

    Args:
        run_dir: the run directory.
        purge_step: events that earlier launches logged at this step or later are hidden
            (a resumed run's: one past its checkpoint's step). ``TensorBoardLogger`` hands its
            extra keyword arguments to ``SummaryWriter``, whose ``purge_step`` this is.

    Returns:
        The logger (its event file is created on first use).
    """
    return TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False,
                             purge_step=purge_step)


@rank_zero_only
def _write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode(),
                 what="summary")


@rank_zero_only
def _warn_budget(line: str | None) -> None:
    if line:
        print(f"unitrain: warning: {line}", file=sys.stderr, flush=True)


def _processes(devices: Any, kwargs: dict[str, Any]) -> int:
    """Processes a run will have, as far as the arguments tell (1 when they do not)."""
    per_node = devices if isinstance(devices, int) and devices > 0 else (
        len(devices) if isinstance(devices, (list, tuple)) else 1)
    return per_node * int(kwargs.get("num_nodes", 1) or 1)


def _many(devices: Any) -> bool:
    if isinstance(devices, int):
        return devices > 1 or devices == -1
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    return isinstance(devices, str) and devices not in ("1", "auto")


def _check_writable(path: Path) -> None:
    """Raise :class:`UserError` unless ``path`` could be created and written (creates nothing)."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        why = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = "Permission denied"
    else:
        return
    raise UserError(f"run_dir: cannot write to {path} ({why}); choose a writable run_dir=")


def _probe_run_dir(path: Path) -> Path | None:
    """Check that ``path`` can be written; return the topmost directory this created (if any).

    Raises:
        UserError: the directory cannot be created or written to.
    """
    top = None
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        top = parent
    probe = path / f".unitrain-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run_dir: cannot write to {path} ({e.strerror or type(e).__name__}); "
                        "choose a writable run_dir=") from None
    return top


def _resolve_run_dir(run_dir: str | os.PathLike | None, env: EnvSpec | None,
                     rule: UpdateRule) -> Path:
    """The run directory, identical in every process of a multi-process run."""
    if run_dir is None and "LOCAL_RANK" in os.environ:
        run_dir = os.environ.get(_RUN_DIR_ENV)
    if run_dir is None:
        env_name = re.sub(r"[^A-Za-z0-9]+", "-", env.id if env else "supervised").strip("-").lower()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{env_name}-{rule.name}" / stamp
    path = Path(run_dir)
    # Processes started by the DDP launcher inherit the environment, hence the same directory.
    os.environ[_RUN_DIR_ENV] = str(path)
    return path

