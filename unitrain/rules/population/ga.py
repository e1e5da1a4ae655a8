"""Deep GA: a simple genetic algorithm over the weights of a deep policy, with novelty search.

Such et al. 2017, "Deep Neuroevolution: Genetic Algorithms Are a Competitive Alternative for
Training Deep Neural Networks for Reinforcement Learning". Each generation:

1. every individual plays ``episodes`` episodes; fitness is its mean return;
2. elitism: the ``elite_candidates`` fittest individuals and the previous elite are re-evaluated
   on ``elite_episodes`` further episodes; the best becomes the elite, carried unchanged into the
   next generation (and held by the module, so evaluation and checkpoints see the best policy);
3. truncation selection: the top ``truncation`` individuals become parents;
4. the other ``population − 1`` individuals of the next generation are mutations
   ``θ' = θ + σ·ε`` of uniformly chosen parents (no crossover).

Genomes are seed chains (the paper's compact encoding, :class:`Genome`): an
initialisation seed and one ``(seed, σ)`` per mutation. Only the parents' parameters are held in
memory; a child is its parent plus one regenerated noise vector, and a checkpoint stores seeds.

Novelty search (Lehman & Stanley 2011, "Abandoning Objectives: Evolution Through the Search for
Novelty Alone"; Conti et al. 2018, "Improving Exploration in Evolution Strategies for Deep
Reinforcement Learning via a Population of Novelty-Seeking Agents", whose NSR variant mixes novelty
and reward ranks): with ``novelty > 0`` each episode is characterised by its final (or mean)
observation, optionally mapped through ``module.behaviour(summary)``; an individual's novelty is
its mean distance to the ``novelty_k`` nearest characterisations in an archive and the rest of the
population, and parents are chosen by ``(1 − novelty)·rank(return) + novelty·rank(novelty)``.
``archive_add`` random individuals enter the archive each generation. The elite is always chosen
by return.

With several processes each rank evaluates a contiguous share of the population; fitness (and
behaviours) are gathered, and every rank then makes the same selection from the same shared
random streams, so ``devices=1`` and ``devices=N`` evolve the same population.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from unitrain.errors import UserError
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               centered_ranks, episode_seeds, perturb_)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["GA", "Genome", "fresh_init", "novelty"]

# Shared random streams (ctx.shared_generator): identical draws on every rank.
_INIT, _BREED, _ARCHIVE = 11, 12, 13
# Seed stream of the elite's re-evaluation episodes (next to the population's, 101).
STREAM_ELITE_EPISODES = 102
_SEED_HIGH = 2**31 - 1  # seeds fit a genome's uint32 field


# ---------------------------------------------------------------------------------- genomes
def _as_float32(sigma: float) -> float:
    """``sigma`` rounded to float32: what a genome stores, hence what a mutation applies."""
    return float(np.float32(sigma))


@dataclass(frozen=True)
class Genome:
    """A Deep GA genome: parameters as an initialisation seed and a chain of mutations.

    ``θ = θ₀(init_seed) + σ₁ε(s₁) + σ₂ε(s₂) + ...``, applied in order with :func:`perturb_`, so a
    rebuild repeats the arithmetic of the generations bit for bit.

    Attributes:
        init_seed: seed of the initial parameters; ``None``: the run's starting parameters.
        mutations: ``(seed, σ)`` per mutation, oldest first (σ is a float32 value).
    """

    init_seed: int | None
    mutations: tuple[tuple[int, float], ...] = ()

    def mutate(self, seed: int, sigma: float) -> "Genome":
        """The child genome with one more mutation."""
        return Genome(self.init_seed, (*self.mutations, (int(seed), _as_float32(sigma))))

    def build(self, init: Callable[[int | None], torch.Tensor],
              cache: tuple["Genome", torch.Tensor] | None = None) -> torch.Tensor:
        """The parameters ``[numel]``.

        Args:
            init: ``init_seed -> θ₀`` (a fresh tensor).
            cache: an ancestor's genome and parameters to start from instead of ``θ₀``.
        """
        start, mutations = 0, self.mutations
        if cache is not None and cache[0].is_ancestor_of(self):
            flat, start = cache[1].clone(), len(cache[0].mutations)
        else:
            flat = init(self.init_seed)
        for seed, sigma in mutations[start:]:
            perturb_(flat, seed, sigma)
        return flat

    def is_ancestor_of(self, other: "Genome") -> bool:
        """Whether ``other`` is this genome or a descendant of it."""
        n = len(self.mutations)
        return self.init_seed == other.init_seed and other.mutations[:n] == self.mutations

    _HEAD = struct.Struct("<q")
    _MUTATION = struct.Struct("<If")

    def to_bytes(self) -> bytes:
        """The compact encoding: int64 init seed (−1 for ``None``), then uint32 seed + float32 σ
        per mutation."""
        head = self._HEAD.pack(-1 if self.init_seed is None else self.init_seed)
        return head + b"".join(self._MUTATION.pack(s, sigma) for s, sigma in self.mutations)

    @classmethod
    def from_bytes(cls, data: bytes) -> "Genome":
        """Inverse of :meth:`to_bytes`."""
        (init,) = cls._HEAD.unpack_from(data)
        size = cls._MUTATION.size
        muts = tuple((s, float(sigma)) for s, sigma in
                     (cls._MUTATION.unpack_from(data, i) for i in range(8, len(data), size)))
        return cls(None if init < 0 else init, muts)


def fresh_init(module: "RLModule", layout: ParamLayout) -> Callable[[int | None], torch.Tensor]:
    """``seed -> θ₀``: the module's own initialisation, rerun under ``torch.manual_seed(seed)``.

    The module is rebuilt from its class and recorded constructor arguments (``module.hparams``),
    so any initialisation the user wrote is what the population starts from. Initialisation code
    must draw from torch's global generator (``nn.init`` does) for the result to depend on the
    seed alone.

    Raises:
        UserError: if the module cannot be rebuilt or the rebuilt module's parameters differ.
    """
    cls, kwargs = type(module), dict(module.hparams)
    device = module.device

    def init(seed: int | None) -> torch.Tensor:
        assert seed is not None, "fresh initialisation needs a seed"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                fresh = cls(**kwargs)
            except Exception as e:  # any failure of user code: report it as a setup problem
                raise UserError(
                    f"cannot rebuild {cls.__qualname__}(**hparams) to draw initial parameters "
                    f"({type(e).__name__}: {e}); record every constructor argument with "
                    "save_hyperparameters, or set optimizer.init=module") from None
        try:
            if ParamLayout.of(fresh) != layout:
                raise UserError(f"{cls.__qualname__}(**hparams) builds different policy "
                                "parameters than the module being trained; "
                                "set optimizer.init=module")
            return layout.flatten(fresh).to(device)
        finally:
            del fresh

    return init



# ---------------------------------------------------------------------------------- novelty
def novelty(behaviour: torch.Tensor, archive: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each behaviour to its ``k`` nearest neighbours.

    Neighbours are the archive and the rest of the population (Lehman & Stanley 2011).

    Args:
        behaviour: ``[P, d]`` behaviour characterisations of the population.
        archive: ``[A, d]`` archived characterisations.
        k: neighbours (fewer if fewer exist).

    Returns:
        ``[P]`` float64 novelty.
    """
    pop = behaviour.to(torch.float64)
    others = torch.cat([archive.to(torch.float64), pop])
    dist = torch.cdist(pop, others, compute_mode="donot_use_mm_for_euclid_dist")
    n = pop.shape[0]
    dist[torch.arange(n), archive.shape[0] + torch.arange(n)] = math.inf  # not its own neighbour
    k = min(k, others.shape[0] - 1)
    if k < 1:
        return torch.zeros(n, dtype=torch.float64)
    return dist.topk(k, dim=1, largest=False).values.mean(1)


