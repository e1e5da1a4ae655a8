"""One module, any rule: every rule reads the module's output the same way, and a checkpoint of
one rule starts another (``Trainer.fit(module, init=CKPT)``, ``unitrain fit RECIPE init=CKPT``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_cli
from test_conformance import RULE_ACTIONS

import unitrain as ut
from unitrain.envs import EnvInfo, env_info
from unitrain.policy.action import ActionHead

OFF_POLICY = dict(batch_size=32, buffer_size=2000, warmup_frames=64, frames_per_batch=16,
                  critic_hidden=(16, 16))
CHAINS = {
    "continuous": (ut.EnvSpec("Pendulum-v1", num_envs=2), [
        ("ppo", lambda: ut.optim.PPO(frames_per_batch=64, minibatch_size=32, epochs=2)),
        ("reinforce", lambda: ut.optim.REINFORCE(frames_per_batch=64)),
        ("ddpg", lambda: ut.optim.DDPG(**OFF_POLICY)),
        ("dsac_t", lambda: ut.optim.DSACT(**OFF_POLICY, utd_ratio=0.5)),
        ("ga", lambda: ut.optim.GA(population=6, truncation=2, elite_candidates=2,
                                   elite_episodes=1, sigma=0.05, init="module",
                                   max_episode_steps=20)),
        ("es", lambda: ut.optim.ES(population=6, sigma=0.05, max_episode_steps=20)),
        ("elite_imitation", lambda: ut.optim.EliteImitation(
            fit=ut.optim.Projection(iterations=5, output="squared_error"), episodes=2,
            updates=1, batch_size=64)),
    ]),
    "discrete": (ut.EnvSpec("CartPole-v1", num_envs=2), [
        ("ppo", lambda: ut.optim.PPO(frames_per_batch=64, minibatch_size=32, epochs=2)),
        ("reinforce", lambda: ut.optim.REINFORCE(frames_per_batch=64)),
        ("ga", lambda: ut.optim.GA(population=6, truncation=2, elite_candidates=2,
                                   elite_episodes=1, sigma=0.05, init="module",
                                   max_episode_steps=20)),
        ("es", lambda: ut.optim.ES(population=6, sigma=0.05, max_episode_steps=20)),
        ("elite_imitation", lambda: ut.optim.EliteImitation(
            fit=ut.optim.Projection(iterations=5), episodes=2, updates=1, batch_size=64)),
    ]),
}


class ActAtStart(L.Callback):
    """``module.act`` on fixed observations once the run has started (before any update)."""

    def __init__(self, obs: torch.Tensor) -> None:
        self.obs, self.action = obs, None

    def on_train_start(self, trainer: L.Trainer, module: ut.RLModule) -> None:
        with torch.no_grad():
            self.action = module.act(self.obs)


@pytest.mark.parametrize("kind", sorted(CHAINS))
def test_one_module_trained_by_every_rule_in_turn(kind: str, tmp_path: Path):
    spec, chain = CHAINS[kind]
    info = env_info(spec)
    obs = torch.randn(32, *info.obs_shape) * 2
    previous: tuple[str, torch.Tensor] | None = None
    for i, (name, make) in enumerate(chain):
        module = ut.MLPPolicy(info.obs_dim, info.act_dim, hidden=[16], activation="relu",
                              out_scale=1.0)
        start = ActAtStart(obs)
        trainer = ut.Trainer(env=spec, optimizer=make(), max_frames=256, eval_episodes=2,
                             seed=i, run_dir=tmp_path / name, callbacks=[start],
                             enable_progress_bar=False, logger=False)
        trainer.fit(module, init=None if previous is None else previous[0])
        if previous is not None:
            # The checkpoint of the previous rule means the same policy to this rule.
            torch.testing.assert_close(start.action, previous[1], rtol=0, atol=0)
        with torch.no_grad():
            after = module.act(obs)
        # The rule's own deterministic action is module.act ...
        torch.testing.assert_close(RULE_ACTIONS[name](trainer.rule, module, obs), after,
                                   rtol=0, atol=1e-6)
        # ... and stays within the env's bounds.
        if not info.discrete:
            assert bool(((after >= info.action_low) & (after <= info.action_high)).all())
        previous = (trainer.summary["checkpoint"], after)
    # A checkpoint evaluates the same from Python whatever rule wrote it.
    a = ut.evaluate(previous[0], episodes=3, seed=5)
    b = ut.evaluate(module, spec, episodes=3, seed=5)
    assert a == b


def test_continuous_head_squashes_the_mean_into_the_bounds():
    info = EnvInfo("box", (3,), 3, 2, False, torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 1.0]))
    head = ActionHead(info, "state")
    out = torch.tensor([[0.0, 100.0, -1.0, 3.0], [-100.0, 0.5, 0.0, 0.0]])
    # low + (tanh(u) + 1) / 2 * (high - low), from the first act_dim outputs only.
    expected = torch.tensor([[0.0, 1.0], [-2.0, (torch.tanh(torch.tensor(0.5)) + 1) / 2]])
    torch.testing.assert_close(head.deterministic(out), expected)
    torch.testing.assert_close(head.log_std(out, None), out[:, 2:])
    assert head.outputs == 4
    discrete = ActionHead(EnvInfo("d", (3,), 3, 4, True), "state")
    assert discrete.outputs == 4  # logits, whatever action_std says
    assert torch.equal(discrete.deterministic(torch.tensor([[0.0, 3.0, 1.0, 2.0]])),
                       torch.tensor([1]))


def test_state_dependent_std_is_a_module_option():
    spec = ut.EnvSpec("Pendulum-v1", num_envs=2)
    module = ut.MLPPolicy(3, 1, hidden=[8], action_std="state")
    assert module.net[-1].out_features == 2  # mean and log std, not typed in by the user
    module.bind_env(env_info(spec))
    assert module.log_std_param() is None
    wrong = ut.MLPPolicy(3, 2, hidden=[8])
    with pytest.raises(ut.ConfigError, match=r"MLPPolicy.forward returns 2 outputs per "
                                             r"observation; expected 1 values"):
        wrong.bind_env(env_info(spec))


def test_recipe_init_starts_from_another_rules_checkpoint(tmp_path: Path):
    ga = tmp_path / "ga.yaml"
    ga.write_text("seed: 0\nenv: {id: CartPole-v1, num_envs: 2}\n"
                  "module: {target: unitrain.MLPPolicy, hidden: [16]}\n"
                  "optimizer: {name: ga, population: 8, truncation: 2, elite_candidates: 2, "
                  "elite_episodes: 2, sigma: 0.1}\ntrainer: {max_frames: 2000}\n")
    first = run_cli("fit", str(ga), f"run_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = json.loads((tmp_path / "a" / "summary.json").read_text())["checkpoint"]
    second = run_cli("fit", "cartpole/ppo", "module.hidden=[16]", "env.num_envs=2",
                     "optimizer.frames_per_batch=64", "trainer.max_frames=64", f"init={ckpt}",
                     f"run_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    bad = run_cli("fit", "cartpole/ppo", f"init={tmp_path / 'missing.ckpt'}",
                  f"run_dir={tmp_path / 'c'}", cwd=tmp_path)
    assert bad.returncode == 2 and "init=" in bad.stderr and "no such checkpoint" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_init_across_param_and_state_std(tmp_path: Path):
    """A policy with a learned std parameter starts a module whose std is an output (and back):
    the mean is the same, and param -> state keeps the whole distribution."""
    spec = ut.EnvSpec("Pendulum-v1", num_envs=2)
    obs = torch.randn(16, 3)

    def run(name, rule, action_std, init=None):
        module = ut.MLPPolicy(3, 1, hidden=[16], activation="relu", out_scale=1.0,
                              action_std=action_std)
        start = ActAtStart(obs)
        trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=64, eval_episodes=1, seed=3,
                             run_dir=tmp_path / name, callbacks=[start],
                             enable_progress_bar=False, logger=False)
        trainer.fit(module, init=init)
        return module, trainer.summary["checkpoint"], start.action

    ppo = ut.optim.PPO(frames_per_batch=64, minibatch_size=32, epochs=1, log_std_init=-0.7)
    param, ckpt, _ = run("ppo", ppo, "param")
    with torch.no_grad():
        param_act, param_log_std = param.act(obs), param.aux.log_std.log_std.clone()
    sac = ut.optim.DSACT(warmup_frames=64, batch_size=32, buffer_size=256,
                         critic_hidden=(16,))
    state, ckpt2, start_act = run("dsac_t", sac, "state", init=ckpt)
    # (an output layer of another width may round its products differently on a CPU)
    torch.testing.assert_close(start_act, param_act, rtol=0, atol=1e-6)
    fresh = ut.MLPPolicy(3, 1, hidden=[16], activation="relu", out_scale=1.0,
                         action_std="state")
    fresh.bind_env(env_info(spec))
    fresh.load_policy(ckpt)
    with torch.no_grad():
        log_std = fresh.actions.log_std(fresh(obs), None)
    torch.testing.assert_close(log_std, param_log_std.expand(16, 1), rtol=0, atol=0)
    # And back: DSAC-T's state-std policy starts a DDPG module (one output per action).
    with torch.no_grad():
        state_act = state.act(obs)
    ddpg = ut.optim.DDPG(warmup_frames=64, batch_size=32, buffer_size=256, critic_hidden=(16,))
    _, _, back = run("ddpg", ddpg, "param", init=ckpt2)
    torch.testing.assert_close(back, state_act, rtol=0, atol=1e-6)
