"""Population evaluation, seed-chain genomes, and the GA/ES rules across processes and resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import child_env
from lightning.pytorch.loggers import Logger
from policies import TinyPolicy
from torch import nn

import unitrain as ut
from unitrain.app.config import load_recipe
from unitrain.envs import EnvInfo, EnvSpec, ObsNorm
from unitrain.errors import ConfigError, UserError
from unitrain.rules.population.ga import Genome, fresh_init, novelty
from unitrain.rules.population.service import (ParamLayout, PopulationEvaluator, PopulationPolicy,
                                               centered_ranks, perturb_, shard)


class Record(Logger):
    """A logger that keeps every metrics dict it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append(dict(metrics))

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.rows if key in row]


# ---------------------------------------------------------------------------------- genomes
def test_seed_chain_rebuild_is_bit_identical():
    module = TinyPolicy(4, 2, hidden=16)
    layout = ParamLayout.of(module)
    init = fresh_init(module, layout)
    rng_before = torch.get_rng_state()
    assert torch.equal(init(7), init(7)) and not torch.equal(init(7), init(8))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global generator is untouched

    # Generation by generation, as the GA breeds: each child is its cached parent + one mutation.
    genome, params = Genome(7), init(7)
    for seed in range(100, 130):
        child = genome.mutate(seed, 0.02)
        params, genome = child.build(init, cache=(genome, params)), child
    assert torch.equal(genome.build(init), params)
    assert not torch.equal(params, init(7))

    data = genome.to_bytes()
    assert len(data) == 8 + 8 * 30
    assert Genome.from_bytes(data) == genome
    assert torch.equal(Genome.from_bytes(data).build(init), params)
    assert Genome(None, ((5, 0.5),)) == Genome.from_bytes(Genome(None, ((5, 0.5),)).to_bytes())


def test_perturbation_is_regenerated_from_its_seed():
    base = torch.zeros(1000)
    a = perturb_(base.clone(), 3, 0.5)
    b = perturb_(base.clone(), 3, -0.5)
    assert torch.equal(a, -b) and torch.equal(a, perturb_(base.clone(), 3, 0.5))
    assert abs(a.std().item() - 0.5) < 0.05


# ---------------------------------------------------------------------------------- the policy
class ConvPolicy(ut.RLModule):
    """A small conv net with buffers (batch norm statistics and a fixed input scale)."""

    def __init__(self, act_dim: int = 3) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(-3))
        self.head = nn.Linear(4 * 5 * 5, act_dim)
        self.register_buffer("scale", torch.tensor(1 / 255))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(observation.float() * self.scale))


def _population(layout: ParamLayout, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, layout.numel, generator=gen) * 0.3


