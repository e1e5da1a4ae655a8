"""DQN and Double DQN: the loss against hand-computed targets, the ε schedule, ε-greedy
actions, target-network updates, bad input, two processes, the dueling modules, and learning
CartPole."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from policies import TinyPolicy
from tensordict import TensorDict
from torch import nn

import unitrain as ut
from unitrain.errors import ConfigError
from unitrain.optim import DQN
from unitrain.policy.models import DuelingMLP, NatureCNN
from unitrain.rules.gradient.dqn import epsilon_at
from unitrain.testing import check_rule

CARTPOLE = ut.EnvSpec("CartPole-v1", num_envs=2)
# 64 random frames, then 8 frames and 4 gradient updates per iteration.
SMALL = dict(batch_size=16, buffer_size=1000, learning_starts=64, frames_per_batch=8,
             train_frequency=2)


def _fit(run_dir: Path, rule: DQN, budget: int, module: ut.RLModule | None = None,
         env: ut.EnvSpec = CARTPOLE) -> tuple[ut.Trainer, ut.RLModule]:
    module = module if module is not None else TinyPolicy(4, 2)
    trainer = ut.Trainer(env=env, optimizer=rule, max_frames=budget, eval_every_frames=10**6,
                         eval_episodes=2, seed=3, num_threads=1, run_dir=run_dir,
                         enable_progress_bar=False)
    trainer.fit(module)
    return trainer, module


def _target_module(rule: DQN, module: ut.RLModule) -> ut.RLModule:
    """A copy of ``module`` holding the loss's target-network parameters."""
    target = copy.deepcopy(module)
    # The loss's value network is QValueActor(LeanModule(ModuleCall(module))): strip that path.
    params = {key.removeprefix("module.0.module.module."): value for key, value in
              rule.loss.target_value_network_params.flatten_keys(".").items()}
    target.load_state_dict({k: v for k, v in params.items() if not k.startswith("aux.")},
                           strict=False)
    return target


def _policy_state(module: ut.RLModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("aux.")}


# ---------------------------------------------------------------- the loss

@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("loss_function", ["l2", "smooth_l1"])
def test_loss_is_the_dqn_target_computed_by_hand(double: bool, loss_function: str,
                                                 tmp_path: Path):
    rule = DQN(**SMALL, gamma=0.9, double=double, loss_function=loss_function)
    _, module = _fit(tmp_path, rule, 96)
    # Move the online network away from its target, so that the two targets differ.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.policy_parameters():
            p.add_(0.5 * torch.randn_like(p))
    target = _target_module(rule, module)
    obs, next_obs = torch.randn(6, 4), torch.randn(6, 4)
    action = torch.tensor([0, 1, 1, 0, 1, 0])
    reward = torch.randn(6, 1)
    terminated = torch.tensor([[False], [True], [False], [False], [True], [False]])
    batch = TensorDict({"observation": obs, "action": action,
                        "next": {"observation": next_obs, "reward": reward,
                                 "done": terminated.clone(), "terminated": terminated}},
                       batch_size=[6])
    loss = rule.loss(batch)["loss"]

    with torch.no_grad():
        q_next = target(next_obs)
        online_next = module(next_obs)
        # van Hasselt et al. 2016: the online network picks a', the target network values it.
        picked = q_next.gather(-1, online_next.argmax(-1, keepdim=True)).squeeze(-1)
        next_value = picked if double else q_next.max(-1).values
        y = reward.squeeze(-1) + 0.9 * (~terminated.squeeze(-1)).float() * next_value
    q = module(obs).gather(-1, action[:, None]).squeeze(-1)
    error = q - y
    expected = (error.pow(2) if loss_function == "l2" else
                torch.where(error.abs() < 1, 0.5 * error.pow(2), error.abs() - 0.5)).mean()
    torch.testing.assert_close(loss, expected)
    # The two targets differ on this batch, so the check tells them apart.
    other = q_next.max(-1).values if double else \
        q_next.gather(-1, online_next.argmax(-1, keepdim=True)).squeeze(-1)
    assert not torch.allclose(next_value, other)
    # The gradient reaches the module, not the target network.
    loss.backward()
    assert all(p.grad is not None for p in module.policy_parameters())
    assert all(not t.requires_grad for t in
               rule.loss.target_value_network_params.values(True, True))


# ---------------------------------------------------------------- exploration

