"""Rollouts: the one loop that plays whole episodes in a batched env.

Deterministic evaluation, population evaluation (:mod:`unitrain.rules.population.service`) and the projection
rule's elite collection all run :func:`rollout`: env slot ``i`` plays ``quota[i]`` whole episodes
(autoreset continues a slot's next episode), slots that are done idle until every slot is done,
and an optional observer sees every step (to record trajectories, characterise behaviour or feed
observation statistics). A recurrent policy's state is carried per slot (``state``), each slot's
row going back to the initial state where its episode ends. :func:`evaluate_policy` builds on it
for the deterministic evaluation of a module: episode ``k`` of an evaluation is seeded from
``(run seed, evaluation, k)`` whatever process plays it, so the reported return does not depend
on the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase

from unitrain.envs.carry import State, put_, reset_, state_like, take

if TYPE_CHECKING:
    from unitrain.envs.batched import BatchedEnv

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
        observation: ``[n, *obs_shape]`` the observations the policy acted on (a TensorDict of
            batch ``[n]`` for named entries, :mod:`unitrain.envs.observation`).
        action: ``[n, ...]`` the actions taken.
        next: the step's ``("next", ...)`` entries (reward, done flags, next observation; the
            final observation of an episode that ended).
        active: ``[n]`` bool, slots whose episode this step belonged to.
        ended: ``[n]`` bool, slots whose episode ended at this step (done or capped).
        length: ``[n]`` int64, steps of each slot's current episode including this one.
    """

    observation: torch.Tensor | TensorDictBase
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
def rollout(env: "BatchedEnv", policy: Callable[..., Any], *,
            quota: Sequence[int] | None = None, seeds: Sequence[int] | None = None,
            max_steps: int | None = None,
            observe: Callable[[Step], None] | None = None,
            on_end: Callable[[torch.Tensor], None] | None = None,
            state: State | None = None) -> Rollout:
    """Play whole episodes: slot ``i`` plays ``quota[i]`` of them (default one per slot).

    The env is reset first. Rewards of idle slots are ignored (``where``, so a non-finite reward
    of an idle slot does not leak in).

    The env's slot groups (``env.parts``: one, or two on EnvPool) are stepped in a pipeline:
    each group's next step is handed to EnvPool's threads as soon as its policy has run, and the
    policy of the other group runs while those envs step. Each group's episodes are what they
    would be unsplit; a group whose slots are all done is no longer stepped.

    Args:
        env: the batched env (``n = env.num_envs`` slots).
        policy: ``(observation [k, *obs_shape], slots) -> action [k, ...]`` (named entries: a
            TensorDict of batch ``[k]``) for the slots
            ``slots`` (a ``slice`` of ``range(n)``, ``k`` long), on the env's device (where
            the bookkeeping and the returned tensors are too). For an env with action masks
            (``env.info.masked``) it is called as ``policy(observation, slots, mask)`` with
            the observations' masks ``[k, A]`` (:mod:`unitrain.policy.action`).
        quota: episodes per slot.
        seeds: one seed per slot for the reset (static: slot ``i`` starts from ``seeds[i]``);
            ``None`` keeps the env's own seeding.
        max_steps: cap on each episode's steps (one episode per slot only: a capped episode is
            not reset by the env, so its slot cannot go on).
        observe: called with a :class:`Step` of all ``n`` slots after every step.
        on_end: called with the slots whose episode just ended (indices into ``range(n)``),
            before the policy chooses their next episode's first action.
        state: a recurrent policy's initial state for all ``n`` slots (a tensor, or a tuple /
            list / dict of tensors, slots first; see :mod:`unitrain.envs.carry`). With it the
            policy is ``(observation, slots, state of those slots) -> (action, state)``
            (``(observation, slots, mask, state)`` with action masks), the
            returned rows are carried to the slots' next step, and a slot's rows go back to
            ``state``'s where its episode ends (before its next episode's first action).

    Returns:
        The episodes, in the order they ended.
    """
    n, device = env.num_envs, env.device
    remaining = torch.ones(n, dtype=torch.int64) if quota is None else torch.as_tensor(
        list(quota), dtype=torch.int64)
    remaining = remaining.to(device)
    if max_steps is not None and bool((remaining > 1).any()):
        raise ValueError("rollout: max_steps needs one episode per slot")
    if seeds is not None:
        # A list seeds each slot: gymnasium reseeds its envs, EnvPool makes a pool with them.
        env.set_seed(list(seeds), static_seed=True)  # type: ignore[arg-type]
    first = env.reset()["observation"]
    ret = torch.zeros(n, dtype=torch.float64, device=device)
    length = torch.zeros(n, dtype=torch.int64, device=device)
    active = remaining > 0
    groups = [_Group(j, sl, first[sl]) for j, sl in enumerate(env.parts)]
    returns: list[torch.Tensor] = []
    lengths: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    rounds = 0
    carried = None if state is None else state_like(state)

    masked = env.info.masked

    def launch(g: _Group) -> None:
        g.last_obs = g.obs
        extra = (env.action_mask(g.slots),) if masked else ()
        if carried is None:
            g.action = policy(g.obs, g.slots, *extra)
        else:
            g.action, new = policy(g.obs, g.slots, *extra, take(carried, g.slots))
            put_(carried, g.slots, new)
        env.send_part(g.index, g.action)
        g.flying = True

    def land(g: _Group) -> Step:
        nxt, g.obs = env.recv_part(g.index)
        g.flying = False
        sl = g.slots
        on = active[sl].clone()
        ret[sl] += torch.where(on, nxt["reward"].reshape(-1).to(torch.float64), 0.0)
        length[sl] += on
        ended = on & nxt["done"].reshape(-1)
        if max_steps is not None:
            ended |= on & (length[sl] >= max_steps)
        g.record = Step(g.last_obs, g.action, nxt, on, ended, length[sl].clone())
        if bool(ended.any()):
            idx = ended.nonzero().squeeze(-1) + sl.start
            returns.append(ret[idx].clone())
            lengths.append(length[idx].clone())
            slots.append(idx)
            ret[idx] = 0.0
            length[idx] = 0
            remaining[sl] -= ended.long()
            active[sl] = remaining[sl] > 0
            if carried is not None:
                reset_(carried, state, idx)
            if on_end is not None:
                on_end(idx)
        return g.record

    if bool(active.any()):
        for g in groups:  # every group steps at least once, so an idle one has a record
            launch(g)
    while any(g.flying for g in groups):
        records = []
        for g in groups:
            records.append(land(g) if g.flying else g.idle())
            if bool(active[g.slots].any()):
                launch(g)
        rounds += 1
        if observe is not None:
            observe(records[0] if len(records) == 1 else Step(
                *(torch.cat([getattr(r, f) for r in records]) for f in ("observation", "action")),
                torch.cat([r.next for r in records]),
                *(torch.cat([getattr(r, f) for r in records])
                  for f in ("active", "ended", "length"))))
    if not slots:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return Rollout(empty.double(), empty, empty, rounds * n)
    return Rollout(torch.cat(returns), torch.cat(lengths), torch.cat(slots), rounds * n)


