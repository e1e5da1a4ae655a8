"""CBO: consensus-based optimisation.

Pinnau, Totzeck, Tse and Martin 2017, "A consensus-based model for global optimization and its
mean-field limit"; anisotropic noise for high dimensions from Carrillo, Jin, Li and Zhu 2021; as
studied in Riedl et al., "Gradient is All You Need?". ``population`` particles ``Xᵢ`` persist from
generation to generation. With ``f = −return`` (fitness is maximised), each generation evaluates
every particle and moves them towards the weighted consensus

    v = Σᵢ Xᵢ·exp(−α f(Xᵢ)) / Σᵢ exp(−α f(Xᵢ))        (by log-sum-exp),
    Xᵢ ← Xᵢ − λ·dt·(Xᵢ − v) + σ·√dt·(Xᵢ − v) ⊙ ξᵢ,     ξᵢ ~ N(0, I).

The module holds the consensus ``v``, so ``module.act`` (and every evaluation) is the consensus
policy. Particles start at the module's initial parameters plus ``N(0, init_std²)``. The
particles are the rule's state, split across processes: each rank holds, evaluates and moves its
shard of them (memory and update ``O(P·n / W)`` per rank), the consensus is one exact sum across
ranks (:func:`~unitrain.rules.population.reduce.exact_sum`), and checkpoints gather them whole.
Noise is regenerated from per-particle seeds drawn identically on every rank, so ``devices=1``
and ``devices=N`` move them alike, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from unitrain.envs.rollout import shard
from unitrain.rules.population.reduce import exact_sum, global_max
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               episode_seeds, gather_shards, generation_seeds,
                                               noise)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CBO"]

_NOISE = 29  # shared random stream of the particles' noise seeds
_INIT = 31  # shared random stream of the initial spread


@register_rule("cbo")
@dataclass
class CBO(Strategy):
    """Consensus-based optimisation with anisotropic noise.

    Args:
        population: particles.
        sigma: noise strength σ.
        alpha: weight α of the fitness in the consensus (large: the best particle dominates).
        drift: λ, the pull towards the consensus.
        dt: time step.
        init_std: spread of the initial particles around the module's parameters.
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int = 64
    sigma: float = 1.0
    alpha: float = bounded(50.0, "[0, inf]")
    drift: float = bounded(1.0, "[0, inf]")
    dt: float = bounded(0.1, "(0, inf]")
    init_std: float = bounded(0.1, "(0, inf]")

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        start = layout.flatten(module).cpu()
        seeds = generation_seeds(ctx, _INIT, 0, self.population)
        # This rank holds the particles it evaluates: its shard of the population.
        self._ctx, self._share = ctx, shard(self.population, ctx.rank, ctx.world_size)
        self._particles = torch.stack([start + self.init_std * noise(seeds[i], layout.numel,
                                                                     layout.dtype)
                                       for i in self._share])

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        particles, device, first = self._particles, theta.device, self._share.start

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            return particles[[i - first for i in idx]].to(device)

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
        return Ask(self.population, candidates, lambda j, e: shared(0, e))

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        particles, share = self._particles, self._share
        count, n = ask.count, particles.shape[1]
        fitness = evaluation.fitness.to(torch.float64)
        finite = torch.isfinite(fitness)
        logits = torch.where(finite, self.alpha * fitness, torch.tensor(-math.inf,
                                                                         dtype=torch.float64))
        if not bool(finite.any()):
            logits = torch.zeros_like(fitness)  # nothing to prefer: the plain mean
        weights = torch.softmax(logits, 0)
        w = weights.tolist()
        # Σᵢ wᵢ = 1: no term wᵢ·Xᵢ exceeds the largest |Xᵢ| of any rank.
        peak = global_max(ctx, float(particles.abs().max()) if len(share) else 0.0)
        consensus = exact_sum(ctx, range(count), lambda i, out: out.add_(
            particles[i - share.start], alpha=w[i]), peak, (n,), block=1).to(particles.dtype)
        seeds = generation_seeds(ctx, _NOISE, generation, count)
        xi = torch.stack([noise(seeds[i], n, particles.dtype) for i in share]) if len(share) \
            else particles
        gap = particles - consensus
        self._particles = (particles - self.drift * self.dt * gap
                           + self.sigma * math.sqrt(self.dt) * gap * xi)
        spread = gather_shards(ctx, gap.norm(dim=1, keepdim=True), count)
        return Told(theta=consensus, metrics={"optim/spread": spread.mean().item(),
                                              "optim/weight_max": weights.max().item()})

    def state_dict(self) -> dict[str, Any]:
        # Every rank takes part in a checkpoint: the particles are gathered whole, so a run
        # resumes on any number of processes.
        rows = gather_shards(self._ctx, self._particles, self.population)
        return {"particles": rows.to(self._particles.dtype)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        particles = state["particles"]
        self._particles = particles[self._share.start: self._share.stop].clone()
