"""Dict and Tuple observations (named entries): every rule trains on a Dict env or refuses in
one line, the module's ``forward`` receives the entries by name, normalisation skips images,
the replay memory keeps the entries, a recipe trains a Dict env with ``MLPPolicy``, the export
takes the entries by name, and PPO and ES learn an env whose image entry is a distractor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import userenvs  # registers userenvs:Cue-v0
from tensordict import TensorDict
from test_conformance import MODULE_ARGS, RULE_ACTIONS, TASKS, _base
from torch import nn

import unitrain as ut
from unitrain.app.cli import main
from unitrain.envs import env_info, make_env
from unitrain.envs.info import info_from_spaces
from unitrain.envs.obs_norm import make_obs_norm
from unitrain.envs.replay import Replay
from unitrain.errors import ConfigError
from unitrain.optim import registered_rules
from unitrain.testing import check_rule

CUE = ut.EnvSpec("userenvs:Cue-v0", num_envs=4)
CUE_IMAGE = ut.EnvSpec("userenvs:Cue-v0", num_envs=4, kwargs={"image": True})
# Rules that refuse Dict/Tuple observations, with the reason they give.
REFUSED = {"elite_imitation"}
CUE_LENGTH = userenvs.Cue.LENGTH


class ImageVector(ut.RLModule):
    """A user's module over the image and the vectors of ``userenvs:Cue-v0``, by name."""

    def __init__(self, act_dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(-3),
                                   nn.Linear(18, hidden))
        self.vector = nn.Linear(3, hidden)
        self.out = nn.Sequential(nn.Tanh(), nn.Linear(hidden, act_dim))
        self.seen: set[str] = set()

    def forward(self, clock: torch.Tensor, cue: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        self.seen = {"clock", "cue", "image"}
        assert image.dtype == torch.uint8
        pixels = image.float() / 255.0
        lead = pixels.shape[:-3]
        features = self.image(pixels.reshape(-1, *pixels.shape[-3:])).reshape(*lead, -1)
        return self.out(features + self.vector(torch.cat([clock, cue], -1)))


def _cue_obs(n: int, image: bool = False, seed: int = 0) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    entries = {"clock": torch.rand(n, 1, generator=gen), "cue": torch.randn(n, 2, generator=gen)}
    if image:
        entries["image"] = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    return TensorDict(entries, batch_size=[n])


def test_env_info_names_the_entries_in_order():
    info = env_info(CUE_IMAGE)
    assert info.obs_shapes == {"clock": (1,), "cue": (2,), "image": (1, 4, 4)}  # sorted by name
    assert info.images == ("image",) and info.obs_dim == 19 and info.obs_shape == (19,)
    tuple_info = env_info(ut.EnvSpec("userenvs:CueTuple-v0"))
    assert tuple_info.obs_shapes == {"obs0": (2,), "obs1": (1,)}  # by position
    with pytest.raises(ConfigError, match=r"observation space Discrete is not supported; "
                                          r"unitrain supports Box observations and Dict/Tuple"):
        env_info(ut.EnvSpec("FrozenLake-v1"))
    nested = gym.spaces.Dict({"arm": gym.spaces.Dict({"angle": gym.spaces.Box(-1, 1, (1,))})})
    with pytest.raises(ConfigError, match=r"^id: nest: observation entry 'arm' is Dict; unitrain "
                                          r"supports Dict/Tuple observations of Box entries"):
        info_from_spaces("nest", nested, gym.spaces.Discrete(2))


@pytest.mark.parametrize("name", sorted(n for n, task in TASKS.items() if task[0] is not None))
def test_every_rule_trains_on_a_dict_env_or_refuses_in_one_line(name: str, tmp_path: Path):
    # A few iterations of every env rule on a Dict observation of vectors (continuous actions
    # for the rules whose task has them), and the contract on named observations.
    spec, kwargs, _, _ = TASKS[name]
    continuous = spec is not None and spec.id == "Pendulum-v1"
    env = ut.EnvSpec("userenvs:Cue-v0", num_envs=4, kwargs={"continuous": continuous})
    info = env_info(env)
    module = ut.MLPPolicy(info.obs_dim, info.act_dim, hidden=(16,), obs_shapes=info.obs_shapes,
                          **MODULE_ARGS.get(_base(name), {}))
    rule = registered_rules()[_base(name)](**kwargs)
    if _base(name) in REFUSED:
        able = ", ".join(n for n in sorted(TASKS) if n.split("/")[0] not in REFUSED
                         and TASKS[n][0] is not None and "/" not in n)
        with pytest.raises(ConfigError) as err:
            ut.Trainer(env, rule, max_frames=1, run_dir=tmp_path)
        assert str(err.value) == (f"env: {_base(name)} does not train on Dict/Tuple observations "
                                  f"(userenvs:Cue-v0 has entries clock, cue); rules that do: "
                                  f"{able}")
        return
    trainer = ut.Trainer(env, rule, max_frames=1, eval_episodes=2, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["frames"] > 0 and math.isfinite(trainer.summary["eval/return_mean"])
    obs = _cue_obs(5)
    with torch.no_grad():
        torch.testing.assert_close(RULE_ACTIONS[_base(name)](trainer.rule, module, obs),
                                   module.act(obs))


def _image_vector(obs_dim: int, act_dim: int) -> ImageVector:
    del obs_dim
    return ImageVector(act_dim)


@pytest.mark.parametrize("name,spec,frames,devices", [
    ("ppo", ut.EnvSpec("userenvs:Cue-v0", num_envs=4, kwargs={"image": True}, obs_norm=True),
     512, 2),
    ("es", ut.EnvSpec("userenvs:CueTuple-v0", num_envs=4), 800, 1)])
def test_quick_checks_on_named_observations(name: str, spec: ut.EnvSpec, frames: int,
                                            devices: int, tmp_path: Path):
    # Determinism, exact resume and the act contract with an image + vectors (PPO, with
    # per-entry normalisation merged across two processes) and a Tuple observation (ES).
    kwargs = (dict(lr=1e-3, frames_per_batch=128, minibatch_size=128, epochs=2) if name == "ppo"
              else dict(population=4, sigma=0.1, lr=0.05, max_episode_steps=20))
    build = _image_vector if name == "ppo" else None  # check_rule's MLP over the entries
    report = check_rule(registered_rules()[name](**kwargs), spec, frames=frames, module=build,
                        rule_action=RULE_ACTIONS[name], run_dir=tmp_path, eval_episodes=2,
                        devices=devices)
    expected = ["keys", "contract", "determinism", "resume"] + (["ranks"] if devices > 1 else [])
    assert list(report.checks) == expected


def test_forward_receives_the_entries_by_name():
    module = ImageVector(2)
    module.bind_env(env_info(CUE_IMAGE))
    assert module.seen == {"clock", "cue", "image"}
    obs = _cue_obs(3, image=True)
    expected = module(**{k: obs[k] for k in ("clock", "cue", "image")}).argmax(-1)
    assert torch.equal(module.act(obs), expected)
    assert torch.equal(module.act(dict(obs.items())), expected)  # a plain dict too


def test_mlp_policy_concatenates_in_the_order_of_obs_shapes():
    torch.manual_seed(0)
    policy = ut.MLPPolicy(3, 2, hidden=(), obs_shapes={"cue": (2,), "clock": (1,)})
    obs = _cue_obs(4)
    flat = torch.cat([obs["cue"], obs["clock"]], -1)
    torch.testing.assert_close(policy(cue=obs["cue"], clock=obs["clock"]), policy.net(flat))
    with pytest.raises(TypeError, match=r"takes the observation entries \['cue', 'clock'\] by "
                                        r"name; missing \['clock'\]"):
        policy(cue=obs["cue"])
    with pytest.raises(ValueError, match="hold 3 values; obs_dim is 4"):
        ut.MLPPolicy(4, 2, obs_shapes={"cue": (2,), "clock": (1,)})


def test_normalisation_skips_images():
    info = env_info(CUE_IMAGE)
    norm = make_obs_norm(info)
    assert set(norm.norms) == {"clock", "cue"}  # no statistics for the image
    normed = make_env(CUE_IMAGE, seed=3, obs_norm=norm)
    raw = make_env(CUE_IMAGE, seed=3)
    for env in (normed, raw):
        env.reset()
    action = TensorDict(action=torch.zeros(4, dtype=torch.int64), batch_size=[4])
    for _ in range(5):
        normed.step(action.clone())
        raw.step(action.clone())
    norm.sync(lambda t: t[None])  # one process
    a = normed.step(action.clone())["next", "observation"]
    b = raw.step(action.clone())["next", "observation"]
    assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
    for key in ("clock", "cue"):
        stats = norm.norms[key]
        std = (stats.m2 / stats.count).sqrt() + stats.eps
        expected = ((b[key].double() - stats.mean) / std).clamp(-5, 5).float()
        torch.testing.assert_close(a[key], expected)
    assert int(norm.norms["cue"].count) == 4 * 6  # reset + 5 steps of 4 slots
    assert not torch.equal(a["cue"], b["cue"])


def test_replay_keeps_the_named_entries():
    gen = torch.Generator().manual_seed(0)
    replay = Replay(8, 4, gen)
    obs, nxt = _cue_obs(6, image=True, seed=1), _cue_obs(6, image=True, seed=2)
    replay.extend(TensorDict({
        "observation": obs, "action": torch.arange(6.0)[:, None], "extra": torch.zeros(6),
        "next": {"observation": nxt, "reward": torch.ones(6, 1),
                 "done": torch.zeros(6, 1, dtype=torch.bool),
                 "terminated": torch.zeros(6, 1, dtype=torch.bool)}}, batch_size=[6]))
    batch = replay.sample()
    assert set(batch["observation"].keys()) == {"clock", "cue", "image"}
    assert batch["observation", "image"].dtype == torch.uint8 and "extra" not in batch.keys()
    rows = batch["action"].reshape(-1).long()
    for key in ("clock", "cue", "image"):
        assert torch.equal(batch["observation", key], obs[key][rows])
        assert torch.equal(batch["next", "observation", key], nxt[key][rows])
    again = Replay(8, 4, torch.Generator().manual_seed(0))
    again.load_state_dict(replay.state_dict())
    assert torch.equal(again.buffer.storage[:6]["observation", "image"], obs["image"])


RECIPE = """\
# unitrain fit recipe.yaml
seed: 0
env: {id: "userenvs:Cue-v0", num_envs: 4, obs_norm: true}
module: {target: unitrain.MLPPolicy, hidden: [16]}
optimizer: {name: ppo, lr: 0.003, frames_per_batch: 256, minibatch_size: 128, epochs: 4}
trainer: {max_frames: 1024, eval_episodes: 2}
"""


def test_a_recipe_trains_a_dict_env_with_mlp_policy(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    assert main(["fit", "recipe.yaml", "run_dir=run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["env"] == "userenvs:Cue-v0" and summary["frames"] == 1024
    module = ut.RLModule.load_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert module.obs_shapes == {"clock": (1,), "cue": (2,)}
    assert set(module.obs_norm.norms) == {"clock", "cue"}
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                 "--episodes", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["eval/length_mean"] == 20


def test_a_torchrl_env_with_several_observation_entries(tmp_path: Path):
    spec = ut.EnvSpec(make="usertorchrl:make_cue", num_envs=2)
    info = env_info(spec)
    assert info.obs_shapes == {"clock": (1,), "cue": (2,)}
    # The time limit's StepCounter adds a step_count entry, which is no observation.
    limited = make_env(ut.EnvSpec(make="usertorchrl:make_cue", num_envs=2, max_episode_steps=5),
                       seed=0)
    assert set(limited.reset()["observation"].keys()) == {"clock", "cue"}
    module = ut.MLPPolicy(info.obs_dim, info.act_dim, hidden=(8,), obs_shapes=info.obs_shapes)
    trainer = ut.Trainer(spec, registered_rules()["ppo"](frames_per_batch=64, minibatch_size=64,
                                                         epochs=1),
                         max_frames=128, eval_episodes=2, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["frames"] == 128
    assert 0 <= trainer.summary["eval/return_mean"] <= 20


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_takes_the_entries_by_name(fmt: str, tmp_path: Path):
    spec = ut.EnvSpec("userenvs:Cue-v0", num_envs=4, kwargs={"image": True}, obs_norm=True)
    trainer = ut.Trainer(spec, registered_rules()["ppo"](frames_per_batch=128), max_frames=256,
                         eval_episodes=2, run_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(ImageVector(2))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    out = tmp_path / f"policy.{fmt}"
    assert main(["export", str(ckpt), "--format", fmt, "--out", str(out)]) == 0
    obs = _cue_obs(7, image=True, seed=4)
    module = ImageVector.load_from_checkpoint(ckpt)
    with torch.no_grad():
        expected = module.act(module.obs_norm(obs))
    entries = {key: obs[key] for key in ("clock", "cue", "image")}
    if fmt == "pt2":
        action = torch.export.load(str(out)).module()(entries)
    else:
        onnxruntime = pytest.importorskip("onnxruntime")
        session = onnxruntime.InferenceSession(str(out))
        assert [i.name for i in session.get_inputs()] == ["clock", "cue", "image"]
        action = torch.from_numpy(session.run(None, {k: v.numpy() for k, v in entries.items()})[0])
    assert torch.equal(action, expected)


@pytest.mark.parametrize("name,kwargs,frames", [
    ("ppo", dict(lr=3e-3, frames_per_batch=256, minibatch_size=128, epochs=4), 4096),
    ("es", dict(population=16, sigma=0.1, lr=0.05), 8000)])
def test_learns_to_follow_the_cue_past_an_image_distractor(name: str, kwargs: dict,
                                                          frames: int, tmp_path: Path):
    # Random play earns about 10 an episode; following the cue (a vector entry), 20.
    torch.manual_seed(0)
    spec = ut.EnvSpec("userenvs:Cue-v0", num_envs=4, kwargs={"image": True}, obs_norm=True)
    trainer = ut.Trainer(spec, registered_rules()[name](**kwargs), max_frames=frames,
                         eval_episodes=8, run_dir=tmp_path, enable_progress_bar=False, seed=0)
    trainer.fit(ImageVector(2))
    assert trainer.summary["eval/return_mean"] >= 18.0, trainer.summary


class ImageVectorValue(ImageVector):
    """:class:`ImageVector` with its own state-value function, over the entries by name."""

    def __init__(self, act_dim: int) -> None:
        super().__init__(act_dim)
        self.critic = nn.Linear(3, 1)
        self.value_calls = 0

    def value(self, clock: torch.Tensor, cue: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        self.value_calls += 1
        assert image.dtype == torch.uint8
        return self.critic(torch.cat([clock, cue], -1))


def test_ppo_calls_the_modules_value_by_name(tmp_path: Path):
    module = ImageVectorValue(2)
    before = module.critic.weight.detach().clone()
    trainer = ut.Trainer(CUE_IMAGE, registered_rules()["ppo"](frames_per_batch=128),
                         max_frames=256, eval_episodes=2, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert module.value_calls > 0
    assert "value" not in getattr(module, "aux", {})  # no default value network added
    assert not torch.equal(module.critic.weight, before)  # trained through the PPO loss


@pytest.mark.parametrize("spec", [CUE_IMAGE, ut.EnvSpec(make="usertorchrl:make_cue", num_envs=2)],
                         ids=["gymnasium", "torchrl"])
def test_an_ended_episode_keeps_its_final_entries(spec: ut.EnvSpec):
    # Same-step autoreset with named entries: the step that ends an episode reports the
    # episode's last observation as next, and the next episode's first as the next input.
    env = make_env(spec, seed=0)
    n = env.num_envs
    td = env.reset()
    for t in range(1, CUE_LENGTH + 1):
        td["action"] = torch.zeros(n, dtype=torch.int64)
        out, td = env.step_and_maybe_reset(td)
        torch.testing.assert_close(out["next", "observation", "clock"],
                                   torch.full((n, 1), t / CUE_LENGTH))
    assert bool(out["next", "done"].all())
    assert torch.equal(td["observation", "clock"], torch.zeros(n, 1))
    assert set(td["observation"].keys()) == set(env_info(spec).obs_shapes)
