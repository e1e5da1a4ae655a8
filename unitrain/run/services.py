"""The services a rule receives: Lightning-free, identical in shape on every process.

:class:`RunServices` implements :class:`~unitrain.rules.base.RuleContext`: the device, rank and
world size, seeded generators, the run's frame count and budget, the training env and a TorchRL
collector over it, observation normalisation, deterministic evaluation
(:func:`unitrain.envs.rollout.evaluate_policy`), collectives (:class:`Collectives`, over
``torch.distributed``) and a histogram sink. It also owns what a checkpoint must restore of the
run besides parameters and optimizers: counters, observation statistics and every process's RNG
states. The Lightning side (:mod:`unitrain.run.adapter`) drives it; a rule never sees Lightning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from unitrain.envs.batched import BatchedEnv, halves, make_env
from unitrain.envs.collect import make_collector
from unitrain.envs.info import EnvInfo
from unitrain.envs.obs_norm import NamedObsNorm, ObsNorm, make_obs_norm
from unitrain.envs.rollout import evaluate_policy
from unitrain.envs.spec import EnvSpec, derive_seed
from unitrain.policy.recurrent import initial_state_of

if TYPE_CHECKING:
    from torchrl.collectors import Collector

    from unitrain.policy.module import RLModule

__all__ = ["RunServices", "Collectives", "episode_stats"]

# Streams of derived seeds, so that no two uses of the run seed collide (2 is evaluation's,
# :data:`unitrain.envs.rollout.EVAL_STREAM`).
_TRAIN_ENV, _RULE, _SHARED = 0, 1, 3


class Collectives:
    """Collectives across the run's processes (no-ops for one process).

    Args:
        rank: this process's global rank.
        world_size: processes in all.
        device: where tensors travel (the module's device; gloo on CPU, NCCL on GPUs).
    """

    def __init__(self, rank: int = 0, world_size: int = 1,
                 device: Callable[[], torch.device] | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self._device = device or (lambda: torch.device("cpu"))

    def all_reduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        """In-place all-reduce (``"mean"``, ``"sum"``, ``"max"``, ``"min"``)."""
        if self.world_size == 1:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, ops[op])
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the ``.grad`` of ``params`` across processes (one flat collective)."""
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
        """Stack ``tensor`` from every process along a new leading dim (on ``tensor``'s device)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def gather_cpu(self, tensor: torch.Tensor) -> torch.Tensor:
        """:meth:`all_gather` of a CPU tensor through the run's device, back on the CPU."""
        return self.all_gather(tensor.to(self._device())).cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def episode_stats(finished: list[tuple[float, int]]) -> dict[str, float]:
    """``episode/return_mean|max|min`` and ``episode/length_mean`` (NaN when none finished)."""
    if not finished:
        nan = float("nan")
        return {"episode/return_mean": nan, "episode/return_max": nan,
                "episode/return_min": nan, "episode/length_mean": nan}
    rets = np.array([r for r, _ in finished])
    lens = np.array([n for _, n in finished])
    return {"episode/return_mean": float(rets.mean()), "episode/return_max": float(rets.max()),
            "episode/return_min": float(rets.min()), "episode/length_mean": float(lens.mean())}


class RunServices:
    """The services of one run (see :class:`~unitrain.rules.base.RuleContext`).

    Args:
        module: the module being trained (bound to the env's action space here).
        env_spec: the environment (``None`` for supervised runs fed by a dataloader).
        seed: the run seed.
        max_frames: frame budget summed over processes (``None``: unbounded).
    """

    def __init__(self, module: "RLModule", env_spec: EnvSpec | None, seed: int,
                 max_frames: int | None, env_info: EnvInfo | None = None) -> None:
        self.module, self.env_spec = module, env_spec
        self.seed, self.max_frames = seed, max_frames
        self.comm = Collectives(device=lambda: self.module.device)
        self.num_threads = 1
        self.frames = 0
        self.iteration = 0
        self.eval_count = 0
        self.batch: Any = None
        self.env_info: EnvInfo | None = None
        self.obs_norm: ObsNorm | NamedObsNorm | None = None
        self.generator = torch.Generator()
        self.train_env_seed: int | None = None
        self.histogram: Callable[[str, torch.Tensor, int], None] | None = None
        self._train_env: BatchedEnv | None = None
        self._train_env_state: dict[str, Any] | None = None
        self._eval_envs: dict[int, BatchedEnv] = {}
        if env_spec is not None:
            from unitrain.envs.info import env_info as read_info

            self.env_info = env_info or read_info(env_spec)
            module.bind_env(self.env_info)
            if env_spec.obs_norm:
                self.obs_norm = make_obs_norm(self.env_info)

    def start(self, rank: int, world_size: int, num_threads: int = 1) -> None:
        """Set the process's place in the run and its thread budget (before the rule's
        ``setup``); EnvPool envs step on ``num_threads`` threads too."""
        self.comm.rank, self.comm.world_size = rank, world_size
        self.num_threads = num_threads
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, _RULE, rank))

    # ------------------------------------------------------------------ identity and progress
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def progress(self) -> float:
        """Fraction of the frame budget used, in [0, 1] (0 when unbounded)."""
        if not self.max_frames:
            return 0.0
        return min(1.0, self.frames / self.max_frames)

    def shared_generator(self, *stream: int) -> torch.Generator:
        """A generator seeded identically on every rank from the run seed and ``stream``."""
        return torch.Generator().manual_seed(derive_seed(self.seed, _SHARED, *stream))

    # ------------------------------------------------------------------ envs
    def train_env(self) -> BatchedEnv:
        """This rank's training env (built on first use with this rank's seeds)."""
        if self._train_env is None:
            assert self.env_spec is not None, "this run has no env"
            # The frame count enters the seed so that a resumed run starts fresh episodes.
            self.train_env_seed = derive_seed(self.seed, _TRAIN_ENV, self.rank, self.frames)
            self._train_env = make_env(self.env_spec, self.train_env_seed, self.obs_norm,
                                       update_norm=True, num_threads=self.num_threads)
            if self._train_env_state is not None:
                # A resumed run continues the episodes that were running at the checkpoint.
                self._train_env.load_state_dict(self._train_env_state)
                self._train_env_state = None
        return self._train_env

    def make_env(self, num_envs: int, seed: int = 0, train: bool = False,
                 parts: Sequence[int] | None = None) -> BatchedEnv:
        """A further env of this run's spec (sharing observation normalisation); ``parts``
        splits its slots for a pipelined rollout (see :class:`~unitrain.envs.BatchedEnv`)."""
        assert self.env_spec is not None, "this run has no env"
        return make_env(self.env_spec, seed, self.obs_norm, update_norm=train, num_envs=num_envs,
                        num_threads=self.num_threads, parts=parts)

    def collector(self, policy: Any, frames_per_batch: int) -> "Collector":
        """A TorchRL collector over :meth:`train_env` running ``policy`` on :attr:`device`.

        In a resumed run the collector goes on with the episodes running at the checkpoint.
        """
        env = self.train_env()
        env.continue_episodes()
        return make_collector(env, policy, frames_per_batch, self.device)

    def pop_episodes(self) -> list[tuple[float, int]]:
        """``(return, length)`` of the training episodes finished since the last call."""
        return self._train_env.pop_finished() if self._train_env is not None else []

    @torch.no_grad()
    def play_evaluation(self, episodes: int, act: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> dict[str, float]:
        """Deterministic evaluation over ``episodes`` episodes split across ranks.

        Each call plays new episodes (seeded by the run seed, the evaluation's number and the
        episode's index, not by the rank).
        """
        def env(slots: int) -> BatchedEnv:
            if slots not in self._eval_envs:
                self._eval_envs[slots] = self.make_env(slots, parts=halves(slots))
            return self._eval_envs[slots]

        result = evaluate_policy(act or self.module.act, env, episodes, self.seed,
                                 self.eval_count, self.rank, self.world_size,
                                 self.comm.all_gather, self.device,
                                 initial_state=None if act else initial_state_of(self.module))
        self.eval_count += 1
        return result

    # ------------------------------------------------------------------ collectives
    def all_reduce_(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        return self.comm.all_reduce_(tensor, op)

    def all_reduce_grads(self, params: Any) -> None:
        self.comm.all_reduce_grads(params)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(tensor)

    def sync_obs_norm(self) -> None:
        """Merge observation statistics gathered since the last sync across ranks."""
        if self.obs_norm is not None:
            # The statistics live with the envs on the CPU; the collective runs on the device.
            self.obs_norm.sync(self.comm.gather_cpu)

    def log_histogram(self, tag: str, values: torch.Tensor) -> None:
        """Log a histogram of ``values`` (rank 0, finite values, stepped by frames)."""
        values = values[torch.isfinite(values)]
        if self.rank == 0 and self.histogram is not None and values.numel():
            self.histogram(tag, values.cpu(), self.frames)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters, observation statistics, and every rank's RNG states and running training
        episodes (a collective)."""
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        env = None if self._train_env is None else self._train_env.state_dict()
        return {"frames": self.frames, "iteration": self.iteration, "eval_count": self.eval_count,
                "seed": self.seed, "rng": self.comm.all_gather_object(rng),
                "train_env": self.comm.all_gather_object(env),
                "obs_norm": None if self.obs_norm is None else self.obs_norm.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (this rank's RNG states)."""
        self.frames, self.iteration = int(state["frames"]), int(state["iteration"])
        self.eval_count = int(state["eval_count"])
        if self.obs_norm is not None and state.get("obs_norm") is not None:
            self.obs_norm.load_state_dict(state["obs_norm"])
        ranks = state["rng"]
        rng = ranks[self.rank] if self.rank < len(ranks) else ranks[0]
        envs = state.get("train_env") or []
        # Another process count cannot continue the same episodes: they start afresh then.
        self._train_env_state = envs[self.rank] if len(envs) == self.world_size else None
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.generator.set_state(rng["generator"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
