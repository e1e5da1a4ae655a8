"""``unitrain.testing.check_rule`` passes a rule that keeps the contract and names the check that
a rule breaking it fails: keys, contract, determinism, resume, ranks, learning.

The rules here are small hill climbers defined in this file (importable, so the two-process check
can start them in fresh processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import unitrain as ut
from unitrain.envs.rollout import rollout
from unitrain.testing import RuleCheckError, check_rule

# Short episodes on two envs: a few seconds per check.
TASK = ut.EnvSpec("CartPole-v1", num_envs=2, max_episode_steps=50)
FRAMES = 1200


@dataclass
class Climb(ut.optim.UpdateRule):
    """Keep ``θ + σ·ε`` when it plays better than ``θ`` (one episode per env slot each), deciding
    on the returns of every process."""

    sigma: float = 0.5

    def setup(self, module: Any, ctx: Any) -> None:
        self.module, self.params, self.tries = module, module.policy_parameters(), 0

    def noise(self, ctx: Any, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=ctx.shared_generator(ctx.iteration))

    @torch.no_grad()
    def load(self, theta: torch.Tensor) -> None:
        torch.nn.utils.vector_to_parameters(theta, self.params)

    def play(self, ctx: Any, theta: torch.Tensor, seeds: list[int]) -> tuple[float, int]:
        self.load(theta)
        played = rollout(ctx.train_env(), lambda obs, _: self.module.act(obs), seeds=seeds)
        return played.returns.mean().item(), int(played.lengths.sum())

    def metrics(self, ctx: Any, frames: int, best: float) -> dict[str, float]:
        return {"frames": frames, "climb/return": best, "climb/tries": float(self.tries)}

    def step(self, ctx: Any) -> dict[str, float]:
        theta = torch.nn.utils.parameters_to_vector(self.params).detach().clone()
        trial = theta + self.sigma * self.noise(ctx, theta.shape)
        seeds = torch.randint(2**31 - 1, (TASK.num_envs,), generator=ctx.generator).tolist()
        base, frames = self.play(ctx, theta, seeds)
        tried, more = self.play(ctx, trial, seeds)
        base, tried = ctx.all_reduce_(torch.tensor([base, tried], dtype=torch.float64)).tolist()
        self.load(trial if tried > base else theta)
        self.tries += 1
        return self.metrics(ctx, frames + more, max(base, tried))

    def state_dict(self) -> dict[str, Any]:
        return {"tries": self.tries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tries = state["tries"]


@dataclass
class NewKey(Climb):
    """Reports a metric on its first step only."""

    def metrics(self, ctx: Any, frames: int, best: float) -> dict[str, float]:
        first = {"climb/first": best} if self.tries == 1 else {}
        return {**super().metrics(ctx, frames, best), **first}


@dataclass
class Unseeded(Climb):
    """Draws its perturbations from a generator the run does not seed."""

    def noise(self, ctx: Any, shape: torch.Size) -> torch.Tensor:
        gen = torch.Generator()
        gen.seed()
        return torch.randn(shape, generator=gen)


@dataclass
class Forgetful(Climb):
    """Leaves its counter out of its checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class RankKey(Climb):
    """Names a metric after its process."""

    def metrics(self, ctx: Any, frames: int, best: float) -> dict[str, float]:
        return {**super().metrics(ctx, frames, best), f"climb/rank{ctx.rank}": best}


@dataclass
class Alone(Climb):
    """Decides on its own process's returns only."""

    def noise(self, ctx: Any, shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=ctx.generator)


def _fails(rule: ut.optim.UpdateRule, tmp_path: Path, **kwargs: Any) -> RuleCheckError:
    kwargs = {"frames": FRAMES, "run_dir": tmp_path, **kwargs}
    with pytest.raises(RuleCheckError) as info:
        check_rule(rule, TASK, **kwargs)
    return info.value


def test_a_rule_keeping_the_contract_passes(tmp_path: Path):
    report = check_rule(Climb(), TASK, frames=FRAMES, min_gain=5.0, run_dir=tmp_path,
                        rule_action=lambda rule, module, obs: module.act(obs))
    assert report.checks == ("keys", "contract", "determinism", "resume", "learning")
    assert report.keys == ("climb/return", "climb/tries", "frames")
    assert report.rule == "Climb" and report.steps > 2
    assert 0 < report.resumed_from < report.frames
    assert report.final > report.initial + 5.0


def test_a_factory_gives_each_run_a_fresh_rule(tmp_path: Path):
    made = []

    def factory() -> Climb:
        made.append(Climb(sigma=0.5))
        return made[-1]

    check_rule(factory, TASK, frames=FRAMES, run_dir=tmp_path)
    assert len({id(r) for r in made}) == len(made) >= 4


def test_a_new_key_fails_the_keys_check(tmp_path: Path):
    error = _fails(NewKey(), tmp_path)
    assert error.check == "keys"
    assert "step 2 returned other metric keys than step 1: [] added, ['climb/first'] missing" \
        in str(error)


def test_a_wrong_action_fails_the_contract_check(tmp_path: Path):
    error = _fails(Climb(), tmp_path, rule_action=lambda rule, module, obs: 1 - module.act(obs))
    assert error.check == "contract"
    assert "the rule's deterministic action differs from module.act" in str(error)


def test_an_unseeded_rule_fails_the_determinism_check(tmp_path: Path):
    error = _fails(Unseeded(), tmp_path)
    assert error.check == "determinism"
    assert str(error).startswith("check_rule(Unseeded): the determinism check failed: step ")


def test_a_rule_forgetting_its_state_fails_the_resume_check(tmp_path: Path):
    error = _fails(Forgetful(), tmp_path)
    assert error.check == "resume"
    assert "reported climb/tries = " in str(error)
    assert "state_dict/load_state_dict must round-trip" in str(error)


def test_no_gain_fails_the_learning_check(tmp_path: Path):
    error = _fails(Climb(), tmp_path, min_gain=1000.0)
    assert error.check == "learning"
    assert "expected a gain of more than 1000.0" in str(error)


def test_a_budget_of_one_step_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="no run can be interrupted half-way"):
        check_rule(Climb(), TASK, frames=20, run_dir=tmp_path)


def test_two_processes_report_the_same_keys_and_parameters(tmp_path: Path):
    report = check_rule(Climb(), TASK, frames=FRAMES, devices=2, run_dir=tmp_path)
    assert report.checks[-1] == "ranks"


@pytest.mark.parametrize("rule, found", [
    (RankKey(), "returned other metric keys on different ranks: rank 0: "),
    (Alone(), "rank 1 ends with other parameters than rank 0"),
], ids=["keys", "parameters"])
def test_ranks_that_disagree_fail_the_ranks_check(rule: Climb, found: str, tmp_path: Path):
    error = _fails(rule, tmp_path, devices=2)
    assert error.check == "ranks"
    assert found in str(error)


def test_the_two_process_check_needs_picklable_rules(tmp_path: Path):
    with pytest.raises(TypeError, match="must be picklable"):
        check_rule(lambda: Climb(), TASK, frames=FRAMES, devices=2, run_dir=tmp_path)
