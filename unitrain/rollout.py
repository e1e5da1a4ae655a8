"""Rollouts: the one loop that plays whole episodes in a batched env.

Deterministic evaluation, population evaluation (:mod:`unitrain.population`) and the projection
rule's elite collection all run :func:`rollout`: env slot ``i`` plays ``quota[i]`` whole episodes
(autoreset continues a slot's next episode), slots that are done idle until every slot is done,
and an optional observer sees every step (to record trajectories, characterise behaviour or feed
observation statistics). :func:`evaluate_policy` builds on it for the deterministic evaluation of
a module: episode ``k`` of an evaluation is seeded from ``(run seed, evaluation, k)`` whatever
process plays it, so the reported return does not depend on the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase

if TYPE_CHECKING:
    from unitrain.envs import BatchedEnv

__all__ = ["Rollout", "Step", "rollout", "evaluate_policy", "eval_seed", "shard",
           "EVAL_STREAM", "MAX_EVAL_ENVS"]

# Seed stream of evaluation episodes (the first entry of derive_seed after the run seed).
EVAL_STREAM = 2
# Most env slots one evaluation wave steps together.
MAX_EVAL_ENVS = 32


@dataclass
class Step:
    """What an observer of :func:`rollout` sees after each env step.

    Attributes:
        observation: ``[n, *obs_shape]`` the observations the policy acted on.
        action: ``[n, ...]`` the actions taken.
        next: the step's ``("next", ...)`` entries (reward, done flags, next observation; the
            final observation of an episode that ended).
        active: ``[n]`` bool, slots whose episode this step belonged to.
        ended: ``[n]`` bool, slots whose episode ended at this step (done or capped).
        length: ``[n]`` int64, steps of each slot's current episode including this one.
    """

    observation: torch.Tensor
    action: torch.Tensor
    next: TensorDictBase
    active: torch.Tensor
    ended: torch.Tensor
    length: torch.Tensor


@dataclass
class Rollout:
    """Episodes played by :func:`rollout`, in the order they ended.

    Attributes:
        returns: ``[k]`` float64 episode returns (non-finite if the env produced them).
        lengths: ``[k]`` int64 episode lengths.
        slots: ``[k]`` int64 env slot of each episode.
        steps: env steps simulated, counting every slot of every step (idle ones included).
    """

    returns: torch.Tensor
    lengths: torch.Tensor
    slots: torch.Tensor
    steps: int

    def by_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns and lengths ``[n]`` ordered by slot (one episode per slot)."""
        order = torch.argsort(self.slots)
        return self.returns[order], self.lengths[order]


@torch.no_grad()
def rollout(env: "BatchedEnv", policy: Callable[[torch.Tensor], torch.Tensor], *,
            quota: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
            max_steps: int | None = None,
            observe: Callable[[Step], None] | None = None) -> Rollout:
    """Play whole episodes: slot ``i`` plays ``quota[i]`` of them (default one per slot).

    The env is reset first. Rewards of idle slots are ignored (``where``, so a non-finite reward
    of an idle slot does not leak in).

    Args:
        env: the batched env (``n = env.num_envs`` slots).
        policy: ``observation [n, *obs_shape] -> action [n, ...]`` (on the env's device).
        quota: episodes per slot.
        seeds: one seed per slot for the reset (static: slot ``i`` starts from ``seeds[i]``);
            ``None`` keeps the env's own seeding.
        max_steps: cap on each episode's steps (one episode per slot only: a capped episode is
            not reset by the env, so its slot cannot go on).
        observe: called with a :class:`Step` after every step.

    Returns:
        The episodes, in the order they ended.
    """
    n = env.num_envs
    remaining = torch.ones(n, dtype=torch.int64) if quota is None else torch.as_tensor(
        list(quota), dtype=torch.int64)
    if max_steps is not None and bool((remaining > 1).any()):
        raise ValueError("rollout: max_steps needs one episode per slot")
    if seeds is not None:
        # A list seeds each slot: gymnasium reseeds its envs, EnvPool makes a pool with them.
        env.set_seed(list(seeds), static_seed=True)  # type: ignore[arg-type]
    td = env.reset()
    ret = torch.zeros(n, dtype=torch.float64)
    length = torch.zeros(n, dtype=torch.int64)
    active = remaining > 0
    returns: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    steps = 0
    while bool(active.any()):
        obs = td["observation"]
        action = policy(obs)
        td["action"] = action
        out, td = env.step_and_maybe_reset(td)
        nxt = out["next"]
        ret += torch.where(active, nxt["reward"].reshape(n).to(torch.float64), 0.0)
        length += active
        steps += 1
        ended = active & nxt["done"].reshape(n)
        if max_steps is not None:
            ended |= active & (length >= max_steps)
        if observe is not None:
            observe(Step(obs, action, nxt, active, ended, length))
        if bool(ended.any()):
            idx = ended.nonzero().squeeze(-1)
            returns.append(ret[idx].clone())
            lengths.append(length[idx].clone())
            slots.append(idx)
            ret[idx] = 0.0
            length[idx] = 0
            remaining -= ended.long()
            active = remaining > 0
    if not slots:
        empty = torch.zeros(0, dtype=torch.int64)
        return Rollout(empty.double(), empty, empty, steps * n)
    return Rollout(torch.cat(returns), torch.cat(lengths), torch.cat(slots), steps * n)


