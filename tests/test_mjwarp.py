"""The ``mjwarp`` backend against gymnasium's own v5 MuJoCo envs.

Parity: each world starts from the state a seeded gymnasium env reset to (``set_state`` on both)
and both take the same random actions; observations, rewards, terminations and the autoreset
agree within :data:`TOLERANCE` (``|mjwarp - gymnasium| <= atol + rtol * |gymnasium|``). MuJoCo
Warp simulates in float32 and MuJoCo in float64, so the two trajectories drift apart at the
rate the dynamics amplify rounding errors: slowly for Hopper (1e-5 after 60 steps), Walker2d
(1e-4 after 80) and Humanoid (relative 1e-5), fast through HalfCheetah's flips (2e-3 after 20
steps) and Ant's contacts (6e-4 after 20); the per-env tolerances are about 5x the largest
deviation seen. Ant runs on elliptic cones (see :func:`elliptic`), Humanoid on gymnasium's model
as it is (PGS there, Newton in MuJoCo Warp).

Statistics: the returns of a fixed seeded linear policy over 24 episodes (100 steps each) have
the distribution of gymnasium's: a two-sample Kolmogorov-Smirnov test does not reject at
alpha = 0.01.

The first run compiles Warp's kernels for each model (minutes on the CPU) into the kernel cache
(``WARP_CACHE_PATH``, default ``~/.cache/unitrain/warp``); later runs load them.
"""

from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import gymnasium.envs.mujoco
import numpy as np
import pytest
import torch

pytest.importorskip("warp")
pytest.importorskip("mujoco_warp")

from unitrain.envs.mjwarp import MJWarpVector
from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError

pytestmark = pytest.mark.slow

#: (atol, rtol) of the parity comparisons, per env.
TOLERANCE = {
    "HalfCheetah-v5": (1e-2, 1e-2),
    "Hopper-v5": (1e-4, 1e-4),
    "Walker2d-v5": (1e-3, 1e-3),
    "Ant-v5": (5e-3, 5e-3),
    "Humanoid-v5": (1e-3, 1e-3),
}
WORLDS = 3


def make(env_id: str, num_envs: int = WORLDS, seed: int = 0, **kwargs) -> MJWarpVector:
    spec = EnvSpec(id=env_id, num_envs=num_envs, kwargs=kwargs,
                   max_episode_steps=kwargs.pop("max_episode_steps", None))
    return MJWarpVector(spec, num_envs, seed=seed, num_threads=1, device="cpu")


def elliptic(xml_file: str, tmp_path: Path, **option: str) -> str:
    """gymnasium's asset ``xml_file`` with elliptic friction cones (and other ``<option>``
    attributes), for both simulators.

    With the pyramidal cones of gymnasium's files, a contact's friction pyramid is oriented by the
    contact's tangent frame, and MuJoCo Warp picks another frame than MuJoCo for a capsule on the
    plane (Ant's legs: the first tangent along +y rather than along the capsule): the pyramids
    point elsewhere and a sliding leg gets different forces from the first contact on. An
    elliptic cone is the same whatever the frame.
    """
    source = (Path(gym.envs.mujoco.__file__).parent / "assets" / xml_file).read_text()
    attributes = " ".join(f'{k}="{v}"' for k, v in {"cone": "elliptic", **option}.items())
    path = tmp_path / xml_file
    path.write_text(source.replace("<option ", f"<option {attributes} ", 1))
    return str(path)


def gym_envs(env_id: str, kick: dict[int, float], **kwargs) -> list:
    """``WORLDS`` seeded, reset gymnasium envs (unwrapped); ``kick`` adds to qvel entries."""
    envs = []
    for i in range(WORLDS):
        env = gym.make(env_id, **kwargs).unwrapped
        env.reset(seed=i)
        qvel = env.data.qvel.copy()
        for j, dv in kick.items():
            qvel[j] += dv
        env.set_state(env.data.qpos.copy(), qvel)
        envs.append(env)
    return envs


def close(mine: np.ndarray, theirs: np.ndarray, env_id: str) -> None:
    atol, rtol = TOLERANCE[env_id]
    np.testing.assert_allclose(mine, theirs, atol=atol, rtol=rtol)


