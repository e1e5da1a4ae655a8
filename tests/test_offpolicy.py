"""Off-policy rules (DDPG, TD3, SAC, DSAC-T, and CEM-RL's critic): exact resume, replay, bad input,
divergence, devices=2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_ranks
from policies import TinyPolicy
from rulecheck import CaptureStart, assert_same, checkpoint_state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensordict import TensorDict
from torch import nn

import unitrain as ut
from unitrain.app.cli import main
from unitrain.app.config import load_recipe
from unitrain.envs.replay import Replay
from unitrain.errors import ConfigError, TrainingDiverged, UserError
from unitrain.optim import DDPG, DSACT, SAC, TD3
from unitrain.policy.ckpt_file import load_checkpoint_file

PENDULUM = ut.EnvSpec("Pendulum-v1", num_envs=2)
# Tiny settings: 64 warm-up frames, then 8 frames and 4 gradient updates per iteration.
SMALL = dict(batch_size=32, buffer_size=1000, warmup_frames=64, frames_per_batch=8,
             utd_ratio=0.5, critic_hidden=(32, 32))


def _trainer(run_dir: Path, rule: ut.optim.UpdateRule, budget: int, callbacks=(),
             env: ut.EnvSpec = PENDULUM, eval_every_frames: int = 32) -> ut.Trainer:
    return ut.Trainer(env=env, optimizer=rule, max_frames=budget,
                      eval_every_frames=eval_every_frames,
                      eval_episodes=2, seed=7, num_threads=1, run_dir=run_dir,
                      callbacks=list(callbacks), enable_progress_bar=False)


def _dsac_t(**overrides) -> DSACT:
    return DSACT(**{**SMALL, "lr_actor": 1e-3, "lr_critic": 1e-3, **overrides})


# ---------------------------------------------------------------- resume

def test_interrupted_dsac_t_run_resumes_exactly(tmp_path: Path):
    run = tmp_path / "run"
    first = _trainer(run, _dsac_t(save_buffer=True), 280)
    module = TinyPolicy(3, 1)
    first.fit(module)
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    state = ckpt["unitrain"]
    assert state["frames"] == 280 and state["iteration"] == 28
    rule_state = state["rule"]
    # 64 warm-up frames in the first iteration, then 27 iterations of 8 frames and 4 updates.
    assert rule_state["updates"] == 108 and rule_state["collected"] == 280
    assert rule_state["replay"]["size"] == 280
    params = ckpt["state_dict"]
    assert params["aux.dsac_t.log_alpha"].item() != math.log(math.e)
    assert bool(params["aux.dsac_t.omega_initialized"]) and (params["aux.dsac_t.omega"] > 0).all()
    targets = [k for k in params if k.startswith("aux.dsac_t.target_")]
    critics = [k for k in params if k.startswith("aux.dsac_t.qvalue_network_params.")]
    assert targets and critics and "aux.log_std.log_std" in params
    assert len(ckpt["optimizer_states"]) == 3 and all(o["state"] for o in ckpt["optimizer_states"])
    # The actor's parameters are the module's own; aux networks stay out of the policy.
    assert {n for n, _ in module.named_policy_parameters()} == {
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}

    capture = CaptureStart()
    second = _trainer(run, _dsac_t(save_buffer=True), 312, [capture])
    second.fit(TinyPolicy(3, 1), ckpt_path="last")
    # Frames, iteration, parameters (critics, targets, log alpha, omega), optimizer moments,
    # counters, the replay memory and every RNG come back exactly as saved.
    assert_same(capture.state, checkpoint_state(ckpt))
    assert second.summary["frames"] == 312
    final = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert final["unitrain"]["rule"]["updates"] == 108 + 16
    assert final["unitrain"]["rule"]["replay"]["size"] == 312


def test_resume_without_saved_buffer_refills_before_updating(tmp_path: Path):
    run = tmp_path / "run"
    _trainer(run, _dsac_t(), 120).fit(TinyPolicy(3, 1))
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["unitrain"]["rule"]["replay"] is None
    updates = ckpt["unitrain"]["rule"]["updates"]
    second = _trainer(run, _dsac_t(), 208)
    second.fit(TinyPolicy(3, 1), ckpt_path="last")
    rule = second.rule
    # The first resumed iteration refilled the 64 warm-up frames with the policy (no updates);
    # each of the next three 8-frame iterations made 4 updates.
    assert len(rule.loop.replay) == 208 - 120
    assert rule.state_dict()["updates"] == updates + 12


def test_replay_state_round_trip_after_wrapping():
    gen = torch.Generator().manual_seed(0)
    replay = Replay(capacity=10, batch_size=4, generator=gen)
    for start in range(0, 14, 7):
        n = 7
        replay.extend(TensorDict({
            "observation": torch.arange(start, start + n, dtype=torch.float32)[:, None],
            "action": torch.zeros(n, 1), "extra": torch.zeros(n),
            ("next", "observation"): torch.zeros(n, 1), ("next", "reward"): torch.zeros(n, 1),
            ("next", "done"): torch.zeros(n, 1, dtype=torch.bool),
            ("next", "terminated"): torch.zeros(n, 1, dtype=torch.bool)}, [n]))
    assert len(replay) == 10
    state = replay.state_dict()
    assert "extra" not in state["rows"]
    copy = Replay(capacity=10, batch_size=4, generator=torch.Generator().manual_seed(1))
    copy.load_state_dict(state)
    assert_same(copy.state_dict(), state)
    gen_state = gen.get_state()
    a = replay.sample()
    copy.generator.set_state(gen_state)
    b = copy.sample()
    assert torch.equal(a["observation"], b["observation"])
    # The oldest rows (0..3) were overwritten; the next write lands on slot 4.
    assert set(state["rows"]["observation"].flatten().tolist()) == set(range(4, 14))


# ---------------------------------------------------------------- evaluation and metrics

def test_deterministic_action_is_the_squashed_mean_without_setup():
    L.seed_everything(0, verbose=False)
    module = TinyPolicy(3, 1)
    assert math.isfinite(ut.evaluate(module, PENDULUM, episodes=2)["return_mean"])
    obs = torch.randn(5, 3)
    action = module.act(obs)
    assert torch.allclose(action, 2.0 * torch.tanh(module(obs)))  # Pendulum torque in [-2, 2]


def test_tensorboard_metrics(tmp_path: Path):
    _trainer(tmp_path / "run", _dsac_t(), 96).fit(TinyPolicy(3, 1))
    tags: set[str] = set()
    for path in (tmp_path / "run").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    expected = {"loss/critic", "loss/actor", "loss/temperature", "train/alpha", "train/entropy",
                "train/omega", "train/q_mean", "train/sigma_mean", "train/target_q_mean",
                "perf/updates_per_s", "optim/updates", "train/buffer_size"}
    assert expected <= tags, expected - tags


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("rule", [DDPG, TD3, SAC, DSACT])
def test_discrete_env_is_a_config_error(rule, tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^env\.id: CartPole-v1 has discrete actions"):
        _trainer(tmp_path / "run", rule(**SMALL), 64, env=ut.EnvSpec("CartPole-v1", num_envs=2))


@pytest.mark.parametrize("rule", [DDPG, TD3, SAC, DSACT])
@pytest.mark.parametrize("kwargs, key", [
    (dict(batch_size=512, buffer_size=256), "batch_size"),
    (dict(warmup_frames=300, buffer_size=256), "warmup_frames"),
    (dict(tau=0.0), "tau"),
    (dict(tau=1.5), "tau"),
    (dict(utd_ratio=0.0), "utd_ratio"),
])
def test_bad_hyperparameters(rule, kwargs, key):
    with pytest.raises(ConfigError) as info:
        rule(**kwargs)
    assert info.value.key == f"optimizer.{key}"
    assert "expected" in str(info.value)


def test_recipe_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env: {id: Pendulum-v1}\noptimizer: {name: dsac_t, batch_size: 512, "
                      "buffer_size: 100}\n")
    with pytest.raises(UserError, match=r"optimizer\.batch_size: got 512; expected an integer "
                                        r"in \[1, buffer_size=100\]"):
        load_recipe(recipe)
    with pytest.raises(UserError, match=r"optimizer\.tau: got 0\.0; expected a number in "
                                        r"\(0, 1\]"):
        load_recipe(recipe, ["optimizer.batch_size=32", "optimizer.tau=0.0"])
    code = main(["fit", str(recipe), "optimizer.batch_size=32", "optimizer.warmup_frames=50",
                 "env.id=CartPole-v1", "trainer.max_frames=64", f"run_dir={tmp_path / 'run'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"unitrain: error: {recipe}: env.id: CartPole-v1 has discrete actions")


def test_module_output_size_is_checked(tmp_path: Path):
    trainer = _trainer(tmp_path / "run", _dsac_t(), 64)
    with pytest.raises(ConfigError, match=r"module: TinyPolicy.forward returns 3 outputs.*"
                                          r"expected 1 values"):
        trainer.fit(TinyPolicy(3, 3))


def test_frames_per_batch_must_fill_every_env(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^optimizer\.frames_per_batch: got 5; expected a "
                                          r"multiple of env.num_envs=2"):
        _trainer(tmp_path / "run", _dsac_t(frames_per_batch=5), 64)
    assert not (tmp_path / "run").exists()  # nothing written by a run that cannot start


# ---------------------------------------------------------------- divergence

class PoisonRewards(L.Callback):
    """Write NaN rewards into the replay memory before iteration ``at`` (0-based)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if module._ctx.services.iteration == self.at:
            rewards = module._ctx.rule.loop.replay.buffer.storage[:]["next", "reward"]
            rewards.fill_(float("nan"))


