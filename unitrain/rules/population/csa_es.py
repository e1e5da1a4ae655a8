"""CSA-ES: the (μ/μ, λ) evolution strategy with cumulative step-size adaptation.

Hansen and Ostermeier 2001, "Completely Derandomized Self-Adaptation in Evolution Strategies"
(cumulative step-size adaptation; constants as in Hansen 2016, "The CMA Evolution Strategy: A
Tutorial"), the isotropic baseline of "Solving Deep Reinforcement Learning Benchmarks with Linear
Policy Networks". The module's parameters are the mean ``m``. Each generation samples
``λ = population`` candidates ``m + σ·zᵢ`` (``zᵢ ~ N(0, I)`` regenerated from seeds, all on the
same episode seeds), keeps the ``μ = ⌊λ/2⌋`` best and, with ``⟨z⟩`` their mean direction,

    m ← m + σ·⟨z⟩
    p ← (1 − c)·p + √(c(2 − c)μ)·⟨z⟩
    σ ← σ·exp((c/d)·(‖p‖ / E‖N(0, I)‖ − 1))

with ``c = (μ + 2)/(n + μ + 5)``, ``d = 1 + 2·max(0, √((μ − 1)/(n + 1)) − 1) + c`` and
``E‖N(0, I)‖ ≈ √n·(1 − 1/(4n) + 1/(21n²))`` for ``n`` parameters: σ grows while successive
steps point the same way and shrinks while they cancel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unitrain.rules.population.service import (
    STREAM_EPISODES,
    PopulationEvaluation,
    PopulationFields,
    episode_seeds,
    generation_seeds,
    noise,
    noise_sum,
)
from unitrain.rules.registry import register_rule

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CSAES"]

_NOISE = 27  # shared random stream of the candidates' seeds


@register_rule("csa_es")
@dataclass
class CSAES(PopulationFields):
    """(μ/μ, λ)-ES, isotropic Gaussian, cumulative step-size adaptation.

    Args:
        population: λ, candidates per generation (the best ``⌊λ/2⌋`` are recombined).
        sigma: initial step size σ.
        episodes: episodes per candidate.
        max_episode_steps: cap on each evaluated episode's steps (``None``: the env's limit).
        max_envs: most env copies stepped together per process (``None``: a whole share at once).
    """

    population: int = 32
    sigma: float = 0.05

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.module = module
        self.pop = PopulationEvaluation(self, module, ctx)
        self.layout = self.pop.layout
        n, mu = self.layout.numel, self.population // 2
        self.c = (mu + 2) / (n + mu + 5)
        self.d = 1 + 2 * max(0.0, math.sqrt((mu - 1) / (n + 1)) - 1) + self.c
        self.chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self._path = torch.zeros(n, dtype=torch.float64)
        self._sigma = self.sigma

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        gen, count, n = self.pop.generation, self.population, self.layout.numel
        seeds = generation_seeds(ctx, _NOISE, gen, count)
        mean = self.layout.flatten(self.module)
        sigma = self._sigma

        def candidates(idx: list[int]) -> torch.Tensor:
            return torch.stack([mean + sigma * noise(seeds[j], n, self.layout.dtype, mean.device)
                                for j in idx])

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, gen)
        ev = self.pop.evaluate(ctx, count, candidates, lambda j, e: shared(0, e))

        mu = count // 2
        best = torch.argsort(ev.fitness, descending=True, stable=True)[:mu].tolist()
        weights = [0.0] * count
        for j in best:
            weights[j] = 1.0 / mu
        direction = noise_sum(seeds, weights, n, self.layout.dtype, torch.device("cpu"))
        new_mean = (mean.to(torch.float64) + sigma * direction.to(mean.device)).to(self.layout.dtype)
        self.layout.assign(self.module, new_mean)
        c = self.c
        self._path = (1 - c) * self._path + math.sqrt(c * (2 - c) * mu) * direction
        self._sigma = sigma * math.exp((c / self.d) * (self._path.norm().item() / self.chi - 1))

        metrics = self.pop.finish_generation(ctx, ev, ev.local_frames, (mean, new_mean))
        metrics.update({"optim/sigma": self._sigma,
                        "optim/path_ratio": self._path.norm().item() / self.chi})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**self.pop.state_dict(), "path": self._path.clone(), "sigma": self._sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pop.load_state_dict(state)
        self._path = state["path"].clone()
        self._sigma = float(state["sigma"])
