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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unitrain.rules.population.reduce import noise_sum
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               episode_seeds, generation_seeds, noise)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CSAES"]

_NOISE = 27  # shared random stream of the candidates' seeds


@register_rule("csa_es")
@dataclass
class CSAES(Strategy):
    """(μ/μ, λ)-ES, isotropic Gaussian, cumulative step-size adaptation.

    Args:
        population: λ, candidates per generation (the best ``⌊λ/2⌋`` are recombined).
        sigma: initial step size σ.
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int = 32
    sigma: float = 0.05

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        n, mu = layout.numel, self.population // 2
        self.c = (mu + 2) / (n + mu + 5)
        self.d = 1 + 2 * max(0.0, math.sqrt((mu - 1) / (n + 1)) - 1) + self.c
        self.chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self._path = torch.zeros(n, dtype=torch.float64)
        self._sigma = self.sigma

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        seeds = generation_seeds(ctx, _NOISE, generation, self.population)
        sigma, n = self._sigma, theta.numel()

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            return torch.stack([theta + sigma * noise(seeds[j], n, theta.dtype, theta.device)
                                for j in idx])

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
        return Ask(self.population, candidates, lambda j, e: shared(0, e), data=(seeds, theta))

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        seeds, mean = ask.data
        count, n, sigma = ask.count, mean.numel(), self._sigma
        mu = count // 2
        best = torch.argsort(evaluation.fitness, descending=True, stable=True)[:mu].tolist()
        weights = [0.0] * count
        for j in best:
            weights[j] = 1.0 / mu
        direction = noise_sum(ctx, seeds, weights, n, mean.dtype)
        new_mean = (mean.to(torch.float64) + sigma * direction.to(mean.device)).to(mean.dtype)
        c = self.c
        self._path = (1 - c) * self._path + math.sqrt(c * (2 - c) * mu) * direction
        self._sigma = sigma * math.exp((c / self.d) * (self._path.norm().item() / self.chi - 1))
        return Told(theta=new_mean, metrics={"optim/sigma": self._sigma,
                                             "optim/path_ratio": self._path.norm().item() / self.chi})

    def state_dict(self) -> dict[str, Any]:
        return {"path": self._path.clone(), "sigma": self._sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._path = state["path"].clone()
        self._sigma = float(state["sigma"])
