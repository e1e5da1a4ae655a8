"""CEM: the cross-entropy method with a diagonal Gaussian, in the form CEM-RL uses.

Pourchot and Sigaud 2019, "CEM-RL: Combining evolutionary and gradient-based methods for policy
search" (the CEM part; after Rubinstein 1997 and Szita and Lőrincz 2006's extra noise). The
module's parameters are the mean ``μ``; a diagonal variance ``Σ`` starts at ``σ²``. Each generation
samples ``θᵢ = μ + √Σ ⊙ εᵢ`` (all candidates on the same episode seeds), ranks them by return and
refits to the ``K`` best (``K = ⌊elite_fraction · population⌋``) with weights
``wᵢ ∝ log((K + 1) / i)``:

    μ' = Σᵢ wᵢ θ₍ᵢ₎,        Σ' = Σᵢ wᵢ (θ₍ᵢ₎ − μ)² + ε,        ε ← τ·ε + (1 − τ)·ε_end

(the variance about the previous mean, as in CEM-RL's code). The added noise ``ε`` starts at
``noise_init`` and decays towards ``noise_end``, keeping the search from collapsing early.
Noise is regenerated from seeds drawn identically on every rank; each rank rebuilds only its share
of the elites for the refit, combined exactly across ranks
(:func:`~unitrain.rules.population.reduce.exact_sum`), so ``devices=1`` and ``devices=N`` make the
same updates bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from unitrain.rules.population.reduce import NOISE_BOUND, exact_sum
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               PopulationFields, episode_seeds, generation_seeds,
                                               noise)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CEM", "CEMFields", "CEMDistribution"]

_NOISE = 25  # shared random stream of the candidates' seeds


class CEMDistribution:
    """CEM's search distribution over a flat parameter vector: the mean lives in the module, the
    diagonal variance ``Σ`` and the extra noise ``ε`` here (what :class:`CEM` and
    :class:`~unitrain.rules.population.cem_rl.CEMRL` share).

    Args:
        rule: the rule's CEM fields (``sigma``, ``elite_fraction``, ``noise_*``).
        numel: parameters.
    """

    def __init__(self, rule: "CEMFields", numel: int) -> None:
        self.rule = rule
        self.var = torch.full((numel,), rule.sigma ** 2, dtype=torch.float64)
        self.extra = rule.noise_init

    def std(self, like: torch.Tensor) -> torch.Tensor:
        """``√Σ`` in ``like``'s dtype and device."""
        return self.var.sqrt().to(like.dtype).to(like.device)

    def refit(self, ctx: "RuleContext", mean: torch.Tensor, fitness: torch.Tensor,
              offset: Callable[[int], torch.Tensor], bound: float
              ) -> tuple[torch.Tensor, list[int]]:
        """The new mean from the ``K`` best candidates (``offset(j) = θⱼ − μ``, at most ``bound``
        in absolute value); refits ``Σ`` and decays ``ε``. Each rank builds the offsets of its
        share of the elites only (:func:`~unitrain.rules.population.reduce.exact_sum`). Returns
        the new mean (``mean``'s dtype) and the elites' indices, best first.
        """
        rule, k = self.rule, self.rule.elites
        order = torch.argsort(fitness, descending=True, stable=True)[:k].tolist()
        raw = torch.tensor([math.log((k + 1) / i) for i in range(1, k + 1)], dtype=torch.float64)
        weights = (raw / raw.sum()).tolist()

        def moments(i: int, out: torch.Tensor) -> None:
            z = offset(order[i]).to(device="cpu", dtype=torch.float64)  # θ₍ᵢ₎ − μ
            out[0].add_(z, alpha=weights[i])
            out[1].addcmul_(z, z, value=weights[i])

        # Σᵢ wᵢ = 1, so no term of either row exceeds max(B, B²).
        first, second = exact_sum(ctx, range(k), moments, max(bound, bound * bound),
                                  (2, mean.numel()))
        new_mean = (mean.to(torch.float64) + first.to(mean.device)).to(mean.dtype)
        self.var = second + self.extra
        self.extra = rule.noise_decay * self.extra + (1 - rule.noise_decay) * rule.noise_end
        return new_mean, order

    def metrics(self) -> dict[str, float]:
        return {"optim/sigma": self.var.sqrt().mean().item(),  # mean standard deviation
                "optim/extra_noise": self.extra}

    def state_dict(self) -> dict[str, Any]:
        return {"var": self.var.clone(), "extra": self.extra}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.var = state["var"].clone()
        self.extra = float(state["extra"])


@dataclass
class CEMFields(PopulationFields):
    """CEM's hyperparameters (fields and their checks): what :class:`CEM` and CEM-RL share.

    Args:
        population: candidates per generation.
        sigma: initial standard deviation of every parameter.
        elite_fraction: share of the population the distribution is refitted to.
        noise_init: extra variance ε added after the first refit.
        noise_end: the value ε decays towards.
        noise_decay: τ in ``ε ← τ·ε + (1 − τ)·noise_end``.
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int = 64
    sigma: float = 0.1
    elite_fraction: float = bounded(0.5, "(0, 1)")
    noise_init: float = bounded(1e-3, "[0, inf]")
    noise_end: float = bounded(1e-5, "[0, inf]")
    noise_decay: float = bounded(0.95, "[0, 1]")

    @property
    def elites(self) -> int:
        return max(1, int(self.elite_fraction * self.population))


@register_rule("cem")
@dataclass
class CEM(CEMFields, Strategy):
    """Cross-entropy method, diagonal covariance, log-rank elite weights, decaying extra noise
    (the fields of :class:`CEMFields`).

    Attributes:
        noise_stream: the shared random stream the candidates' seeds are drawn from (a
            composition sets its own).
    """

    noise_stream: ClassVar[int] = _NOISE

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        self.dist = CEMDistribution(self, layout.numel)

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        seeds = generation_seeds(ctx, self.noise_stream, generation, self.population)
        std, n = self.dist.std(theta), theta.numel()

        def offset(j: int) -> torch.Tensor:
            return std * noise(seeds[j], n, theta.dtype, theta.device)

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            return torch.stack([theta + offset(j) for j in idx])

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
        return Ask(self.population, candidates, lambda j, e: shared(0, e), data=theta,
                   offset=offset, offset_bound=NOISE_BOUND * float(std.abs().max()))

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        assert ask.offset is not None and ask.offset_bound is not None
        new_mean, order = self.dist.refit(ctx, ask.data, evaluation.fitness, ask.offset,
                                          ask.offset_bound)
        return Told(theta=new_mean, metrics={
            **self.dist.metrics(), "fitness/elite_mean": evaluation.fitness[order].mean().item()})

    def state_dict(self) -> dict[str, Any]:
        return {**self.dist.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dist.load_state_dict(state)