# ---------------------------------------------------------------------------------- the rule


@register_rule("ga")
@dataclass
class GA(Strategy):
    """Deep GA: truncation selection, Gaussian mutation, elitism with re-evaluation, optional
    novelty search. Defaults are the paper's Atari settings.

    Args:
        population: individuals per generation (P).
        sigma: mutation standard deviation σ.
        truncation: parents per generation (T, the top by selection score); ``None``: the
            paper's 20, at most half the population.
        elite_candidates: fittest individuals re-evaluated for the elite, besides the previous
            elite; ``None``: the paper's 10, at most the population.
        elite_episodes: extra episodes per elite candidate (0: pick the elite by fitness alone).
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
        init: ``"fresh"``: generation 0 is P initialisations of the module class, each under its
            own seed (the module is rebuilt from its recorded constructor arguments);
            ``"module"``: generation 0 is the module's starting parameters and P − 1 mutations
            of them (fine-tuning a given network).
        novelty: weight of novelty in parent selection, in [0, 1] (0: plain GA, 1: pure novelty
            search).
        novelty_k: nearest neighbours in the novelty measure.
        archive_add: random individuals added to the novelty archive per generation.
        behaviour: episode summary characterising behaviour: ``"final"`` or ``"mean"``
            observation (mapped through ``module.behaviour(summary)`` if defined).
    """

    population: int = 1000
    sigma: float = 0.002
    truncation: int | None = bounded(None, "[1, population]", null=True)
    elite_candidates: int | None = bounded(None, "[1, population]", null=True)
    elite_episodes: int = bounded(30, "[0, inf]")
    init: str = one_of("fresh", "fresh", "module")
    novelty: float = bounded(0.0, "[0, 1]")
    novelty_k: int = bounded(10, "[1, inf]")
    archive_add: int = bounded(5, "[0, inf]")
    behaviour: str = one_of("final", "final", "mean")

    @property
    def parents(self) -> int:
        """T: ``truncation``, or the paper's 20 capped at half the population."""
        return self.truncation or min(20, max(1, self.population // 2))

    @property
    def candidates(self) -> int:
        """Elite candidates: ``elite_candidates``, or the paper's 10 capped at the population."""
        return self.elite_candidates or min(10, self.population)

    # ------------------------------------------------------------------ construction
    def characterisation(self) -> str | None:
        return self.behaviour if self.novelty > 0 else None

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        self._fresh = fresh_init(module, layout) if self.init == "fresh" else None
        if self._fresh is not None:
            self._fresh(0)  # fail now, with the reason, if the module cannot be rebuilt
        self._genomes: list[Genome] = []
        self._parent_of: list[int] = []
        self._parents: list[Genome] = []
        self._cache: torch.Tensor | None = None
        self._base: torch.Tensor | None = None
        self._archive = torch.zeros(0, 0, dtype=torch.float64)

    def _init_params(self, seed: int | None) -> torch.Tensor:
        if seed is None:
            assert self._base is not None
            return self._base.clone()
        assert self._fresh is not None
        return self._fresh(seed)

    def _first_generation(self, ctx: "RuleContext", theta: torch.Tensor) -> None:
        gen = ctx.shared_generator(_INIT)
        seeds = torch.randint(0, _SEED_HIGH, (self.population,), generator=gen).tolist()
        if self.init == "fresh":
            self._genomes = [Genome(s) for s in seeds]
        else:
            # Read at the first generation, after rank 0's parameters reached every rank.
            self._base = theta
            self._genomes = [Genome(None)] + [Genome(None).mutate(s, self.sigma)
                                              for s in seeds[1:]]
        self._parent_of = [-1] * self.population

    # ------------------------------------------------------------------ parameters
    def _materialise(self, individuals: Sequence[int]) -> torch.Tensor:
        """Parameters ``[len(individuals), numel]``: a cached parent plus at most one mutation."""
        if self._cache is None and self._parents:
            # After a restore: rebuild the parents from their seed chains (the same arithmetic,
            # so the same bits, as when they were bred).
            self._cache = torch.stack([g.build(self._init_params) for g in self._parents])
        rows = []
        for i in individuals:
            genome, parent = self._genomes[i], self._parent_of[i]
            cache = None
            if parent >= 0:
                assert self._cache is not None
                cache = (self._parents[parent], self._cache[parent])
            rows.append(genome.build(self._init_params, cache))
        return torch.stack(rows)

    # ------------------------------------------------------------------ one generation
    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        if not self._genomes:
            self._first_generation(ctx, theta)
        return Ask(self.population, self._materialise,
                   episode_seeds(ctx.seed, STREAM_EPISODES, generation))

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        if ask.data is None:  # the population's evaluation
            metrics: dict[str, float] = {}
            score = evaluation.fitness
            if self.novelty > 0:
                score = self._novelty_score(ctx, generation, evaluation, metrics)
            self._score = score
            candidates = self._elite_candidates(generation, evaluation.fitness)
            if self.elite_episodes == 0:
                best = candidates[int(torch.argmax(evaluation.fitness[candidates]))]
                return self._breed(ctx, generation, best, evaluation.fitness[best].item(), metrics)
            # Elitism: the candidates play further episodes of their own.
            seeds = episode_seeds(ctx.seed, STREAM_ELITE_EPISODES, generation)
            again = Ask(len(candidates),
                        lambda idx: self._materialise([candidates[j] for j in idx]),
                        lambda j, e: seeds(candidates[j], e), self.elite_episodes,
                        behaviour=False, data=candidates)
            return Told(metrics=metrics, again=again)
        candidates = ask.data  # the elite candidates' re-evaluation
        best = int(torch.argmax(evaluation.fitness))
        return self._breed(ctx, generation, candidates[best], evaluation.fitness[best].item(), {})

    def _elite_candidates(self, generation: int, fitness: torch.Tensor) -> list[int]:
        """The previous elite (individual 0 from the second generation on), then the
        ``elite_candidates`` fittest; ties go to the first."""
        order = torch.argsort(fitness, descending=True, stable=True).tolist()
        previous = [0] if generation > 0 else []
        return previous + [i for i in order[: self.candidates] if i not in previous]

    def _breed(self, ctx: "RuleContext", generation: int, elite: int, elite_return: float,
               metrics: dict[str, float]) -> Told:
        """The next generation: the elite unchanged, then mutations of uniformly drawn parents
        (the top ``truncation`` by selection score)."""
        count = self.population
        order = torch.argsort(self._score, descending=True, stable=True)
        parents = order[: self.parents].tolist()
        keep = parents + [elite]
        cache = self._materialise(keep)
        gen_rng = ctx.shared_generator(_BREED, generation)
        picks = torch.randint(0, self.parents, (count - 1,), generator=gen_rng).tolist()
        seeds = torch.randint(0, _SEED_HIGH, (count - 1,), generator=gen_rng).tolist()
        kept = [self._genomes[i] for i in keep]
        children = [kept[p].mutate(s, self.sigma) for p, s in zip(picks, seeds, strict=True)]
        self._genomes = [kept[-1], *children]
        self._parent_of = [len(kept) - 1] + picks
        self._parents, self._cache = kept, cache
        metrics.update({"fitness/elite_return": elite_return,
                        "ga/elite_mutations": float(len(kept[-1].mutations))})
        return Told(theta=cache[-1], metrics=metrics)

    def _novelty_score(self, ctx: "RuleContext", generation: int, ev: Evaluation,
                       metrics: dict[str, float]) -> torch.Tensor:
        """Selection score mixing return and novelty ranks; grows the archive."""
        assert ev.behaviour is not None
        bcs = ev.behaviour
        if self._archive.numel() == 0:
            self._archive = bcs.new_zeros(0, bcs.shape[1])
        nov = novelty(bcs, self._archive, self.novelty_k)
        nov = torch.where(torch.isfinite(nov), nov, 0.0)
        score = ((1 - self.novelty) * centered_ranks(ev.fitness)
                 + self.novelty * centered_ranks(nov))
        score = score.masked_fill(~torch.isfinite(ev.fitness), -torch.inf)
        if self.archive_add:
            gen = ctx.shared_generator(_ARCHIVE, generation)
            pick = torch.randperm(len(bcs), generator=gen)[: self.archive_add]
            pick = pick[torch.isfinite(bcs[pick]).all(1)]
            self._archive = torch.cat([self._archive, bcs[pick]])
        metrics.update({"novelty/mean": nov.mean().item(), "novelty/max": nov.max().item(),
                        "novelty/archive_size": float(len(self._archive))})
        return score

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"genomes": [g.to_bytes() for g in self._genomes],
                "parent_of": list(self._parent_of),
                "parents": [g.to_bytes() for g in self._parents],
                "base": None if self._base is None else self._base.clone(),
                "archive": self._archive.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._genomes = [Genome.from_bytes(b) for b in state["genomes"]]
        self._parent_of = list(state["parent_of"])
        self._parents = [Genome.from_bytes(b) for b in state["parents"]]
        self._base = state["base"]
        self._archive = state["archive"]
        self._cache = None