@pytest.mark.parametrize("kind", ["mlp-discrete", "mlp-continuous", "conv"])
def test_vmap_population_matches_each_individual(kind: str):
    torch.manual_seed(0)
    if kind == "conv":
        module: ut.RLModule = ConvPolicy()
        module.conv[1].running_mean.uniform_(-1, 1)  # non-trivial buffers
        module.conv[1].running_var.uniform_(0.5, 2)
        obs = torch.randint(0, 256, (5, 3, 2, 15, 15), dtype=torch.uint8)
        module.bind_env(EnvInfo("img", (2, 15, 15), 450, 3, True, image=True))
    elif kind == "mlp-discrete":
        module = TinyPolicy(4, 3)
        obs = torch.randn(5, 3, 4)
        module.bind_env(EnvInfo("d", (4,), 4, 3, True))
    else:
        module = ut.MLPPolicy(4, 2, hidden=[8])
        obs = torch.randn(5, 3, 4) * 50
        module.bind_env(EnvInfo("c", (4,), 4, 2, False, -torch.ones(2), torch.ones(2) * 0.5))
    module.eval()
    layout = ParamLayout.of(module)
    params = _population(layout, 5, 1)
    forward = PopulationPolicy(module, layout, lambda m, o: m(o))(params, obs)
    actions = PopulationPolicy(module, layout, lambda m, o: m.act(o))(params, obs)
    for i in range(5):
        layout.assign(module, params[i])
        with torch.no_grad():
            torch.testing.assert_close(forward[i], module(obs[i]), rtol=1e-5, atol=1e-5)
            if kind == "mlp-continuous":
                torch.testing.assert_close(actions[i], module.act(obs[i]), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(actions[i], module(obs[i]).argmax(-1))
    # Splitting the population does not change any individual's result.
    halves = torch.cat([PopulationPolicy(module, layout, lambda m, o: m(o))(params[a:b], obs[a:b])
                        for a, b in ((0, 2), (2, 5))])
    assert torch.equal(halves, forward)


class TiedPolicy(ut.RLModule):
    """A layer used twice, a second layer tied to the first's weight, a LayerNorm named
    ``norm``."""

    def __init__(self, obs_dim: int = 4, act_dim: int = 3) -> None:
        super().__init__()
        self.first = nn.Linear(obs_dim, obs_dim)
        self.norm = nn.LayerNorm(obs_dim)
        self.again = self.first
        self.tied = nn.Linear(obs_dim, obs_dim, bias=False)
        self.tied.weight = self.first.weight
        self.head = nn.Linear(obs_dim, act_dim)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        x = self.again(torch.tanh(self.norm(self.first(observation))))
        return self.head(torch.tanh(self.tied(x)))


def test_vmap_population_swaps_tied_weights_and_leaves_aux_copies_alone():
    """Tied policy weights take each candidate's values under both names; an aux network that
    holds the policy's own parameters (as a TorchRL loss over the module does) is not swapped."""
    torch.manual_seed(0)
    module = TiedPolicy()
    holder = nn.Module()
    holder.weight = module.first.weight  # the same Parameter, under aux
    module.add_aux("loss", holder)
    module.bind_env(EnvInfo("d", (4,), 4, 3, True))
    module.eval()
    layout = ParamLayout.of(module)
    policy = PopulationPolicy(module, layout, lambda m, o: m(o))
    assert policy._tied == [("module.tied.weight", "module.first.weight")]
    params = _population(layout, 3, 2)
    obs = torch.randn(3, 5, 4)
    out = policy(params, obs)
    for i in range(3):
        layout.assign(module, params[i])
        with torch.no_grad():
            torch.testing.assert_close(out[i], module(obs[i]), rtol=1e-5, atol=1e-5)


def _evaluator(module: ut.RLModule, spec: EnvSpec, **kwargs: Any) -> PopulationEvaluator:
    from unitrain.envs import env_info

    info = env_info(spec)
    module.bind_env(info)
    policy = PopulationPolicy(module, ParamLayout.of(module), lambda m, o: m.act(o))
    return PopulationEvaluator(policy, spec, info.obs_shape, **kwargs)


def test_episodes_do_not_depend_on_how_the_population_is_split():
    module = TinyPolicy(4, 2)
    evaluator = _evaluator(module, EnvSpec("CartPole-v1"), episodes=2, behaviour="final")
    params = _population(evaluator.policy.layout, 6, 2)
    seeds = lambda i, e: 1000 * i + e  # noqa: E731
    whole = evaluator.play(range(6), lambda idx: params[list(idx)], seeds)
    parts = [evaluator.play(range(a, b), lambda idx: params[list(idx)], seeds)
             for a, b in ((0, 1), (1, 4), (4, 6))]
    assert torch.equal(whole.returns, torch.cat([p.returns for p in parts]))
    assert torch.equal(whole.behaviour, torch.cat([p.behaviour for p in parts]))
    assert torch.equal(whole.returns, whole.lengths.double())  # CartPole: +1 per step
    other = evaluator.play(range(6), lambda idx: params[list(idx)],
                               lambda i, e: seeds(i, e) + 7)
    assert not torch.equal(other.behaviour, whole.behaviour)  # the seeds decide the episodes
    assert whole.behaviour.shape == (6, 2, 4)
    # Waves of at most 4 env slots (two individuals) give the same episodes.
    waves = _evaluator(module, EnvSpec("CartPole-v1"), episodes=2, max_envs=4)
    assert torch.equal(waves.play(range(6), lambda idx: params[list(idx)], seeds).returns,
                       whole.returns)
    # A step cap truncates every episode.
    capped = _evaluator(module, EnvSpec("CartPole-v1"), episodes=2, max_episode_steps=5)
    assert capped.play(range(6), lambda idx: params[list(idx)], seeds).lengths.max() <= 5


def test_observation_normalisation_is_frozen_during_a_generation():
    module = ut.MLPPolicy(3, 1, hidden=[])
    norm = ObsNorm((3,))
    evaluator = _evaluator(module, EnvSpec("Pendulum-v1"), max_episode_steps=20, obs_norm=norm,
                           max_envs=2)
    params = _population(evaluator.policy.layout, 4, 3)
    res = evaluator.play(range(4), lambda idx: params[list(idx)], lambda i, e: i)
    assert norm.count.item() == 0  # two waves ran on the statistics of the generation's start
    norm.sync(lambda t: t.unsqueeze(0))  # what the Trainer does after each iteration
    assert norm.count.item() == res.lengths.sum().item() == 80


def test_ranks_novelty_and_shards():
    x = torch.tensor([3.0, -torch.inf, 1.0, 3.0])
    assert torch.allclose(centered_ranks(x), torch.tensor([1 / 3, -0.5, -1 / 6, 1 / 3],
                                                          dtype=torch.float64))
    assert centered_ranks(torch.full((5,), -200.0)).tolist() == [0.0] * 5
    pop = torch.tensor([[0.0], [1.0], [10.0]])
    assert novelty(pop, torch.zeros(0, 1), 1).tolist() == [1.0, 1.0, 9.0]
    assert novelty(pop, torch.tensor([[10.0]]), 1).tolist() == [1.0, 1.0, 0.0]
    shares = [shard(7, r, 3) for r in range(3)]
    assert [list(s) for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make, key", [
    (lambda: ut.optim.GA(population=10, truncation=20), "truncation"),
    (lambda: ut.optim.GA(population=10, truncation=5, elite_candidates=11), "elite_candidates"),
    (lambda: ut.optim.GA(sigma=0.0), "sigma"),
    (lambda: ut.optim.ES(sigma=-0.1), "sigma"),
    (lambda: ut.optim.ES(population=15), "population"),
    (lambda: ut.optim.GA(population=1, truncation=1, elite_candidates=1), "population"),
    (lambda: ut.optim.GA(novelty=1.5), "novelty"),
    (lambda: ut.optim.ARS(population=15), "population"),
    (lambda: ut.optim.ARS(population=16, top=9), "top"),
    (lambda: ut.optim.ARS(sigma=0.0), "sigma"),
    (lambda: ut.optim.CEM(elite_fraction=1.0), "elite_fraction"),
    (lambda: ut.optim.CEM(sigma=-1.0), "sigma"),
    (lambda: ut.optim.CEM(noise_decay=1.5), "noise_decay"),
    (lambda: ut.optim.CSAES(population=1), "population"),
    (lambda: ut.optim.CSAES(sigma=0.0), "sigma"),
    (lambda: ut.optim.CMAES(population=3), "population"),
    (lambda: ut.optim.CMAES(sigma=0.0), "sigma"),
    (lambda: ut.optim.CMAES(covariance="dense"), "covariance"),
    (lambda: ut.optim.CMAES(full_max=0), "full_max"),
    (lambda: ut.optim.CBO(dt=0.0), "dt"),
    (lambda: ut.optim.CBO(alpha=-1.0), "alpha"),
    (lambda: ut.optim.CBO(init_std=0.0), "init_std"),
])
def test_bad_hyperparameters_name_the_key(make, key: str):
    with pytest.raises(ConfigError) as err:
        make()
    assert err.value.key == f"optimizer.{key}"


