"""The Trainer end to end: Python API and recipe train the same module class; TensorBoard output."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import run_cli
from policies import TinyPolicy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import unitrain as ut
from unitrain.app.cli import main
from unitrain.policy.ckpt_file import load_checkpoint_file


@pytest.fixture(autouse=True)
def _torch_threads():
    """A run sets torch's thread count for its whole process: each test here leaves the count
    it found, so no test sees another's setting."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _api_run(run_dir: Path, **overrides) -> ut.Trainer:
    args = dict(env=ut.EnvSpec("CartPole-v1", num_envs=4), max_frames=2048, eval_every_frames=512,
                eval_episodes=4, seed=3, num_threads=1, run_dir=run_dir,
                optimizer=ut.optim.PPO(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=4,
                                       gamma=0.98, gae_lambda=0.8))
    args.update(overrides)
    trainer = ut.Trainer(**args)
    trainer.fit(TinyPolicy(obs_dim=4, act_dim=2, hidden=32))
    return trainer


def test_python_api_and_recipe_train_the_same_module(tmp_path: Path):
    api = _api_run(tmp_path / "api")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
seed: 3
env: {id: CartPole-v1, num_envs: 4}
module: {target: policies.TinyPolicy, hidden: 32}
optimizer: {name: ppo, lr: 1.0e-3, frames_per_batch: 128, minibatch_size: 128, epochs: 4,
            gamma: 0.98, gae_lambda: 0.8}
