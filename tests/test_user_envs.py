"""A user's own env: gymnasium ``module:id`` ids, TorchRL envs and factories (``EnvSpec.make``)
as the torch-native backend of :class:`~unitrain.envs.BatchedEnv`, and what checkpoints record."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from torchrl.envs import GymEnv
from usertorchrl import Countdown, make_countdown, make_nothing, make_pendulum

import unitrain as ut
from unitrain.envs import EnvSpec, make_env
from unitrain.envs.info import env_info
from unitrain.errors import ConfigError, UserError


def _steps(env, actions):
    """Step ``env`` through ``actions``; per step: (next obs, reward, done, next input's obs)."""
    td = env.reset()
    out = []
    for a in actions:
        td["action"] = a
        step, td = env.step_and_maybe_reset(td)
        out.append((step["next", "observation"].clone(), step["next", "reward"].clone(),
                    step["next", "done"].clone(), td["observation"].clone()))
    return out


# ------------------------------------------------------------------ gymnasium module:id

def test_module_id_imports_the_module_that_registers_it():
    spec = EnvSpec(id="userenvs:Reach-v0", num_envs=2)
    info = env_info(spec)
    assert (info.obs_dim, info.act_dim, info.discrete) == (2, 1, False)
    env = make_env(spec, seed=3)
    assert env.backend_name == "gymnasium"
    steps = _steps(env, [torch.ones(2, 1)] * 60)
    assert any(bool(done.any()) for _, _, done, _ in steps)  # time limit of 50 at the latest


def test_module_id_errors_are_one_line(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        EnvSpec(id="nosuchmodule:Reach-v0")
    msg = str(e.value)
    assert msg.startswith("env.id: cannot import env module 'nosuchmodule'")
    assert str(tmp_path) in msg and "PYTHONPATH" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="module 'userenvs' registers no gymnasium env "
                                          "'Reech-v0'; did you mean Reach-v0"):
        EnvSpec(id="userenvs:Reech-v0")


# ------------------------------------------------------------------ the torch-native backend

def test_torch_native_autoreset_and_bookkeeping(monkeypatch):
    env = make_env(EnvSpec(make=make_countdown, num_envs=3), seed=0)
    assert env.torch_native and env.backend_name == "torchrl"
    assert env.device == torch.device("cpu")
    # No numpy round trip on the way: stepping must not call Tensor.numpy.
    monkeypatch.setattr(torch.Tensor, "numpy", lambda *a, **k: pytest.fail("numpy round trip"))
    steps = _steps(env, [torch.full((3, 1), 0.5)] * 4)
    monkeypatch.undo()
    # Slot i's episodes last 2 + i steps; the next obs is the ended episode's last one (0 left),
    # the next input's obs the new episode's first (2 + i left).
    left = [[o[:, 0].tolist() for o, *_ in steps], [s[:, 0].tolist() for *_, s in steps]]
    assert left[0] == [[1, 2, 3], [0, 1, 2], [1, 0, 1], [0, 2, 0]]
    assert left[1] == [[1, 2, 3], [2, 1, 2], [1, 3, 1], [2, 2, 4]]
    assert [d.view(-1).tolist() for _, _, d, _ in steps][3] == [True, False, True]
    assert isinstance(env.episodes_done, torch.Tensor)
    assert env.episodes_done.tolist() == [2, 1, 1]
    # Completion order: by step, then by slot; returns are the (clamped) actions summed.
    assert env.pop_finished() == [(1.0, 2), (1.5, 3), (1.0, 2), (2.0, 4)]
    assert env.pop_finished() == []


def test_torchrl_env_autoresets_as_gymnasium_does():
    # TorchRL's GymEnv over CartPole (one-hot actions, partial resets) against gymnasium itself
    # with same-step autoreset: seeded as TorchRL seeds (set_seed resets with the seed, then
    # the env is reset), the same actions give the same steps across episode ends.
    actions = [(t * 7 // 3) % 2 for t in range(150)]
    ours = _steps(make_env(EnvSpec(make=lambda: GymEnv("CartPole-v1"), num_envs=1), seed=5),
                  [torch.tensor([a]) for a in actions])
    ref = gym.make("CartPole-v1")
    ref.reset(seed=5)
    ref.reset()  # the first step's observations depend on this reset's
    ended = 0
    for a, (last, reward, done, first) in zip(actions, ours):
        obs, r, terminated, truncated, _ = ref.step(a)
        torch.testing.assert_close(last[0], torch.as_tensor(obs))
        assert float(reward) == r and bool(done) == (terminated or truncated)
        if terminated or truncated:
            ended += 1
            obs, _ = ref.reset()
        torch.testing.assert_close(first[0], torch.as_tensor(obs))
    assert ended >= 2


def test_an_instance_is_a_template_copied_for_every_env():
    user = Countdown(4)
    spec = EnvSpec.from_env(user)
    assert spec.num_envs == 4 and spec.id == "Countdown"
    env = make_env(spec, seed=0, num_envs=2)  # fewer slots than the env has: the rest idle
    steps = _steps(env, [torch.ones(2, 1)] * 3)
    assert [o[:, 0].tolist() for o, *_ in steps] == [[1, 2], [0, 1], [1, 0]]
    assert user.resets == 0  # the user's own object is never stepped
    single = EnvSpec.from_env(GymEnv("Pendulum-v1"))
    assert single.num_envs == 1
    assert make_env(single, seed=0, num_envs=3).reset()["observation"].shape == (3, 3)


def test_factories_that_cannot_serve_are_one_line_errors():
    with pytest.raises(ConfigError, match="returned NotAnEnv, not a torchrl.envs.EnvBase"):
        env_info(EnvSpec(make=make_nothing))
    with pytest.raises(ConfigError, match="has 2 slots and this use needs 4"):
        make_env(EnvSpec(make=lambda: Countdown(2), num_envs=4), seed=0)
    with pytest.raises(ConfigError, match="env.make: module 'usertorchrl' .* has no attribute "
                                          "'make_nope'"):
        EnvSpec(make="usertorchrl:make_nope")
    with pytest.raises(ConfigError, match="env.make: got 3; expected a torchrl.envs.EnvBase"):
        EnvSpec(make=3)


def test_factory_kwargs_and_time_limit():
    spec = EnvSpec(make="usertorchrl:make_pendulum", kwargs={"g": 9.0},
                   max_episode_steps=7, num_envs=2)
    env = make_env(spec, seed=0)
    steps = _steps(env, [torch.zeros(2, 1)] * 7)
    assert [bool(d.all()) for _, _, d, _ in steps] == [False] * 6 + [True]
    assert env.pop_finished()[0][1] == 7


# ------------------------------------------------------------------ what checkpoints record

def test_record_names_the_factory_or_asks_for_the_env_again():
    by_path = EnvSpec(make=make_pendulum, num_envs=2).record()
    assert by_path["make"] == "usertorchrl:make_pendulum" and not by_path["make_passed"]
    assert EnvSpec.from_record(by_path).make == "usertorchrl:make_pendulum"
    live = EnvSpec.from_env(GymEnv("Pendulum-v1")).record()
    assert live["make"] is None and live["make_passed"]
    with pytest.raises(UserError, match="ckpt: this run's env was a TorchRL env passed as an "
                                        "object .*; pass it again"):
        EnvSpec.from_record(live, "ckpt")
    assert EnvSpec.from_record({"id": "CartPole-v1"}).make is None  # a record before make


def test_trainer_fits_and_evaluates_a_torchrl_env(tmp_path):
    trainer = ut.Trainer(env=lambda: GymEnv("Pendulum-v1"), num_envs=2,
                         optimizer=ut.optim.PPO(frames_per_batch=64, minibatch_size=64, epochs=1),
                         max_frames=128, eval_episodes=2, run_dir=tmp_path / "run",
                         enable_progress_bar=False)
    trainer.fit(ut.MLPPolicy(3, 1, hidden=(8,)))
    assert trainer.summary["frames"] == 128
    assert np.isfinite(trainer.summary["eval/return_mean"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match="pass it again"):
        ut.evaluate(ckpt, episodes=2)
    result = ut.evaluate(ckpt, env=lambda: GymEnv("Pendulum-v1"), episodes=2)
    assert result["episodes"] == 2 and result["length_mean"] == 200


def test_rollout_keeps_its_bookkeeping_on_the_env_device():
    from unitrain.envs.rollout import rollout

    env = make_env(EnvSpec(make=make_countdown, num_envs=3), seed=0)
    played = rollout(env, lambda obs, _: torch.ones(obs.shape[0], 1), quota=[2, 1, 1])
    returns, lengths = played.returns.tolist(), played.lengths.tolist()
    assert sorted(zip(played.slots.tolist(), lengths)) == [(0, 2), (0, 2), (1, 3), (2, 4)]
    assert returns == [float(n) for n in lengths]
    assert played.returns.device == env.device



def test_a_backend_without_send_and_recv_steps_at_recv(monkeypatch):
    # send/recv are optional in the backend protocol: a rollout still plays whole episodes.
    from unitrain.envs import batched
    from unitrain.envs.rollout import rollout
    from unitrain.envs.torchrl_env import TorchRLVector

    class StepOnly:
        torch_native = True

        def __init__(self, *args):
            self.inner = TorchRLVector(*args)
            self.device = self.inner.device
            self.observation_space = self.inner.observation_space
            self.action_space = self.inner.action_space
            self.reset, self.step, self.close = (self.inner.reset, self.inner.step,
                                                 self.inner.close)

    monkeypatch.setitem(batched.BACKENDS, "torchrl", StepOnly)
    env = make_env(EnvSpec(make=make_countdown, num_envs=2), seed=0)
    assert not hasattr(env.backend, "send")
    played = rollout(env, lambda obs, _: torch.ones(obs.shape[0], 1))
    assert sorted(zip(played.slots.tolist(), played.lengths.tolist())) == [(0, 2), (1, 3)]
