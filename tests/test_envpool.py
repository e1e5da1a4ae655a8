"""The EnvPool backend against the gymnasium reference: spaces, episodes, returns, seeding, and
the rules that run on it (resume, devices=1 vs devices=2)."""

from __future__ import annotations

import pytest
import torch
from conftest import run_script
from policies import TinyPolicy
from scipy import stats

import unitrain as ut
from unitrain.envs import EnvSpec, env_info, make_env, resolve_backend
from unitrain.envs.rollout import rollout
from unitrain.errors import ConfigError

FAMILIES = ["CartPole-v1", "Pendulum-v1", "HalfCheetah-v5", "ALE/Pong-v5"]


def test_auto_backend_is_envpool_for_mujoco_and_atari_only():
    assert resolve_backend(EnvSpec("HalfCheetah-v5")) == "envpool"
    assert resolve_backend(EnvSpec("ALE/Pong-v5")) == "envpool"
    assert resolve_backend(EnvSpec("CartPole-v1")) == "gymnasium"
    assert resolve_backend(EnvSpec("CartPole-v1", backend="envpool")) == "envpool"
    # Extra gymnasium.make kwargs need gymnasium.
    assert resolve_backend(EnvSpec("HalfCheetah-v5", kwargs={"ctrl_cost_weight": 0.2})) == \
        "gymnasium"
    with pytest.raises(ConfigError, match=r"^env\.backend: envpool cannot run HalfCheetah-v5 \(extra "
                                          r"kwargs need gymnasium\)"):
        EnvSpec("HalfCheetah-v5", backend="envpool", kwargs={"ctrl_cost_weight": 0.2})
    with pytest.raises(ConfigError, match=r"^env\.backend: got 'cuda'; expected one of auto"):
        EnvSpec("CartPole-v1", backend="cuda")


@pytest.mark.parametrize("env_id", FAMILIES)
def test_spaces_and_dtypes_match_gymnasium(env_id: str):
    envs = [make_env(EnvSpec(env_id, num_envs=2, backend=b), seed=0)
            for b in ("gymnasium", "envpool")]
    a, b = (e.info for e in envs)
    assert (a.obs_shape, a.act_dim, a.discrete, a.image) == (b.obs_shape, b.act_dim, b.discrete,
                                                             b.image)
    if not a.discrete:
        assert torch.equal(a.action_low, b.action_low) and torch.equal(a.action_high,
                                                                        b.action_high)
    for key in ("observation",):
        assert envs[0].observation_spec[key] == envs[1].observation_spec[key]
    assert envs[0].action_spec == envs[1].action_spec
    for env in envs:
        env.close()


