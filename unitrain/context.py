"""The run context: the services a rule receives, and the bookkeeping of one training run.

:class:`RunContext` implements :class:`~unitrain.optim.base.RuleContext` for a rule and does the
Lightning-side work of an :class:`~unitrain.RLModule`: one ``training_step`` is one rule
iteration; metrics are reduced across ranks in one collective and logged against the frame count;
the frame budget stops the run; a validation step is a deterministic evaluation (in a supervised
run, the accuracy of the logits' argmax on the validation loader); checkpoints carry
the rule's state, frame count and every rank's RNG states.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from unitrain.collect import make_collector
from unitrain.envs import EnvInfo, EnvSpec, ObsNorm, VecGymEnv, derive_seed, env_info, make_env

if TYPE_CHECKING:
    from torchrl.collectors import Collector

    from unitrain.module import RLModule
    from unitrain.optim.base import UpdateRule

__all__ = ["RunContext"]

# Streams of derived seeds, so that no two uses of the run seed collide.
_TRAIN_ENV, _RULE, _EVAL_ENV, _SHARED = 0, 1, 2, 3
_MAX_EVAL_ENVS = 32


class _Ticks:
    """The iterable Lightning loops over: ``n`` iterations per epoch, then an evaluation."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class RunContext:
    """Services and bookkeeping of one run (see :class:`~unitrain.optim.base.RuleContext`).

    Args:
        module: the module being trained.
        rule: the update rule.
        env_spec: the environment (``None`` for supervised runs fed by a dataloader).
        seed: the run seed.
        max_frames: frame budget summed over ranks (``None``: unbounded).
        eval_every: rule iterations between evaluations.
        eval_episodes: episodes per evaluation (split across ranks).
        num_threads: torch threads per process (``None``: the cores divided among the local
            processes; oversubscribed cores make small matrix products many times slower).
    """

    def __init__(self, module: "RLModule", rule: "UpdateRule", env_spec: EnvSpec | None,
                 seed: int, max_frames: int | None, eval_every: int, eval_episodes: int,
                 num_threads: int | None = None) -> None:
        self.module, self.rule, self.env_spec = module, rule, env_spec
        self.seed, self.max_frames = seed, max_frames
        self.eval_every, self.eval_episodes = eval_every, eval_episodes
        self.num_threads = num_threads
        self.rank, self.world_size = 0, 1
        self.frames = 0
        self.iteration = 0
        self.eval_count = 0
        self.batch: Any = None
        self.env_info: EnvInfo | None = None
        self.obs_norm: ObsNorm | None = None
        self.generator = torch.Generator()
        self.last_eval: dict[str, float] | None = None
        self.final_eval: dict[str, float] | None = None
        self._train_env: VecGymEnv | None = None
        self.train_env_seed: int | None = None
        self._eval_envs: dict[int, VecGymEnv] = {}
        self._last_return = float("nan")
        self._correct = self._seen = 0.0
        self._clock: float | None = None
        self._start_time = time.perf_counter()
        if env_spec is not None:
            self.env_info = env_info(env_spec)
            module.env_info = self.env_info
            if env_spec.obs_norm:
                self.obs_norm = ObsNorm(self.env_info.obs_shape)

    # ------------------------------------------------------------------ RuleContext services
    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def progress(self) -> float:
        if not self.max_frames:
            return 0.0
        return min(1.0, self.frames / self.max_frames)

    def shared_generator(self, *stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, _SHARED, *stream))

    def train_env(self) -> VecGymEnv:
        if self._train_env is None:
            assert self.env_spec is not None, "this run has no env"
            # The frame count enters the seed so that a resumed run starts fresh episodes.
            self.train_env_seed = derive_seed(self.seed, _TRAIN_ENV, self.rank, self.frames)
            self._train_env = make_env(self.env_spec, self.train_env_seed, self.obs_norm,
                                       update_norm=True)
        return self._train_env

    def make_env(self, num_envs: int, seed: int, train: bool = False) -> VecGymEnv:
        assert self.env_spec is not None, "this run has no env"
        return make_env(self.env_spec, seed, self.obs_norm, update_norm=train, num_envs=num_envs)

    def collector(self, policy: Any, frames_per_batch: int) -> "Collector":
        return make_collector(self.train_env(), policy, frames_per_batch, self.device)

    @torch.no_grad()
    def evaluate(self, episodes: int, act: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, float]:
        if act is None:
            act = lambda obs: self.rule.act(self.module, obs)  # noqa: E731
        mine = episodes // self.world_size + int(self.rank < episodes % self.world_size)
        returns, lengths = self._run_episodes(mine, act)
        self.eval_count += 1
        # Every rank contributes the same number of slots (NaN-padded) to one gather.
        width = math.ceil(episodes / self.world_size)
        local = torch.full((2, width), float("nan"), dtype=torch.float64)
        local[0, : len(returns)] = torch.as_tensor(returns, dtype=torch.float64)
        local[1, : len(lengths)] = torch.as_tensor(lengths, dtype=torch.float64)
        gathered = self.all_gather(local.to(self.device)).cpu()
        rets = gathered[:, 0].flatten()
        lens = gathered[:, 1].flatten()
        rets, lens = rets[~rets.isnan()], lens[~lens.isnan()]
        return {"return_mean": rets.mean().item(), "return_std": rets.std(unbiased=False).item(),
                "return_max": rets.max().item(), "return_min": rets.min().item(),
                "length_mean": lens.mean().item(), "episodes": float(len(rets))}

    def _run_episodes(self, n: int, act: Callable[[torch.Tensor], torch.Tensor]
                      ) -> tuple[list[float], list[int]]:
        returns: list[float] = []
        lengths: list[int] = []
        wave = 0
        while len(returns) < n:
            k = min(n - len(returns), _MAX_EVAL_ENVS)
            env = self._eval_envs.get(k)
            if env is None:
                env = self._eval_envs[k] = self.make_env(k, 0)
            env.set_seed(derive_seed(self.seed, _EVAL_ENV, self.rank, self.eval_count, wave))
            td = env.reset()
            ret = torch.zeros(k, dtype=torch.float64)
            length = torch.zeros(k, dtype=torch.int64)
            active = torch.ones(k, dtype=torch.bool)
            while active.any():
                td["action"] = act(td["observation"].to(self.device)).cpu()
                out, td = env.step_and_maybe_reset(td)
                ret += out["next", "reward"].squeeze(-1).double() * active
                length += active
                active &= ~out["next", "done"].squeeze(-1)
            returns += ret.tolist()
            lengths += length.tolist()
            wave += 1
        return returns, lengths

    def all_reduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, ops[op])
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        if self.world_size == 1:
            return
        params = [p for p in params if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        self.all_reduce_(flat, "mean")
        offset = 0
        for p in params:
            n = p.numel()
            g = flat[offset: offset + n].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += n

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def sync_obs_norm(self) -> None:
        if self.obs_norm is not None:
            # The statistics live with the envs on the CPU; the collective runs on the device.
            self.obs_norm.sync(lambda t: self.all_gather(t.to(self.device)).cpu())

    # ------------------------------------------------------------------ Lightning side
    def setup(self) -> None:
        """Called from ``RLModule.setup("fit")`` once ranks are known."""
        trainer = self.module.trainer
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        local = max(1, trainer.num_devices) if trainer.world_size > 1 else 1
        torch.set_num_threads(self.num_threads or max(1, (os.cpu_count() or 1) // local))
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, _RULE, self.rank))
        self.rule.setup(self.module, self)

    def train_iterable(self) -> Iterable[Any]:
        return _Ticks(self.eval_every)

    def val_iterable(self) -> Iterable[Any]:
        return [0]

    def training_step(self, batch: Any) -> None:
        self.batch = batch
        if self._clock is None:
            self._clock = time.perf_counter()
        metrics = {k: float(v) for k, v in self.rule.step(self).items()}
        local_frames = metrics.pop("frames", 0.0)
        self.sync_obs_norm()
        metrics.update(self._episode_stats())
        keys = sorted(metrics)
        values = torch.tensor([local_frames] + [metrics[k] for k in keys], dtype=torch.float64)
        rows = self.all_gather(values.to(self.device)).cpu()
        frames = int(rows[:, 0].sum().item())
        reduced = {k: _reduce(k, rows[:, i + 1]) for i, k in enumerate(keys)}
        self.frames += frames
        self.iteration += 1
        # Lightning counts optimizer steps as global steps; one rule iteration is one step here,
        # whether the rule stepped an optimizer zero or many times (checkpoint and step-based
        # callbacks key on it).
        progress = self.module.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        now = time.perf_counter()
        reduced["perf/frames_per_s"] = frames / max(now - self._clock, 1e-9)
        reduced["perf/iteration"] = float(self.iteration)
        self._clock = now
        if not math.isnan(reduced.get("episode/return_mean", float("nan"))):
            self._last_return = reduced["episode/return_mean"]
        self._log({k: v for k, v in reduced.items() if not math.isnan(v)})
        m = self.module
        if self.env_spec is not None:
            m.log("return", self._last_return, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
            m.log("fps", reduced["perf/frames_per_s"], prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
            m.log("frames", float(self.frames), prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=1)
        if self.max_frames is not None and self.frames >= self.max_frames:
            m.trainer.should_stop = True

    def _episode_stats(self) -> dict[str, float]:
        done = self._train_env.pop_finished() if self._train_env is not None else []
        if not done:
            nan = float("nan")
            return {"episode/return_mean": nan, "episode/return_max": nan,
                    "episode/return_min": nan, "episode/length_mean": nan}
        rets = np.array([r for r, _ in done])
        lens = np.array([n for _, n in done])
        return {"episode/return_mean": float(rets.mean()), "episode/return_max": float(rets.max()),
                "episode/return_min": float(rets.min()), "episode/length_mean": float(lens.mean())}

    def validation_step(self, batch: Any) -> None:
        if self.env_spec is None:
            self._count_correct(batch)
            return
        res = self.evaluate(self.eval_episodes)
        self.last_eval = res
        self._log({f"eval/{k}": v for k, v in res.items()})
        self.module.log("eval/return_mean", res["return_mean"], prog_bar=True, logger=False,
                        on_step=False, on_epoch=True, batch_size=1)

    @torch.no_grad()
    def _count_correct(self, batch: Any) -> None:
        """Accumulate correct predictions of a supervised ``(inputs, labels)`` batch."""
        inputs, labels = batch
        predicted = self.module(inputs.to(self.device)).argmax(-1)
        self._correct += float((predicted.cpu() == labels.cpu()).sum())
        self._seen += float(labels.numel())

    def on_validation_epoch_end(self) -> None:
        """Log ``test/accuracy`` of a supervised run over the whole test set (all ranks)."""
        if self.env_spec is not None:
            return
        counts = torch.tensor([self._correct, self._seen], dtype=torch.float64)
        counts = self.all_reduce_(counts.to(self.device), "sum").cpu()
        self._correct = self._seen = 0.0
        if counts[1] == 0:
            return
        accuracy = float(counts[0] / counts[1])
        self._log({"test/accuracy": accuracy})
        self.module.log("test/accuracy", accuracy, prog_bar=True, logger=False, on_step=False,
                        on_epoch=True, batch_size=1)

    def on_train_end(self) -> None:
        if self.env_spec is not None:
            self.final_eval = self.evaluate(self.eval_episodes)
            self._log({f"final/{k}": v for k, v in self.final_eval.items()})

    def _log(self, metrics: dict[str, float]) -> None:
        # Scalars are stepped by env frames; supervised runs have none and step by iteration.
        step = self.frames if self.env_spec is not None else self.iteration
        for logger in self.module.trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._start_time

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        if self.world_size > 1:
            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        module = self.module
        return {
            "frames": self.frames, "iteration": self.iteration, "eval_count": self.eval_count,
            "seed": self.seed, "rule": self.rule.state_dict(), "rule_config": self.rule.config(),
            "rng": ranks, "obs_norm": None if self.obs_norm is None else self.obs_norm.state_dict(),
            "env": None if self.env_spec is None else dataclasses.asdict(self.env_spec),
            "module_class": f"{type(module).__module__}:{type(module).__qualname__}",
            "module_hparams": dict(module.hparams),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frames, self.iteration = int(state["frames"]), int(state["iteration"])
        self.eval_count = int(state["eval_count"])
        self.rule.load_state_dict(state["rule"])
        if self.obs_norm is not None and state.get("obs_norm") is not None:
            self.obs_norm.load_state_dict(state["obs_norm"])
        ranks = state["rng"]
        rng = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


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