def run_parity(env_id: str, steps: int, kick: dict[int, float] | None = None,
               **kwargs) -> list[int | None]:
    """Step gymnasium and mjwarp side by side (both made with ``kwargs``); return each world's
    termination step."""
    envs = gym_envs(env_id, kick or {}, **kwargs)
    venv = make(env_id, **kwargs)
    obs = venv.set_state(torch.tensor(np.array([e.data.qpos for e in envs])),
                         torch.tensor(np.array([e.data.qvel for e in envs])))
    close(obs.numpy(), np.array([e._get_obs() for e in envs]), env_id)
    rng = np.random.default_rng(1)
    ended: list[int | None] = [None] * WORLDS
    low, high = venv.action_space.low, venv.action_space.high
    for t in range(steps):
        action = rng.uniform(low, high, (WORLDS, len(low))).astype(np.float32)
        obs, reward, terminated, truncated, final = venv.step(torch.tensor(action))
        assert not truncated.any()
        for i, env in enumerate(envs):
            if ended[i] is not None:
                continue
            g_obs, g_reward, g_terminated, _, _ = env.step(action[i].astype(np.float64))
            last = (final if final is not None else obs)[i].numpy()
            close(last, g_obs, env_id)
            close(np.float64(reward[i]), g_reward, env_id)
            assert bool(terminated[i]) == g_terminated, (t, i)
            if g_terminated:
                ended[i] = t
                assert final is not None
                # the next episode started at once: a fresh state near init_qpos
                assert not np.allclose(obs[i].numpy(), last)
                start = torch.cat([venv.init_qpos, venv.init_qvel]).float()
                state = torch.cat([venv.qpos[i], venv.qvel[i]])
                assert (state - start).abs().max() < 5 * venv.settings["reset_noise_scale"]
    return ended


def test_half_cheetah_parity():
    assert run_parity("HalfCheetah-v5", 20) == [None] * WORLDS


def test_hopper_parity_and_termination():
    # a backward spin of the torso makes every hopper fall within 60 steps
    ended = run_parity("Hopper-v5", 60, kick={2: -2.0})
    assert all(t is not None for t in ended), ended


def test_walker2d_parity_and_termination():
    ended = run_parity("Walker2d-v5", 80, kick={2: -2.0})
    assert all(t is not None for t in ended), ended


def test_ant_parity(tmp_path):
    # the contact cost weighed 100 times gymnasium's 5e-4, to weigh in the comparison
    assert run_parity("Ant-v5", 20, xml_file=elliptic("ant.xml", tmp_path),
                      contact_cost_weight=5e-2) == [None] * WORLDS


def test_ant_termination(tmp_path):
    # thrown upwards, every ant leaves the healthy z range (0.2, 1.0)
    ended = run_parity("Ant-v5", 20, kick={2: 4.0}, xml_file=elliptic("ant.xml", tmp_path))
    assert all(t is not None for t in ended), ended


def test_humanoid_parity_and_termination():
    # gymnasium's model as it is: PGS there, Newton in MuJoCo Warp; the humanoid falls (its
    # torso below z = 1) within 40 steps of random actions
    ended = run_parity("Humanoid-v5", 40)
    assert all(t is not None for t in ended), ended


def test_spaces_match_gymnasium():
    for env_id in TOLERANCE:
        venv, env = make(env_id, 1), gym.make(env_id)
        assert venv.observation_space == env.observation_space
        assert venv.action_space == env.action_space
        assert venv.dt == env.unwrapped.dt


def test_kwargs_are_gymnasiums():
    venv = make("Hopper-v5", 2, reset_noise_scale=0.0, ctrl_cost_weight=0.5,
                exclude_current_positions_from_observation=False)
    obs = venv.reset(seed=3)
    assert obs.shape == (2, 12)
    np.testing.assert_allclose(obs[0, :6].numpy(), venv.init_qpos.numpy(), atol=1e-7)
    with pytest.raises(ConfigError, match="no_such_weight"):
        make("Hopper-v5", 1, no_such_weight=1.0)
    with pytest.raises(ConfigError, match="mjwarp backend runs"):
        make("Pendulum-v1", 1)


def test_seeded_resets_replay_and_time_limit_truncates():
    venv = make("HalfCheetah-v5", 2, max_episode_steps=3)
    first = venv.reset(seed=7)
    assert not torch.equal(first[0], first[1])
    again = venv.reset(seed=7)
    assert torch.equal(first, again)
    shifted = venv.reset(seed=[8, 7])
    assert torch.equal(shifted[1], first[0])
    venv.reset(seed=7)
    action = torch.zeros(2, 6)
    for _ in range(2):
        *_, truncated, final = venv.step(action)
        assert not truncated.any() and final is None
    obs, _, terminated, truncated, final = venv.step(action)
    assert truncated.all() and not terminated.any() and final is not None
    assert not torch.equal(final, obs)
    assert (venv.elapsed == 0).all()
    # the second episodes' starts are new noise, reproducible from the seed
    second = obs.clone()
    venv.reset(seed=7)
    for _ in range(3):
        obs, *_ = venv.step(action)
    assert torch.equal(obs, second)