trainer: {max_frames: 2048, eval_every_frames: 512, eval_episodes: 4}
""")
    assert main(["fit", str(recipe), f"run_dir={tmp_path / 'cli'}"]) == 0
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    # Same class, same seed, same settings: the two paths are one code path.
    assert cli["eval/return_mean"] == api.summary["eval/return_mean"]
    assert cli["frames"] == api.summary["frames"] == 2048
    a = load_checkpoint_file(api.summary["checkpoint"])
    b = load_checkpoint_file(cli["checkpoint"])
    assert a["unitrain"]["module_class"] == b["unitrain"]["module_class"] == "policies:TinyPolicy"
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_tensorboard_scalars_and_hparams(tmp_path: Path):
    trainer = _api_run(tmp_path / "run")
    events = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert events
    tags: set[str] = set()
    hparams_found = False
    steps: dict[str, list[int]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.add(tag)
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
        try:
            hparams_found = hparams_found or bool(acc.PluginTagToContent("hparams"))
        except KeyError:
            pass
    for tag in ("episode/return_mean", "episode/return_max", "episode/return_min",
                "episode/length_mean", "eval/return_mean", "loss/objective", "loss/critic",
                "optim/lr", "perf/frames_per_s", "final/return_mean"):
        assert tag in tags, (tag, sorted(tags))
    # Scalars are stepped by frames.
    assert max(steps["optim/lr"]) == trainer.summary["frames"]
    assert sorted(steps["optim/lr"])[0] == 128
    assert hparams_found
    hparams = (tmp_path / "run" / "hparams.yaml").read_text()
    assert "optimizer/clip" in hparams and "env/id" in hparams


def test_seeded_runs_reproduce_and_seeds_matter(tmp_path: Path):
    a = _api_run(tmp_path / "a", max_frames=1024)
    b = _api_run(tmp_path / "b", max_frames=1024)
    c = _api_run(tmp_path / "c", max_frames=1024, seed=4)
    sa, sb, sc = (load_checkpoint_file(t.summary["checkpoint"])["state_dict"]
                  for t in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_continuous_actions_train(tmp_path: Path):
    trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1", num_envs=4), max_frames=2048,
                         eval_every_frames=512, eval_episodes=2, seed=0, run_dir=tmp_path,
                         optimizer=ut.optim.PPO(frames_per_batch=256, minibatch_size=128, epochs=2))
    module = ut.MLPPolicy(obs_dim=3, act_dim=1)
    trainer.fit(module)
    assert trainer.summary["frames"] == 2048
    # Sampled actions are the squashed Gaussian's: inside the bounds, never clipped by the env.
    ckpt = load_checkpoint_file(trainer.summary["checkpoint"])
    assert ckpt["unitrain"]["frames"] == 2048
    # The Gaussian's log std is part of the run's state, outside the policy parameters.
    names = [n for n, _ in module.named_policy_parameters()]
    assert names and not any(n.startswith("aux.") for n in names)
    assert "aux.log_std.log_std" in module.state_dict()
    obs = torch.randn(5, 3) * 10
    action = module.act(obs)
    assert action.shape == (5, 1) and bool(((action >= -2) & (action <= 2)).all())
    assert module.aux.log_std.log_std.item() != 0.0  # trained with the policy


def test_trainer_rejects_non_rule_and_non_module(tmp_path: Path):
    with pytest.raises(ut.UserError, match="optimizer= must be an update rule"):
        ut.Trainer(env="CartPole-v1", optimizer="ppo", run_dir=tmp_path)
    trainer = ut.Trainer(env="CartPole-v1", optimizer=ut.optim.PPO(), run_dir=tmp_path)
    with pytest.raises(ut.UserError, match="not a unitrain.RLModule"):
        trainer.fit(torch.nn.Linear(4, 2))


def test_early_stopping_on_eval_return(tmp_path: Path):
    trainer = _api_run(tmp_path, max_frames=20_000, early_stop=ut.EarlyStop(threshold=15.0))
    # The threshold is met at an early evaluation, long before the frame budget.
    assert trainer.summary["frames"] < 20_000
    assert trainer.callback_metrics["eval/return_mean"] >= 15.0


def test_early_stopping_threshold_is_reached_at_equality(tmp_path: Path):
    # Every episode is cut at 5 steps (CartPole cannot fail that early): the evaluation return is
    # exactly 5, the maximum, so a threshold of 5 must stop the run at the first evaluation.
    trainer = _api_run(tmp_path, env=ut.EnvSpec("CartPole-v1", num_envs=4, max_episode_steps=5),
                       max_frames=20_000, early_stop=ut.EarlyStop(threshold=5.0))
    assert trainer.callback_metrics["eval/return_mean"] == 5.0
    assert trainer.summary["iterations"] == 4


def _eval_steps(run_dir: Path) -> list[int]:
    steps: list[int] = []
    for path in run_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if "eval/return_mean" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("eval/return_mean")]
    return sorted(steps)


def test_evaluations_follow_the_frame_count(tmp_path: Path):
    # 128 frames per iteration; an evaluation after the iteration that reaches each multiple of
    # 300 frames, and one at the end of the budget.
    trainer = _api_run(tmp_path / "a", eval_every_frames=300)
    assert _eval_steps(tmp_path / "a") == [384, 640, 1024, 1280, 1536, 1920, 2048]
    assert trainer.summary["frames"] == 2048 and trainer.summary["frames_over_budget"] == 0
    # Without a cadence: a tenth of the budget; the budget is met to within one iteration and
    # the overshoot is reported.
    trainer = _api_run(tmp_path / "b", eval_every_frames=None, max_frames=1200)
    assert trainer.eval_every_frames == 120
    assert trainer.summary["frames"] == 1280 and trainer.summary["frames_over_budget"] == 80
    assert _eval_steps(tmp_path / "b") == [128 * k for k in range(1, 11)]


class Threads(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        self.threads = torch.get_num_threads()


def test_one_thread_per_process_by_default(tmp_path: Path):
    # Start from another count than the default, so a run that left torch's count alone (or a
    # count left by an earlier run in this process) could not pass for the default.
    torch.set_num_threads(3)
    threads = Threads()
    _api_run(tmp_path / "default", num_threads=None, max_frames=128, callbacks=[threads])
    assert threads.threads == 1
    # An explicit count is the one the run trains with (the callback sees the run's setting).
    torch.set_num_threads(1)
    _api_run(tmp_path / "two", num_threads=2, max_frames=128, callbacks=[threads])
    assert threads.threads == 2


def test_a_failed_start_leaves_no_run_directory(tmp_path: Path):
    run = tmp_path / "new" / "run"
    trainer = ut.Trainer(env="CartPole-v1", optimizer=ut.optim.PPO(), run_dir=run,
                         enable_progress_bar=False)
    with pytest.raises(ut.ConfigError, match="forward returns 3 outputs"):
        trainer.fit(TinyPolicy(4, 3))
    assert not (tmp_path / "new").exists()


def test_unwritable_run_dir_is_one_line(tmp_path: Path, small_recipe: Path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ut.UserError, match=r"run_dir: cannot write to .*file/run"):
        ut.Trainer(env="CartPole-v1", optimizer=ut.optim.PPO(), run_dir=blocker / "run")
    proc = run_cli("fit", str(small_recipe), f"run_dir={blocker / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"unitrain: error: run_dir: cannot write to {blocker / 'run'} (Not a directory); "
        "choose a writable run_dir="]


def test_console_shows_one_progress_bar_and_no_lightning_banner(tmp_path: Path,
                                                                 small_recipe: Path):
    proc = run_cli("fit", str(small_recipe), f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    for noise in ("GPU available", "TPU available", "Tip", "litlogger", "configure_optimizers",
                  "dataloader_iter", "Warning", "Validation", "Epoch"):
        assert noise not in console, (noise, console[-2000:])
    frames = [line for line in console.replace("\r", "\n").splitlines() if "frames/s" in line]
    assert frames and frames[-1].lstrip().startswith("100%") and "2.05k/2.05k" in frames[-1]
    assert "eval return" in proc.stdout