@pytest.mark.parametrize("make_rule", [_dsac_t, lambda: DDPG(**SMALL)], ids=["dsac_t", "ddpg"])
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(
        make_rule, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    run = tmp_path / "run"
    trainer = _trainer(run, make_rule(), 10_000, [PoisonRewards(at=10)])
    module = TinyPolicy(3, 1)
    with pytest.raises(TrainingDiverged, match=r"non-finite gradients .* at iteration 11,"):
        trainer.fit(module)
    # In-memory parameters were not stepped with the bad gradients.
    assert all(torch.isfinite(p).all() for p in module.policy_parameters())
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    # Evaluations (and checkpoints) every 32 frames: the last one after iteration 9, 128 frames
    # (64 warm-up frames in the first iteration, then 8 per iteration).
    assert ckpt["unitrain"]["iteration"] == 9 and ckpt["unitrain"]["frames"] == 128
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values()
               if v.is_floating_point())
    # The last checkpoint evaluates and resumes.
    capsys.readouterr()
    assert main(["evaluate", str(run / "checkpoints" / "last.ckpt"), "--episodes", "2"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["eval/return_mean"])
    # 128 frames in the checkpoint, 64 to refill the memory, then 3 iterations of 8.
    resumed = _trainer(run, make_rule(), 128 + 64 + 24)
    resumed.fit(TinyPolicy(3, 1), ckpt_path="last")
    assert math.isfinite(resumed.summary["eval/return_mean"])


def test_divergence_through_the_cli_is_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env: {id: Pendulum-v1, num_envs: 2}\n"
                      "module: {target: policies.TinyPolicy}\n"
                      "optimizer: {name: ddpg, lr_actor: 1.0e+30, lr_critic: 1.0e+30, "
                      "batch_size: 32, buffer_size: 1000, warmup_frames: 64, "
                      "frames_per_batch: 8, critic_hidden: [32, 32]}\n"
                      "trainer: {max_frames: 4000, eval_every_frames: 32, eval_episodes: 2, "
                      "num_threads: 1}\n")
    assert main(["fit", str(recipe), f"run_dir={tmp_path / 'run'}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("unitrain: error: ddpg: non-finite gradients"), last


# ---------------------------------------------------------------- custom critics, OU noise

class CriticPolicy(TinyPolicy):
    """A module that supplies its own critics and a state-dependent std (mean, then log std)."""

    action_std = "state"

    def make_critic(self) -> nn.Module:
        return Pair(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)))


