"""Every registered update rule passes :func:`unitrain.testing.check_rule` (one suite, not one
test per rule).

Every rule gets the quick checks: every ``step`` returns the same metric keys, ``frames`` among
them; the rule's own deterministic action is ``module.act`` and the Trainer's evaluation is
``module.act``'s; two runs of one seed agree; and a run interrupted after a checkpoint and
resumed restores the rule's and its optimizers' state exactly and ends bit-identical to an
uninterrupted run. One rule of each family (gradient: PPO, population: ES, projection: the
projection rule) is also checked to learn its task; the others run on budgets just large enough
to interrupt a run half-way. Rules that declare ``supervised_only`` run on the digits data (test
accuracy) instead of an env.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from policies import TinyPolicy
from tensordict import TensorDict
from torchrl.envs.utils import ExplorationType, set_exploration_type

import unitrain as ut
from unitrain.optim import registered_rules
from unitrain.testing import check_rule

# rule name (or "rule/variant" for a rule with an option that changes how it learns) -> (env spec,
# rule arguments, frame budget, required gain in eval return or None for the quick checks only);
# for a rule declaring ``supervised_only`` the spec is None, the budget is epochs of the digits
# data and the gain is in test accuracy.
TASKS: dict[str, tuple[ut.EnvSpec | None, dict[str, Any], int, float | None]] = {
    # One rule per family learns: gradient, population, projection.
    "ppo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=10, gamma=0.98,
                 gae_lambda=0.8), 4096, 20.0),
    "es": (ut.EnvSpec("CartPole-v1", num_envs=4),
           dict(population=16, sigma=0.1, lr=0.05, max_episode_steps=200), 8000, 20.0),
    "projection": (None, dict(iterations=10), 2, 0.3),
    # The quick checks only.
    "adam": (None, dict(lr=3e-3), 2, None),
    "reinforce": (ut.EnvSpec("CartPole-v1", num_envs=8),
                  dict(lr=1e-2, frames_per_batch=128), 1024, None),
    "dqn": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(lr=1e-3, gamma=0.95, batch_size=64, buffer_size=5000, learning_starts=256,
                 train_frequency=2, target_update=64, frames_per_batch=32, save_buffer=True),
            768, None),
    "dqn/double": (ut.EnvSpec("CartPole-v1", num_envs=4),
                   dict(lr=1e-3, gamma=0.95, batch_size=64, buffer_size=5000,
                        learning_starts=256, train_frequency=1, target_update=32, tau=0.5,
                        frames_per_batch=32, save_buffer=True, double=True), 768, None),
    "ddpg": (ut.EnvSpec("Pendulum-v1", num_envs=4),
             dict(lr_actor=3e-3, lr_critic=3e-3, gamma=0.95, batch_size=128, buffer_size=5000,
                  warmup_frames=256, frames_per_batch=32, critic_hidden=(64, 64),
                  save_buffer=True), 768, None),
    "dsac_t": (ut.EnvSpec("Pendulum-v1", num_envs=4),
               dict(lr_actor=3e-3, lr_critic=3e-3, lr_alpha=3e-3, alpha_init=0.05, gamma=0.95,
                    delay=1, batch_size=256, buffer_size=5000, warmup_frames=256,
                    frames_per_batch=64, utd_ratio=1.0, critic_hidden=(64, 64),
                    save_buffer=True), 768, None),
    "sac": (ut.EnvSpec("Pendulum-v1", num_envs=4),
            dict(lr_actor=3e-3, lr_critic=3e-3, lr_alpha=3e-3, alpha_init=0.05, gamma=0.95,
                 batch_size=256, buffer_size=5000, warmup_frames=256, frames_per_batch=64,
                 critic_hidden=(64, 64), save_buffer=True), 768, None),
    "td3": (ut.EnvSpec("Pendulum-v1", num_envs=4),
            dict(lr_actor=3e-3, lr_critic=3e-3, gamma=0.95, batch_size=128, buffer_size=5000,
                 warmup_frames=256, frames_per_batch=32, critic_hidden=(64, 64), delay=1,
                 policy_noise=0.1, save_buffer=True), 768, None),
    "ga": (ut.EnvSpec("CartPole-v1", num_envs=4),
           dict(population=24, truncation=6, sigma=0.1, elite_candidates=3, elite_episodes=3,
                max_episode_steps=200), 4000, None),
    "ars": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=0.1, lr=0.05, top=4, max_episode_steps=200), 2000, None),
    "cem": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=0.1, max_episode_steps=200), 2000, None),
    "csa_es": (ut.EnvSpec("CartPole-v1", num_envs=4),
               dict(population=16, sigma=0.2, max_episode_steps=200), 2000, None),
    "cmaes": (ut.EnvSpec("CartPole-v1", num_envs=4),
              dict(population=16, sigma=0.1, max_episode_steps=200), 2000, None),
    "cbo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(population=16, sigma=1.5, init_std=0.3, max_episode_steps=200), 2000, None),
    "cem_rl": (ut.EnvSpec("Pendulum-v1", num_envs=4),
               dict(population=4, gradient_actors=2, sigma=0.05, max_episode_steps=100,
                    warmup_frames=400, batch_size=64, buffer_size=5000, lr_actor=3e-3,
                    lr_critic=3e-3, gamma=0.95, critic_hidden=(64, 64), save_buffer=True,
                    utd_ratio=0.25), 1600, None),
    "cem_rl/dsac_t": (ut.EnvSpec("Pendulum-v1", num_envs=4),
                      dict(population=4, gradient_actors=2, sigma=0.05, max_episode_steps=100,
                           warmup_frames=400, batch_size=64, buffer_size=5000, lr_actor=3e-3,
                           lr_critic=3e-3, gamma=0.95, critic_hidden=(64, 64), save_buffer=True,
                           critic="dsac_t", alpha_init=0.05, lr_alpha=3e-3, utd_ratio=0.25),
                      1600, None),
    "elite_imitation": (ut.EnvSpec("CartPole-v1", num_envs=4),
                        dict(fit=dict(iterations=20), episodes=8, elite_fraction=0.25,
                             keep_elites=True, greedy_share=0.0, explore=0.1, updates=2,
                             batch_size=128), 1500, None),
    "elite_imitation/starts": (ut.EnvSpec("CartPole-v1", num_envs=4),
                               dict(fit=dict(iterations=20, lam=1.0, standardize=True),
                                    episodes=8, starts=1, elite_fraction=0.3, explore=0.1,
                                    greedy_share=0.0, updates=2, batch_size=128), 1500, None),
    "elite_imitation/param_noise": (ut.EnvSpec("CartPole-v1", num_envs=4),
                                    dict(fit=dict(iterations=20, lam=1.0, standardize=True,
                                                  step_size=0.6),
                                         episodes=8, param_noise=0.1, param_noise_target=0.1,
                                         elite_fraction=0.3, greedy_share=0.25, batch_size=512),
                                    1500, None),
}


# Module arguments a rule needs (projection training takes ReLU networks only).
MODULE_ARGS: dict[str, dict[str, Any]] = {"projection": {"activation": "relu"},
                                          "elite_imitation": {"activation": "relu"}}


def _base(name: str) -> str:
    """The registered rule of a task name (``rule`` or ``rule/variant``)."""
    return name.split("/")[0]


def test_every_rule_has_a_task():
    # The package's own rules; a rule a test or a doc defines elsewhere registers itself too.
    builtin = {n for n, r in registered_rules().items() if r.__module__.startswith("unitrain.")}
    assert builtin <= set(TASKS), builtin - set(TASKS)
    assert {_base(name) for name in TASKS} <= builtin


def test_one_rule_per_family_learns():
    learns = {_base(n): registered_rules()[_base(n)].__module__.split(".")[2]
              for n, task in TASKS.items() if task[3] is not None}
    assert sorted(learns.values()) == ["gradient", "population", "projection"], learns


# ---------------------------------------------------------------- the rules' own actions

def _policy_gradient_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        return rule.data.actor(TensorDict(observation=obs, batch_size=obs.shape[:1]))["action"]


def _deterministic_actor_action(rule: Any, module: ut.RLModule,
                                obs: torch.Tensor) -> torch.Tensor:
    return module.actions.to_env(rule.actor(obs))


def _squashed_actor_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    return module.actions.to_env(torch.tanh(rule.actor(obs)[0]))


def _greedy_q_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    return rule.greedy(obs)


def _population_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    params = rule.layout.flatten(module)[None]
    return rule.pop.policy(params, obs[None])[0]


def _elite_imitation_action(rule: Any, module: ut.RLModule, obs: torch.Tensor) -> torch.Tensor:
    out = module(obs)
    if module.actions.discrete:
        return out.argmax(-1)
    # The squashed pre-squash mean: low + (tanh(u) + 1) / 2 · (high − low).
    low, high = module.actions.low, module.actions.high
    return low + (torch.tanh(out) + 1) / 2 * (high - low)


# The deterministic action as each rule computes it (its actor, its population).
RULE_ACTIONS: dict[str, Callable[[Any, ut.RLModule, torch.Tensor], torch.Tensor] | None] = {
    "ppo": _policy_gradient_action, "reinforce": _policy_gradient_action,
    "dqn": _greedy_q_action,
    "ddpg": _deterministic_actor_action, "td3": _deterministic_actor_action,
    "dsac_t": _squashed_actor_action, "sac": _squashed_actor_action,
    **dict.fromkeys(["ga", "es", "ars", "cem", "csa_es", "cmaes", "cbo", "cem_rl"],
                    _population_action),
    "elite_imitation": _elite_imitation_action,
    # Supervised rules have no env to act in.
    "projection": None, "adam": None,
}


def test_every_rule_says_how_it_acts():
    assert {_base(n) for n in TASKS} <= set(RULE_ACTIONS)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rule_conformance(name: str, tmp_path: Path):
    spec, kwargs, budget, gain = TASKS[name]
    rule = registered_rules()[_base(name)](**kwargs)
    module = functools.partial(TinyPolicy, **MODULE_ARGS.get(_base(name), {}))
    if spec is None:
        report = check_rule(rule, None, data="digits", epochs=budget, module=module,
                            min_gain=gain, run_dir=tmp_path)
    else:
        report = check_rule(rule, spec, frames=budget, module=module, min_gain=gain,
                            rule_action=RULE_ACTIONS[_base(name)], run_dir=tmp_path)
    # Supervised rules have no env, hence no action to check.
    expected = ["keys", "contract", "determinism", "resume"] if spec else \
        ["keys", "determinism", "resume"]
    assert list(report.checks) == expected + (["learning"] if gain is not None else [])


# ---------------------------------------------------------------- a user's own envs

# A user's gymnasium env through its module:id (tests/userenvs.py), continuous actions.
USER_ENV = ut.EnvSpec("userenvs:Reach-v0", num_envs=4)
# Its discrete twin, for the rules that need discrete actions.
USER_ENV_DISCRETE = ut.EnvSpec("userenvs:ReachDiscrete-v0", num_envs=4)
DISCRETE_ONLY = {"dqn"}
# A user's TorchRL env through its factory's import path (tests/usertorchrl.py): one unbatched
# GymEnv per slot, stepped by the torch-native backend.
TORCHRL_ENV = ut.EnvSpec(make="usertorchrl:make_pendulum", num_envs=4)


@pytest.mark.parametrize("name", sorted(n for n, task in TASKS.items() if task[0] is not None))
def test_every_rule_trains_on_a_user_env(name: str, tmp_path: Path):
    # One iteration of every env rule on the user's env, and its contract: the rule's own
    # deterministic action is module.act's.
    _, kwargs, _, _ = TASKS[name]
    if "fit" in kwargs:  # elite imitation fits continuous actions as real targets
        kwargs = dict(kwargs, fit=dict(kwargs["fit"], output="squared_error"))
    env = USER_ENV_DISCRETE if _base(name) in DISCRETE_ONLY else USER_ENV
    module = TinyPolicy(2, 3 if env is USER_ENV_DISCRETE else 1,
                        **MODULE_ARGS.get(_base(name), {}))
    trainer = ut.Trainer(env, registered_rules()[_base(name)](**kwargs), max_frames=1,
                         eval_episodes=2, run_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["frames"] > 0 and trainer.summary["env"] == env.id
    obs = torch.rand(5, 2) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(RULE_ACTIONS[_base(name)](trainer.rule, module, obs),
                                   module.act(obs))


@pytest.mark.parametrize("name,frames", [("ppo", 512), ("es", 1200)])
def test_rules_pass_the_quick_checks_on_a_torchrl_env(name: str, frames: int, tmp_path: Path):
    # A gradient and a population rule on a TorchRL env: the quick checks, resume included
    # (the env's running episodes are pickled into the checkpoint).
    kwargs = dict(TASKS[name][1], **({"frames_per_batch": 128, "epochs": 2} if name == "ppo"
                                     else {"population": 4, "max_episode_steps": 50}))
    report = check_rule(registered_rules()[name](**kwargs), TORCHRL_ENV, frames=frames,
                        module=TinyPolicy, rule_action=RULE_ACTIONS[name], run_dir=tmp_path,
                        eval_episodes=2)
    assert list(report.checks) == ["keys", "contract", "determinism", "resume"]