def returns_of_linear_policy(env_id: str, episodes: int, steps: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """First-episode returns of ``a = clip(W obs)`` (a seeded W) on mjwarp and gymnasium."""
    venv = make(env_id, episodes, seed=100, max_episode_steps=steps)
    weights = np.random.default_rng(5).normal(0, 0.1, (venv.action_space.shape[0],
                                                       venv.observation_space.shape[0]))
    low, high = venv.action_space.low, venv.action_space.high
    w = torch.tensor(weights, dtype=torch.float32)
    obs = venv.reset(seed=100)
    mine = np.zeros(episodes)
    running = np.ones(episodes, bool)
    for _ in range(steps):
        action = (obs @ w.T).clamp(torch.tensor(low), torch.tensor(high))
        obs, reward, terminated, truncated, _ = venv.step(action)
        mine += np.where(running, reward.numpy(), 0.0)
        running &= ~(terminated | truncated).numpy()
    assert not running.any()
    theirs = np.zeros(episodes)
    env = gym.make(env_id, max_episode_steps=steps)
    for k in range(episodes):
        obs, _ = env.reset(seed=10_000 + k)
        done = False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(np.clip(weights @ obs, low, high))
            theirs[k] += reward
            done = terminated or truncated
    return mine, theirs


@pytest.mark.parametrize("env_id", ["HalfCheetah-v5", "Hopper-v5"])
def test_return_distribution_matches_gymnasium(env_id):
    from scipy.stats import ks_2samp

    mine, theirs = returns_of_linear_policy(env_id, 24, 100)
    assert mine.std() > 0 and theirs.std() > 0
    assert ks_2samp(mine, theirs).pvalue > 0.01, (mine.mean(), theirs.mean())


def test_the_backend_is_chosen_by_name_and_checks_its_ids():
    from unitrain.envs.mjwarp import TASKS
    from unitrain.envs.spec import MJWARP_IDS, EnvSpec, resolve_backend
    from unitrain.errors import ConfigError

    assert tuple(TASKS) == MJWARP_IDS
    assert resolve_backend(EnvSpec("Hopper-v5", backend="mjwarp")) == "mjwarp"
    with pytest.raises(ConfigError, match="mjwarp runs HalfCheetah-v5.*not Pendulum-v1"):
        EnvSpec("Pendulum-v1", backend="mjwarp")


def test_a_policy_trained_on_mjwarp_plays_alike_on_gymnasium(tmp_path):
    """ES trains a linear HalfCheetah policy on the mjwarp backend through the Trainer (the
    population evaluation and the deterministic evaluations on MuJoCo Warp worlds); its checkpoint
    then plays on the gymnasium backend (``unitrain evaluate CKPT env.backend=gymnasium``) to a
    mean return within three standard errors of the mjwarp one (24 episodes each)."""
    import unitrain as ut
    from unitrain.run.checkpoint import evaluate_checkpoint

    spec = EnvSpec("HalfCheetah-v5", backend="mjwarp", max_episode_steps=100)
    trainer = ut.Trainer(env=spec, optimizer=ut.optim.ES(population=16, sigma=0.05, lr=0.05),
                         max_frames=6_400, eval_every_frames=3_200, eval_episodes=4, seed=2,
                         num_threads=1, run_dir=tmp_path / "run", logger=False,
                         enable_progress_bar=False)
    trainer.fit(ut.MLPPolicy(17, 6, hidden=[]))
    ckpt = trainer.summary["checkpoint"]
    n = 24
    runs = {b: evaluate_checkpoint(ckpt, episodes=n, seed=1, env_overrides={"backend": b})
            for b in ("mjwarp", "gymnasium")}
    m, g = (runs[b]["eval/return_mean"] for b in ("mjwarp", "gymnasium"))
    # Three standard errors of the difference of the two means (Welch).
    se = math.sqrt(sum(runs[b]["eval/return_std"] ** 2 / n for b in runs))
    assert abs(m - g) <= 3 * se, runs
    assert trainer.summary["frames"] >= 6_400
