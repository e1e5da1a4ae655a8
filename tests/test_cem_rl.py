"""CEM-RL: the gradient schedule, the population's transitions in the replay memory, the refit over
trained actors, bad input, and the shipped recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from policies import TinyPolicy
from torchrl.objectives import TD3Loss

import unitrain as ut
from unitrain.app.cli import main
from unitrain.errors import ConfigError
from unitrain.optim import CEMRL
from unitrain.rules.gradient.dsac_t_loss import DSACTLoss


def _fit(rule: CEMRL, run_dir: Path, frames: int) -> tuple[ut.Trainer, list[dict]]:
    rows: list[dict] = []
    step = rule.step

    def recording(ctx):
        metrics = step(ctx)
        rows.append(metrics)
        return metrics

    rule.step = recording  # type: ignore[method-assign]
    trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1"), optimizer=rule, max_frames=frames,
                         eval_every_frames=frames, eval_episodes=1, seed=2, num_threads=1,
                         run_dir=run_dir, logger=False, enable_progress_bar=False)
    trainer.fit(TinyPolicy(3, 1))
    return trainer, rows


def _count_actor_losses(monkeypatch, loss_class: type) -> dict[str, int]:
    """Count the calls of ``loss_class.actor_loss`` (one per actor step)."""
    calls = {"actor": 0}
    actor_loss = loss_class.actor_loss

    def counting(self, *args, **kwargs):
        calls["actor"] += 1
        return actor_loss(self, *args, **kwargs)

    monkeypatch.setattr(loss_class, "actor_loss", counting)
    return calls


def test_critic_and_actor_steps_follow_the_previous_generation(tmp_path: Path, monkeypatch):
    calls = _count_actor_losses(monkeypatch, TD3Loss)
    rule = CEMRL(population=4, gradient_actors=3, max_episode_steps=25, warmup_frames=100,
                 batch_size=16, utd_ratio=0.4, critic_hidden=(16,))
    _, rows = _fit(rule, tmp_path, 300)  # three generations of 4 x 25 frames
    assert [r["frames"] for r in rows] == [100.0, 100.0, 100.0]
    # Generation 0 is pure CEM (the memory fills); then 0.4 x 100 critic updates split over the
    # 3 trained actors (13 each), and 40 actor steps for each of them.
    assert [r["optim/updates"] for r in rows] == [0.0, 39.0, 39.0]
    assert calls["actor"] == 2 * 3 * 40
    assert len(rule.loop.replay) == 300  # every transition every actor played


def test_the_refit_uses_what_the_trained_actors_became(tmp_path: Path, monkeypatch):
    seen = {}
    original = CEMRL._learn

    def learn(self, actors, ctx):
        before = actors.clone()
        out = original(self, actors, ctx)
        seen["before"], seen["after"] = before, actors.clone()
        return out

    monkeypatch.setattr(CEMRL, "_learn", learn)
    rule = CEMRL(population=4, gradient_actors=2, max_episode_steps=20, warmup_frames=80,
                 batch_size=16, utd_ratio=0.5, critic_hidden=(16,))
    _, rows = _fit(rule, tmp_path, 160)
    before, after = seen["before"], seen["after"]
    # The trained actors moved; the others are CEM's samples as drawn.
    assert not torch.equal(before[0], after[0]) and not torch.equal(before[1], after[1])
    assert torch.equal(before[2:], after[2:])
    assert rows[-1]["fitness/gradient_elites"] in (0.0, 1.0, 2.0)


def test_transitions_in_memory_are_the_population_episodes(tmp_path: Path):
    rule = CEMRL(population=2, gradient_actors=0, max_episode_steps=10, warmup_frames=10,
                 batch_size=4, critic_hidden=(8,))
    _fit(rule, tmp_path, 20)
    rows = rule.loop.replay.buffer.storage[:20]
    # Actions in [-1, 1]; each transition's next observation is the following one's observation
    # within an episode (slot 0's first 9 steps are rows 0, 2, 4, ... of the interleaved waves).
    assert rows["action"].abs().max() <= 1.0
    assert torch.equal(rows["next", "observation"][0], rows["observation"][2])
    assert not rows["next", "terminated"].any()  # capped, not terminated: bootstrapped
    assert rows["next", "done"].sum() == 2  # the two capped episodes ended


def test_dsac_t_critic_trains_actors_and_temperature(tmp_path: Path, monkeypatch):
    calls = _count_actor_losses(monkeypatch, DSACTLoss)
    rule = CEMRL(population=4, gradient_actors=2, max_episode_steps=25, warmup_frames=100,
                 batch_size=16, utd_ratio=0.4, critic_hidden=(16,), critic="dsac_t",
                 alpha_init=0.5, lr_alpha=1e-2)
    trainer, rows = _fit(rule, tmp_path, 300)
    assert isinstance(rule.loss, DSACTLoss)
    # Same schedule as with TD3: 0.4 x 100 critic updates split over 2 actors, 40 steps each.
    assert [r["optim/updates"] for r in rows] == [0.0, 40.0, 40.0]
    assert calls["actor"] == 2 * 2 * 40
    # The temperature stepped with every actor step (80 steps of lr 1e-2 move log alpha).
    assert abs(rule.loss.alpha.item() - 0.5) > 0.05
    assert all(torch.isfinite(torch.tensor(rows[-1][k])) for k in
               ("loss/critic", "loss/actor", "loss/temperature", "train/alpha", "train/q_mean"))
    assert bool(rule.loss.omega_initialized)
    # The learned std (action_std: param) is the module's aux.log_std, trained with the actors.
    assert "aux.log_std.log_std" in trainer.lightning_module.state_dict()


def test_a_module_holding_the_other_critic_is_refused(tmp_path: Path):
    module = TinyPolicy(3, 1)
    first = CEMRL(population=2, gradient_actors=0, max_episode_steps=10, critic_hidden=(8,))
    ut.Trainer(env=ut.EnvSpec("Pendulum-v1"), optimizer=first, max_frames=20,
               eval_every_frames=20, eval_episodes=1, seed=0, num_threads=1, run_dir=tmp_path,
               logger=False, enable_progress_bar=False).fit(module)
    second = CEMRL(population=2, gradient_actors=0, max_episode_steps=10, critic_hidden=(8,),
                   critic="dsac_t")
    trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1"), optimizer=second, max_frames=20,
                         eval_every_frames=20, eval_episodes=1, seed=0, num_threads=1,
                         run_dir=tmp_path / "b", logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"^optimizer.critic: got 'dsac_t', but the module "
                                          r"already holds a TD3Loss critic under aux.cem_rl"):
        trainer.fit(module)


class NormPolicy(ut.RLModule):
    """A policy with a LayerNorm attribute named ``norm`` (a TensorDict method's name too)."""

    def __init__(self, obs_dim: int = 3, act_dim: int = 1) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(obs_dim, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.out = torch.nn.Linear(16, act_dim)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.inp(observation))))