class Pair(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], -1))


def test_user_critics_and_ou_noise(tmp_path: Path):
    module = CriticPolicy(3, 2)  # 2 outputs: mean and log std
    trainer = _trainer(tmp_path / "a", _dsac_t(), 96)
    trainer.fit(module)
    keys = module.state_dict().keys()
    assert any(k.startswith("aux.dsac_t.qvalue_network_params.critic.net.") for k in keys)
    assert "aux.log_std.log_std" not in keys  # the module gives a state-dependent std
    ddpg = DDPG(**SMALL, noise="ou", noise_std=0.2)
    _trainer(tmp_path / "b", ddpg, 96).fit(TinyPolicy(3, 1))
    assert ddpg._ou is not None and ddpg._ou.abs().max() > 0


# ---------------------------------------------------------------- two processes

DDP_SCRIPT = '''
import sys
import torch
import lightning as L
import unitrain as ut
from dump import Dump
from policies import TinyPolicy


def replay_and_updates(trainer, module):
    rule = module._ctx.rule
    extra = {"replay_obs": rule.loop.replay.buffer.storage[:8]["observation"].clone(),
             "updates": rule.state_dict()["updates"]}
    if rule.name == "cem_rl":
        extra["cem_var"] = rule.cem.dist.var.clone()
    return extra


if __name__ == "__main__":
    small = dict(lr_actor=1e-3, lr_critic=1e-3, batch_size=32, buffer_size=1000,
                 warmup_frames=64, frames_per_batch=8, utd_ratio=0.5, critic_hidden=(32, 32))
    # Three runs in one launch: the processes and their process group serve all three fits.
    for rule in (ut.optim.DSACT(**small), ut.optim.SAC(**small), ut.optim.TD3(**small)):
        trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1", num_envs=2), optimizer=rule,
                             devices=2, strategy="ddp", max_frames=256, eval_every_frames=10000,
                             eval_episodes=2, seed=3, num_threads=1, run_dir=f"run-{rule.name}",
                             callbacks=[Dump(f"{rule.name}-", extra=replay_and_updates)],
                             enable_progress_bar=False)
        trainer.fit(TinyPolicy(3, 1))
    # CEM-RL: 4 actors of 32 steps a generation (2 per rank), 2 of them trained by the critic;
    # with TD3's critics and with DSAC-T's (omega averaged across ranks, a shared temperature).
    for critic, tag in (("td3", "cem_rl"), ("dsac_t", "cem_rl_dsac_t")):
        rule = ut.optim.CEMRL(population=4, gradient_actors=2, max_episode_steps=32, sigma=0.1,
                              critic=critic,
                              **{k: v for k, v in small.items() if k != "frames_per_batch"})
        trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1"), optimizer=rule, devices=2,
                             strategy="ddp", max_frames=384, eval_every_frames=10000,
                             eval_episodes=2, seed=3, num_threads=1, run_dir=f"run-{tag}",
                             callbacks=[Dump(f"{tag}-", extra=replay_and_updates)],
                             enable_progress_bar=False)
        trainer.fit(TinyPolicy(3, 1))
'''


