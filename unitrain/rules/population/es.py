"""OpenAI-ES: evolution strategies with mirrored sampling, rank shaping and Adam.

Salimans et al. 2017, "Evolution Strategies as a Scalable Alternative to Reinforcement
Learning". Each generation draws ``population / 2`` noise seeds; the candidates are the mirrored
pairs ``θ ± σ·εᵢ``. With centred-rank fitness ``F`` in ``[−0.5, 0.5]`` over all candidates, the
search gradient is

    g = 1/P · Σᵢ (F(θ + σεᵢ) − F(θ − σεᵢ)) · εᵢ

(σ is not divided out, as in the authors' code: the rank transform fixes the scale and Adam is
invariant to it), and the optimizer steps on ``−g + λ·θ`` (L2 weight decay ``λ``). Both members of a
pair play the same episode seeds (common random numbers), so their difference measures the
perturbation rather than the episodes. Noise is regenerated from seeds; with observation
normalisation (``EnvSpec(obs_norm=True)``) every candidate of a generation sees the same statistics,
and the generation's observations are folded in afterwards (merged across processes by the
Trainer).

With several processes each rank evaluates a contiguous share of the candidates and regenerates
only that share's noise for the gradient; returns and one vector of ``n`` integers cross process
boundaries (:func:`~unitrain.rules.population.reduce.noise_sum`), and every rank makes the same
update, so ``devices=1`` and ``devices=N`` follow the same trajectory bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from unitrain.errors import check
from unitrain.rules.population.reduce import noise_sum
from unitrain.rules.population.service import Evaluation, centered_ranks
from unitrain.rules.population.strategy import Ask, Strategy, Told, mirrored_ask
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.rules.base import RuleContext

__all__ = ["ES"]

_NOISE = 21  # shared random stream of the noise seeds


@register_rule("es")
@dataclass
class ES(Strategy):
    """OpenAI evolution strategies (mirrored sampling, centred ranks, Adam, L2 decay).

    Args:
        population: candidates per generation (an even number: ``population / 2`` mirrored pairs).
        sigma: perturbation standard deviation σ.
        lr: step size of the optimizer.
        weight_decay: L2 coefficient λ added to the descent direction.
        update: ``"adam"`` (``torch.optim.Adam``) or ``"sgd"`` (``torch.optim.SGD``, momentum 0.9).
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int = 64
    sigma: float = 0.02
    lr: float = bounded(0.01, "(0, inf]")
    weight_decay: float = bounded(0.005, "[0, inf]")
    update: str = one_of("adam", "adam", "sgd")

    def validate(self) -> None:
        super().validate()
        check(self.population % 2 == 0, "population",
              "an even integer >= 2 (mirrored pairs)", self.population)

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if self.update == "adam":
            self._optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        return self._optimizer

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        return mirrored_ask(ctx, _NOISE, generation, theta, self.population, self.sigma)

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        seeds, theta = ask.data
        shaped = centered_ranks(evaluation.fitness)
        weights = (shaped[0::2] - shaped[1::2]).tolist()
        grad = noise_sum(ctx, seeds, weights, theta.numel(), theta.dtype) / ask.count
        descent = -grad.to(theta.device) + self.weight_decay * theta.to(torch.float64)
        return Told(grad=descent, metrics={"optim/lr": self._optimizer.param_groups[0]["lr"],
                                           "optim/grad_norm": grad.norm().item()})
