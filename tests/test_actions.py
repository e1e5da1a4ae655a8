"""MultiDiscrete actions and action masks (:mod:`unitrain.policy.action`): the masked and
multi-discrete distributions against hand computations, ``module.act`` never picking a masked
action, the masks an env gives (gymnasium's info, a gymnasium ``Dict`` observation's
``"action_mask"`` entry, a TorchRL env's ``"action_mask"`` key), rules learning the masked
``userenvs:Trap-v0`` and ``userenvs:TrapDict-v0`` without ever taking a masked action, a recipe
training ``userenvs:Dial-v0`` (``MultiDiscrete``) with ``unitrain.MLPPolicy``, and every
registered rule training those envs or refusing them in one line that names the space and the
rules that do."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import userenvs
from tensordict import TensorDict
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type

import unitrain as ut
from unitrain.envs.batched import make_env
from unitrain.envs.gymnasium import flat_mask
from unitrain.envs.info import EnvInfo
from unitrain.errors import ConfigError
from unitrain.optim import registered_rules
from unitrain.policy.action import stochastic_actor

DIAL = ut.EnvSpec("userenvs:Dial-v0", num_envs=4)
TRAP = ut.EnvSpec("userenvs:Trap-v0", num_envs=4)
TRAP_DICT = ut.EnvSpec("userenvs:TrapDict-v0", num_envs=4, obs_norm=True)


def _bound(nvec: tuple[int, ...] | None, masked: bool, seed: int = 0) -> ut.MLPPolicy:
    act_dim = sum(nvec) if nvec else 4
    torch.manual_seed(seed)
    module = ut.MLPPolicy(3, act_dim, hidden=(8,), out_scale=1.0)
    module.bind_env(EnvInfo("t", (3,), 3, act_dim, True, nvec=nvec, masked=masked))
    return module


def _masks(rows: int, blocks: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    """Random masks with at least one allowed action in every block."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n in blocks:
        m = torch.rand(rows, n, generator=g) < 0.5
        m[torch.arange(rows), torch.randint(n, (rows,), generator=g)] = True
        parts.append(m)
    return torch.cat(parts, -1)


