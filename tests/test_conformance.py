"""Every registered update rule passes the same checks (one suite, not one test per rule).

For each rule: training a tiny task beats the initial parameters, a checkpoint round-trips the
rule's state (and its optimizers'), and a fixed seed gives bit-identical results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import unitrain as ut
from policies import TinyPolicy
from rulecheck import CaptureStart, assert_same, checkpoint_state
from unitrain.context import RunContext
from unitrain.optim import registered_rules

# rule name -> (env spec, rule arguments, frame budget)
TASKS: dict[str, tuple[ut.EnvSpec, dict[str, Any], int]] = {
    "ppo": (ut.EnvSpec("CartPole-v1", num_envs=4),
            dict(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=10, gamma=0.98,
                 gae_lambda=0.8), 4096),
    "reinforce": (ut.EnvSpec("CartPole-v1", num_envs=8),
                  dict(lr=1e-2, frames_per_batch=128, minibatch_size=128), 8192),
}


def test_every_rule_has_a_task():
    assert set(registered_rules()) <= set(TASKS), set(registered_rules()) - set(TASKS)


def _run(name: str, run_dir: Path, budget: int | None = None, ckpt: str | None = None,
         callbacks=()) -> tuple[ut.Trainer, TinyPolicy]:
    spec, kwargs, default_budget = TASKS[name]
    rule = registered_rules()[name](**kwargs)
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=budget or default_budget,
                         eval_every=4, eval_episodes=8, seed=1, num_threads=1, run_dir=run_dir,
                         callbacks=list(callbacks), enable_progress_bar=False)
    module = TinyPolicy(4, 2)
    trainer.fit(module, ckpt_path=ckpt)
    return trainer, module


def _initial_return(name: str) -> float:
    spec, kwargs, _ = TASKS[name]
    torch.manual_seed(1)
    import lightning as L

    L.seed_everything(1, verbose=False)
    module = TinyPolicy(4, 2)
    rule = registered_rules()[name](**kwargs)
    return RunContext(module, rule, spec, 1, None, 1, 8).evaluate(8)["return_mean"]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rule_conformance(name: str, tmp_path: Path):
    before = _initial_return(name)
    trainer, module = _run(name, tmp_path / "a")
    after = trainer.summary["eval/return_mean"]
    assert after > before + 20, f"{name}: {before} -> {after}"

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
