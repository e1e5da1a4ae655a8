"""CSA-ES: the (μ/μ_w, λ) evolution strategy with cumulative step-size adaptation.

Hansen and Ostermeier 2001, "Completely Derandomized Self-Adaptation in Evolution Strategies"
(cumulative step-size adaptation; constants as in Hansen 2016, "The CMA Evolution Strategy: A
Tutorial"), the isotropic baseline of "Solving Deep Reinforcement Learning Benchmarks with Linear
Policy Networks". The module's parameters are the mean ``m``. Each generation samples
``λ = population`` candidates ``m + σ·zᵢ`` (``zᵢ ~ N(0, I)`` regenerated from seeds, all on the
same episode seeds), keeps the ``μ = ⌊λ/2⌋`` best and, with ``⟨z⟩_w = Σ wᵢ z_{i:λ}`` their
weighted mean direction (Hansen's weights ``wᵢ ∝ ln((λ + 1)/2) − ln i``, best first, or equal
weights ``1/μ`` with ``weights: equal``) and ``μ_w = 1 / Σ wᵢ²``,

    m ← m + σ·⟨z⟩_w
    p ← (1 − c)·p + √(c(2 − c)μ_w)·⟨z⟩_w
    σ ← σ·exp((c/d)·(‖p‖ / E‖N(0, I)‖ − 1))

with ``c = (μ_w + 2)/(n + μ_w + 5)``, ``d = 1 + 2·max(0, √((μ_w − 1)/(n + 1)) − 1) + c`` and
``E‖N(0, I)‖ ≈ √n·(1 − 1/(4n) + 1/(21n²))`` for ``n`` parameters: σ grows while successive
steps point the same way and shrinks while they cancel. This is CMA-ES (:mod:`.cmaes`) with the
covariance fixed to the identity, the CSA-ES of the linear-policy paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unitrain.rules.population.reduce import noise_sum
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               default_population, episode_seeds,
                                               generation_seeds, log_weights, noise)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule
from unitrain.validation import one_of

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
        population: λ, candidates per generation (``None``: ``4 + ⌊3 ln n⌋`` for ``n``
            parameters, as for CMA-ES); the best ``⌊λ/2⌋`` are recombined.
        sigma: initial step size σ₀.
        weights: ``"log"`` (Hansen's recombination weights, as CMA-ES) or ``"equal"``.
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int | None = None  # type: ignore[assignment]
    sigma: float = 0.1
    weights: str = one_of("log", "log", "equal")

    def validate_population(self) -> None:
        self.validate_default_population()

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        n = layout.numel
        self.lam = self.population or default_population(n)
        mu = self.lam // 2
        self.w = (log_weights(self.lam) if self.weights == "log"
                  else torch.full((mu,), 1.0 / mu, dtype=torch.float64))
        self.mu_w = 1.0 / float((self.w ** 2).sum())
        self.c = (self.mu_w + 2) / (n + self.mu_w + 5)
        self.d = 1 + 2 * max(0.0, math.sqrt((self.mu_w - 1) / (n + 1)) - 1) + self.c
        self.chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self._path = torch.zeros(n, dtype=torch.float64)
        self._sigma = self.sigma

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        seeds = generation_seeds(ctx, _NOISE, generation, self.lam)
        sigma, n = self._sigma, theta.numel()

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            return torch.stack([theta + sigma * noise(seeds[j], n, theta.dtype, theta.device)
                                for j in idx])

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
        return Ask(self.lam, candidates, lambda j, e: shared(0, e), data=(seeds, theta))

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        seeds, mean = ask.data
        count, n, sigma = ask.count, mean.numel(), self._sigma
        best = torch.argsort(evaluation.fitness, descending=True, stable=True)[:len(self.w)]
        weights = [0.0] * count
        for rank, j in enumerate(best.tolist()):
            weights[j] = float(self.w[rank])
        direction = noise_sum(ctx, seeds, weights, n, mean.dtype)
        new_mean = (mean.to(torch.float64) + sigma * direction.to(mean.device)).to(mean.dtype)
        c = self.c
        self._path = (1 - c) * self._path + math.sqrt(c * (2 - c) * self.mu_w) * direction
        self._sigma = sigma * math.exp((c / self.d) * (self._path.norm().item() / self.chi - 1))
        return Told(theta=new_mean, metrics={"optim/sigma": self._sigma,
                                             "optim/path_ratio": self._path.norm().item() / self.chi})

    def state_dict(self) -> dict[str, Any]:
        return {"path": self._path.clone(), "sigma": self._sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._path = state["path"].clone()
        self._sigma = float(state["sigma"])
