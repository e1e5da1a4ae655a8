"""CSA-ES against hand computation of Hansen's tutorial formulas, and its defaults."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import unitrain as ut
from unitrain.rules.population.service import Evaluation, noise


def _ctx() -> SimpleNamespace:
    """A one-process run's services, as much of them as ask and tell use."""
    return SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), seed=0,
                           shared_generator=lambda stream, generation: torch.Generator()
                           .manual_seed(1_000 * stream + generation))


def _generation(rule: ut.optim.CSAES, theta: torch.Tensor, target: np.ndarray, generation: int):
    ask = rule.ask(_ctx(), generation, theta)
    candidates = ask.params(range(ask.count)).double().numpy()
    fitness = torch.tensor([-float(np.sum((c - target) ** 2)) for c in candidates],
                           dtype=torch.float64)
    evaluation = Evaluation(returns=fitness[:, None], fitness=fitness, behaviour=None,
                            frames=ask.count, local_frames=ask.count, nonfinite=0)
    seeds, _ = ask.data
    return seeds, fitness, rule.tell(_ctx(), generation, ask, evaluation)


@pytest.mark.parametrize("weights", ["log", "equal"])
def test_one_generation_matches_the_tutorial_formulas(weights: str):
    n, lam, sigma = 7, 10, 0.3
    rule = ut.optim.CSAES(population=lam, sigma=sigma, weights=weights)
    rule.start(_ctx(), None, SimpleNamespace(numel=n))
    theta = torch.full((n,), 0.5, dtype=torch.float64)
    target = np.linspace(-1.0, 1.0, n)

    # By hand (Hansen 2016, "The CMA Evolution Strategy: A Tutorial", with C = I).
    mu = lam // 2
    if weights == "log":
        w = np.array([math.log((lam + 1) / 2) - math.log(i) for i in range(1, mu + 1)])
        w /= w.sum()
    else:
        w = np.full(mu, 1.0 / mu)
    mu_w = 1.0 / np.sum(w ** 2)
    c = (mu_w + 2) / (n + mu_w + 5)
    d = 1 + 2 * max(0.0, math.sqrt((mu_w - 1) / (n + 1)) - 1) + c
    chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n ** 2))
    path = np.zeros(n)
    mean, step = theta.numpy().copy(), sigma
    for generation in range(3):
        seeds, fitness, told = _generation(rule, theta, target, generation)
        z = np.stack([noise(s, n, torch.float64).numpy() for s in seeds])
        order = np.argsort(-fitness.numpy(), kind="stable")[:mu]
        direction = (w[:, None] * z[order]).sum(0)
        mean = mean + step * direction
        path = (1 - c) * path + math.sqrt(c * (2 - c) * mu_w) * direction
        step = step * math.exp((c / d) * (np.linalg.norm(path) / chi - 1))
        assert told.theta.numpy() == pytest.approx(mean, abs=1e-12)
        assert told.metrics["optim/sigma"] == pytest.approx(step, rel=1e-12)
        assert told.metrics["optim/path_ratio"] == pytest.approx(np.linalg.norm(path) / chi,
                                                                 rel=1e-12)
        theta = told.theta


def test_defaults_are_hansens():
    rule = ut.optim.CSAES()
    assert rule.population is None and rule.weights == "log"
    rule.start(_ctx(), None, SimpleNamespace(numel=108))  # HalfCheetah's linear policy
    assert rule.lam == 4 + math.floor(3 * math.log(108)) == 18
    assert rule.mu_w == pytest.approx(5.391, abs=1e-3)  # 1 / Σ wᵢ² of Hansen's 9 weights


def test_step_size_grows_far_from_the_optimum_and_shrinks_near_it():
    """On the sphere from a tiny σ₀ far away, successive steps agree and σ grows; started at the
    optimum with a large σ₀, they cancel and σ shrinks."""
    n = 10
    for start, sigma0, grows in ((10.0, 1e-3, True), (0.0, 1.0, False)):
        rule = ut.optim.CSAES(sigma=sigma0)
        rule.start(_ctx(), None, SimpleNamespace(numel=n))
        theta = torch.full((n,), start, dtype=torch.float64)
        for generation in range(30):
            _, _, told = _generation(rule, theta, np.zeros(n), generation)
            theta = told.theta
        sigma = told.metrics["optim/sigma"]
        assert (sigma > 20 * sigma0) if grows else (sigma < sigma0 / 5), (start, sigma)
