"""One validation path: Python constructors and recipes reject the same values with the same key."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path

import pytest

import unitrain as ut
from unitrain.app.cli import main
from unitrain.app.config import load_recipe
from unitrain.envs.data import DataSpec
from unitrain.errors import ConfigError, UserError, check
from unitrain.rules.registry import registered_rules
from unitrain.run.trainer import TrainerConfig
from unitrain.validation import Validated, bounded, one_of

BLOCKS = [*registered_rules().values(), ut.EnvSpec, DataSpec, TrainerConfig, ut.EarlyStop]


def _wrong(hint: typing.Any) -> typing.Any:
    """A value of the wrong type for ``hint``."""
    if hint is str or str in typing.get_args(hint):
        return 3
    return "x"


def _fields():
    for cls in BLOCKS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is not typing.Any:
                yield pytest.param(cls, f.name, hints[f.name], id=f"{cls.__name__}.{f.name}")


@pytest.mark.parametrize("cls, name, hint", list(_fields()))
def test_every_field_is_type_checked_where_it_is_constructed(cls, name, hint):
    value = _wrong(hint)
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    assert err.value.key == f"{cls.block}.{name}"
    assert str(err.value).startswith(f"{cls.block}.{name}: got {value!r}; expected ")


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr="fast"), "optimizer.lr: got 'fast'; expected a number"),
    (dict(epochs=2.5), "optimizer.epochs: got 2.5; expected an integer"),
    (dict(epochs=True), "optimizer.epochs: got True; expected an integer"),
    (dict(anneal_lr="maybe"), "optimizer.anneal_lr: got 'maybe'; expected true or false"),
    (dict(value_hidden=[64, "a"]), "optimizer.value_hidden: got [64, 'a']; expected a list of "
                                   "integers"),
    (dict(clip=1.5), "optimizer.clip: got 1.5; expected a number in (0, 1)"),
])
def test_python_gets_the_recipe_messages(tmp_path: Path, kwargs, message):
    with pytest.raises(ConfigError) as err:
        ut.optim.PPO(**kwargs)
    assert str(err.value) == message
    # The recipe gets the same line, after its file name.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env: {id: CartPole-v1}\noptimizer: {name: ppo}\n")
    key, value = next(iter(kwargs.items()))
    with pytest.raises(UserError) as from_recipe:
        load_recipe(recipe, [f"optimizer.{key}={value!r}".replace("'", "")])
    assert str(from_recipe.value) == f"{recipe}: {message}"


def test_values_are_conformed_to_their_annotations():
    rule = ut.optim.PPO(lr=1, value_hidden=[32, 32])
    assert rule.lr == 1.0 and isinstance(rule.lr, float) and rule.value_hidden == (32, 32)
    nested = ut.optim.EliteImitation(fit={"lam": 2})
    assert isinstance(nested.fit, ut.optim.Projection) and nested.fit.lam == 2.0


@pytest.mark.parametrize("make, message", [
    (lambda: ut.optim.EliteImitation(fit={"lam": 0.0}),
     "optimizer.fit.lam: got 0.0; expected a number > 0"),
    (lambda: ut.optim.EliteImitation(fit={"lamb": 1.0}), "optimizer.fit.lamb: unknown key"),
    (lambda: ut.EarlyStop(patience=0), "trainer.early_stop.patience: got 0; expected an integer >= 1"),
    (lambda: ut.Trainer("CartPole-v1", ut.optim.PPO(), early_stop={"patience": 0}),
     "trainer.early_stop.patience: got 0"),
    (lambda: ut.Trainer("CartPole-v1", ut.optim.PPO(), max_frames="100k"),
     "trainer.max_frames: got '100k'; expected an integer or null"),
    (lambda: ut.Trainer("CartPole-v1", ut.optim.PPO(), seed=-1), "seed: got -1"),
    (lambda: ut.Trainer("CartPole-v1", ut.optim.PPO(), eval_episodes=0),
     "trainer.eval_episodes: got 0; expected an integer >= 1"),
    (lambda: ut.Trainer("CartPole-v1", ut.optim.PPO(), num_threads=0),
     "trainer.num_threads: got 0; expected an integer >= 1 or null"),
])
def test_nested_blocks_and_trainer_arguments_name_their_full_key(make, message):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("rule, env, message", [
    (ut.optim.PPO(frames_per_batch=100), "CartPole-v1",
     "optimizer.frames_per_batch: got 100; expected a multiple of env.num_envs=8"),
    (ut.optim.REINFORCE(frames_per_batch=100), "CartPole-v1",
     "optimizer.frames_per_batch: got 100; expected a multiple of env.num_envs=8"),
    (ut.optim.DDPG(), "CartPole-v1", "env.id: CartPole-v1 has discrete actions"),
    (ut.optim.Adam(), "CartPole-v1", "env: adam trains on (input, target) batches"),
    (ut.optim.PPO(), None, "env: ppo needs an env (a gymnasium id or a unitrain.EnvSpec); only "
                           "adam, projection train on a dataloader"),
])
def test_cross_field_checks_run_before_anything_is_written(tmp_path: Path, rule, env, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        ut.Trainer(env, rule, max_frames=1000, run_dir=run_dir)
    assert str(err.value).startswith(message)
    assert not run_dir.exists()


def test_a_recipe_that_cannot_start_writes_nothing(tmp_path: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("env: {id: CartPole-v1, num_envs: 8}\noptimizer: {name: ppo}\n"
                      "trainer: {max_frames: 2048}\n")
    run_dir = tmp_path / "run"
    for override, message in [
        ("optimizer.frames_per_batch=100",
         "optimizer.frames_per_batch: got 100; expected a multiple of env.num_envs=8"),
        ("trainer.early_stop.patience=0", "trainer.early_stop.patience: got 0; expected an "
                                          "integer >= 1"),
        ("trainer.early_stop.patiense=3", "trainer.early_stop.patiense: unknown key; valid "
                                          "keys: threshold, patience"),
        ("module.hidden=[8, x]", "module"),
    ]:
        code = main(["fit", str(recipe), override, f"run_dir={run_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"unitrain: error: {recipe}: {message}"), err
        assert not run_dir.exists()


@dataclasses.dataclass
class _Bounded(Validated):
    block: typing.ClassVar[str] = "optimizer"
    lr: float = bounded(1e-3, "(0, inf]")
    noise: float = bounded(1.0, "[0, inf)")
    gamma: float = bounded(0.99, "(0, 1]")
    batch_size: int = bounded(8, "[1, buffer_size]")
    buffer_size: int = bounded(100, "[1, inf]")
    hidden: tuple[int, ...] = bounded((4, 4), "[1, inf]")
    top: int | None = bounded(None, "[1, inf]", null=True)
    update: str = one_of("adam", "adam", "sgd")

    def validate(self) -> None:
        check(self.buffer_size != 7, "buffer_size", "not 7", self.buffer_size)


@dataclasses.dataclass
class _NewDefault(_Bounded):
    gamma: float = 0.5


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0), "optimizer.lr: got 0.0; expected a number > 0"),
    (dict(noise=math.inf), "optimizer.noise: got inf; expected a number >= 0"),
    (dict(noise=math.nan), "optimizer.noise: got nan; expected a number >= 0"),
    (dict(gamma=1.5), "optimizer.gamma: got 1.5; expected a number in (0, 1]"),
    (dict(batch_size=101), "optimizer.batch_size: got 101; expected an integer in "
                           "[1, buffer_size=100]"),
    # The bound's own checks, in validate() too, come before the ranges it bounds.
    (dict(buffer_size=0), "optimizer.buffer_size: got 0; expected an integer >= 1"),
    (dict(buffer_size=7), "optimizer.buffer_size: got 7; expected not 7"),
    (dict(hidden=[4, 0]), "optimizer.hidden: got [4, 0]; expected a list of integers >= 1"),
    (dict(top=0), "optimizer.top: got 0; expected an integer >= 1 or null"),
    (dict(update="rmsprop"), "optimizer.update: got 'rmsprop'; expected 'adam' or 'sgd'"),
])
def test_declared_ranges_and_choices_give_the_check_messages(kwargs, message):
    for cls in (_Bounded, _NewDefault):  # a new default keeps the declared range
        with pytest.raises(ConfigError) as err:
            cls(**kwargs)
        assert str(err.value) == message


def test_declared_ranges_admit_their_ends():
    rule = _Bounded(lr=math.inf, noise=0.0, gamma=1.0, batch_size=100, top=3, update="sgd")
    assert rule.lr == math.inf and rule.batch_size == 100 and rule.top == 3
    assert _NewDefault().gamma == 0.5
