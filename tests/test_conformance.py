"""Every registered update rule passes the same checks (one suite, not one test per rule).

For each rule: training a tiny task beats the initial parameters, a checkpoint round-trips the
rule's state (and its optimizers'), and a fixed seed gives bit-identical results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import unitrain as ut
from policies import TinyPolicy
from rulecheck import CaptureStart, assert_same, checkpoint_state
from unitrain.context import RunContext
from unitrain.envs import env_info
from unitrain.optim import registered_rules

# rule name -> (env spec, rule arguments, frame budget, required gain in eval return)
TASKS: dict[str, tuple[ut.EnvSpec, dict[str, Any], int, float]] = {
    "ppo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=10, gamma=0.98,
                 gae_lambda=0.8), 4096, 20.0),
    "reinforce": (ut.EnvSpec("CartPole-v1", num_envs=8),
                  dict(lr=1e-2, frames_per_batch=128, minibatch_size=128), 8192, 20.0),
}


def test_every_rule_has_a_task():
    assert set(registered_rules()) <= set(TASKS), set(registered_rules()) - set(TASKS)


def _run(name: str, run_dir: Path, budget: int | None = None, ckpt: str | None = None,
         callbacks=()) -> tuple[ut.Trainer, TinyPolicy]:
    spec, kwargs, default_budget, _ = TASKS[name]
    rule = registered_rules()[name](**kwargs)
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=budget or default_budget,
                         eval_every=4, eval_episodes=8, seed=1, num_threads=1, run_dir=run_dir,
                         callbacks=list(callbacks), enable_progress_bar=False)
    module = _module(spec)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, module


def _module(spec: ut.EnvSpec) -> TinyPolicy:
    info = env_info(spec)
    return TinyPolicy(info.obs_dim, info.act_dim)


def _initial_return(name: str) -> float:
    spec, kwargs, _, _ = TASKS[name]
    L.seed_everything(1, verbose=False)
    module = _module(spec)
    rule = registered_rules()[name](**kwargs)
    return RunContext(module, rule, spec, 1, None, 1, 8).evaluate(8)["return_mean"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rule_conformance(name: str, tmp_path: Path):
    before = _initial_return(name)
    trainer, module = _run(name, tmp_path / "a")
    after = trainer.summary["eval/return_mean"]
    assert after > before + TASKS[name][3], f"{name}: {before} -> {after}"

    # Determinism: the same seed gives the same parameters and the same evaluation.
    again, module2 = _run(name, tmp_path / "b")
    assert again.summary["eval/return_mean"] == after
    assert_same(dict(module.state_dict()), dict(module2.state_dict()))

    # Round trip: resuming restores the rule's and its optimizers' state exactly.
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    capture = CaptureStart()
    frames = ckpt["unitrain"]["frames"]
    _run(name, tmp_path / "a", budget=frames + 1, ckpt="last", callbacks=[capture])
    assert_same(capture.state, checkpoint_state(ckpt))
