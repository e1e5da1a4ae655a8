"""Tests for unitrain.envs and unitrain.envs.collect: specs, batches, episode boundaries, seeding."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import check_env_specs, step_mdp

from unitrain.envs import BatchedEnv, EnvSpec, ObsNorm, env_info, make_env
from unitrain.envs.collect import make_collector
from unitrain.errors import ConfigError


class _Argmax(nn.Module):
    """A deterministic discrete policy: argmax over a linear layer's logits."""

    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        self.net = nn.Linear(obs_dim, act_dim)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.net(observation).argmax(-1)


def _policy(env: BatchedEnv, seed: int = 0) -> TensorDictModule:
    """A deterministic policy for ``env`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    info = env.info
    if info.discrete:
        net: nn.Module = _Argmax(info.obs_dim, info.act_dim)
    else:
        net = nn.Sequential(nn.Linear(info.obs_dim, 16), nn.Tanh(), nn.Linear(16, info.act_dim),
                            nn.Tanh())
    return TensorDictModule(net, in_keys=["observation"], out_keys=["action"])


def _collect(spec: EnvSpec, seed: int, steps: int, policy_seed: int = 0,
             random_actions: bool = False) -> tuple[TensorDictBase, BatchedEnv]:
    """One batch of ``steps`` vector steps from a fresh env."""
    env = make_env(spec, seed)
    torch.manual_seed(policy_seed)  # random actions come from torch's global generator
    policy = None if random_actions else _policy(env, policy_seed)
    collector = make_collector(env, policy, frames_per_batch=spec.num_envs * steps)
    batch = next(iter(collector))
    return batch, env


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
@pytest.mark.parametrize("env_id, obs_shape, obs_dtype", [
    ("CartPole-v1", (4,), torch.float32),
    ("Pendulum-v1", (3,), torch.float32),
    ("HalfCheetah-v5", (17,), torch.float32),
    ("ALE/Pong-v5", (4, 84, 84), torch.uint8),
])
def test_check_env_specs(env_id: str, obs_shape: tuple[int, ...], obs_dtype: torch.dtype,
                         backend: str) -> None:
    env = make_env(EnvSpec(env_id, num_envs=2, backend=backend), seed=3)
    assert env.backend_name == backend
    try:
        assert env.observation_spec["observation"].shape == (2, *obs_shape)
        assert env.observation_spec["observation"].dtype == obs_dtype
        check_env_specs(env, seed=0)
        check_env_specs(env, seed=0, break_when_any_done="both")
    finally:
        env.close()


def test_env_info_matches_env() -> None:
    info = env_info(EnvSpec("ALE/Pong-v5", num_envs=1))
    assert info.obs_shape == (4, 84, 84) and info.image and info.discrete and info.act_dim == 6
    info = env_info(EnvSpec("HalfCheetah-v5", num_envs=1))
    assert (info.obs_dim, info.act_dim, info.discrete, info.image) == (17, 6, False, False)


@pytest.mark.parametrize("backend", ["gymnasium", "envpool"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "HalfCheetah-v5"])
def test_batch_shape_and_keys(env_id: str, backend: str) -> None:
    spec = EnvSpec(env_id, num_envs=3, max_episode_steps=25, backend=backend)
    batch, env = _collect(spec, seed=1, steps=10)
    assert batch.batch_size == (3, 10)
    info = env.info
    expected = {
        "action": ((3, 10) if info.discrete else (3, 10, info.act_dim),
                   torch.int64 if info.discrete else torch.float32),
        "observation": ((3, 10, info.obs_dim), torch.float32),
        ("next", "observation"): ((3, 10, info.obs_dim), torch.float32),
        ("next", "reward"): ((3, 10, 1), torch.float32),
        ("next", "done"): ((3, 10, 1), torch.bool),
        ("next", "terminated"): ((3, 10, 1), torch.bool),
        ("next", "truncated"): ((3, 10, 1), torch.bool),
        "done": ((3, 10, 1), torch.bool),
    }
    for key, (shape, dtype) in expected.items():
        assert batch.get(key).shape == shape, key
        assert batch.get(key).dtype == dtype, key
    # Where no episode ended, step t + 1 starts from step t's next observation.
    done = batch["next", "done"][:, :-1, 0]
    carried = batch["observation"][:, 1:][~done]
    assert torch.equal(carried, batch["next", "observation"][:, :-1][~done])
    env.close()


@pytest.mark.parametrize("env_id, max_steps", [("CartPole-v1", None), ("HalfCheetah-v5", 12)])
def test_episode_boundaries_match_gymnasium(env_id: str, max_steps: int | None) -> None:
    """Replays the batch's actions in plain gymnasium envs seeded like the vector env's slots."""
    spec = EnvSpec(env_id, num_envs=2, max_episode_steps=max_steps, backend="gymnasium")
    seed, steps = 11, 40
    batch, env = _collect(spec, seed=seed, steps=steps, random_actions=True)
    kwargs = {} if max_steps is None else {"max_episode_steps": max_steps}
    boundaries = 0
    for i in range(spec.num_envs):
        single = gym.make(env_id, **kwargs)
        obs, _ = single.reset(seed=seed + i)
        assert np.array_equal(batch["observation"][i, 0].numpy(), obs.astype(np.float32))
        for t in range(steps):
            action = batch["action"][i, t].numpy()
            obs, reward, terminated, truncated, _ = single.step(action)
            np.testing.assert_array_equal(batch["next", "observation"][i, t].numpy(),
                                          obs.astype(np.float32))
            assert batch["next", "reward"][i, t, 0].item() == pytest.approx(reward, rel=1e-6)
            assert batch["next", "terminated"][i, t, 0].item() == terminated
            assert batch["next", "truncated"][i, t, 0].item() == truncated
            assert batch["next", "done"][i, t, 0].item() == (terminated or truncated)
            if terminated or truncated:
                boundaries += 1
                obs, _ = single.reset()
                if t + 1 < steps:
                    np.testing.assert_array_equal(batch["observation"][i, t + 1].numpy(),
                                                  obs.astype(np.float32))
                    assert not batch["done"][i, t + 1, 0].item()
        single.close()
    assert boundaries >= 2, "the batch should cross episode boundaries"
    env.close()


def test_finished_episode_returns() -> None:
    spec = EnvSpec("CartPole-v1", num_envs=4)
    batch, env = _collect(spec, seed=5, steps=60, random_actions=True)
    reward = batch["next", "reward"][..., 0].double().numpy()
    done = batch["next", "done"][..., 0].numpy()
    expected: list[tuple[float, int]] = []
    start = np.zeros(spec.num_envs, dtype=np.int64)
    for t in range(done.shape[1]):  # the env records episodes in time order, then slot order
        for i in np.flatnonzero(done[:, t]):
            expected.append((reward[i, start[i]:t + 1].sum(), int(t + 1 - start[i])))
            start[i] = t + 1
    finished = env.pop_finished()
    assert len(finished) == len(expected) > 0
    for (ret, length), (exp_ret, exp_length) in zip(finished, expected):
        assert length == exp_length
        assert ret == pytest.approx(exp_ret, rel=1e-6)
    assert env.pop_finished() == []
    assert env.episodes_done.sum() == len(expected)
    assert np.array_equal(env.episodes_done, done.sum(1))
    env.close()


def test_same_seed_same_batch_different_seed_different() -> None:
    spec = EnvSpec("Pendulum-v1", num_envs=2)
    a, _ = _collect(spec, seed=7, steps=8)
    b, _ = _collect(spec, seed=7, steps=8)
    c, _ = _collect(spec, seed=8, steps=8)
    assert (a == b).all()
    assert not torch.equal(a["observation"], c["observation"])
    assert not torch.equal(a["next", "reward"], c["next", "reward"])


def test_fast_step_matches_torchrl_generic_path() -> None:
    """``step_and_maybe_reset`` equals ``step`` + ``step_mdp`` + ``maybe_reset`` of EnvBase."""
    spec = EnvSpec("CartPole-v1", num_envs=3, max_episode_steps=9)
    fast, generic = make_env(spec, seed=2), make_env(spec, seed=2)
    td_fast, td_generic = fast.reset(), generic.reset()
    resets = 0
    for t in range(30):
        action = torch.tensor([t % 2, (t // 2) % 2, 1], dtype=torch.int64)
        td_fast.set("action", action)
        td_generic.set("action", action.clone())
        out_fast, td_fast = fast.step_and_maybe_reset(td_fast)
        out_generic = generic.step(td_generic)
        td_generic = generic.maybe_reset(step_mdp(out_generic, keep_other=True,
                                                  exclude_action=False))
        resets += int(out_generic["next", "done"].sum())
        assert (out_fast == out_generic).all()
        assert set(td_fast.keys(True)) == set(td_generic.keys(True))
        assert (td_fast == td_generic).all()
    assert resets > 0
    assert fast.pop_finished() == generic.pop_finished()


def test_obs_norm_merge_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x1 = rng.normal(2.0, 3.0, size=(120, 5))
    x2 = rng.normal(-1.0, 0.5, size=(70, 5))
    a, b = ObsNorm((5,)), ObsNorm((5,))
    for chunk in np.array_split(x1, 4):
        a.update(torch.from_numpy(chunk))
    b.update(torch.from_numpy(x2))
    assert a.count.item() == 0  # pending until synced
    a.sync(lambda t: t.unsqueeze(0))
    b.sync(lambda t: t.unsqueeze(0))
    a.merge(b.count, b.mean, b.m2)
    both = np.concatenate([x1, x2])
    assert a.count.item() == len(both)
    np.testing.assert_allclose(a.mean.numpy(), both.mean(0), rtol=1e-10)
    np.testing.assert_allclose((a.m2 / a.count).numpy(), both.var(0), rtol=1e-10)


def test_obs_norm_in_env_normalises_observations() -> None:
    norm = ObsNorm((3,))
    spec = EnvSpec("Pendulum-v1", num_envs=4)
    env = make_env(spec, seed=0, obs_norm=norm)
    collector = make_collector(env, _policy(env), frames_per_batch=4 * 50)
    batch = next(iter(collector))
    assert norm.pending_count.item() == 4 * 51  # the first reset and every step
    norm.sync(lambda t: t.unsqueeze(0))
    assert norm.count.item() == 4 * 51 and norm.pending_count.item() == 0
    batch = next(iter(collector))
    assert batch["next", "observation"].abs().max() <= norm.clip
    assert batch["next", "observation"].abs().mean() < 3
    frozen = make_env(spec, seed=1, obs_norm=norm, update_norm=False)
    frozen.rollout(5)
    assert norm.pending_count.item() == 4 * 50


def test_unknown_env_id_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="CartPole-v1"):
        EnvSpec("CartPole-v2")
    with pytest.raises(ConfigError, match="HalfCheetah-v5"):
        EnvSpec("HalfCheetah-v9")


@pytest.mark.parametrize("num_envs", [0, -2])
def test_num_envs_must_be_positive(num_envs: int) -> None:
    with pytest.raises(ConfigError, match="num_envs"):
        EnvSpec("CartPole-v1", num_envs=num_envs)
    with pytest.raises(ConfigError, match="num_envs"):
        make_env(EnvSpec("CartPole-v1", num_envs=2), seed=0, num_envs=num_envs)


def test_collector_on_explicit_device_keeps_layout() -> None:
    spec = EnvSpec("Pendulum-v1", num_envs=2)
    env = make_env(spec, seed=0)
    collector = make_collector(env, _policy(env), frames_per_batch=2 * 4, device="cpu",
                               track_traj_ids=True)
    batch = next(iter(collector))
    assert batch.batch_size == (2, 4)
    assert batch.device == torch.device("cpu")
    assert ("collector", "traj_ids") in batch.keys(True)
    assert isinstance(batch, TensorDict)


def test_area_resize_averages_pixel_spans() -> None:
    from unitrain.envs.atari import _area_weights

    weights = _area_weights(210, 84)
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-6)
    image = np.random.default_rng(0).random((8, 6)).astype(np.float32)
    halved = _area_weights(8, 4) @ image @ _area_weights(6, 3).T
    np.testing.assert_allclose(halved, image.reshape(4, 2, 3, 2).mean((1, 3)), rtol=1e-6)


def test_vector_step_matches_gymnasium_sync_vector_env() -> None:
    from unitrain.envs.gymnasium import SameStepSyncVectorEnv as _SameStepSyncVectorEnv

    fns = [lambda: gym.make("CartPole-v1")] * 3
    ours = _SameStepSyncVectorEnv(fns)
    ref = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    assert np.array_equal(ours.reset(seed=4)[0], ref.reset(seed=4)[0])
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(60):
        action = rng.integers(0, 2, size=3)
        got, want = ours.step(action), ref.step(action)
        for a, b in zip(got[:4], want[:4]):
            assert np.array_equal(a, b) and a.dtype == b.dtype
        if "final_obs" in want[4]:
            ended += 1
            assert np.array_equal(got[4]["_final_obs"], want[4]["_final_obs"])
            for i in np.flatnonzero(want[4]["_final_obs"]):
                assert np.array_equal(got[4]["final_obs"][i], want[4]["final_obs"][i])
        else:
            assert "final_obs" not in got[4]
    assert ended > 0


def test_atari_ram_observations_are_the_scaled_memory() -> None:
    """``obs_type: ram``: the 128 RAM bytes after each agent step, divided by 255, on the
    gymnasium backend (``auto`` picks it), with the image path's frame skip and no-op starts."""
    from unitrain.envs.gymnasium import make_single
    from unitrain.envs.spec import resolve_backend

    spec = EnvSpec("ALE/Pong-v5", num_envs=2, obs_type="ram")
    assert resolve_backend(spec) == "gymnasium"
    info = env_info(spec)
    assert info.obs_shape == (128,) and not info.image and info.discrete and info.act_dim == 6
    single = make_single(spec)
    obs, _ = single.reset(seed=5)
    ale = single.unwrapped.ale
    for action in [0, 2, 3, 2, 1] * 4:
        assert obs.dtype == np.float32 and obs.shape == (128,)
        assert np.array_equal(obs * 255.0, ale.getRAM().astype(np.float32))
        before = ale.getEpisodeFrameNumber()
        obs, *_ = single.step(action)
        assert ale.getEpisodeFrameNumber() - before == 4  # frame skip 4
    again = make_single(spec)
    assert np.array_equal(again.reset(seed=5)[0], single.reset(seed=5)[0])
    env = make_env(spec, seed=3)
    try:
        check_env_specs(env, seed=0)
    finally:
        env.close()


@pytest.mark.parametrize("fields, key, says", [
    (dict(id="CartPole-v1", obs_type="ram"), "env.obs_type", "not an Atari id"),
    (dict(id="ALE/Pong-v5", obs_type="ram", backend="envpool"), "env.backend",
     "EnvPool's Atari envs do not expose the RAM"),
    (dict(id="ALE/Pong-v5", obs_type="rgb"), "env.obs_type", "one of image, ram"),
])
def test_bad_obs_type_is_one_line(fields: dict, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        EnvSpec(**fields)
    assert str(e.value).startswith(key) and says in str(e.value)
