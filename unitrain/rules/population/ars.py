"""ARS: augmented random search.

Mania, Guy and Recht 2018, "Simple random search provides a competitive approach to
reinforcement learning". Each generation draws ``N = population / 2`` directions ``δₖ`` and plays
the mirrored candidates ``θ ± ν·δₖ`` (both members of a pair on the same episode seeds). With
``r⁺ₖ, r⁻ₖ`` their returns, the ``b`` directions with the largest ``max(r⁺ₖ, r⁻ₖ)`` are kept and

    θ ← θ + α / (b·σ_R) · Σₖ (r⁺ₖ − r⁻ₖ) · δₖ

with ``σ_R`` the standard deviation of the ``2b`` kept returns. The paper's V1 uses raw
observations; V2 normalises them with running statistics, which here is the env's own option
(``EnvSpec(obs_norm=True)``: statistics frozen within a generation, merged across processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from unitrain.errors import check
from unitrain.rules.population.reduce import noise_sum
from unitrain.rules.population.service import Evaluation
from unitrain.rules.population.strategy import Ask, Strategy, Told, mirrored_ask
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.rules.base import RuleContext

__all__ = ["ARS"]

_NOISE = 23  # shared random stream of the directions' seeds


@register_rule("ars")
@dataclass
class ARS(Strategy):
    """Augmented random search (V1; V2 with ``env.obs_norm: true``), top-``b`` directions.

    Args:
        population: candidates per generation, ``2N`` for ``N`` mirrored directions (even).
        sigma: exploration noise ν of the directions.
        lr: step size α.
        top: directions kept, ``b`` (``None``: all ``N``).
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int = 64
    sigma: float = 0.03
    lr: float = bounded(0.02, "(0, inf]")
    top: int | None = None

    def validate(self) -> None:
        super().validate()
        check(self.population % 2 == 0, "population",
              "an even integer >= 2 (mirrored directions)", self.population)
        check(self.top is None or 1 <= self.top <= self.population // 2, "top",
              f"an integer in [1, population/2={self.population // 2}] or null", self.top)

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        return mirrored_ask(ctx, _NOISE, generation, theta, self.population, self.sigma)

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        seeds, theta = ask.data
        directions = len(seeds)
        # A candidate with a non-finite return counts as the generation's worst.
        fitness = evaluation.fitness.to(torch.float64)
        finite = torch.isfinite(fitness)
        worst = fitness[finite].min() if bool(finite.any()) else torch.tensor(0.0, dtype=fitness.dtype)
        fitness = torch.where(finite, fitness, worst)
        plus, minus = fitness[0::2], fitness[1::2]
        b = self.top or directions
        kept = torch.argsort(torch.maximum(plus, minus), descending=True, stable=True)[:b]
        reward_std = torch.cat([plus[kept], minus[kept]]).std(unbiased=False).item()
        weights = torch.zeros(directions, dtype=torch.float64)
        weights[kept] = (plus - minus)[kept] / (b * reward_std) if reward_std > 0 else 0.0
        step = noise_sum(ctx, seeds, weights.tolist(), theta.numel(), theta.dtype) * self.lr
        return Told(theta=(theta.to(torch.float64) + step.to(theta.device)).to(theta.dtype),
                    metrics={"optim/lr": self.lr, "optim/reward_std": reward_std})