def _linear(info, seed: int):
    """A fixed linear policy whose action for a row does not depend on the other rows (a
    matrix product's rounding can depend on the number of rows)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(info.obs_dim, info.act_dim, generator=gen, dtype=torch.float64) * 0.5

    def act(obs: torch.Tensor, slots: slice | None = None) -> torch.Tensor:
        out = (obs.reshape(len(obs), -1, 1).double() * w).sum(1).float()
        if info.discrete:
            return out.argmax(-1)
        return torch.tanh(out) * info.action_high

    return act


@pytest.mark.parametrize("env_id, max_steps, episodes", [
    ("CartPole-v1", None, 40), ("Pendulum-v1", None, 24), ("HalfCheetah-v5", 200, 24)])
def test_episodes_of_a_fixed_policy_match_gymnasium_in_distribution(env_id, max_steps, episodes):
    """Lengths, terminations and returns of a fixed linear policy over seeded episodes.

    The backends draw initial states from different generators, so episodes are compared as
    samples: a two-sample Kolmogorov-Smirnov test on the returns at the 1% level (a wrong
    reward, termination or time limit shifts the distribution far beyond it; identical numbers
    are not expected), and the same time limits and share of terminations.
    """
    results = {}
    for backend in ("gymnasium", "envpool"):
        spec = EnvSpec(env_id, backend=backend, max_episode_steps=max_steps)
        env = make_env(spec, 0, num_envs=episodes)
        played = rollout(env, _linear(env.info, 3), seeds=list(range(100, 100 + episodes)))
        results[backend] = played.by_slot()
        env.close()
    (ra, la), (rb, lb) = results["gymnasium"], results["envpool"]
    assert stats.ks_2samp(ra.numpy(), rb.numpy()).pvalue > 0.01, (ra, rb)
    limit = max_steps or {"CartPole-v1": 500, "Pendulum-v1": 200}[env_id]
    assert int(la.max()) <= limit and int(lb.max()) <= limit
    assert abs(float((la < limit).float().mean()) - float((lb < limit).float().mean())) <= 0.25


def test_atari_episodes_of_a_fixed_policy_match_gymnasium():
    """Pong under a fixed policy on 12x12-pixel block means: the episodes end the same way
    (the opponent reaches 21) after as many agent steps, within 2% (sticky actions and no-op
    starts draw from different generators, so single episodes differ by a few steps)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4 * 7 * 7, 6, generator=gen, dtype=torch.float64)

    def act(obs: torch.Tensor, slots: slice) -> torch.Tensor:
        blocks = obs.double().reshape(len(obs), 4, 7, 12, 7, 12).mean((3, 5))
        return (blocks.reshape(len(obs), -1, 1) * w).sum(1).argmax(-1)

    played = {}
    for backend in ("gymnasium", "envpool"):
        env = make_env(EnvSpec("ALE/Pong-v5", backend=backend), 0, num_envs=8)
        played[backend] = rollout(env, act, seeds=list(range(200, 208))).by_slot()
        env.close()
    (ra, la), (rb, lb) = played["gymnasium"], played["envpool"]
    assert torch.equal(ra, rb) and bool((ra == -21).all()), (ra, rb)
    assert abs(la.double().mean() / lb.double().mean() - 1) < 0.02, (la, lb)
    assert int(la.max() - la.min()) < 40 and int(lb.max() - lb.min()) < 40


def test_seeded_episodes_do_not_depend_on_the_slot_or_the_batch():
    spec = EnvSpec("HalfCheetah-v5", backend="envpool", max_episode_steps=30)
    act = _linear(env_info(spec), 1)
    three = rollout(make_env(spec, 0, num_envs=3), act, seeds=[5, 6, 7], max_steps=30)
    two = rollout(make_env(spec, 0, num_envs=2), act, seeds=[7, 5], max_steps=30)
    r3, r2 = three.by_slot()[0], two.by_slot()[0]
    assert torch.equal(r3[[2, 0]], r2)
    again = rollout(make_env(spec, 0, num_envs=3), act, seeds=[5, 6, 7], max_steps=30)
    assert torch.equal(again.by_slot()[0], r3)


def test_atari_settings_follow_the_gymnasium_path():
    env = make_env(EnvSpec("ALE/Pong-v5", backend="envpool"), 0, num_envs=1)
    cfg = env.backend.pool.spec.config
    assert (cfg.repeat_action_probability, cfg.frame_skip, cfg.noop_max, cfg.stack_num) == \
        (0.25, 4, 30, 4)
    assert (cfg.episodic_life, cfg.reward_clip, cfg.use_fire_reset, cfg.gray_scale) == \
        (False, False, False, True)
    env.close()


RULES = {
    "es": lambda: ut.optim.ES(population=8, sigma=0.1, lr=0.05, max_episode_steps=100),
    "ga": lambda: ut.optim.GA(population=8, truncation=3, sigma=0.1, elite_candidates=2,
                              elite_episodes=2, max_episode_steps=100),
}


def _fit(name, run_dir, max_frames, ckpt=None):
    trainer = ut.Trainer(env=EnvSpec("CartPole-v1", backend="envpool"), optimizer=RULES[name](),
                         max_frames=max_frames, eval_every_frames=1, eval_episodes=3, seed=2,
                         run_dir=run_dir, logger=False, enable_progress_bar=False)
    module = TinyPolicy(4, 2)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, module