def test_bad_recipe_value_is_one_line(tmp_path: Path):
    recipe = tmp_path / "ga.yaml"
    recipe.write_text("env: {id: CartPole-v1}\n"
                      "optimizer: {name: ga, population: 8, truncation: 20}\n")
    with pytest.raises(UserError, match=r"optimizer\.truncation: got 20; expected an integer "
                                        r"in \[1, population=8\]"):
        load_recipe(recipe)


class Frozen(ut.RLModule):
    """A module without trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2).requires_grad_(False)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation)


@pytest.mark.parametrize("rule", [ut.optim.GA, ut.optim.ES])
def test_module_without_parameters_is_a_user_error(rule, tmp_path: Path):
    trainer = ut.Trainer(env=EnvSpec("CartPole-v1"), optimizer=rule(population=4, truncation=2,
                                                                    elite_candidates=2)
                         if rule is ut.optim.GA else rule(population=4),
                         max_frames=100, num_threads=1, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False)
    with pytest.raises(UserError, match="no trainable policy parameters"):
        trainer.fit(Frozen())


# ---------------------------------------------------------------------------------- non-finite
class NanReward(gym.Env):
    """Four steps per episode; the reward is NaN whenever the action exceeds 0.5."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed: int | None = None, options: Any = None):
        super().reset(seed=seed)
        self.t = 0
        return np.ones(1, np.float32), {}

    def step(self, action):
        self.t += 1
        a = float(np.asarray(action).reshape(-1)[0])
        reward = float("nan") if a > 0.5 else 1.0 - abs(a)
        return np.ones(1, np.float32), reward, False, self.t >= 4, {}


