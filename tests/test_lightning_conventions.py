"""Lightning's conventions hold on a unitrain Trainer and module: a caller's ModelCheckpoint adds
to unitrain's checkpoints, ``load_from_checkpoint`` returns the trained module, a caller's
loggers keep TensorBoard, and ``fit`` ends with the CLI's summary lines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import unitrain as ut
from unitrain.run.checkpoint import policy_and_env

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoints_0_1_0"


class Policy(ut.RLModule):
    """The README's module: no save_hyperparameters call."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, 16), nn.ReLU(), nn.Linear(16, act_dim))

    def forward(self, observation):
        return self.net(observation)


def _trainer(run_dir: Path, **kwargs) -> ut.Trainer:
    args = dict(max_frames=512, eval_every_frames=256, eval_episodes=1, run_dir=run_dir,
                optimizer=ut.optim.PPO(frames_per_batch=128, minibatch_size=128, epochs=1))
    return ut.Trainer("CartPole-v1", **{**args, **kwargs})


def test_a_user_model_checkpoint_adds_to_unitrains(tmp_path: Path):
    mine = ModelCheckpoint(dirpath=tmp_path / "mine", save_last=True)
    trainer = _trainer(tmp_path / "run", callbacks=[mine], enable_progress_bar=False)
    trainer.fit(Policy(4, 2))
    assert trainer.summary["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert Path(trainer.summary["best_checkpoint"]).is_file()
    assert (tmp_path / "mine" / "last.ckpt").is_file()
    # Resuming from unitrain's last.ckpt, with the same callbacks, goes on.
    again = _trainer(tmp_path / "run", callbacks=[ModelCheckpoint(dirpath=tmp_path / "mine",
                                                                  save_last=True)],
                     max_frames=768, enable_progress_bar=False)
    again.fit(Policy(4, 2), ckpt_path="last")
    assert again.summary["segments"][-1]["from_frames"] == 512


def test_resume_last_without_a_checkpoint_is_one_line(tmp_path: Path):
    with pytest.raises(ut.UserError, match="ckpt_path='last': no checkpoint at"):
        _trainer(tmp_path / "run", enable_progress_bar=False).fit(Policy(4, 2), ckpt_path="last")


def test_load_from_checkpoint_returns_the_trained_module(tmp_path: Path):
    trainer = _trainer(tmp_path / "run", enable_progress_bar=False)
    trained = Policy(4, 2)
    trainer.fit(trained)
    loaded = Policy.load_from_checkpoint(trainer.summary["checkpoint"])
    assert isinstance(loaded, Policy) and loaded.obs_norm is None
    assert loaded.hparams == {"obs_dim": 4, "act_dim": 2}
    for key, value in trained.state_dict().items():
        if not key.startswith("aux."):
            assert torch.equal(value, loaded.state_dict()[key]), key
    assert not any(k.startswith("aux.") for k in loaded.state_dict())  # PPO's critic left out
    obs = torch.randn(32, 4)
    assert torch.equal(loaded.act(obs), trained.act(obs))


@pytest.mark.parametrize("name", ["pendulum_sac", "cartpole_ppo_obsnorm"])
def test_load_from_checkpoint_reads_old_checkpoints_with_their_statistics(name: str):
    path = FIXTURES / f"{name}.ckpt"
    loaded = ut.RLModule.load_from_checkpoint(path)  # the recorded class (0.1.0's path)
    expected, _, norm = policy_and_env(path)
    assert type(loaded) is type(expected)
    obs = torch.randn(16, *expected.env_info.obs_shape)
    with torch.no_grad():
        if norm is None:
            assert loaded.obs_norm is None
            assert torch.equal(loaded.act(obs), expected.act(obs))
            assert not any(k.startswith("aux.") for k in loaded.state_dict())  # no critics
        else:
            assert torch.equal(loaded.obs_norm.mean, norm.mean)
            assert torch.equal(loaded.act(loaded.obs_norm(obs)), expected.act(norm(obs)))


def test_load_from_checkpoint_is_strict(tmp_path: Path):
    with pytest.raises(ut.UserError, match="do not fit"):
        ut.RLModule.load_from_checkpoint(FIXTURES / "cartpole_es.ckpt", hidden=[3])


def test_a_user_logger_keeps_tensorboard(tmp_path: Path):
    csv = CSVLogger(tmp_path / "csv")
    trainer = _trainer(tmp_path / "run", logger=csv, enable_progress_bar=False)
    assert trainer.loggers[0] is csv
    assert any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
    only = _trainer(tmp_path / "run2", logger=[csv], tensorboard=False)
    assert only.loggers == [csv]
    theirs = TensorBoardLogger(tmp_path / "tb")
    assert _trainer(tmp_path / "run3", logger=[csv, theirs]).loggers == [csv, theirs]


def test_fit_prints_the_summary_unless_quiet(tmp_path: Path, capsys):
    _trainer(tmp_path / "a").fit(Policy(4, 2))
    out = capsys.readouterr().out
    assert "unitrain: ppo on CartPole-v1: eval return" in out
    assert f"unitrain: checkpoint {tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}" in out
    _trainer(tmp_path / "b", enable_progress_bar=False).fit(Policy(4, 2))
    assert "unitrain:" not in capsys.readouterr().out


def test_old_checkpoints_callback_states_get_the_new_keys():
    from unitrain.policy.ckpt_file import load_checkpoint_file
    from unitrain.run.trainer import upgrade_callback_states

    checkpoint = load_checkpoint_file(FIXTURES / "cartpole_es.ckpt")
    states = upgrade_callback_states(checkpoint)["callbacks"]
    assert {"unitrain.last", "unitrain.best"} <= set(states)
    assert states["unitrain.best"]["monitor"] == "eval/return_mean"
    assert not any(key.startswith("ModelCheckpoint") for key in states)


def test_a_recorded_class_that_does_not_import_is_one_line():
    from unitrain.errors import UserError
    from unitrain.policy.ckpt_file import recorded_class

    with pytest.raises(UserError, match=r"^run/last\.ckpt: module class nope\.mod:Gone is not "
                                        r"importable here; pass an instance$"):
        recorded_class({"module_class": "nope.mod:Gone"}, "run/last.ckpt", "pass an instance")
    assert recorded_class({"module_class": "unitrain:MLPPolicy"}, "x", "y") is ut.MLPPolicy