def test_a_policy_with_a_layer_named_norm_trains(tmp_path: Path):
    """The critic's loss holds the policy's parameters in a TensorDict under aux; evaluating
    the population must swap only the policy's own names."""
    rule = CEMRL(population=4, warmup_frames=100, batch_size=32, buffer_size=1000,
                 max_episode_steps=50, critic_hidden=(16,))
    trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1", num_envs=2), optimizer=rule,
                         max_frames=600, eval_every_frames=600, eval_episodes=1, seed=0,
                         num_threads=1, run_dir=tmp_path, logger=False, enable_progress_bar=False)
    trainer.fit(NormPolicy())
    assert trainer.summary["frames"] >= 600
    assert rule.loop.updates > 0  # the actors learned from the critic


def test_bad_input():
    with pytest.raises(ConfigError, match=r"optimizer.gradient_actors: got 11; expected an "
                                          r"integer in \[0, population=10\] or null"):
        CEMRL(gradient_actors=11)
    with pytest.raises(ConfigError, match=r"optimizer.critic: got 'sac'; expected 'td3' or "
                                          r"'dsac_t'"):
        CEMRL(critic="sac")
    with pytest.raises(ConfigError, match="env.obs_norm: cem_rl replays raw observations"):
        ut.Trainer(env=ut.EnvSpec("Pendulum-v1", obs_norm=True), optimizer=CEMRL())
    with pytest.raises(ConfigError, match="CartPole-v1 has discrete actions"):
        ut.Trainer(env="CartPole-v1", optimizer=CEMRL())


def test_pendulum_recipe_trains_its_actors_after_the_warmup(tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "pendulum/cem_rl", f"run_dir={run}", "trainer.max_frames=4000",
                 "optimizer.utd_ratio=0.05", "trainer.eval_episodes=2"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    # Generation 1 fills the memory (2,000 frames); generation 2 trains 5 actors on
    # 0.05 x 2,000 = 100 critic updates.
    assert [e.value for e in acc.Scalars("train/updates_total")] == [0.0, 100.0]
    assert [e.step for e in acc.Scalars("fitness/gradient_mean")] == [4000]