def test_nonfinite_returns_get_the_worst_fitness(tmp_path: Path):
    if "unitrain-test/NanReward-v0" not in gym.registry:
        gym.register("unitrain-test/NanReward-v0", entry_point=NanReward)
    record = Record()
    trainer = ut.Trainer(env=EnvSpec("unitrain-test/NanReward-v0", num_envs=1),
                         optimizer=ut.optim.GA(population=16, truncation=4, sigma=0.5,
                                               elite_candidates=2, elite_episodes=2),
                         max_frames=16 * 4 * 4, eval_every_frames=128, eval_episodes=2, seed=0,
                         num_threads=1, run_dir=tmp_path, logger=[record],
                         enable_progress_bar=False)
    trainer.fit(ut.MLPPolicy(1, 1, hidden=[], out_scale=1.0))
    bad = record.series("fitness/nonfinite")
    assert len(bad) >= 3 and bad[0] > 0, bad
    elite = record.series("fitness/elite_return")
    assert all(np.isfinite(elite)) and elite[-1] > 3.0, elite
    assert trainer.summary["eval/return_mean"] > 3.0


# ---------------------------------------------------------------------------------- processes
SCRIPT = '''
import sys

import unitrain as ut
from dump import Dump
from policies import TinyPolicy
from test_population import Record

RULES = {
    "ga": lambda: ut.optim.GA(population=14, truncation=4, sigma=0.1, elite_candidates=3,
                              elite_episodes=2, episodes=2, max_episode_steps=100, novelty=0.5,
                              novelty_k=3, archive_add=2),
    "es": lambda: ut.optim.ES(population=12, sigma=0.1, lr=0.05, max_episode_steps=100),
    "es_table": lambda: ut.optim.ES(population=12, sigma=0.1, lr=0.05, max_episode_steps=100,
                                    noise_source="table", noise_table_size=100_000),
    "ars": lambda: ut.optim.ARS(population=12, sigma=0.1, lr=0.05, top=4, max_episode_steps=100),
    "cem": lambda: ut.optim.CEM(population=11, sigma=0.1, elite_fraction=0.4,
                                max_episode_steps=100),
    "csa_es": lambda: ut.optim.CSAES(population=11, sigma=0.1, max_episode_steps=100),
    "cmaes": lambda: ut.optim.CMAES(population=11, sigma=0.1, max_episode_steps=100),
    "cmaes_sep": lambda: ut.optim.CMAES(population=11, sigma=0.1, covariance="diagonal",
                                        max_episode_steps=100),
    "cbo": lambda: ut.optim.CBO(population=11, max_episode_steps=100),
}


if __name__ == "__main__":
    devices = int(sys.argv[1])
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else list(RULES)
    # Several runs in one launch: the processes and their process group serve every fit.
    for name in names:
        make = RULES[name]
        record = Record()
        trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1"), optimizer=make(), devices=devices,
                             strategy="ddp" if devices > 1 else "auto", max_frames=2500,
                             eval_every_frames=1, eval_episodes=3, seed=4, num_threads=1,
                             run_dir=f"run-{name}-{devices}", logger=[record],
                             callbacks=[Dump(f"{name}-{devices}-", record)],
                             enable_progress_bar=False)
        trainer.fit(TinyPolicy(4, 2))
'''


