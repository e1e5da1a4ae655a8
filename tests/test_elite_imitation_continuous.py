"""Elite imitation with continuous actions: exploration in the pre-squash space of the action
contract, the recorded targets, the squared-error fit toward elite actions, and its errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli

import unitrain as ut
from unitrain.envs import EnvInfo, env_info
from unitrain.optim import EliteImitation, Projection
from unitrain.run.services import RunServices

PENDULUM = ut.EnvSpec("Pendulum-v1", num_envs=4)
FIT = dict(output="squared_error", lam=1.0, iterations=20, standardize=True)


def _setup(rule: EliteImitation, seed: int = 0, **module_args) -> tuple[ut.RLModule, RunServices]:
    torch.manual_seed(seed)
    module = ut.MLPPolicy(3, 1, hidden=[16], activation="relu", out_scale=1.0, **module_args)
    services = RunServices(module, PENDULUM, seed, None)
    services.start(0, 1)
    rule.setup(module, services)
    return module, services


def _squash_by_hand(pre: torch.Tensor) -> torch.Tensor:
    """Pendulum's action for a pre-squash value: low + (tanh(u) + 1) / 2 · (high − low)."""
    low, high = -2.0, 2.0
    return low + (torch.tanh(pre) + 1) / 2 * (high - low)


def test_recorded_targets_map_back_to_the_executed_actions():
    rule = EliteImitation(fit=Projection(**FIT), episodes=4, explore=0.2, greedy_share=0.5,
                          noise_std=0.7)
    module, ctx = _setup(rule)
    episodes, frames = rule._collect(ctx)
    assert frames == 800 and sorted(e["slot"] for e in episodes) == [0, 1, 2, 3]
    for e in episodes:
        assert e["target"].shape == e["action"].shape == (200, 1)
        torch.testing.assert_close(_squash_by_hand(e["target"]), e["action"])
        with torch.no_grad():
            mean = module(e["observation"])
        same = (e["target"] == mean).all(-1)
        if e["slot"] < 2:  # greedy slots: the mean itself, apart from the random actions
            assert 0.65 < same.float().mean() < 0.95
        else:  # sampling slots: never the mean
            assert not same.any()
    # Random actions cover the bounds; their targets stay finite (the squash's inverse, clipped).
    actions = torch.cat([e["action"] for e in episodes])
    assert actions.min() < -1.9 and actions.max() > 1.9
    assert all(bool(e["target"].abs().max() <= math.atanh(1 - 1e-6) + 1e-3) for e in episodes)


def test_sampling_adds_noise_std_gaussian_noise_to_the_mean():
    rule = EliteImitation(fit=Projection(**FIT), episodes=8, explore=0.0, greedy_share=0.0,
                          noise_std=0.3)
    module, ctx = _setup(rule, seed=1)
    episodes, _ = rule._collect(ctx)
    obs = torch.cat([e["observation"] for e in episodes])
    with torch.no_grad():
        noise = torch.cat([e["target"] for e in episodes]) - module(obs)
    assert abs(float(noise.mean())) < 0.03 and abs(float(noise.std()) - 0.3) < 0.02


def test_fit_moves_the_deterministic_action_toward_the_elite_actions():
    rule = EliteImitation(fit=Projection(**FIT, step_size=0.5))
    module, ctx = _setup(rule, seed=2)
    torch.manual_seed(3)
    angle, speed = torch.rand(256) * 2 * math.pi, torch.randn(256) * 3
    obs = torch.stack([angle.cos(), angle.sin(), speed], -1)
    # Elite actions: push with the angular velocity (in env units, within the bounds).
    elite = (0.6 * speed).clamp(-1.9, 1.9).unsqueeze(-1)
    target = torch.atanh(elite / 2)
    gaps = []
    for _ in range(4):
        with torch.no_grad():
            gaps.append(float((module.act(obs) - elite).abs().mean()))
        metrics = rule.fit.fit([(obs, target)], ctx)
        assert metrics["train/param_change"] > 0 and "train/accuracy" not in metrics
    with torch.no_grad():
        gaps.append(float((module.act(obs) - elite).abs().mean()))
    assert all(b < a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] < 0.5 * gaps[0], gaps