class _Group:
    """A slot group of a :func:`rollout`: its observations and its step in flight."""

    def __init__(self, index: int, slots: slice, obs: torch.Tensor) -> None:
        self.index, self.slots, self.obs = index, slots, obs
        self.last_obs = obs
        self.action: torch.Tensor | None = None
        self.flying = False
        self.record: Step | None = None

    def idle(self) -> Step:
        """The group's entry in a step it sat out (every slot inactive)."""
        r = self.record
        assert r is not None, "a group is launched once before it can sit a step out"
        none = torch.zeros_like(r.active)
        return Step(r.observation, r.action, r.next, none, none, torch.zeros_like(r.length))


def shard(count: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``count`` items that ``rank`` takes (sizes differ by at most 1)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def eval_seed(run_seed: int, evaluation: int, episode: int) -> int:
    """The env seed of episode ``episode`` of evaluation number ``evaluation``."""
    from unitrain.envs.spec import derive_seed

    return derive_seed(run_seed, EVAL_STREAM, evaluation, episode)


@torch.no_grad()
def evaluate_policy(act: Callable[..., Any],
                    make_env: Callable[[int], "BatchedEnv"], episodes: int, seed: int,
                    evaluation: int = 0, rank: int = 0, world_size: int = 1,
                    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    device: torch.device | str = "cpu",
                    initial_state: Callable[[int], State] | None = None) -> dict[str, float]:
    """Deterministic evaluation over ``episodes`` episodes, split across processes.

    Episode ``k`` is played from :func:`eval_seed` ``(seed, evaluation, k)`` by the process whose
    :func:`shard` holds ``k``, and the statistics are computed over all episodes in index order,
    so every process count reports the same numbers.

    Args:
        act: ``observation -> action`` on ``device`` (e.g. ``module.act``); for an env with
            action masks ``(observation, mask) -> action``.
        make_env: ``slots -> env`` with that many slots (cached by the caller if it likes).
        episodes: episodes in all.
        seed: the run seed.
        evaluation: the evaluation's number (each evaluation plays new episodes).
        rank, world_size: this process and the process count.
        all_gather: stacks a tensor from every process (required when ``world_size > 1``).
        device: where ``act`` runs.
        initial_state: a recurrent policy's ``slots -> state`` (``module.initial_state``); with
            it ``act`` is ``(observation[, mask], state=state) -> (action, state)``
            (``module.act``); the state is carried per slot and reset where an episode starts.

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
        seeds = [eval_seed(seed, evaluation, k) for k in wave]
        if initial_state is None:
            played = rollout(env, lambda obs, _, *mask, on=env.device: act(
                obs.to(device), *(m.to(device) for m in mask)).to(on), seeds=seeds)
        else:
            # The rollout passes (observation, slots[, mask], state).
            played = rollout(env, lambda obs, _, *rest, on=env.device: _moved(act(
                obs.to(device), *(m.to(device) for m in rest[:-1]), state=rest[-1]), on),
                             seeds=seeds, state=initial_state(len(wave)))
        r, n = played.by_slot()
        rets[a: a + len(wave)], lens[a: a + len(wave)] = r.cpu(), n.cpu().double()
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


def _moved(out: tuple[torch.Tensor, State], device: torch.device) -> tuple[torch.Tensor, State]:
    """A recurrent ``act``'s ``(action, state)`` with the action on the env's ``device``."""
    return out[0].to(device), out[1]


def summarize(returns: torch.Tensor, lengths: torch.Tensor) -> dict[str, Any]:
    """Mean, population std, max and min of ``returns``; mean of ``lengths``; their count."""
    return {"return_mean": returns.mean().item(), "return_std": returns.std(unbiased=False).item(),
            "return_max": returns.max().item(), "return_min": returns.min().item(),
            "length_mean": lengths.mean().item(), "episodes": float(len(returns))}