def test_one_two_and_four_processes_evolve_identically(tmp_path: Path):
    """Every population rule ends with the same bits on 1 and 2 processes (ES also with its
    perturbations read from the shared noise table); ES and GA on 4 too."""
    script = tmp_path / "evolve.py"
    script.write_text(SCRIPT)
    env = child_env()
    launches = {"1": [], "2": [], "4": ["es,ga"]}
    procs = {n: subprocess.Popen([sys.executable, str(script), n, *rules], cwd=tmp_path, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for n, rules in launches.items()}
    for n, proc in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"devices={n}: {err[-3000:]}"
    rules = ("ga", "es", "es_table", "ars", "cem", "csa_es", "cmaes", "cmaes_sep", "cbo")
    for rule in rules:
        one = torch.load(tmp_path / f"{rule}-1-rank0.pt", weights_only=False)
        worlds = [2, 4] if rule in ("es", "ga") else [2]
        many = [torch.load(tmp_path / f"{rule}-{w}-rank{r}.pt", weights_only=False)
                for w in worlds for r in range(w)]
        assert one["world_size"] == 1 and [m["world_size"] for m in many][:2] == [2, 2]
        best = [[row["fitness/return_max"] for row in run["rows"] if "fitness/return_max" in row]
                for run in (one, *many)]
        assert len(best[0]) >= 3 and all(b == best[0] for b in best), (rule, best)
        assert all(m["frames"] == one["frames"] for m in many)
        # Evaluation episodes are seeded by their index, not by the process that plays them
        # (3 episodes: 2 on rank 0 and 1 on rank 1), so the reported returns agree too.
        evals = [[row["eval/return_mean"] for row in run["rows"] if "eval/return_mean" in row]
                 for run in (one, *many)]
        assert len(evals[0]) >= 3 and all(e == evals[0] for e in evals), (rule, evals)
        for key, value in one["params"].items():
            for m in many:
                assert torch.equal(value, m["params"][key]), (rule, m["world_size"], key)
        if rule == "ga":
            novel = [[row["novelty/mean"] for row in run["rows"] if "novelty/mean" in row]
                     for run in (one, *many)]
            assert all(n == novel[0] for n in novel) and len(novel[0]) == len(best[0])
    # The noise table is used: the same run with perturbations regenerated from seeds differs.
    es, table = (torch.load(tmp_path / f"{r}-1-rank0.pt", weights_only=False)["params"]
                 for r in ("es", "es_table"))
    assert any(not torch.equal(es[k], table[k]) for k in es)


# ---------------------------------------------------------------------------------- resume
def _fit(rule: ut.optim.UpdateRule, run_dir: Path, max_frames: int, ckpt: str | None = None
         ) -> tuple[ut.Trainer, TinyPolicy]:
    trainer = ut.Trainer(env=EnvSpec("CartPole-v1"), optimizer=rule, max_frames=max_frames,
                         eval_every_frames=1, eval_episodes=2, seed=9, num_threads=1, run_dir=run_dir,
                         logger=False, enable_progress_bar=False)
    module = TinyPolicy(4, 2)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, module


@pytest.mark.parametrize("make", [
    lambda: ut.optim.GA(population=12, truncation=3, sigma=0.1, elite_candidates=2,
                        elite_episodes=2, max_episode_steps=150, init="module", novelty=0.3,
                        novelty_k=3),
    lambda: ut.optim.ES(population=10, sigma=0.1, lr=0.05, max_episode_steps=150),
    lambda: ut.optim.ARS(population=10, sigma=0.1, lr=0.05, top=3, max_episode_steps=150),
    lambda: ut.optim.CEM(population=9, sigma=0.1, max_episode_steps=150),
    lambda: ut.optim.CSAES(population=9, sigma=0.1, max_episode_steps=150),
    lambda: ut.optim.CMAES(population=9, sigma=0.1, max_episode_steps=150),
    lambda: ut.optim.CBO(population=9, max_episode_steps=150),
], ids=["ga", "es", "ars", "cem", "csa_es", "cmaes", "cbo"])
def test_resume_continues_exactly(make, tmp_path: Path):
    whole, module = _fit(make(), tmp_path / "whole", 3000)
    cut, _ = _fit(make(), tmp_path / "cut", 1)  # stops after one generation, with a checkpoint
    assert cut.summary["iterations"] == 1
    resumed, module2 = _fit(make(), tmp_path / "cut", 3000, ckpt="last")
    assert resumed.summary["iterations"] == whole.summary["iterations"] >= 3
    assert resumed.summary["frames"] == whole.summary["frames"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, module2.state_dict()[key]), key
    a = whole.rule.state_dict()
    b = resumed.rule.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_ga_defaults_fit_a_small_population():
    """The paper's T = 20 and 10 elite candidates are for P = 1,000: with fewer individuals the
    defaults shrink (T at most half the population) instead of refusing the population."""
    small = ut.optim.GA(population=16)
    assert (small.parents, small.candidates) == (8, 10)
    assert (ut.optim.GA(population=6).parents, ut.optim.GA(population=6).candidates) == (3, 6)
    assert (ut.optim.GA().parents, ut.optim.GA().candidates) == (20, 10)
    assert ut.optim.GA(population=16, truncation=12).parents == 12
    with pytest.raises(ConfigError, match="truncation"):
        ut.optim.GA(population=16, truncation=20)