def test_two_processes_keep_every_network_identical(tmp_path: Path):
    keys = {"dsac_t": ("aux.dsac_t.log_alpha", "aux.dsac_t.omega",
                       "aux.dsac_t.target_qvalue_network_params.critic.net.0.weight"),
            "sac": ("aux.sac.log_alpha", "aux.sac.target_qvalue_network_params.module.net.0.weight"),
            "td3": ("aux.td3.target_actor_network_params.module.module.net.0.weight",
                    "aux.td3.target_qvalue_network_params.module.net.0.weight"),
            "cem_rl": ("aux.cem_rl.target_qvalue_network_params.module.net.0.weight",
                       "aux.cem_rl.qvalue_network_params.module.net.0.weight"),
            "cem_rl_dsac_t": ("aux.cem_rl.log_alpha", "aux.cem_rl.omega", "aux.log_std.log_std",
                              "aux.cem_rl.target_qvalue_network_params.critic.net.0.weight")}
    for name, names in keys.items():
        r0, r1 = run_ranks(tmp_path, DDP_SCRIPT, prefix=f"{name}-")  # one launch runs all five
        if name.startswith("cem_rl"):
            # Three generations of 128 frames; the last two train 2 actors on 0.5 x 128 critic
            # updates in all.
            assert r0["updates"] == r1["updates"] == 128
            assert torch.equal(r0["cem_var"], r1["cem_var"])
        else:
            # Each rank collected 128 frames: 64 of warm-up, then 8 iterations of 4 updates.
            assert r0["updates"] == r1["updates"] == 32, name
        # Ranks explored with their own seeds ...
        assert not torch.equal(r0["replay_obs"], r1["replay_obs"]), name
        # ... and end with identical actors, critics, targets and temperature (and omega).
        assert set(r0["params"]) == set(r1["params"])
        for key in (*names, "net.0.weight"):
            assert key in r0["params"], (name, key, sorted(r0["params"]))
        for key, value in r0["params"].items():
            assert torch.equal(value, r1["params"][key]), (name, key)
        assert not torch.equal(r0["params"]["net.0.weight"], r0["init"]["net.0.weight"]), name


@pytest.mark.parametrize("rule, delay, alpha_every, steps", [
    (DSACT, 2, "delayed", 16),  # the paper's: the temperature steps with the policy
    (DSACT, 2, "update", 32),   # SAC's schedule
    (SAC, 1, None, 32),
    (SAC, 2, None, 16),
    (TD3, 2, None, None),
])
def test_temperature_and_actor_steps_follow_the_schedule(rule, delay, alpha_every, steps,
                                                         tmp_path: Path):
    extra = {} if alpha_every is None else {"alpha_every": alpha_every}
    r = rule(**SMALL, delay=delay, **extra)
    # 2 envs: 64 warm-up frames, then 8 iterations of 8 frames at 0.5 updates per frame.
    _trainer(tmp_path, r, 128, eval_every_frames=10_000).fit(TinyPolicy(3, 1))
    assert r.loop.updates == 32
    if steps is not None:
        alpha_state = r.alpha_opt.state[r.loss.log_alpha]
        assert int(alpha_state["step"]) == steps
    actor_state = r.actor_opt.state[r.actor_opt.param_groups[0]["params"][0]]
    critic_state = r.critic_opt.state[r.critic_opt.param_groups[0]["params"][0]]
    assert int(actor_state["step"]) == 32 // delay and int(critic_state["step"]) == 32
