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
particles are the rule's state (checkpointed); noise is regenerated from seeds drawn identically
on every rank, so ``devices=1`` and ``devices=N`` move them alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from unitrain.errors import check
from unitrain.rules.population.service import (
    STREAM_EPISODES,
    PopulationEvaluation,
    PopulationFields,
    episode_seeds,
    generation_seeds,
    noise,
)
from unitrain.rules.registry import register_rule

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CBO"]

_NOISE = 29  # shared random stream of the particles' noise seeds
_INIT = 31  # shared random stream of the initial spread


@register_rule("cbo")
@dataclass
class CBO(PopulationFields):
    """Consensus-based optimisation with anisotropic noise.

    Args:
        population: particles.
        sigma: noise strength σ.
        alpha: weight α of the fitness in the consensus (large: the best particle dominates).
        drift: λ, the pull towards the consensus.
        dt: time step.
        init_std: spread of the initial particles around the module's parameters.
        episodes: episodes per particle.
        max_episode_steps: cap on each evaluated episode's steps (``None``: the env's limit).
        max_envs: most env copies stepped together per process (``None``: a whole share at once).
    """

    population: int = 64
    sigma: float = 1.0
    alpha: float = 50.0
    drift: float = 1.0
    dt: float = 0.1
    init_std: float = 0.1

    def validate(self) -> None:
        super().validate()
        check(self.alpha >= 0, "alpha", "a number >= 0", self.alpha)
        check(self.drift >= 0, "drift", "a number >= 0", self.drift)
        check(self.dt > 0, "dt", "a number > 0", self.dt)
        check(self.init_std > 0, "init_std", "a number > 0", self.init_std)

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.module = module
        self.pop = PopulationEvaluation(self, module, ctx)
        self.layout = self.pop.layout
        start = self.layout.flatten(module).cpu()
        seeds = generation_seeds(ctx, _INIT, 0, self.population)
        self._particles = torch.stack([start + self.init_std * noise(s, self.layout.numel,
                                                                     self.layout.dtype)
                                       for s in seeds])

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        gen, count, n = self.pop.generation, self.population, self.layout.numel
        particles = self._particles
        device = self.module.device

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            return particles[list(idx)].to(device)

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, gen)
        ev = self.pop.evaluate(ctx, count, candidates, lambda j, e: shared(0, e))

        before = self.layout.flatten(self.module)
        fitness = ev.fitness.to(torch.float64)
        finite = torch.isfinite(fitness)
        logits = torch.where(finite, self.alpha * fitness, torch.tensor(-math.inf,
                                                                         dtype=torch.float64))
        if not bool(finite.any()):
            logits = torch.zeros_like(fitness)  # nothing to prefer: the plain mean
        weights = torch.softmax(logits, 0)
        consensus = (weights @ particles.to(torch.float64)).to(self.layout.dtype)
        seeds = generation_seeds(ctx, _NOISE, gen, count)
        xi = torch.stack([noise(s, n, self.layout.dtype) for s in seeds])
        gap = particles - consensus
        self._particles = (particles - self.drift * self.dt * gap
                           + self.sigma * math.sqrt(self.dt) * gap * xi)
        self.layout.assign(self.module, consensus.to(before.device))

        metrics = self.pop.finish_generation(ctx, ev, ev.local_frames,
                                             (before, consensus.to(before.device)))
        metrics.update({
            "optim/spread": gap.norm(dim=1).mean().item(),
            "optim/weight_max": weights.max().item(),
        })
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**self.pop.state_dict(), "particles": self._particles.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pop.load_state_dict(state)
        self._particles = state["particles"].clone()