@pytest.mark.parametrize("name", sorted(RULES))
def test_population_runs_reproduce_and_resume_exactly_on_envpool(name, tmp_path):
    whole, module = _fit(name, tmp_path / "a", 2000)
    again, module2 = _fit(name, tmp_path / "b", 2000)
    assert whole.summary["eval/return_mean"] == again.summary["eval/return_mean"]
    cut, _ = _fit(name, tmp_path / "c", 1)
    assert cut.summary["iterations"] == 1
    resumed, module3 = _fit(name, tmp_path / "c", 2000, ckpt="last")
    assert resumed.summary["frames"] == whole.summary["frames"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, module2.state_dict()[key]), key
        assert torch.equal(value, module3.state_dict()[key]), key


SCRIPT = '''
import sys
import unitrain as ut
from dump import Dump
from policies import TinyPolicy

if __name__ == "__main__":
    devices = int(sys.argv[1])
    for name, rule in (("ga", ut.optim.GA(population=10, truncation=3, sigma=0.1,
                                          elite_candidates=2, elite_episodes=2,
                                          max_episode_steps=100)),
                       ("es", ut.optim.ES(population=10, sigma=0.1, lr=0.05,
                                          max_episode_steps=100))):
        trainer = ut.Trainer(env=ut.EnvSpec("CartPole-v1", backend="envpool"), optimizer=rule,
                             devices=devices, strategy="ddp" if devices > 1 else "auto",
                             max_frames=1500, eval_every_frames=1, eval_episodes=3, seed=4,
                             run_dir=f"run-{name}-{devices}", logger=False,
                             callbacks=[Dump(f"{name}-{devices}-")], enable_progress_bar=False)
        trainer.fit(TinyPolicy(4, 2))
'''


def test_one_and_two_processes_evolve_identically_on_envpool(tmp_path):
    script = tmp_path / "evolve.py"
    script.write_text(SCRIPT)
    for devices in ("1", "2"):
        proc = run_script(script, devices)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("ga", "es"):
        single = torch.load(tmp_path / f"{name}-1-rank0.pt", weights_only=False)
        pair = [torch.load(tmp_path / f"{name}-2-rank{r}.pt", weights_only=False) for r in (0, 1)]
        assert single["frames"] == pair[0]["frames"] == pair[1]["frames"]
        for key, value in single["params"].items():
            assert torch.equal(value, pair[0]["params"][key]), (name, key)
            assert torch.equal(value, pair[1]["params"][key]), (name, key)


def test_a_pipelined_rollout_plays_the_same_episodes_as_an_unsplit_one():
    """Two slot groups stepped in a pipeline: the same returns, lengths, order of endings and
    observed steps as one group, with step caps and with several episodes per slot."""
    spec = EnvSpec("Hopper-v5", backend="envpool")
    act = _linear(env_info(spec), 2)
    for kwargs in ({"seeds": [3, 4, 5, 6, 7], "max_steps": 40}, {"quota": [2, 1, 3, 0, 1]}):
        seen = {}
        results = {}
        for parts in (None, [3, 2]):
            env = make_env(spec, 0, num_envs=5, parts=parts)
            assert len(env.parts) == (1 if parts is None else 2)
            steps = []
            results[str(parts)] = rollout(env, act, observe=lambda s: steps.append(
                (s.observation.clone(), s.action.clone(), s.next["reward"].clone(),
                 s.active.clone(), s.ended.clone(), s.length.clone())), **kwargs)
            seen[str(parts)] = steps
            env.close()
        one, two = results["None"], results["[3, 2]"]
        for field in ("returns", "lengths", "slots"):
            assert torch.equal(getattr(one, field), getattr(two, field)), field
        assert one.steps == two.steps
        assert len(seen["None"]) == len(seen["[3, 2]"])
        for a, b in zip(seen["None"], seen["[3, 2]"]):
            active = a[3]
            assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])
            assert torch.equal(a[5][active], b[5][active])
            for x, y in zip(a[:3], b[:3]):
                assert torch.equal(x[active], y[active])
