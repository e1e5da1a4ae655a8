"""CMA-ES: the (μ/μ_w, λ) evolution strategy with covariance matrix adaptation.

Hansen and Ostermeier 2001, "Completely Derandomized Self-Adaptation in Evolution Strategies";
Hansen, Müller and Koumoutsakos 2003 (the rank-μ update); constants and the order of the updates
as in Hansen 2016, "The CMA Evolution Strategy: A Tutorial". The diagonal variant is Ros and
Hansen 2008, "A Simple Modification in CMA-ES Achieving Linear Time and Space Complexity"
(sep-CMA-ES). The classical baseline of "Solving Deep Reinforcement Learning Benchmarks with
Linear Policy Networks".

The module's parameters are the mean ``m`` (kept in float64 by the rule). With ``C = B·D²·Bᵀ``,
each generation samples ``λ`` candidates ``xₖ = m + σ·yₖ``, ``yₖ = B·D·zₖ``, ``zₖ ~ N(0, I)``
regenerated from seeds (every candidate on the same episode seeds), ranks them by return and,
with log-rank weights ``wᵢ`` over the ``μ = ⌊λ/2⌋`` best and ``⟨y⟩ = Σ wᵢ y₍ᵢ₎``:

    m   ← m + σ·⟨y⟩
    p_σ ← (1 − c_σ)·p_σ + √(c_σ(2 − c_σ)μ_eff)·B·⟨z⟩
    p_c ← (1 − c_c)·p_c + h_σ·√(c_c(2 − c_c)μ_eff)·⟨y⟩
    C   ← (1 + c₁δ(h_σ) − c₁ − c_μ)·C + c₁·p_c·p_cᵀ + c_μ·Σ wᵢ y₍ᵢ₎y₍ᵢ₎ᵀ
    σ   ← σ·exp((c_σ/d_σ)(‖p_σ‖ / E‖N(0, I)‖ − 1))

``B`` and ``D`` are refreshed from ``C`` by an eigendecomposition every
``max(1, ⌊1/(10·n·(c₁ + c_μ))⌋)`` generations (the tutorial's lazy update). Full covariance costs
O(n²) memory and O(n³) per decomposition; above ``full_max`` parameters the rule switches to
sep-CMA-ES, which keeps the diagonal of ``C`` only (``B = I``, O(n) everything) with ``c₁`` and
``c_μ`` multiplied by ``(n + 2)/3``.

Every rank holds the same ``C`` and computes the same candidates: the linear algebra runs in
float64 on one thread, one candidate at a time. sep-CMA-ES splits its recombination across ranks
(each regenerates only its share of the selected ``zᵢ``, summed exactly,
:func:`~unitrain.rules.population.reduce.exact_sum`), so its update costs ``O(μ·n / W)`` per rank;
full CMA-ES, limited to ``full_max`` parameters, stays whole on every rank (its ``O(n²)``
covariance update is not a sum over candidates that would pay to split at that size). Either way
``devices=1`` and ``devices=N`` make the same updates bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from unitrain.errors import ConfigError, check
from unitrain.rules.population.reduce import NOISE_BOUND, exact_sum
from unitrain.rules.population.service import (STREAM_EPISODES, Evaluation, ParamLayout,
                                               default_population, episode_seeds,
                                               generation_seeds, log_weights, noise)
from unitrain.rules.population.strategy import Ask, Strategy, Told
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CMAES"]

_NOISE = 29  # shared random stream of the candidates' seeds
COVARIANCES = ("auto", "full", "diagonal")
FULL_LIMIT = 10_000  # largest n a full covariance is allowed for (an 800 MB float64 matrix)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread, so results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@register_rule("cmaes")
@dataclass
class CMAES(Strategy):
    """(μ/μ_w, λ)-CMA-ES: weighted recombination, step-size and covariance adaptation.

    Args:
        population: λ, candidates per generation (``None``: ``4 + ⌊3 ln n⌋`` for ``n``
            parameters); the best ``⌊λ/2⌋`` are recombined.
        sigma: initial step size σ₀ (the mean starts at the module's parameters).
        covariance: ``"full"``, ``"diagonal"`` (sep-CMA-ES) or ``"auto"``: full up to
            ``full_max`` parameters, diagonal above.
        full_max: the largest parameter count ``"auto"`` adapts a full covariance for.
        episodes, max_episode_steps, max_envs: as for every strategy
            (:class:`~unitrain.rules.population.service.PopulationFields`).
    """

    population: int | None = None  # type: ignore[assignment]
    sigma: float = 0.1
    covariance: str = "auto"
    full_max: int = bounded(1000, f"[1, {FULL_LIMIT}]")

    def validate_population(self) -> None:
        self.validate_default_population()

    def validate(self) -> None:
        super().validate()
        check(self.covariance in COVARIANCES, "covariance", "one of " + ", ".join(COVARIANCES),
              self.covariance)

    def start(self, ctx: "RuleContext", module: "RLModule", layout: ParamLayout) -> None:
        n = layout.numel
        if self.covariance == "full" and n > FULL_LIMIT:
            raise ConfigError("optimizer.covariance", (
                f"full covariance for {n:,} parameters needs a {n}x{n} matrix; the limit is "
                f"{FULL_LIMIT:,}: use covariance: diagonal (or auto)"))
        self.lam = self.population or default_population(n)
        self.n = n
        self.full = self.covariance == "full" or (self.covariance == "auto" and n <= self.full_max)
        self._constants(n)
        self._mean = layout.flatten(module).detach().to(torch.float64).cpu()
        self._sigma = float(self.sigma)
        self._ps = torch.zeros(n, dtype=torch.float64)
        self._pc = torch.zeros(n, dtype=torch.float64)
        if self.full:
            self._C = torch.eye(n, dtype=torch.float64)
            self._B = torch.eye(n, dtype=torch.float64)
        else:
            self._C = torch.ones(n, dtype=torch.float64)  # the diagonal
        self._D = torch.ones(n, dtype=torch.float64)
        self._decomposed = 0  # generation of the last eigendecomposition

    def _constants(self, n: int) -> None:
        self.weights = log_weights(self.lam)
        self.mu_eff = 1.0 / float((self.weights ** 2).sum())
        me = self.mu_eff
        self.c_sigma = (me + 2) / (n + me + 5)
        self.d_sigma = 1 + 2 * max(0.0, math.sqrt((me - 1) / (n + 1)) - 1) + self.c_sigma
        self.c_c = (4 + me / n) / (n + 4 + 2 * me / n)
        c1 = 2 / ((n + 1.3) ** 2 + me)
        cmu = 2 * (me - 2 + 1 / me) / ((n + 2) ** 2 + me)
        if not self.full:
            c1, cmu = c1 * (n + 2) / 3, cmu * (n + 2) / 3
        self.c1 = min(1.0, c1)
        self.cmu = min(1 - self.c1, cmu)
        self.chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.decompose_every = max(1, int(1 / (10 * n * (self.c1 + self.cmu))))

    def _y(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, y = B·D·z)`` of one candidate, float64 on the CPU."""
        z = noise(seed, self.n, torch.float64)
        dz = self._D * z
        return z, (self._B @ dz if self.full else dz)

    def ask(self, ctx: "RuleContext", generation: int, theta: torch.Tensor) -> Ask:
        seeds = generation_seeds(ctx, _NOISE, generation, self.lam)
        dtype, device = theta.dtype, theta.device

        def candidates(idx: Sequence[int]) -> torch.Tensor:
            with _one_thread():
                rows = [self._mean + self._sigma * self._y(seeds[j])[1] for j in idx]
            return torch.stack(rows).to(dtype).to(device)

        shared = episode_seeds(ctx.seed, STREAM_EPISODES, generation)
        return Ask(self.lam, candidates, lambda j, e: shared(0, e), data=seeds)

    def tell(self, ctx: "RuleContext", generation: int, ask: Ask, evaluation: Evaluation) -> Told:
        seeds = ask.data
        order = torch.argsort(evaluation.fitness, descending=True, stable=True)[:len(self.weights)]
        with _one_thread():
            self._update(*self._recombine(ctx, [seeds[j] for j in order.tolist()]), generation)
        return Told(theta=self._mean, metrics={
            "optim/sigma": self._sigma, "optim/axis_ratio": (self._D.max() / self._D.min()).item(),
            "optim/path_ratio": self._ps.norm().item() / self.chi,
            "optim/population": float(self.lam)})

    def _recombine(self, ctx: "RuleContext", best: list[int]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``⟨z⟩``, ``⟨y⟩`` and the rank-μ term ``Σ wᵢ y₍ᵢ₎y₍ᵢ₎ᵀ`` (its diagonal for sep-CMA-ES) of
        the ``μ`` best candidates, best first. The diagonal variant's sums are split across ranks
        (each rank regenerates its share of the ``zᵢ``,
        :func:`~unitrain.rules.population.reduce.exact_sum`); the full one, at most ``full_max``
        parameters, is computed whole on every rank."""
        w = self.weights
        if self.full:
            zs, ys = zip(*(self._y(s) for s in best), strict=True)
            Z, Y = torch.stack(zs), torch.stack(ys)  # [μ, n]
            return w @ Z, w @ Y, (Y * w[:, None]).T @ Y
        weights = w.tolist()

        def moments(i: int, out: torch.Tensor) -> None:
            z = noise(best[i], self.n, torch.float64)
            out[0].add_(z, alpha=weights[i])
            out[1].addcmul_(z, z, value=weights[i])

        # Σᵢ wᵢ = 1 and |z| < NOISE_BOUND: no term of either row exceeds NOISE_BOUND².
        z_w, zz_w = exact_sum(ctx, range(len(best)), moments, NOISE_BOUND ** 2, (2, self.n))
        return z_w, self._D * z_w, self._D ** 2 * zz_w  # y = D ⊙ z

    def _update(self, z_w: torch.Tensor, y_w: torch.Tensor, rank_mu: torch.Tensor,
                gen: int) -> None:
        self._mean = self._mean + self._sigma * y_w

        cs, cc, c1, cmu, me = self.c_sigma, self.c_c, self.c1, self.cmu, self.mu_eff
        # C^{-1/2}·⟨y⟩ = B·⟨z⟩
        self._ps = (1 - cs) * self._ps + math.sqrt(cs * (2 - cs) * me) * (
            self._B @ z_w if self.full else z_w)
        ps_norm = self._ps.norm().item()
        h_sigma = ps_norm / math.sqrt(1 - (1 - cs) ** (2 * (gen + 1))) < \
            (1.4 + 2 / (self.n + 1)) * self.chi
        self._pc = (1 - cc) * self._pc + (math.sqrt(cc * (2 - cc) * me) if h_sigma else 0.0) * y_w
        delta = 0.0 if h_sigma else cc * (2 - cc)
        keep = 1 + c1 * delta - c1 - cmu
        if self.full:
            self._C = keep * self._C + c1 * torch.outer(self._pc, self._pc) + cmu * rank_mu
            self._C = (self._C + self._C.T) / 2
        else:
            self._C = keep * self._C + c1 * self._pc ** 2 + cmu * rank_mu
        self._sigma *= math.exp((cs / self.d_sigma) * (ps_norm / self.chi - 1))

        if not self.full:
            self._D = self._C.sqrt()
        elif gen + 1 - self._decomposed >= self.decompose_every:
            eigvals, self._B = torch.linalg.eigh(self._C)
            self._D = eigvals.clamp_min(1e-300).sqrt()
            self._decomposed = gen + 1

    def state_dict(self) -> dict[str, Any]:
        state = {"mean": self._mean.clone(), "sigma": self._sigma,
                 "ps": self._ps.clone(), "pc": self._pc.clone(), "C": self._C.clone(),
                 "D": self._D.clone(), "decomposed": self._decomposed}
        if self.full:
            state["B"] = self._B.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["C"].dim() != (2 if self.full else 1):
            raise ConfigError("optimizer.covariance", (
                "the checkpoint's covariance is " + ("diagonal" if self.full else "full")
                + "; resume with the covariance setting it was trained with"))
        self._mean = state["mean"].clone()
        self._sigma = float(state["sigma"])
        self._ps, self._pc = state["ps"].clone(), state["pc"].clone()
        self._C, self._D = state["C"].clone(), state["D"].clone()
        self._decomposed = int(state["decomposed"])
        if self.full:
            self._B = state["B"].clone()