def test_continuous_actions_need_a_squared_error_fit():
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.fit\.output: got 'cross_entropy'; "
                                             r"Pendulum-v1 has continuous actions.*expected "
                                             r"squared_error$"):
        ut.Trainer(PENDULUM, EliteImitation())
    unbounded = EnvInfo("box", (3,), 3, 1, False, torch.tensor([-math.inf]),
                        torch.tensor([math.inf]))
    rule = EliteImitation(fit=Projection(output="squared_error"))
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.explore: got 0\.05; box has "
                                             r"unbounded actions.*expected 0$"):
        rule.check_env(PENDULUM, unbounded)
    EliteImitation(fit=Projection(output="squared_error"), explore=0.0).check_env(PENDULUM,
                                                                                  unbounded)
    with pytest.raises(ut.ConfigError, match="noise_std"):
        EliteImitation(noise_std=-0.1)


def test_a_state_dependent_std_is_rejected():
    with pytest.raises(ut.ConfigError, match=r"^module\.action_std: got 'state'; .*expected "
                                             r"'param'$"):
        _setup(EliteImitation(fit=Projection(**FIT)), action_std="state")


def test_the_cli_reports_a_classification_fit_in_one_line(tmp_path: Path):
    proc = run_cli("fit", "pendulum/elite_imitation", "optimizer.fit.output=margin",
                   f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optimizer.fit.output: got 'margin'" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_short_pendulum_run_finishes(tmp_path: Path):
    torch.manual_seed(0)
    module = ut.MLPPolicy(3, 1, hidden=[64, 64], activation="relu")
    rule = EliteImitation(fit=Projection(**FIT, step_size=0.3), episodes=8, elite_fraction=0.25)
    trainer = ut.Trainer(env=PENDULUM, optimizer=rule, max_frames=4800, eval_episodes=2, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module)
    summary = trainer.summary
    assert summary["frames"] >= 4800 and math.isfinite(summary["eval/return_mean"])
    assert Path(summary["checkpoint"]).is_file()
    # Two elites of 200 steps each, with their pre-squash targets.
    assert [len(e["target"]) for e in rule._elites] == [200, 200]
    # The checkpoint evaluates as the module's deterministic action does.
    info = env_info(PENDULUM)
    assert module.actions.act_dim == info.act_dim
    assert ut.evaluate(summary["checkpoint"], episodes=2, seed=5) == ut.evaluate(
        module, PENDULUM, episodes=2, seed=5)


def test_common_starts_share_start_states_and_rank_elites_per_start(monkeypatch):
    rule = EliteImitation(fit=Projection(**FIT), episodes=8, starts=2, elite_fraction=0.5,
                          explore=0.0)
    module, ctx = _setup(rule)
    episodes, frames = rule._collect(ctx)
    # Two waves of one 200-step episode per slot.
    assert len(episodes) == 8 and frames == 2 * 4 * 200
    first = {}
    for e in episodes:
        first.setdefault(e["start"], []).append(e["observation"][0])
    # Slots i and i + 2 of a wave start together; every wave draws new starts.
    assert sorted(len(v) for v in first.values()) == [2, 2, 2, 2]
    for obs in first.values():
        assert all(torch.equal(o, obs[0]) for o in obs)
    assert len({tuple(v[0].tolist()) for v in first.values()}) == 4
    # The same iteration draws the same starts again; the next iteration new ones.
    again, _ = rule._collect(ctx)
    assert torch.equal(again[0]["observation"][0], episodes[0]["observation"][0])
    ctx.iteration += 1
    later, _ = rule._collect(ctx)
    assert not torch.equal(later[0]["observation"][0], episodes[0]["observation"][0])
    # Elites: the better episode of each start (half of 2).
    monkeypatch.setattr(rule, "_collect", lambda ctx: (episodes, frames))
    metrics = rule.step(ctx)
    best = {}
    for e in episodes:
        if e["start"] not in best or e["return"] > best[e["start"]]:
            best[e["start"]] = e["return"]
    assert sorted(e["return"] for e in rule._elites) == sorted(best.values())
    assert metrics["train/elite_return_mean"] == pytest.approx(sum(best.values()) / 4)


def test_common_starts_are_validated():
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.starts: got 5; each start needs an "
                                             r"env slot of its own: expected at most "
                                             r"env\.num_envs=4$"):
        ut.Trainer(PENDULUM, EliteImitation(fit=Projection(**FIT), starts=5))
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.episodes: got 10; with starts the "
                                             r"episodes run in full waves of one per env slot: "
                                             r"expected a multiple of env\.num_envs=4$"):
        ut.Trainer(PENDULUM, EliteImitation(fit=Projection(**FIT), starts=2, episodes=10))
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.starts: .*null when keep_elites"):
        EliteImitation(starts=2, keep_elites=True)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.starts: got 0"):
        EliteImitation(starts=0)
