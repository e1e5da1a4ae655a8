"""CMA-ES on the sphere and Rosenbrock functions, through the rule's RL code path, beside pycma.

The ``cmaes`` rule optimises a :class:`unitrain.functions.ParameterVector` on the one-step envs
``unitrain/Sphere-v0`` and ``unitrain/Rosenbrock-v0`` (10-D; one env frame per function
evaluation). For each seed it reports the evaluations until the best candidate of a generation
has ``f <= 1e-8``, and, side by side on the same start, the same count for pycma (Hansen's
reference implementation, ``pip install cma``) with its active update switched off so both run
the same (μ/μ_w, λ)-CMA-ES. Starts: sphere ``x₀ = 1``, ``σ₀ = 1``; Rosenbrock ``x₀ = 0.1``,
``σ₀ = 0.3`` (pycma's documented example, which bounds that run by 8,000 evaluations).

    python tools/cmaes_functions.py --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import Logger

import unitrain as ut
from unitrain.functions import FUNCTIONS
from unitrain.policy.models import ParameterVector

TARGET = 1e-8
SETUPS = {"Sphere": (1.0, 1.0, 4000), "Rosenbrock": (0.1, 0.3, 12000)}  # x0, sigma0, budget


class BestF(Logger):
    """Keeps (frames, best f) per generation."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, float]] = []

    name = property(lambda self: "bestf")
    version = property(lambda self: "0")

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "fitness/return_max" in metrics and step is not None:
            self.rows.append((step, -metrics["fitness/return_max"]))


def unitrain_evals(fn: str, seed: int, covariance: str, root: Path) -> int | None:
    x0, sigma0, budget = SETUPS[fn]
    log = BestF()
    trainer = ut.Trainer(env=ut.EnvSpec(f"unitrain/{fn}-v0", num_envs=1),
                         optimizer=ut.optim.CMAES(sigma=sigma0, covariance=covariance),
                         max_frames=budget, eval_every_frames=budget, eval_episodes=1, seed=seed,
                         num_threads=1, run_dir=root / f"{fn}-{covariance}-{seed}", logger=[log],
                         enable_progress_bar=False)
    trainer.fit(ParameterVector(10, x0))
    return next((frames for frames, f in log.rows if f <= TARGET), None)


def pycma_evals(fn: str, seed: int) -> int | None:
    import cma

    x0, sigma0, budget = SETUPS[fn]
    es = cma.CMAEvolutionStrategy(10 * [x0], sigma0, {"seed": seed + 1, "CMA_active": False,
                                                      "verbose": -9, "maxfevals": budget,
                                                      "ftarget": TARGET, "tolfun": 0,
                                                      "tolflatfitness": 10**9})
    evals, f = FUNCTIONS[fn], None
    while not es.stop():
        xs = es.ask()
        values = [evals(np.asarray(x)) for x in xs]
        es.tell(xs, values)
        if min(values) <= TARGET:
            return es.countevals
    return f


def fmt(values: list[int | None]) -> str:
    hit = [v for v in values if v is not None]
    median = f"{statistics.median(hit):,.0f}" if hit else "-"
    return f"median {median:>6} (reached {len(hit)}/{len(values)}) {values}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--no-pycma", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for fn in SETUPS:
            for cov in ("full", "diagonal"):
                res = [unitrain_evals(fn, s, cov, Path(tmp)) for s in args.seeds]
                print(f"{fn:<10} unitrain cmaes ({cov:>8}): evaluations to f <= 1e-8: {fmt(res)}",
                      flush=True)
            if not args.no_pycma:
                try:
                    res = [pycma_evals(fn, s) for s in args.seeds]
                except ImportError:
                    sys.exit("pycma is not installed: pip install cma (or pass --no-pycma)")
                print(f"{fn:<10} pycma (CMA_active off)   : evaluations to f <= 1e-8: {fmt(res)}",
                      flush=True)


if __name__ == "__main__":
    main()
