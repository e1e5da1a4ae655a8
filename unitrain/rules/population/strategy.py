"""Population rules as ask/tell strategies, and the one service that runs them.

A strategy holds a search distribution over the policy's parameters, flattened to one vector
``θ ∈ ℝⁿ`` (:class:`~unitrain.rules.population.service.ParamLayout`), and answers two questions,
as in evosax's and EvoTorch's functional interfaces:

- ``ask(ctx, generation, theta) -> Ask``: which candidates to evaluate (how many, how to build
  any of them from its index, the env seed of each of its episodes);
- ``tell(ctx, generation, ask, evaluation) -> Told``: given their fitness (mean episode return,
  higher is better), its next state, and the policy's new parameters (``theta``) or a descent
  direction for the strategy's ``torch.optim`` optimizer (``grad``), its metrics, and
  optionally another :class:`Ask` in the same generation (the GA re-evaluates its elites).

Every rank's ``tell`` sees the whole population's fitness (``P`` floats, gathered by the
service) but does the heavy part of the update — the sum over candidates of their perturbations
or parameters — on its own share only: :func:`~unitrain.rules.population.reduce.exact_sum` (and
:func:`~unitrain.rules.population.reduce.noise_sum` on top of it) builds this rank's terms and
combines the shares exactly, in integers, so every rank gets the same bits whatever the number of
processes. A strategy whose update is small may compute it whole on every rank instead.

:class:`PopulationRule` is the service that runs a strategy under the Trainer: it owns the
population evaluation (:class:`~unitrain.rules.population.service.PopulationEvaluation`: the
vmapped evaluator, each rank evaluating a contiguous share of every ask with only fitness crossing
processes), the generation counter, the module's parameters (it writes ``theta`` or steps the
strategy's optimizer with ``grad``), the metrics every population rule reports, and the
checkpointed state (the generation and the strategy's ``state_dict``). A strategy is a dataclass
whose fields are its hyperparameters; registered with ``@register_rule`` it is an
``optimizer: {name: ...}`` of recipes, and the Trainer runs any strategy it is given (a user's
too) through :func:`as_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from unitrain.rules.base import UpdateRule
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               PopulationEvaluation, PopulationFields,
                                               episode_seeds, generation_seeds, mirrored,
                                               noise_source, noise_table)

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.rollout import Step
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["Ask", "Told", "Strategy", "PopulationRule", "as_rule", "mirrored_ask"]


@dataclass
class Ask:
    """Candidates a strategy wants evaluated.

    Attributes:
        count: candidates, indexed ``0 .. count - 1``.
        params: ``indices -> [len(indices), n]`` flat parameters of those candidates (a rank
            builds only its share).
        seeds: ``(candidate, episode) -> env seed``; derive it from the run seed and the
            generation, never from the rank, so any number of processes plays the same episodes.
        episodes: episodes per candidate (``None``: the strategy's ``episodes`` field).
        behaviour: characterise behaviours (when the strategy asked for a characterisation).
        data: whatever the strategy wants back in :meth:`Strategy.tell` (seeds, the centre).
        offset: ``j -> θⱼ − θ`` for a strategy that samples around a centre ``θ``: what its
            ``tell`` refits from, so a composition (CEM-RL) may replace candidates.
        offset_bound: an upper bound of ``|offset(j)|`` over every ``j`` and parameter (the
            grid of the exact cross-rank sum, :mod:`unitrain.rules.population.reduce`).
        observe: sees every env step this rank plays for the ask (CEM-RL fills its memory).
    """

    count: int
    params: Callable[[Sequence[int]], torch.Tensor]
    seeds: Callable[[int, int], int]
    episodes: int | None = None
    behaviour: bool = True
    data: Any = None
    offset: Callable[[int], torch.Tensor] | None = None
    offset_bound: float | None = None
    observe: Callable[["Step"], None] | None = None


@dataclass
class Told:
    """What a strategy's :meth:`~Strategy.tell` returns.

    Attributes:
        theta: the policy's new flat parameters (``None``: unchanged, or see ``grad``).
        grad: a descent direction ``[n]`` for the strategy's optimizer instead of ``theta``.
        metrics: the strategy's own metrics of the generation.
        again: another ask within this generation; its evaluation comes back to ``tell``.
    """

    theta: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    again: Ask | None = None


@dataclass
class Strategy(PopulationFields):
    """Base of ask/tell strategies: the population fields (``population``, ``sigma``,
    ``episodes``, ``max_episode_steps``, ``max_envs``) and the interface.

    A subclass is a dataclass that adds its hyperparameters as fields (checked in ``validate``)
    and implements :meth:`ask` and :meth:`tell`, plus :meth:`start`, :meth:`state_dict` and
    :meth:`load_state_dict` when it has state (``"generation"`` is the service's key), and
    :meth:`optimizer` when it steps a ``torch.optim`` optimizer on the policy's parameters.

    Candidates are evaluated by the service with the contract's deterministic action
    (``module.act``), so every action space and action masks are honoured alike.
    """

    action_spaces: ClassVar[tuple[str, ...]] = ("discrete", "multidiscrete", "continuous")
    action_masks: ClassVar[bool] = True

    def characterisation(self) -> str | None:
        """``"final"`` or ``"mean"`` observation as each episode's behaviour (for novelty), or
        ``None`` (no characterisation: the default)."""
        return None

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        """Check the settings against the env before the run starts (default: nothing)."""
        del env, info

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        """Build the starting state (once per process, before the first generation).

        Args:
            ctx: the run's services.
            module: the user's module (read it; the service writes its parameters).
            layout: its policy parameters as one flat vector (``numel``, ``dtype``, ``flatten``).
        """
        del ctx, module, layout

    def optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
        """The optimizer ``Told.grad`` steps, over the policy's parameters (default: none)."""
        del params
        return None

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        """The candidates of generation ``generation``; ``theta`` is the policy's flat
        parameters now."""
        raise NotImplementedError

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask,
             evaluation: Evaluation) -> Told:
        """Take the fitness of ``ask``'s candidates (``evaluation.fitness``, ``[count]``; ``-inf``
        for a candidate with a non-finite return) and update the strategy."""
        raise NotImplementedError


class PopulationRule(UpdateRule):
    """The update rule that runs a :class:`Strategy`: evaluation split across ranks, the
    generation counter, the module's parameters, the common metrics and checkpoints.

    Args:
        strategy: the strategy to run.

    Attributes:
        pop: the :class:`PopulationEvaluation` (after setup).
        layout: the module's :class:`ParamLayout` (after setup).
    """

    # Every strategy's candidates act through module.act, which carries a recurrent state.
    feedforward_only = None

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.name = strategy.name  # type: ignore[misc]  (the rule is known by its strategy's name)
        self.action_spaces = strategy.action_spaces  # type: ignore[misc]
        self.action_masks = strategy.action_masks  # type: ignore[misc]
        self._optimizer: torch.optim.Optimizer | None = None

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        self.strategy.check_env(env, info)

    def config(self) -> dict[str, Any]:
        return self.strategy.config()

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.module = module
        self.pop = PopulationEvaluation(self.strategy, module, ctx,
                                        self.strategy.characterisation())
        self.layout = self.pop.layout
        # Perturbations come from the strategy's noise source while the rule runs.
        self.table = noise_table(self.strategy, self.layout.numel)
        with noise_source(self.table):
            self.strategy.start(ctx, module, self.layout)
        self._optimizer = self.strategy.optimizer(module.policy_parameters())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [] if self._optimizer is None else [self._optimizer]

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        with noise_source(self.table):
            return self._generation(ctx)

    def _generation(self, ctx: "RuleContext") -> dict[str, float]:
        generation = self.pop.generation
        theta = self.layout.flatten(self.module)
        ask: Ask | None = self.strategy.ask(ctx, generation, theta)
        first: Evaluation | None = None
        local_frames = 0
        metrics: dict[str, float] = {}
        while ask is not None:
            ev = self.pop.evaluate(ctx, ask.count, ask.params, ask.seeds, ask.episodes,
                                   ask.behaviour, ask.observe)
            first = first or ev
            local_frames += ev.local_frames
            told = self.strategy.tell(ctx, generation, ask, ev)
            metrics.update(told.metrics)
            ask = told.again
        assert first is not None
        if told.grad is not None:
            if self._optimizer is None:
                raise TypeError(f"{type(self.strategy).__name__}.tell returned grad, but its "
                                "optimizer() returned no optimizer to step")
            self.layout.set_grads(self.module, told.grad.to(self.layout.dtype))
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)
        elif told.theta is not None:
            self.layout.assign(self.module, told.theta.to(self.layout.dtype))
        moved = (theta, self.layout.flatten(self.module))
        return {**self.pop.finish_generation(ctx, first, local_frames, moved), **metrics}

    def state_dict(self) -> dict[str, Any]:
        with noise_source(self.table):
            return {**self.pop.state_dict(), **self.strategy.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pop.load_state_dict(state)
        with noise_source(self.table):
            self.strategy.load_state_dict(state)


def as_rule(optimizer: Any) -> Any:
    """``optimizer`` as an update rule: a :class:`Strategy` runs in a :class:`PopulationRule`,
    anything else is returned as it is."""
    return PopulationRule(optimizer) if isinstance(optimizer, Strategy) else optimizer


def mirrored_ask(ctx: "RuleContext", stream: int, generation: int, theta: torch.Tensor,
                 population: int, sigma: float) -> Ask:
    """Mirrored pairs ``θ ± σ·εₖ`` (candidates ``2k`` and ``2k + 1``) from ``population / 2``
    seeds of the shared ``stream``, both members of a pair on the same episode seeds (common
    random numbers): the ask of ES and ARS. ``data`` is ``(seeds, theta)``."""
    seeds = generation_seeds(ctx, stream, generation, population // 2)
    pair_seeds = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
    return Ask(population, mirrored(theta, seeds, sigma), lambda j, e: pair_seeds(j // 2, e),
               data=(seeds, theta))