def test_epsilon_schedule_values():
    assert epsilon_at(0, 1.0, 0.05, 1000) == 1.0
    assert epsilon_at(250, 1.0, 0.05, 1000) == pytest.approx(1.0 - 0.95 * 0.25)
    assert epsilon_at(500, 1.0, 0.05, 1000) == pytest.approx(0.525)
    assert epsilon_at(1000, 1.0, 0.05, 1000) == 0.05
    assert epsilon_at(10**6, 1.0, 0.05, 1000) == 0.05
    assert epsilon_at(0, 1.0, 0.05, 0) == 0.05  # no decay: the final value from the start


def test_epsilon_decays_over_the_fraction_of_the_budget(tmp_path: Path):
    # 0.5 of 800 frames: ε reaches its end after 400 frames of this process.
    rule = DQN(**SMALL, exploration_fraction=0.5, epsilon_start=1.0, epsilon_end=0.1)
    steps: list[tuple[float, float]] = []
    step = rule.step

    def recording(ctx):
        metrics = step(ctx)
        steps.append((rule.loop.collected, metrics["train/epsilon"]))
        return metrics

    rule.step = recording  # type: ignore[method-assign]
    _fit(tmp_path, rule, 800)
    assert rule.decay_frames == 400
    for collected, epsilon in steps:
        assert epsilon == pytest.approx(max(0.1, 1.0 - 0.9 * collected / 400))
    assert steps[-1][1] == pytest.approx(0.1)


def test_epsilon_greedy_is_greedy_at_zero_and_uniform_at_one(tmp_path: Path):
    rule = DQN(**SMALL, epsilon_start=0.0, epsilon_end=0.0)
    _, module = _fit(tmp_path, rule, 96)
    obs = torch.randn(4000, 4)
    with torch.no_grad():
        assert torch.equal(rule._explore(obs), module.act(obs))
        assert torch.equal(rule.greedy(obs), module.act(obs))
        rule.epsilon_start = rule.epsilon_end = 1.0
        actions = rule._explore(obs)
    # ε = 1: a uniformly random action whatever the Q-values.
    assert abs(float(actions.float().mean()) - 0.5) < 0.05
    assert not torch.equal(actions, module.act(obs))


def test_exploration_draws_come_from_the_run_seed(tmp_path: Path):
    # Two runs of one seed collect the same transitions; another seed collects others.
    memories = []
    for seed in (3, 3, 4):
        rule = DQN(**SMALL, exploration_fraction=1.0)
        trainer = ut.Trainer(env=CARTPOLE, optimizer=rule, max_frames=160, seed=seed,
                             eval_every_frames=10**6, eval_episodes=1, num_threads=1,
                             run_dir=tmp_path / f"run{len(memories)}", enable_progress_bar=False)
        trainer.fit(TinyPolicy(4, 2))
        memories.append(rule.loop.replay.buffer.storage._storage["action"][:160].clone())
    assert torch.equal(memories[0], memories[1])
    assert not torch.equal(memories[0], memories[2])


# ---------------------------------------------------------------- target network

def test_hard_target_copies_every_target_update_frames(tmp_path: Path):
    # 2 frames per update and a copy every 8 frames: after every 4th update. 96 frames =
    # 64 random + 32 of training: 16 updates, the last of them followed by a copy.
    rule = DQN(**SMALL, target_update=8)
    _, module = _fit(tmp_path / "a", rule, 96)
    assert rule.loop.updates == 16
    after = _target_module(rule, module).state_dict()
    for key, value in _policy_state(module).items():
        assert torch.equal(after[key], value), key
    # A target_update longer than the run: the target never moves from the initial module.
    rule = DQN(**SMALL, target_update=10**6)
    initial = TinyPolicy(4, 2)
    start = _policy_state(initial)
    _, module = _fit(tmp_path / "b", rule, 96, module=initial)
    after = _target_module(rule, module).state_dict()
    for key, value in start.items():
        assert torch.equal(after[key], value), key
        assert not torch.equal(module.state_dict()[key], value), key


def test_polyak_target_with_tau_below_one(tmp_path: Path):
    # tau < 1 after every update: the target is a mix of the initial and trained networks.
    rule = DQN(**SMALL, target_update=2, tau=0.1)
    initial = TinyPolicy(4, 2)
    start = _policy_state(initial)
    _, module = _fit(tmp_path, rule, 96, module=initial)
    after = _target_module(rule, module).state_dict()
    key = "net.0.weight"
    assert not torch.equal(after[key], start[key])
    assert not torch.equal(after[key], module.state_dict()[key])


# ---------------------------------------------------------------- bad input

def test_continuous_actions_are_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^env\.id: Pendulum-v1 has continuous actions "
                                          r"\(Box\(1,\)\), which dqn does not train; rules "
                                          r"that do: ars, .*\bsac\b"):
        _fit(tmp_path, DQN(**SMALL), 64, module=TinyPolicy(3, 1),
             env=ut.EnvSpec("Pendulum-v1", num_envs=2))


