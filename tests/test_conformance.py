"""Every registered update rule passes the same checks (one suite, not one test per rule).

For each rule: training a tiny task beats the initial parameters; every ``step`` returns the same
metric keys, ``frames`` among them; the rule's own deterministic action is ``module.act`` (the
action contract); and a run interrupted right after a checkpoint and resumed restores the rule's
and its optimizers' state exactly and ends bit-identical to an uninterrupted run of the same
seed (so a fixed seed also gives bit-identical results). Rules that declare ``supervised_only``
are checked on the digits data (test accuracy) instead of an env.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from policies import TinyPolicy
from rulecheck import CaptureStart, assert_same, checkpoint_state
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

import unitrain as ut
from unitrain.envs import env_info
from unitrain.envs.data import DataSpec, load_data
from unitrain.optim import registered_rules

# rule name (or "rule/variant" for a rule with an option that changes how it learns) -> (env spec,
# rule arguments, frame budget, required gain in eval return); for a rule
# declaring ``supervised_only`` the spec is None, the budget is epochs of the digits data and the
# gain is in test accuracy.
TASKS: dict[str, tuple[ut.EnvSpec | None, dict[str, Any], int, float]] = {
    "elite_imitation": (ut.EnvSpec("CartPole-v1", num_envs=4),
                        dict(fit=dict(iterations=20), episodes=8, elite_fraction=0.25,
                             keep_elites=True, greedy_share=0.0, explore=0.1, updates=2,
                             batch_size=128), 6000, 20.0),
    "projection": (None, dict(iterations=10), 2, 0.3),
    "adam": (None, dict(lr=3e-3), 2, 0.3),
    "ppo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=10, gamma=0.98,
                 gae_lambda=0.8), 4096, 20.0),
    "reinforce": (ut.EnvSpec("CartPole-v1", num_envs=8),
                  dict(lr=1e-2, frames_per_batch=128), 8192, 20.0),
    "ddpg": (ut.EnvSpec("Pendulum-v1", num_envs=4),
             dict(lr_actor=3e-3, lr_critic=3e-3, gamma=0.95, batch_size=128, buffer_size=5000,
                  warmup_frames=256, frames_per_batch=32, critic_hidden=(64, 64),
                  save_buffer=True), 2560, 300.0),
    "dsac_t": (ut.EnvSpec("Pendulum-v1", num_envs=4),
               dict(lr_actor=3e-3, lr_critic=3e-3, lr_alpha=3e-3, alpha_init=0.05, gamma=0.95,
                    delay=1, batch_size=256, buffer_size=5000, warmup_frames=256,
                    frames_per_batch=64, utd_ratio=1.0, critic_hidden=(64, 64),
                    save_buffer=True), 2560, 200.0),
    "sac": (ut.EnvSpec("Pendulum-v1", num_envs=4),
            dict(lr_actor=3e-3, lr_critic=3e-3, lr_alpha=3e-3, alpha_init=0.05, gamma=0.95,
                 batch_size=256, buffer_size=5000, warmup_frames=256, frames_per_batch=64,
                 critic_hidden=(64, 64), save_buffer=True), 2560, 200.0),
    # TD3's delayed actor (checked in test_offpolicy) needs more than this tiny budget.
    "td3": (ut.EnvSpec("Pendulum-v1", num_envs=4),
            dict(lr_actor=3e-3, lr_critic=3e-3, gamma=0.95, batch_size=128, buffer_size=5000,
                 warmup_frames=256, frames_per_batch=32, critic_hidden=(64, 64), delay=1,
                 policy_noise=0.1, save_buffer=True), 2560, 150.0),
    "ga": (ut.EnvSpec("CartPole-v1", num_envs=4),
           dict(population=24, truncation=6, sigma=0.1, elite_candidates=3, elite_episodes=3,
                max_episode_steps=200), 8000, 20.0),
    "es": (ut.EnvSpec("CartPole-v1", num_envs=4),
           dict(population=16, sigma=0.1, lr=0.05, max_episode_steps=200), 8000, 20.0),
    "ars": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=0.1, lr=0.05, top=4, max_episode_steps=200), 8000, 20.0),
    "cem": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=0.1, max_episode_steps=200), 8000, 20.0),
    "csa_es": (ut.EnvSpec("CartPole-v1", num_envs=4),
               dict(population=16, sigma=0.2, max_episode_steps=200), 8000, 20.0),
    "cmaes": (ut.EnvSpec("CartPole-v1", num_envs=4),
              dict(population=16, sigma=0.1, max_episode_steps=200), 8000, 20.0),
    "cem_rl": (ut.EnvSpec("Pendulum-v1", num_envs=4),
               dict(population=4, gradient_actors=2, sigma=0.05, max_episode_steps=100,
                    warmup_frames=400, batch_size=64, buffer_size=5000, lr_actor=3e-3,
                    lr_critic=3e-3, gamma=0.95, critic_hidden=(64, 64), save_buffer=True),
               3200, 150.0),
    "cem_rl/dsac_t": (ut.EnvSpec("Pendulum-v1", num_envs=4),
                      dict(population=4, gradient_actors=2, sigma=0.05, max_episode_steps=100,
                           warmup_frames=400, batch_size=64, buffer_size=5000, lr_actor=3e-3,
                           lr_critic=3e-3, gamma=0.95, critic_hidden=(64, 64), save_buffer=True,
                           critic="dsac_t", alpha_init=0.05, lr_alpha=3e-3),
                      3200, 150.0),
    "elite_imitation/starts": (ut.EnvSpec("CartPole-v1", num_envs=4),
                               dict(fit=dict(iterations=20, lam=1.0, standardize=True),
                                    episodes=8, starts=1, elite_fraction=0.3, explore=0.1,
                                    greedy_share=0.0, updates=2, batch_size=128), 6000, 20.0),
    "elite_imitation/param_noise": (ut.EnvSpec("CartPole-v1", num_envs=4),
                                    dict(fit=dict(iterations=20, lam=1.0, standardize=True,
                                                  step_size=0.6),
                                         episodes=8, param_noise=0.1, param_noise_target=0.1,
                                         elite_fraction=0.3, greedy_share=0.25, batch_size=512),
                                    6000, 20.0),
    "cbo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=1.5, init_std=0.3, max_episode_steps=200), 12000, 20.0),
}


# Module arguments a rule needs (projection training takes ReLU networks only).
MODULE_ARGS: dict[str, dict[str, Any]] = {"projection": {"activation": "relu"},
                                          "elite_imitation": {"activation": "relu"}}


def _base(name: str) -> str:
    """The registered rule of a task name (``rule`` or ``rule/variant``)."""
    return name.split("/")[0]


def test_every_rule_has_a_task():
    assert set(registered_rules()) <= set(TASKS), set(registered_rules()) - set(TASKS)
    assert {_base(name) for name in TASKS} <= set(registered_rules())


def _supervised(name: str) -> bool:
    return bool(getattr(registered_rules()[_base(name)], "supervised_only", False))


def _digits() -> tuple[Any, Any, Any]:
    return load_data(DataSpec(name="digits", batch_size=64))


def _run(name: str, run_dir: Path, budget: int | None = None, ckpt: str | None = None,
         callbacks=(), record: list | None = None) -> tuple[ut.Trainer, TinyPolicy]:
    spec, kwargs, default_budget, _ = TASKS[name]
    rule = ut.optim.as_rule(registered_rules()[_base(name)](**kwargs))
    if record is not None:
        _record_keys(rule, record)
    common = dict(optimizer=rule, seed=1, num_threads=1, run_dir=run_dir,
                  callbacks=list(callbacks), enable_progress_bar=False)
    if _supervised(name):
        train, test, info = _digits()
        trainer = ut.Trainer(env=None, max_epochs=budget or default_budget, **common)
        module = _module(name, info.obs_dim, info.act_dim)
        trainer.fit(module, train_dataloaders=train, val_dataloaders=test, ckpt_path=ckpt)
        return trainer, module
    trainer = ut.Trainer(env=spec, max_frames=budget or default_budget,
                         eval_every_frames=(budget or default_budget) // 4,
                         eval_episodes=8, **common)
    info = env_info(spec)
    module = _module(name, info.obs_dim, info.act_dim)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, module


def _module(name: str, obs_dim: int, act_dim: int) -> TinyPolicy:
    return TinyPolicy(obs_dim, act_dim, **MODULE_ARGS.get(_base(name), {}))


def _initial_score(name: str) -> float:
    """Eval return (or test accuracy, for supervised-only rules) of the initial parameters."""
    spec, kwargs, _, _ = TASKS[name]
    L.seed_everything(1, verbose=False)
    if _supervised(name):
        _, test, info = _digits()
        module = _module(name, info.obs_dim, info.act_dim)
        with torch.no_grad():
            hits = sum(int((module(x).argmax(-1) == y).sum()) for x, y in test)
        return hits / len(test.dataset)
    info = env_info(spec)
    module = _module(name, info.obs_dim, info.act_dim)
    return ut.evaluate(module, spec, episodes=8, seed=1)["return_mean"]


class StopAfter(L.Callback):
    """Interrupt a run after the iteration that reaches ``frames`` (its checkpoint is written
    then, as an interrupted run's last checkpoint would be)."""

    def __init__(self, frames: int) -> None:
        self.frames = frames

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        if module._ctx.services.frames >= self.frames:
            trainer.should_stop = True


def _record_keys(rule: ut.optim.UpdateRule, keys: list[set[str]]) -> None:
    """Wrap ``rule.step`` to append the metric keys of every call to ``keys``."""
    step = rule.step

    def recording(ctx):
        metrics = step(ctx)
        keys.append(set(metrics))
        return metrics

    rule.step = recording  # type: ignore[method-assign]


def _rule_action(name: str, rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    """The deterministic action as the rule itself computes it (its actor, its population)."""
    name = _base(name)
    if name in ("ppo", "reinforce"):
        with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
            return rule.data.actor(TensorDict(observation=obs,
                                              batch_size=obs.shape[:1]))["action"]
    if name in ("ddpg", "td3"):
        with torch.no_grad():
            return module.actions.to_env(rule.actor(obs))
    if name in ("dsac_t", "sac"):
        with torch.no_grad():
            return module.actions.to_env(torch.tanh(rule.actor(obs)[0]))
    if name in ("ga", "es", "ars", "cem", "csa_es", "cmaes", "cbo", "cem_rl"):
        params = rule.layout.flatten(module)[None]
        return rule.pop.policy(params, obs[None])[0]
    if name == "elite_imitation":
        with torch.no_grad():
            out = module(obs)
        if module.actions.discrete:
            return out.argmax(-1)
        # The squashed pre-squash mean: low + (tanh(u) + 1) / 2 · (high − low).
        low, high = module.actions.low, module.actions.high
        return low + (torch.tanh(out) + 1) / 2 * (high - low)
    raise AssertionError(f"{name}: tell this suite how the rule computes its deterministic action")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rule_conformance(name: str, tmp_path: Path):
    score = "test/accuracy" if _supervised(name) else "eval/return_mean"
    before = _initial_score(name)
    keys: list[set[str]] = []
    trainer, module = _run(name, tmp_path / "a", record=keys)
    after = trainer.summary[score]
    assert after > before + TASKS[name][3], f"{name}: {before} -> {after}"

    # Every step reports the same metric keys, including the frames it used.
    assert keys and all(k == keys[0] for k in keys), (name, keys)
    assert "frames" in keys[0]

    # The action contract: the rule's deterministic action is module.act.
    spec = TASKS[name][0]
    if spec is not None:
        info = env_info(spec)
        obs = torch.randn(16, *info.obs_shape)
        torch.testing.assert_close(_rule_action(name, trainer.rule, module, obs),
                                   module.act(obs), rtol=0, atol=1e-6)

    # An interrupted run resumes exactly where it stopped and ends where an uninterrupted run
    # of the same seed ends.
    if _supervised(name):
        cut, _ = _run(name, tmp_path / "b", budget=1)
        budget = TASKS[name][2]
    else:
        budget = TASKS[name][2]
        cut, _ = _run(name, tmp_path / "b", callbacks=[StopAfter(budget // 2)])
        assert cut.summary["frames"] < budget
    ckpt = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    capture = CaptureStart()
    resumed, module2 = _run(name, tmp_path / "b", budget=budget, ckpt="last", callbacks=[capture])
    expected = checkpoint_state(ckpt)
    if _supervised(name):
        # Lightning creates the shuffling data iterator (drawing from the torch RNG) before
        # on_train_start; exactness of the restored RNG is checked by the continuation.
        del capture.state["torch_rng"], expected["torch_rng"]
    assert_same(capture.state, expected)
    assert resumed.summary[score] == after
    assert_same(dict(module.state_dict()), dict(module2.state_dict()))