def _hand(logits: torch.Tensor, mask: torch.Tensor, action: torch.Tensor,
          blocks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``action`` and entropy under independent softmaxes over each block's
    allowed logits, written out."""
    log_prob = torch.zeros(logits.shape[0])
    entropy = torch.zeros(logits.shape[0])
    start = 0
    for i, n in enumerate(blocks):
        for r in range(logits.shape[0]):
            allowed = [j for j in range(n) if bool(mask[r, start + j])]
            z = [math.exp(float(logits[r, start + j])) for j in allowed]
            total = sum(z)
            p = {j: zj / total for j, zj in zip(allowed, z)}
            log_prob[r] += math.log(p[int(action[r, i] if action.ndim > 1 else action[r])])
            entropy[r] -= sum(q * math.log(q) for q in p.values())
        start += n
    return log_prob, entropy


@pytest.mark.parametrize("nvec", [None, (3, 2, 4)])
def test_ppo_log_probs_and_entropy_are_those_of_the_masked_distribution(nvec):
    from torchrl.objectives import ClipPPOLoss

    from unitrain.rules.gradient.ppo import value_operator

    module = _bound(nvec, masked=True)
    blocks = nvec or (4,)
    actor = stochastic_actor(module)
    obs = torch.randn(64, 3, generator=torch.Generator().manual_seed(2))
    mask = _masks(64, blocks)
    td = TensorDict({"observation": obs, "action_mask": mask}, batch_size=[64])
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        actor(td)
    action = td["action"]
    assert action.shape == ((64, len(nvec)) if nvec else (64,))
    per_block = action if nvec else action[:, None]
    offsets = np.cumsum([0, *blocks[:-1]])
    chosen = torch.stack([mask[torch.arange(64), int(o) + per_block[:, i]]
                          for i, o in enumerate(offsets)], -1)
    assert bool(chosen.all()), "a sampled action was masked"
    with torch.no_grad():
        logits = module(obs)
    log_prob, entropy = _hand(logits, mask, action, blocks)
    torch.testing.assert_close(td["action_log_prob"], log_prob, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        dist = actor.get_dist(td)
    torch.testing.assert_close(dist.entropy(), entropy, rtol=1e-5, atol=1e-5)
    by_head = module.actions.distribution(logits, mask)
    torch.testing.assert_close(by_head.log_prob(action), log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_head.entropy(), entropy, rtol=1e-5, atol=1e-5)
    # The unmasked distribution differs: the masks are what PPO sees.
    assert not torch.allclose(torch.log_softmax(logits[:, : blocks[0]], -1).max(-1).values,
                              torch.log_softmax(logits[:, : blocks[0]].masked_fill(
                                  ~mask[:, : blocks[0]], -math.inf), -1).max(-1).values)

    # PPO's loss (as the rule builds it) on this batch: its ratio is 1 (kl 0) when the stored
    # log-probability is the hand-computed one, and its entropy is the masked entropy's mean.
    critic = value_operator(module, module.env_info, (8,))
    loss = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_bonus=True, entropy_coeff=0.1,
                       critic_coeff=0.5, loss_critic_type="l2", normalize_advantage=False)
    td["action_log_prob"] = log_prob
    td["advantage"] = torch.randn(64, 1, generator=torch.Generator().manual_seed(3))
    td["value_target"] = torch.zeros(64, 1)
    out = loss(td)
    assert abs(float(out["kl_approx"])) < 1e-6
    torch.testing.assert_close(out["loss_objective"], -td["advantage"].mean(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(out["entropy"], entropy.mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("nvec", [None, (3, 2, 4)])
def test_act_never_returns_a_masked_action_and_reads_blocks_in_order(nvec):
    module = _bound(nvec, masked=True)
    blocks = nvec or (4,)
    obs = torch.randn(500, 3, generator=torch.Generator().manual_seed(4))
    mask = _masks(500, blocks, seed=5)
    with torch.no_grad():
        logits = module(obs)
        action = module.act(obs, mask)
    per_block = action if nvec else action[:, None]
    start = 0
    for i, n in enumerate(blocks):
        block, allowed = logits[:, start: start + n], mask[:, start: start + n]
        assert bool(allowed.gather(1, per_block[:, i: i + 1]).all())
        expected = block.masked_fill(~allowed, -math.inf).argmax(-1)
        assert torch.equal(per_block[:, i], expected)
        # Without a mask: each block's plain argmax, which often is a masked action.
        assert torch.equal(module.act(obs)[..., i] if nvec else module.act(obs),
                           block.argmax(-1))
        start += n
    unmasked = module.act(obs)
    free = unmasked if nvec else unmasked[:, None]
    picked = torch.stack([mask[torch.arange(500), int(o) + free[:, i]]
                          for i, o in enumerate(np.cumsum([0, *blocks[:-1]]))], -1)
    assert not bool(picked.all()), "these masks rule out some of the unmasked argmaxes"


def test_a_gymnasium_multidiscrete_mask_may_be_one_array_per_sub_action():
    assert flat_mask((np.array([1, 0, 1]), np.array([0, 1]))).tolist() == [
        True, False, True, False, True]
    assert flat_mask(np.array([1, 0, 0, 1], dtype=np.int8)).tolist() == [True, False, False, True]


def _allowed(obs: torch.Tensor) -> torch.Tensor:
    """Trap's masks, from its observations: action 3 only in phase 3."""
    mask = torch.ones(obs.shape[0], 4, dtype=torch.bool)
    mask[:, 3] = obs[:, 3] == 1
    return mask


def test_the_env_gives_each_observations_mask_at_reset_and_every_step():
    env = make_env(TRAP, seed=3)
    assert env.info.masked and env.info.action_space == "discrete"
    assert env.observation_spec["action_mask"].shape == (4, 4)
    td = env.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert torch.equal(td["action_mask"], _allowed(td["observation"]))
        # Random actions, masked ones included: an episode then ends (and is reset).
        td["action"] = torch.randint(4, (4,), generator=g)
        td, nxt = env.step_and_maybe_reset(td)
        assert torch.equal(td["next", "action_mask"], _allowed(td["next", "observation"]))
        td = nxt
    assert sum(env.episodes_done) > 0
    env.close()


def test_a_dict_observations_action_mask_entry_is_the_mask_and_no_observation():
    info = ut.envs.env_info(TRAP_DICT)
    assert info.masked and info.obs_shapes == {"phase": (4,)} and info.obs_dim == 4
    env = make_env(TRAP_DICT, seed=3)
    assert env.info == info
    assert env.observation_spec["action_mask"].shape == (4, 4)
    assert list(env.observation_spec["observation"].keys()) == ["phase"]
    td = env.reset()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        assert list(td["observation"].keys()) == ["phase"]
        assert torch.equal(td["action_mask"], _allowed(td["observation", "phase"]))
        td["action"] = torch.randint(4, (4,), generator=g)
        td, nxt = env.step_and_maybe_reset(td)
        assert torch.equal(td["next", "action_mask"], _allowed(td["next", "observation", "phase"]))
        td = nxt
    assert sum(env.episodes_done) > 0
    env.close()


class PhaseOnly(ut.RLModule):
    """A policy over TrapDict's ``phase`` entry: its ``forward`` takes nothing else."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 4))

    def forward(self, phase: torch.Tensor) -> torch.Tensor:
        return self.net(phase)


@pytest.mark.parametrize("rule,frames", [
    (ut.optim.PPO(lr=3e-3, frames_per_batch=256, minibatch_size=64, epochs=4, anneal_lr=False),
     6000),
    (ut.optim.CEM(population=16), 8000)], ids=["ppo", "cem"])
def test_rules_learn_the_trap_with_its_mask_in_the_observation(rule, frames, tmp_path):
    from unitrain.run.export import export

    userenvs.Trap.masked_taken = 0
    torch.manual_seed(0)
    trainer = ut.Trainer(TRAP_DICT, rule, max_frames=frames, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False, eval_episodes=8)
    trainer.fit(PhaseOnly())
    assert trainer.summary["eval/return_mean"] >= 30
    assert userenvs.Trap.masked_taken == 0
    module = PhaseOnly.load_from_checkpoint(trainer.summary["checkpoint"])
    assert set(module.obs_norm.norms) == {"phase"}  # the mask is not normalised
    phases = module.obs_norm(TensorDict(phase=torch.eye(4), batch_size=[4]))
    assert module.act(phases, _allowed(torch.eye(4))).tolist() == [0, 1, 2, 3]
    assert ut.evaluate(trainer.summary["checkpoint"], episodes=8)["return_mean"] >= 30
    assert userenvs.Trap.masked_taken == 0
    # The exported policy takes the entries by name and the masks.
    only = torch.nn.functional.one_hot(torch.arange(4).flip(0), 4).bool()
    out = export(trainer.summary["checkpoint"], tmp_path / "policy.pt2")
    with torch.no_grad():
        action = torch.export.load(str(out)).module()({"phase": torch.eye(4)}, only)
    assert action.tolist() == [3, 2, 1, 0]
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(export(trainer.summary["checkpoint"],
                                                      tmp_path / "policy.onnx")))
    assert [i.name for i in session.get_inputs()] == ["phase", "action_mask"]
    feed = {"phase": torch.eye(4).numpy(), "action_mask": only.numpy()}
    assert session.run(None, feed)[0].tolist() == [3, 2, 1, 0]


def test_a_torchrl_envs_action_mask_key_is_read(tmp_path):
    from torchrl.data import Binary
    from torchrl.envs import GymEnv
    from torchrl.envs.libs.gym import default_info_dict_reader

    def make() -> Any:
        env = GymEnv("userenvs:Trap-v0", categorical_action_encoding=True)
        env.set_info_dict_reader(default_info_dict_reader(
            ["action_mask"], spec={"action_mask": Binary(4, dtype=torch.bool)}))
        return env

    spec = ut.EnvSpec(make=make, num_envs=2)
    assert ut.envs.env_info(spec).masked
    env = make_env(spec, seed=0)
    assert env.info.masked
    td = env.reset()
    for _ in range(30):
        assert torch.equal(td["action_mask"], _allowed(td["observation"]))
        td["action"] = torch.tensor([3, 0])
        td, td = env.step_and_maybe_reset(td)
    env.close()
    # PPO samples from the masked policy there too.
    userenvs.Trap.masked_taken = 0
    trainer = ut.Trainer(spec, ut.optim.PPO(frames_per_batch=128, minibatch_size=64, epochs=1),
                         max_frames=512, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False, eval_episodes=2)
    trainer.fit(ut.MLPPolicy(4, 4, hidden=(8,), out_scale=1.0))
    assert userenvs.Trap.masked_taken == 0


def test_a_torchrl_envs_multicategorical_action_spec_is_multidiscrete(tmp_path):
    from torchrl.envs import GymEnv

    spec = ut.EnvSpec(make=lambda: GymEnv("userenvs:Dial-v0", categorical_action_encoding=True),
                      num_envs=2)
    info = ut.envs.env_info(spec)
    assert (info.nvec, info.act_dim, info.masked) == ((3, 2), 5, False)
    env = make_env(spec, seed=0)
    assert env.action_spec.shape == (2, 2)
    env.close()
    trainer = ut.Trainer(spec, ut.optim.PPO(frames_per_batch=64, minibatch_size=32, epochs=1),
                         max_frames=128, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False, eval_episodes=2)
    trainer.fit(ut.MLPPolicy(5, 5, hidden=(8,)))
    assert trainer.summary["frames"] >= 128


@pytest.mark.parametrize("rule", [
    ut.optim.PPO(frames_per_batch=128, minibatch_size=64, epochs=2),
    ut.optim.CEM(population=8)], ids=["ppo", "cem"])
def test_a_masked_multidiscrete_gymnasium_env_trains_without_a_masked_action(rule, tmp_path):
    spec = ut.EnvSpec("userenvs:Dial-v0", num_envs=4, kwargs={"masked": True})
    info = ut.envs.env_info(spec)
    assert (info.nvec, info.masked) == ((3, 2), True)
    userenvs.Dial.masked_taken = 0
    trainer = ut.Trainer(spec, rule, max_frames=640, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False, eval_episodes=2)
    # A large output scale: without the masks the policy would often pick the masked value.
    trainer.fit(ut.MLPPolicy(5, 5, hidden=(8,), out_scale=1.0))
    assert trainer.summary["frames"] >= 640
    assert userenvs.Dial.masked_taken == 0


def test_a_mask_of_the_wrong_size_is_one_line():
    import gymnasium as gym

    from unitrain.errors import UserError

    class Short(userenvs.Trap):
        def _out(self) -> tuple[np.ndarray, dict]:
            obs, info = super()._out()
            return obs, {"action_mask": info["action_mask"][:3]}

    if "ShortMask-v0" not in gym.registry:
        gym.register("ShortMask-v0", entry_point=Short, max_episode_steps=5)
    env = make_env(ut.EnvSpec("ShortMask-v0", num_envs=2), seed=0)
    with pytest.raises(UserError) as e:
        env.reset()
    assert str(e.value) == ("ShortMask-v0: the env's action masks have 3 entries; expected 4 "
                            "(one per logit of Discrete(4))")
    env.close()


def _fit(rule: Any, spec: ut.EnvSpec, frames: int, tmp: Path, **kw: Any) -> ut.Trainer:
    trainer = ut.Trainer(spec, rule, max_frames=frames, run_dir=tmp, logger=False,
                         enable_progress_bar=False, **kw)
    trainer.fit(ut.MLPPolicy(spec_obs(spec), spec_act(spec), hidden=(32,)))
    return trainer


def spec_obs(spec: ut.EnvSpec) -> int:
    return 4 if spec is TRAP else 5


def spec_act(spec: ut.EnvSpec) -> int:
    return 4 if spec is TRAP else 5


@pytest.mark.parametrize("rule,frames", [
    (ut.optim.PPO(lr=3e-3, frames_per_batch=256, minibatch_size=64, epochs=4, anneal_lr=False),
     6000),
    (ut.optim.ES(population=16, sigma=0.1, lr=0.05), 8000)])
def test_rules_learn_the_trap_without_ever_taking_a_masked_action(rule, frames, tmp_path):
    userenvs.Trap.masked_taken = 0
    trainer = _fit(rule, TRAP, frames, tmp_path, eval_episodes=8)
    # Best play: about 40; the allowed actions at random: about 11; never the jackpot: 15.
    assert trainer.summary["eval/return_mean"] >= 30
    assert userenvs.Trap.masked_taken == 0
    module = ut.MLPPolicy.load_from_checkpoint(trainer.summary["checkpoint"])
    phases = torch.eye(4)
    assert module.act(phases, _allowed(phases)).tolist() == [0, 1, 2, 3]
    # Evaluating the checkpoint without a Trainer passes the masks too.
    assert ut.evaluate(trainer.summary["checkpoint"], episodes=8)["return_mean"] >= 30
    assert userenvs.Trap.masked_taken == 0


def test_a_recipe_trains_a_multidiscrete_env_with_mlppolicy(tmp_path, monkeypatch, capsys):
    from unitrain.app.cli import main

    monkeypatch.chdir(tmp_path)
    Path("dial.yaml").write_text(
        "# unitrain fit dial.yaml\n"
        "seed: 0\n"
        "env: {id: \"userenvs:Dial-v0\", num_envs: 4}\n"
        "module: {target: unitrain.MLPPolicy, hidden: [32]}\n"
        "optimizer: {name: ppo, lr: 3.0e-3, anneal_lr: false, frames_per_batch: 256,\n"
        "            minibatch_size: 64, epochs: 4}\n"
        "trainer: {max_frames: 4096, eval_episodes: 4}\n")
    assert main(["fit", "dial.yaml", "run_dir=run"]) == 0
    summary = json.loads(Path("run/summary.json").read_text())
    # Best return 10 (both sub-actions right at every step); uniform random about 4.2.
    assert summary["eval/return_mean"] >= 9.0


# Small settings that let each rule run a few iterations on Trap or Dial.
QUICK: dict[str, dict[str, Any]] = {
    "ppo": dict(frames_per_batch=64, minibatch_size=32, epochs=2),
    "reinforce": dict(frames_per_batch=64),
    "ga": dict(population=8, truncation=2, elite_candidates=2, elite_episodes=1),
    "ars": dict(population=8, top=4),
}


def _rule(name: str) -> Any:
    cls = registered_rules()[name]
    kwargs = QUICK.get(name, dict(population=8) if "population" in cls.__dataclass_fields__
                       else {})
    return cls(**kwargs)


ENV_RULES = [n for n, r in registered_rules().items() if not r.supervised_only]


@pytest.mark.parametrize("name", ENV_RULES)
def test_every_rule_trains_multidiscrete_actions_or_refuses_them_in_one_line(name, tmp_path):
    rule = _rule(name)
    able = [n for n in ENV_RULES if "multidiscrete" in registered_rules()[n].action_spaces]
    assert {"ppo", "reinforce", "ga", "es", "ars", "cem", "csa_es", "cmaes", "cbo"} <= set(able)
    if "multidiscrete" in rule.action_spaces:
        trainer = _fit(rule, DIAL, 320, tmp_path, eval_episodes=2)
        assert trainer.summary["frames"] >= 320
        assert math.isfinite(trainer.summary["eval/return_mean"])
        return
    with pytest.raises(ConfigError) as e:
        _fit(rule, DIAL, 320, tmp_path)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert message == ("env.id: userenvs:Dial-v0 has multidiscrete actions "
                       f"(MultiDiscrete([3, 2])), which {name} does not train; rules that do: "
                       f"{', '.join(able)}")


@pytest.mark.parametrize("name", ENV_RULES)
def test_every_rule_honours_action_masks_or_refuses_them_in_one_line(name, tmp_path):
    rule = _rule(name)
    if "discrete" not in rule.action_spaces:
        with pytest.raises(ConfigError, match=f"Trap-v0 has discrete actions .*, which {name} "
                                              "does not train; rules that do: "):
            _fit(rule, TRAP, 320, tmp_path)
        return
    able = [n for n in ENV_RULES if registered_rules()[n].action_masks
            and "discrete" in registered_rules()[n].action_spaces]
    if rule.action_masks:
        userenvs.Trap.masked_taken = 0
        trainer = _fit(rule, TRAP, 320, tmp_path, eval_episodes=2)
        assert trainer.summary["frames"] >= 320
        assert userenvs.Trap.masked_taken == 0
        return
    with pytest.raises(ConfigError) as e:
        _fit(rule, TRAP, 320, tmp_path)
    assert str(e.value) == ("env.id: userenvs:Trap-v0 has action masks (Discrete(4) with "
                            f"action masks), which {name} does not honour; rules that do: "
                            f"{', '.join(able)}")


@pytest.mark.parametrize("spec", [TRAP, DIAL], ids=["masked", "multidiscrete"])
def test_the_exported_policy_acts_as_module_act(spec, tmp_path):
    from unitrain.run.export import export

    trainer = _fit(ut.optim.PPO(frames_per_batch=64, minibatch_size=32, epochs=1), spec, 64,
                   tmp_path / "run", eval_episodes=1)
    module = ut.MLPPolicy.load_from_checkpoint(trainer.summary["checkpoint"])
    obs = torch.eye(spec_obs(spec)).repeat(3, 1)
    # One allowed action per row: a policy that ignored the masks would differ.
    only = torch.nn.functional.one_hot(torch.arange(12) % 4, 4).bool()
    args = (obs, only) if spec is TRAP else (obs,)
    expected = module.act(*args)
    if spec is TRAP:
        assert torch.equal(expected, torch.arange(12) % 4)
    out = export(trainer.summary["checkpoint"], tmp_path / "policy.pt2")
    with torch.no_grad():
        assert torch.equal(torch.export.load(str(out)).module()(*args), expected)
    try:
        import onnxruntime
    except ImportError:
        return
    out = export(trainer.summary["checkpoint"], tmp_path / "policy.onnx")
    session = onnxruntime.InferenceSession(str(out))
    feed = dict(zip(["observation", "action_mask"], (a.numpy() for a in args)))
    assert np.array_equal(session.run(None, feed)[0], expected.numpy())


def _ppo_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    """PPO's own deterministic action, every action allowed."""
    td = TensorDict(observation=obs, batch_size=obs.shape[:1])
    if module.actions.masked:
        td["action_mask"] = torch.ones(obs.shape[0], module.actions.act_dim, dtype=torch.bool)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        return rule.data.actor(td)["action"]


@pytest.mark.parametrize("spec,rule,frames,rule_action", [
    (TRAP, functools.partial(ut.optim.PPO, frames_per_batch=128, minibatch_size=64, epochs=2),
     512, _ppo_action),
    (DIAL, functools.partial(ut.optim.PPO, frames_per_batch=128, minibatch_size=64, epochs=2),
     512, _ppo_action),
    (TRAP, functools.partial(ut.optim.ES, population=8), 640, None)],
    ids=["ppo-masked", "ppo-multidiscrete", "es-masked"])
def test_the_rule_checks_pass_with_masks_and_multidiscrete_actions(spec, rule, frames,
                                                                    rule_action, tmp_path):
    # Determinism, exact resume (the env's masks are part of its saved episodes) and the same
    # parameters in two processes as in one.
    from unitrain.testing import check_rule

    report = check_rule(rule, spec, frames=frames, rule_action=rule_action, run_dir=tmp_path,
                        eval_episodes=2, devices=2)
    assert list(report.checks) == ["keys", "contract", "determinism", "resume", "ranks"]