@pytest.mark.parametrize("kwargs, key", [
    (dict(batch_size=512, buffer_size=256), "batch_size"),
    (dict(learning_starts=300, buffer_size=256), "learning_starts"),
    (dict(tau=0.0), "tau"),
    (dict(train_frequency=0), "train_frequency"),
    (dict(epsilon_start=0.1, epsilon_end=0.5), "epsilon_end"),
    (dict(exploration_fraction=1.5), "exploration_fraction"),
    (dict(loss_function="l1"), "loss_function"),
])
def test_bad_hyperparameters(kwargs, key):
    with pytest.raises(ConfigError) as info:
        DQN(**kwargs)
    assert info.value.key == f"optimizer.{key}"


def test_budget_warning_names_learning_starts():
    assert "optimizer.learning_starts" in DQN().budget_warning(50_000, 1)
    assert DQN().budget_warning(10_000_000, 1) is None


# ---------------------------------------------------------------- two processes

def test_two_processes_end_identical(tmp_path: Path):
    # The ranks check: every rank returns the same keys and ends with the same parameters
    # (module, target network, optimizer), though each explores with its own seeds.
    report = check_rule(DQN(**SMALL, double=True, save_buffer=True), CARTPOLE, frames=256,
                        module=TinyPolicy, devices=2, run_dir=tmp_path, eval_episodes=2)
    assert "ranks" in report.checks


# ---------------------------------------------------------------- dueling modules

def test_dueling_mlp_is_value_plus_centred_advantage():
    net = DuelingMLP(4, 3, hidden=[8], stream_hidden=5)
    obs = torch.randn(7, 4)
    features = net.trunk(obs)
    value, advantage = net.head.value(features), net.head.advantage(features)
    torch.testing.assert_close(net(obs), value + advantage - advantage.mean(-1, keepdim=True))
    # Q - V has mean zero over actions (Wang et al. 2016, eq. 9).
    torch.testing.assert_close((net(obs) - value).mean(-1), torch.zeros(7))
    with pytest.raises(ValueError, match="discrete"):
        DuelingMLP(4, 3, discrete=False)


def test_nature_cnn_with_a_dueling_head():
    net = NatureCNN((4, 84, 84), 6, hidden=16, dueling=True)
    out = net(torch.randint(0, 255, (2, 4, 84, 84), dtype=torch.uint8))
    assert out.shape == (2, 6)
    assert isinstance(net.head.value[0], nn.Linear) and net.head.value[0].out_features == 16


def test_dueling_mlp_trains_with_ppo(tmp_path: Path):
    # Any rule can train it: its output is one value per action, read as logits by PPO.
    module = DuelingMLP(4, 2, hidden=[16], stream_hidden=16)
    before = _policy_state(module)
    trainer = ut.Trainer(env=CARTPOLE, optimizer=ut.optim.PPO(frames_per_batch=64), max_frames=128,
                         eval_episodes=1, num_threads=1, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert not torch.equal(module.state_dict()["head.value.0.weight"],
                           before["head.value.0.weight"])


# ---------------------------------------------------------------- learning

def test_dqn_learns_cartpole(tmp_path: Path):
    # Random play lasts about 22 steps; a seeded run is several times longer after 15,000
    # frames (110.8 here; ten times its 3,500 updates reach CartPole's 500: docs/dqn.md).
    rule = DQN(lr=2e-3, batch_size=64, buffer_size=20_000, learning_starts=1000,
               train_frequency=4, frames_per_batch=64, target_update=256,
               exploration_fraction=0.3, epsilon_end=0.04, double=True)
    module = ut.MLPPolicy(4, 2, hidden=[64, 64], activation="relu", out_scale=1.0)
    trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1", num_envs=4), optimizer=rule,
                         max_frames=15_000, eval_every_frames=10**6, eval_episodes=5, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["eval/return_mean"] > 75


def test_cartpole_recipe_runs_past_learning_starts(tmp_path: Path):
    # The recipe as shipped, short (its 475 within 100k frames: docs/dqn.md, three seeds).
    from unitrain.app.cli import main

    run = tmp_path / "run"
    assert main(["fit", "cartpole/dqn", f"run_dir={run}", "trainer.max_frames=2048",
                 "trainer.eval_episodes=2"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    # 1,024 random frames (whole iterations of 64 past learning_starts=1000), then one update
    # per 2 frames.
    assert [e.value for e in acc.Scalars("train/updates_total")][-1] == 512