def shard(count: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``count`` items that ``rank`` takes (sizes differ by at most 1)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def eval_seed(run_seed: int, evaluation: int, episode: int) -> int:
    """The env seed of episode ``episode`` of evaluation number ``evaluation``."""
    from unitrain.envs import derive_seed

    return derive_seed(run_seed, EVAL_STREAM, evaluation, episode)


@torch.no_grad()
def evaluate_policy(act: Callable[[torch.Tensor], torch.Tensor],
                    make_env: Callable[[int], "BatchedEnv"], episodes: int, seed: int,
                    evaluation: int = 0, rank: int = 0, world_size: int = 1,
                    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Deterministic evaluation over ``episodes`` episodes, split across processes.

    Episode ``k`` is played from :func:`eval_seed` ``(seed, evaluation, k)`` by the process whose
    :func:`shard` holds ``k``, and the statistics are computed over all episodes in index order,
    so every process count reports the same numbers.

    Args:
        act: ``observation -> action`` on ``device`` (e.g. ``module.act``).
        make_env: ``slots -> env`` with that many slots (cached by the caller if it likes).
        episodes: episodes in all.
        seed: the run seed.
        evaluation: the evaluation's number (each evaluation plays new episodes).
        rank, world_size: this process and the process count.
        all_gather: stacks a tensor from every process (required when ``world_size > 1``).
        device: where ``act`` runs.

    Returns:
        ``return_mean``, ``return_std``, ``return_max``, ``return_min``, ``length_mean`` and
        ``episodes``.
    """
    mine = list(shard(episodes, rank, world_size))
    rets = torch.zeros(len(mine), dtype=torch.float64)
    lens = torch.zeros(len(mine), dtype=torch.float64)
    for a in range(0, len(mine), MAX_EVAL_ENVS):
        wave = mine[a: a + MAX_EVAL_ENVS]
        env = make_env(len(wave))
        played = rollout(env, lambda obs: act(obs.to(device)).cpu(),
                         seeds=[eval_seed(seed, evaluation, k) for k in wave])
        r, n = played.by_slot()
        rets[a: a + len(wave)], lens[a: a + len(wave)] = r, n.double()
    if world_size > 1:
        assert all_gather is not None, "evaluate_policy: several processes need all_gather"
        # Every process contributes the same number of rows (NaN-padded) to one gather.
        width = math.ceil(episodes / world_size)
        local = torch.full((2, width), math.nan, dtype=torch.float64)
        local[0, : len(mine)], local[1, : len(mine)] = rets, lens
        rows = all_gather(local.to(device)).cpu()
        rets = torch.cat([rows[r, 0, : len(shard(episodes, r, world_size))]
                          for r in range(world_size)])
        lens = torch.cat([rows[r, 1, : len(shard(episodes, r, world_size))]
                          for r in range(world_size)])
    return summarize(rets, lens)


def summarize(returns: torch.Tensor, lengths: torch.Tensor) -> dict[str, Any]:
    """Mean, population std, max and min of ``returns``; mean of ``lengths``; their count."""
    return {"return_mean": returns.mean().item(), "return_std": returns.std(unbiased=False).item(),
            "return_max": returns.max().item(), "return_min": returns.min().item(),
            "length_mean": lengths.mean().item(), "episodes": float(len(returns))}
