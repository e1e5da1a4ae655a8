"""Population evaluation: what every population update rule shares.

A population rule (GA, ES) evaluates P candidate parameter sets of the user's module and changes
the module from their fitness (mean episode return, higher is better). This module holds the
pieces they share; a rule composes them (GA-only pieces, the genomes and novelty, live in
:mod:`unitrain.rules.population.ga`):

- :class:`ParamLayout`: the module's policy parameters (``RLModule.policy_parameters()``; the
  ``aux`` networks are left out) as one flat vector, so a population is a ``[P, n]`` matrix and a
  perturbation is one vector addition; :func:`noise` regenerates a perturbation from its seed
  (one ``torch.Generator`` per seed), or reads it from a :class:`NoiseTable` shared by the
  processes of a machine (``noise_source``).
- :class:`PopulationEvaluator`: runs the episodes of many individuals at once in one batched
  TorchRL env through :func:`unitrain.envs.rollout.rollout`, with the module applied once per step to
  all of them through ``torch.func.vmap(functional_call)`` over the stacked parameters
  (:class:`PopulationPolicy`). Slot ``i * E + e`` plays episode ``e`` of the wave's individual
  ``i``.
- :class:`PopulationFields` (the hyperparameters every population rule has) and
  :class:`PopulationEvaluation` (the service a rule composes: the split of the population across
  processes, each rank evaluating a contiguous share and only fitness crossing process
  boundaries; fitness with non-finite returns made worst; the metrics every rule reports).
- :func:`centered_ranks`: fitness shaping (Salimans et al. 2017, "Evolution Strategies as a
  Scalable Alternative to Reinforcement Learning").

Episode seeds are derived from the run seed, the generation, the individual's index in the
population and the episode's index, never from the rank, so a population split across any number
of processes is evaluated on the same episodes and gets the same fitness.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase
from torch import nn
from torch.func import functional_call, vmap

from unitrain.envs.batched import BatchedEnv, halves, make_env
from unitrain.envs.carry import map_state
from unitrain.envs.obs_norm import NamedObsNorm, ObsNorm
from unitrain.envs.observation import flat_observation
from unitrain.envs.rollout import Step, rollout, shard
from unitrain.envs.spec import EnvSpec, derive_seed
from unitrain.errors import UserError, check
from unitrain.policy.recurrent import is_recurrent
from unitrain.rules.base import RuleFields

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["ParamLayout", "noise", "NoiseTable", "noise_source", "noise_table", "perturb_",
           "PopulationPolicy", "PopulationEvaluator", "Episodes", "Evaluation", "PopulationFields",
           "PopulationEvaluation", "centered_ranks", "shard", "gather_shards", "episode_seeds",
           "default_population", "log_weights"]

# Seed stream of population episodes (the first entry of derive_seed after the run seed), distinct
# from the run's other streams so that no two uses of the run seed collide.
STREAM_EPISODES = 101


# ---------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class ParamLayout:
    """Where each policy parameter of a module sits in one flat vector.

    Attributes:
        names: parameter names (``module.named_policy_parameters()`` order).
        shapes: their shapes.
        dtypes: their dtypes (the flat vector uses their common promoted dtype).
        dtype: dtype of flat vectors.
        numel: length of the flat vector.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype: torch.dtype
    numel: int

    @classmethod
    def of(cls, module: "RLModule") -> "ParamLayout":
        """The layout of ``module.named_policy_parameters()``.

        Raises:
            UserError: if the module has no trainable policy parameters.
        """
        named = list(module.named_policy_parameters())
        if not named:
            raise UserError(f"{type(module).__name__} has no trainable policy parameters "
                            "(parameters outside module.aux with requires_grad=True); a population "
                            "rule has nothing to evolve")
        dtype = named[0][1].dtype
        for _, p in named[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        if not dtype.is_floating_point:
            raise UserError(f"{type(module).__name__}: policy parameters must be floating point")
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named),
                   tuple(p.dtype for _, p in named), dtype, sum(p.numel() for _, p in named))

    def _offsets(self) -> Iterator[tuple[str, torch.Size, torch.dtype, int, int]]:
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            size = math.prod(shape)
            yield name, shape, dtype, offset, offset + size
            offset += size

    def flatten(self, module: nn.Module) -> torch.Tensor:
        """The module's policy parameters as one vector ``[numel]`` (a copy)."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(self.dtype) for n in self.names])

    def unflatten(self, flat: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """``flat [..., numel]`` as tensors ``[..., *shape]`` by parameter name."""
        lead = flat.shape[:-1]
        return {prefix + name: flat[..., a:b].reshape(*lead, *shape).to(dtype)
                for name, shape, dtype, a, b in self._offsets()}

    def assign(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Copy ``flat [numel]`` into the module's policy parameters (in place)."""
        params = dict(module.named_parameters())
        with torch.no_grad():
            for name, value in self.unflatten(flat).items():
                params[name].copy_(value)

    def set_grads(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Set the ``.grad`` of the module's policy parameters from ``flat [numel]``."""
        params = dict(module.named_parameters())
        for name, value in self.unflatten(flat).items():
            params[name].grad = value.detach().clone().to(params[name].device)


class NoiseTable:
    """A read-only table of standard normals shared by every process of a machine: perturbation
    ``seed`` of ``n`` parameters is the slice at offset ``seed mod (size − n + 1)`` (Salimans et
    al. 2017's shared noise table).

    The table is a file of float32 values in shared memory (``/dev/shm``, or the temporary
    directory where that is missing or too small), written once from ``torch.randn`` with a fixed
    seed — so its content depends on ``size`` only and every machine builds the same table —
    and mapped copy-on-write by each process, which shares the pages: one copy per machine.
    Reading a slice is a memory copy, far cheaper than regenerating ``n`` normals from a seed.

    Args:
        size: float32 values in the table (4 bytes each).
    """

    _SEED = 0x5EED
    _CHUNK = 1 << 24

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.path = self._file(self.size)
        self.data = torch.from_file(str(self.path), shared=False, size=self.size,
                                    dtype=torch.float32)

    @classmethod
    def _file(cls, size: int) -> Path:
        shm = Path("/dev/shm")
        room = shm.is_dir() and shutil.disk_usage(shm).free > 2 * 4 * size
        folder = shm if room else Path(tempfile.gettempdir())
        path = folder / f"unitrain-noise-{size}.f32"
        if path.exists() and path.stat().st_size == 4 * size:
            return path
        # Concurrent writers (the ranks of a machine) write identical files; the last rename wins.
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        gen = torch.Generator().manual_seed(cls._SEED)
        with open(tmp, "wb") as f:
            for start in range(0, size, cls._CHUNK):
                chunk = torch.randn(min(cls._CHUNK, size - start), generator=gen)
                f.write(chunk.numpy().tobytes())
        os.replace(tmp, path)
        return path

    def slice(self, seed: int, numel: int) -> torch.Tensor:
        """The ``numel`` normals of perturbation ``seed`` (a view into the table)."""
        if numel > self.size:
            raise UserError(f"the noise table holds {self.size:,} values, fewer than the "
                            f"{numel:,} parameters; raise optimizer.noise_table_size")
        offset = int(seed) % (self.size - numel + 1)
        return self.data[offset: offset + numel]


# The table noise() reads while a population rule that uses one runs (see noise_source).
_TABLE: NoiseTable | None = None


@contextlib.contextmanager
def noise_source(table: NoiseTable | None) -> Iterator[None]:
    """Make :func:`noise` read ``table`` (``None``: regenerate from seeds) inside the block."""
    global _TABLE
    previous, _TABLE = _TABLE, table
    try:
        yield
    finally:
        _TABLE = previous


def noise(seed: int, numel: int, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise ``[numel]`` for ``seed`` (a new tensor).

    Regenerated on the CPU from a generator of its own, so every process and device gets the same
    values for the same seed; or, inside :func:`noise_source`, read from a shared
    :class:`NoiseTable`.
    """
    if _TABLE is not None:
        return _TABLE.slice(seed, numel).to(dtype=dtype, device=device, copy=True)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(numel, generator=gen, dtype=dtype).to(device)


def perturb_(flat: torch.Tensor, seed: int, sigma: float) -> torch.Tensor:
    """``flat += sigma * noise(seed)`` in place; the one arithmetic every rebuild repeats."""
    return flat.add_(noise(seed, flat.shape[-1], flat.dtype, flat.device), alpha=sigma)


def generation_seeds(ctx: "RuleContext", stream: int, generation: int, count: int) -> list[int]:
    """``count`` noise seeds of one generation, identical on every rank."""
    rng = ctx.shared_generator(stream, generation)
    return torch.randint(0, 2**31 - 1, (count,), generator=rng).tolist()


def mirrored(theta: torch.Tensor, seeds: Sequence[int],
             sigma: float) -> Callable[[Sequence[int]], torch.Tensor]:
    """``indices -> parameters`` of the mirrored candidates ``θ ± σ·ε(seed)``: even index ``j`` is
    ``θ + σ·ε(seeds[j // 2])``, odd ``j`` is ``θ − σ·ε(seeds[j // 2])``."""
    def candidates(idx: Sequence[int]) -> torch.Tensor:
        return torch.stack([perturb_(theta.clone(), seeds[j // 2], sigma if j % 2 == 0 else -sigma)
                            for j in idx])

    return candidates


# ---------------------------------------------------------------------------------- the policy
class _Actor(nn.Module):
    """``observation -> act(module, observation)`` (``module.act``, the contract's deterministic
    action, unless told otherwise)."""

    def __init__(self, module: "RLModule",
                 act: Callable[["RLModule", torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.module: RLModule = module
        self._act = act

    def forward(self, observation: Any, mask: torch.Tensor | None = None,
                state: Any = None) -> Any:
        if state is not None:  # a recurrent module: (action, state)
            return self.module.act(observation, mask, state=state)
        if self._act is None:
            return self.module.act(observation, mask)
        return self._act(self.module, observation)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluation mode for the duration (dropout off, normalisation layers read-only)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class PopulationPolicy:
    """The user's module applied to many parameter sets at once.

    ``policy(params [w, numel], observation [w, B, *obs_shape]) -> [w, B, *action_shape]``: for
    each individual ``i`` the deterministic action (``module.act``) of the module with parameters
    ``params[i]`` on its ``B`` observations, computed in one call with
    ``torch.func.vmap(functional_call)``. Buffers and non-policy parameters are shared. Call it
    with the module in evaluation mode (the evaluator does), so that no layer writes a buffer.
    A recurrent module (:mod:`unitrain.policy.recurrent`) also takes and returns its state, each
    tensor ``[w, B, ...]``: ``policy(params, observation, state) -> (action, state)``.

    Args:
        module: the user's module.
        layout: its policy-parameter layout.
        act: ``(module, observation) -> output`` to apply instead of ``module.act``.
    """

    def __init__(self, module: "RLModule", layout: ParamLayout,
                 act: Callable[["RLModule", torch.Tensor], torch.Tensor] | None = None) -> None:
        self.module, self.layout = module, layout
        self._actor = _Actor(module, act)
        self.recurrent = is_recurrent(module)
        # Other names of the same policy tensors in other modules (weights the user tied), swapped
        # with them. Only these: the aux networks may hold the policy's parameters too (a loss's
        # functional copy of the actor) and are not part of the policy's forward, and a module
        # reachable under two names holds its parameter once.
        first = {id(p): name for name, p in module.named_policy_parameters()}

        def owner(name: str) -> tuple[int, str]:
            path, _, attr = name.rpartition(".")
            return id(module.get_submodule(path)), attr

        self._tied = [(f"module.{name}", f"module.{first[id(p)]}")
                      for name, p in module.named_parameters(remove_duplicate=False)
                      if id(p) in first and not name.startswith("aux.")
                      and owner(name) != owner(first[id(p)])]

    def _one(self, params: dict[str, torch.Tensor], observation: torch.Tensor,
             mask: torch.Tensor | None = None, state: Any = None) -> Any:
        return functional_call(self._actor, params, (observation, mask, state),
                               tie_weights=False)

    def initial_state(self, w: int, batch: int) -> Any:
        """A recurrent module's initial state for ``w`` individuals of ``batch`` slots each
        (tensors ``[w, batch, ...]``)."""
        return map_state(lambda t: t.reshape(w, batch, *t.shape[1:]),
                         self.module.initial_state(w * batch))

    def stack(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter tensors ``[w, *shape]`` of ``params [w, numel]``, for :meth:`apply`."""
        stacked = self.layout.unflatten(params, "module.")
        for name, same in self._tied:
            stacked[name] = stacked[same]
        return stacked

    @torch.no_grad()
    def apply(self, stacked: dict[str, torch.Tensor], observation: Any,
              mask: torch.Tensor | None = None, state: Any = None) -> Any:
        """The actions for ``observation [w, B, *obs_shape]`` under :meth:`stack`'s parameters
        (named entries: a TensorDict of batch ``[w, B]``, vmapped as a dict of its entries; with
        action masks ``[w, B, A]``: the allowed actions only; for a recurrent module given its
        ``state``, ``(actions, next state)``)."""
        if isinstance(observation, TensorDictBase):
            observation = dict(observation.items())
        fresh = self.recurrent and state is None
        if fresh:
            w, batch = next(iter(observation.values())).shape[:2] if isinstance(
                observation, dict) else observation.shape[:2]
            state = self.initial_state(w, batch)
        batched = vmap(self._one, in_dims=(0, 0, None if mask is None else 0,
                                           None if state is None else 0))
        out = batched(stacked, observation, mask, state)
        return out[0] if fresh else out

    def __call__(self, params: torch.Tensor, observation: Any,
                 mask: torch.Tensor | None = None, state: Any = None) -> Any:
        return self.apply(self.stack(params), observation, mask, state)


# ---------------------------------------------------------------------------------- evaluation
@dataclass
class Episodes:
    """Outcome of evaluating ``p`` individuals on ``E`` episodes each.

    Attributes:
        returns: ``[p, E]`` float64 episode returns (non-finite if the env produced them).
        lengths: ``[p, E]`` int64 episode lengths (env steps).
        behaviour: ``[p, E, d]`` float64 behaviour characterisations, or ``None``.
        steps: env steps simulated, including slots idling while others finish.
    """

    returns: torch.Tensor
    lengths: torch.Tensor
    behaviour: torch.Tensor | None
    steps: int

    @staticmethod
    def cat(parts: Sequence["Episodes"]) -> "Episodes":
        """The episodes of consecutive groups of individuals, as one."""
        behaviours = [p.behaviour for p in parts if p.behaviour is not None]
        behaviour = torch.cat(behaviours) if behaviours else None
        return Episodes(torch.cat([p.returns for p in parts]),
                        torch.cat([p.lengths for p in parts]), behaviour,
                        sum(p.steps for p in parts))


class PopulationEvaluator:
    """Run the episodes of a population in one batched env per wave.

    Each wave takes as many whole individuals as fit in ``max_envs`` env slots (at least one);
    slot ``i * E + e`` plays episode ``e`` of the wave's individual ``i`` from its own seed, and the
    wave ends when every slot's episode has ended (slots that finish early idle until then).

    Args:
        policy: the batched policy.
        spec: the env to run (``spec.num_envs`` is ignored: the wave decides).
        obs_shape: shape of one observation, or ``{name: shape}`` of a named one (its
            behaviour characterisation reads the entries flattened and concatenated).
        episodes: episodes per individual ``E``.
        max_episode_steps: cap on each episode's steps (``None``: the env's own limit).
        max_envs: most env slots stepped together (``None``: a whole call in one wave).
        obs_norm: observation normalisation applied to what the policy sees; each wave folds
            the raw observations of its episodes into its pending statistics, which take effect
            at the next :meth:`~unitrain.envs.ObsNorm.sync` (the Trainer's, after the
            generation), so every individual of a generation sees the same normalisation.
        behaviour: ``"final"`` or ``"mean"`` observation of each episode as its behaviour
            characterisation (mapped through ``module.behaviour`` if the module defines it), or
            ``None`` to skip it.
        num_threads: threads EnvPool envs step on.
    """

    def __init__(self, policy: PopulationPolicy, spec: EnvSpec,
                 obs_shape: Sequence[int] | dict[str, tuple[int, ...]],
                 episodes: int = 1, max_episode_steps: int | None = None,
                 max_envs: int | None = None, obs_norm: ObsNorm | NamedObsNorm | None = None,
                 behaviour: str | None = None, num_threads: int = 1) -> None:
        self.policy, self.spec, self.episodes = policy, spec, episodes
        self.num_threads = num_threads
        self.max_episode_steps, self.max_envs = max_episode_steps, max_envs
        self.obs_norm, self.behaviour = obs_norm, behaviour
        self._envs: dict[tuple[int, int], BatchedEnv] = {}
        self._layout: Any = dict(obs_shape) if isinstance(obs_shape, dict) else tuple(obs_shape)
        self._obs_shape = ((sum(math.prod(s) for s in obs_shape.values()),)
                           if isinstance(obs_shape, dict) else tuple(obs_shape))
        self._behaviour_dim: int | None = None

    def _env(self, slots: int, episodes: int) -> BatchedEnv:
        # Two slot groups of whole individuals, stepped in a pipeline on EnvPool.
        env = self._envs.get((slots, episodes))
        if env is None:
            env = self._envs[slots, episodes] = make_env(
                self.spec, 0, obs_norm=None, num_envs=slots, num_threads=self.num_threads,
                parts=halves(slots, episodes))
        return env

    def play(self, individuals: Sequence[int], params: Callable[[Sequence[int]], torch.Tensor],
             seeds: Callable[[int, int], int], episodes: int | None = None,
             behaviour: bool = True, observe: Callable[[Step], None] | None = None) -> Episodes:
        """Play the episodes of ``individuals``.

        Args:
            individuals: indices of the individuals (passed back to ``params`` and ``seeds``).
            params: ``indices -> [len(indices), numel]`` parameters, called once per wave so that
                only one wave's parameters exist at a time.
            seeds: ``(individual, episode) -> env seed``.
            episodes: episodes per individual (default: the evaluator's ``episodes``).
            behaviour: characterise behaviours (if the evaluator was built to).
            observe: called with every step of every wave (its raw observations and the actions
                in env units), e.g. to keep the transitions.
        """
        episodes = self.episodes if episodes is None else episodes
        mode = self.behaviour if behaviour else None
        limit = len(individuals) * episodes if self.max_envs is None else self.max_envs
        width = max(1, limit // episodes)  # whole individuals per wave
        parts = []
        with _eval_mode(self.policy.module):
            for a in range(0, len(individuals), width):
                wave = individuals[a: a + width]
                parts.append(self._wave(params(wave), [seeds(i, e) for i in wave
                                                       for e in range(episodes)], episodes, mode,
                                        observe))
        if parts:
            return Episodes.cat(parts)
        empty = torch.zeros(0, episodes, dtype=torch.float64)
        dim = None if mode is None else torch.zeros(0, episodes, self.behaviour_dim(),
                                                    dtype=torch.float64)
        return Episodes(empty, empty.long(), dim, 0)

    def behaviour_dim(self) -> int:
        """Size ``d`` of a behaviour characterisation."""
        if self._behaviour_dim is None:
            probe = torch.zeros(1, math.prod(self._obs_shape), dtype=torch.float64)
            self._behaviour_dim = self._characterise(probe, self._obs_shape).shape[1]
        return self._behaviour_dim

    @torch.no_grad()
    def _wave(self, params: torch.Tensor, seeds: list[int], episodes: int,
              mode: str | None, also: Callable[[Step], None] | None = None) -> Episodes:
        w, slots = params.shape[0], len(seeds)
        # Reshaped once per wave: slices of a [w, numel] matrix are copied when reshaped.
        stacked = self.policy.stack(params)
        norm = self.obs_norm

        env = self._env(slots, episodes)
        # The stacked parameters of each slot group's individuals (groups hold whole ones).
        parts = {sl.start: {k: v[sl.start // episodes: sl.stop // episodes]
                            for k, v in stacked.items()} for sl in env.parts}

        def policy(obs: Any, group: slice, *rest: Any) -> Any:
            # The rollout passes (observation, slots[, mask][, state]).
            # The envs (and their observations) stay on the CPU; the network runs where the
            # parameters are (the module's device), and the actions come back to the envs.
            mask = rest[0] if env.info.masked else None
            state = rest[-1] if self.policy.recurrent else None
            x = obs if norm is None else norm(obs)
            x = x.reshape(-1, episodes, *obs.shape[1:]).to(params.device)
            if mask is not None:
                mask = mask.reshape(-1, episodes, mask.shape[-1]).to(params.device)
            if state is None:
                action = self.policy.apply(parts[group.start], x, mask)
            else:  # slot-major rows [k, ...] are [individuals, episodes, ...]
                action, state = self.policy.apply(parts[group.start], x, mask, map_state(
                    lambda t: t.reshape(-1, episodes, *t.shape[1:]), state))
                state = map_state(lambda t: t.reshape(obs.shape[0], *t.shape[2:]), state)
            action = action.reshape(obs.shape[0], *action.shape[2:]).to(obs.device)
            return action if state is None else (action, state)

        seen: list[torch.Tensor] = []
        summary: list[torch.Tensor | None] = [None]

        def observe(step: Step) -> None:
            if also is not None:
                also(step)
            if norm is not None:
                seen.append(step.observation[step.active])
            if mode == "mean":
                flat = torch.where(step.active[:, None],
                                   flat_observation(step.observation, self._layout).reshape(
                                       slots, -1).to(torch.float64), 0.0)
                summary[0] = flat if summary[0] is None else summary[0].add_(flat)
            elif mode == "final" and bool(step.ended.any()):
                last = flat_observation(step.next["observation"], self._layout).reshape(
                    slots, -1).to(torch.float64)
                if summary[0] is None:
                    summary[0] = torch.zeros_like(last)
                summary[0][step.ended] = last[step.ended]

        watched = norm is not None or mode is not None or also is not None
        # A recurrent module's state, one row per slot, reset where the slot's episode ends.
        state = (map_state(lambda t: t.reshape(slots, *t.shape[2:]).to(params.device),
                           self.policy.initial_state(w, episodes))
                 if self.policy.recurrent else None)
        played = rollout(env, policy, seeds=seeds, max_steps=self.max_episode_steps,
                         observe=observe if watched else None, state=state)
        if norm is not None:
            norm.update(torch.cat(seen))
        ret, length = played.by_slot()
        behaviour = None
        if mode is not None:
            assert summary[0] is not None
            bcs = summary[0] / length[:, None] if mode == "mean" else summary[0]
            behaviour = self._characterise(bcs, self._obs_shape).reshape(w, episodes, -1)
        return Episodes(ret.reshape(w, episodes), length.reshape(w, episodes), behaviour,
                        played.steps)

    def _characterise(self, summary: torch.Tensor, obs_shape: Sequence[int]) -> torch.Tensor:
        hook = getattr(self.policy.module, "behaviour", None)
        if not callable(hook):
            return summary
        device = next((p.device for p in self.policy.module.parameters()), torch.device("cpu"))
        out = hook(summary.reshape(-1, *obs_shape).to(device, torch.float32))
        return torch.as_tensor(out).reshape(summary.shape[0], -1).to("cpu", torch.float64)


# ---------------------------------------------------------------------------------- selection
def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks of ``x`` mapped linearly onto ``[-0.5, 0.5]``; tied values share their mean rank.

    Salimans et al. 2017's fitness shaping: the update depends on the order of the returns only.
    Averaging ties keeps equal returns (every episode timed out, say) from being ordered by their
    position in the population: they carry no preference, so they get none.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(n, dtype=torch.float64)
    _, group, size = torch.unique(flat, return_inverse=True, return_counts=True)
    totals = torch.zeros(len(size), dtype=torch.float64).index_add_(0, group, ranks)
    ranks = totals[group] / size[group]
    return (ranks / max(n - 1, 1) - 0.5).reshape(x.shape)


# ---------------------------------------------------------------------------------- processes
def gather_shards(ctx: "RuleContext", local: torch.Tensor, count: int) -> torch.Tensor:
    """Concatenate every rank's shard ``[len(shard), ...]`` into ``[count, ...]`` on every rank.

    One all-gather; shards are padded to a common length first.
    """
    width = math.ceil(count / ctx.world_size)
    padded = torch.full((width, *local.shape[1:]), math.nan, dtype=torch.float64)
    padded[: local.shape[0]] = local.to(torch.float64)
    rows = ctx.all_gather(padded.to(ctx.device)).cpu()
    return torch.cat([rows[r, : len(shard(count, r, ctx.world_size))]
                      for r in range(ctx.world_size)])


def episode_seeds(run_seed: int, stream: int, generation: int) -> Callable[[int, int], int]:
    """``(individual, episode) -> seed`` for one generation: independent of the rank."""
    return lambda individual, episode: derive_seed(run_seed, stream, generation, individual,
                                                   episode)


# ---------------------------------------------------------------------------------- the service
NOISE_SOURCES = ("auto", "seeds", "table")
TABLE_FROM = 100_000  # parameters from which noise_source "auto" reads a table


def noise_table(fields: "PopulationFields", numel: int) -> NoiseTable | None:
    """The table a strategy's perturbations come from, or ``None`` (regenerated from seeds)."""
    use = fields.noise_source == "table" or (fields.noise_source == "auto" and numel >= TABLE_FROM)
    return NoiseTable(max(fields.noise_table_size, numel)) if use else None


@dataclass
class Evaluation:
    """A population's evaluation gathered from every rank.

    Attributes:
        returns: ``[P, E]`` episode returns.
        fitness: ``[P]`` mean return; ``-inf`` for an individual with any non-finite return.
        behaviour: ``[P, d]`` mean behaviour characterisation over its episodes, or ``None``.
        frames: env frames of these episodes on all ranks together.
        local_frames: the part of ``frames`` this rank simulated.
        nonfinite: individuals with a non-finite return.
    """

    returns: torch.Tensor
    fitness: torch.Tensor
    behaviour: torch.Tensor | None
    frames: int
    local_frames: int
    nonfinite: int


@dataclass
class PopulationFields(RuleFields):
    """The hyperparameters every population strategy has (fields and their validation only).

    Args:
        population: individuals per generation.
        sigma: mutation / perturbation standard deviation σ.
        episodes: episodes per individual; fitness is their mean return.
        max_episode_steps: cap on each evaluated episode's steps (``None``: the env's limit).
        max_envs: most env copies stepped together per process (``None``: a process's whole
            share of the population at once); bounds memory for large populations and images.
        noise_source: where perturbations come from: ``"seeds"`` (regenerated from each seed),
            ``"table"`` (read from a :class:`NoiseTable` shared by the machine's processes) or
            ``"auto"``: the table from :data:`TABLE_FROM` parameters up, where regenerating the
            noise would cost more than the evaluation (measured in ``tools/bench_scale.py``).
        noise_table_size: float32 values in the table (4 bytes each; at least the parameter
            count, and best many times it: perturbations are overlapping slices).
    """

    population: int = 64
    sigma: float = 0.02
    episodes: int = 1
    max_episode_steps: int | None = None
    max_envs: int | None = None
    noise_source: str = "auto"
    noise_table_size: int = 1 << 26

    def validate(self) -> None:
        self.validate_population()
        check(self.noise_source in NOISE_SOURCES, "noise_source",
              "one of " + ", ".join(NOISE_SOURCES), self.noise_source)
        check(isinstance(self.noise_table_size, int) and self.noise_table_size >= 1,
              "noise_table_size", "an integer >= 1", self.noise_table_size)
        check(self.sigma > 0, "sigma", "a number > 0", self.sigma)
        check(self.episodes >= 1, "episodes", "an integer >= 1", self.episodes)
        check(self.max_episode_steps is None or self.max_episode_steps >= 1, "max_episode_steps",
              "an integer >= 1 or null", self.max_episode_steps)
        check(self.max_envs is None or self.max_envs >= 1, "max_envs", "an integer >= 1 or null",
              self.max_envs)

    def validate_population(self) -> None:
        """The check of ``population`` (a rule with another lower bound overrides this)."""
        check(isinstance(self.population, int) and self.population >= 2, "population",
              "an integer >= 2", self.population)


    def validate_default_population(self) -> None:
        """The check of a ``population`` that may be ``None`` (:func:`default_population`)."""
        if self.population is not None:
            check(isinstance(self.population, int) and self.population >= 4, "population",
                  "an integer >= 4 or null (4 + 3 ln n)", self.population)


def default_population(n: int) -> int:
    """Hansen's default number of candidates for ``n`` parameters, λ = 4 + ⌊3 ln n⌋."""
    return 4 + int(3 * math.log(n))


def log_weights(lam: int) -> torch.Tensor:
    """Hansen's recombination weights of the ``μ = ⌊λ/2⌋`` best of ``λ`` candidates, best first:
    ``wᵢ ∝ ln((λ + 1)/2) − ln i``, summing to 1 (float64)."""
    raw = torch.tensor([math.log((lam + 1) / 2) - math.log(i) for i in range(1, lam // 2 + 1)],
                       dtype=torch.float64)
    return raw / raw.sum()


class PopulationEvaluation:
    """The population evaluation a rule composes: split across ranks, gathered, summarised.

    Args:
        rule: the rule's :class:`PopulationFields`.
        module: the user's module (its policy parameters are the population's genotype).
        ctx: the run's services.
        behaviour: ``"final"`` or ``"mean"`` observation as each episode's behaviour
            characterisation (for novelty), or ``None``.

    Attributes:
        layout: the module's :class:`ParamLayout`.
        evaluator: the :class:`PopulationEvaluator`.
    """

    def __init__(self, rule: PopulationFields, module: "RLModule", ctx: "RuleContext",
                 behaviour: str | None = None) -> None:
        if ctx.env_spec is None or ctx.env_info is None:
            raise UserError(f"{type(rule).__name__} needs an env: give the Trainer env=...")
        self.rule = rule
        self.layout = ParamLayout.of(module)
        self.policy = PopulationPolicy(module, self.layout)
        self.evaluator = PopulationEvaluator(
            self.policy, ctx.env_spec, ctx.env_info.layout, rule.episodes,
            rule.max_episode_steps, rule.max_envs, obs_norm=ctx.obs_norm, behaviour=behaviour,
            num_threads=ctx.num_threads)
        self.generation = 0  # generations finished
        self._steps = 0
        self._eval_s = 0.0

    def evaluate(self, ctx: "RuleContext", count: int,
                 params: Callable[[Sequence[int]], torch.Tensor],
                 seeds: Callable[[int, int], int], episodes: int | None = None,
                 behaviour: bool = True, observe: Callable[[Step], None] | None = None
                 ) -> Evaluation:
        """Evaluate individuals ``0..count-1``, this rank its :func:`shard`; gather the results.

        Args:
            ctx: the run's services.
            count: individuals.
            params: ``indices -> [len(indices), numel]`` parameters.
            seeds: ``(individual, episode) -> env seed``.
            episodes: episodes per individual (default ``rule.episodes``).
            behaviour: characterise behaviours (when the evaluator was built to).
            observe: sees every step this rank plays (see :meth:`PopulationEvaluator.play`).
        """
        episodes = self.rule.episodes if episodes is None else episodes
        mine = list(shard(count, ctx.rank, ctx.world_size))
        start = time.perf_counter()
        res = self.evaluator.play(mine, params, seeds, episodes, behaviour, observe)
        self._eval_s += time.perf_counter() - start
        self._steps += res.steps
        # One collective carries returns, lengths and behaviours.
        parts = [res.returns, res.lengths.to(torch.float64)]
        if res.behaviour is not None:
            parts.append(res.behaviour.mean(1))
        rows = gather_shards(ctx, torch.cat(parts, 1), count)
        returns, lengths = rows[:, :episodes], rows[:, episodes: 2 * episodes]
        bcs = rows[:, 2 * episodes:] if res.behaviour is not None else None
        bad = ~torch.isfinite(returns).all(1)
        fitness = returns.mean(1).masked_fill(bad, -math.inf)
        return Evaluation(returns, fitness, bcs, int(lengths.sum().item()),
                          int(res.lengths.sum().item()), int(bad.sum().item()))

    def finish_generation(self, ctx: "RuleContext", ev: Evaluation, local_frames: int,
                          moved: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> dict[str, float]:
        """Close a generation: log the fitness histogram and return the metrics every population
        rule reports.

        Args:
            ctx: the run's services.
            ev: the generation's evaluation.
            local_frames: env frames of the generation on this rank (the ``"frames"`` metric).
            moved: the flat parameters before and after the generation's update, for
                ``optim/param_norm`` and ``optim/update_norm``.
        """
        self.generation += 1
        ctx.log_histogram("fitness/returns", ev.fitness)
        finite = ev.fitness[torch.isfinite(ev.fitness)]
        nan = math.nan
        steps, seconds = self._steps, self._eval_s
        self._steps, self._eval_s = 0, 0.0
        return {
            "frames": float(local_frames),
            "fitness/return_mean": finite.mean().item() if finite.numel() else nan,
            "fitness/return_max": finite.max().item() if finite.numel() else nan,
            "fitness/return_min": finite.min().item() if finite.numel() else nan,
            "fitness/nonfinite": float(ev.nonfinite),
            "optim/sigma": float(self.rule.sigma),
            # Env steps of slots idling after their episode ended, as a fraction of all stepped.
            "perf/idle_fraction": 1.0 - local_frames / steps if steps else 0.0,
            "perf/eval_steps_per_s": steps / max(seconds, 1e-9),
            **({} if moved is None else {
                "optim/param_norm": moved[1].norm().item(),
                "optim/update_norm": (moved[1] - moved[0]).norm().item()}),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"generation": self.generation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generation = int(state["generation"])
