"""The projection rule through the Trainer (supervised digits, two processes) and elite imitation,
the RL rule composed over it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_ranks
from policies import TinyPolicy
from torch import nn

import unitrain as ut
from unitrain.envs.data import DataSpec, load_data
from unitrain.optim import EliteImitation, Projection
from unitrain.rules.projection.elite_imitation import _SlotNoise
from unitrain.run.services import RunServices

FAST = dict(iterations=20, output="cross_entropy", lam=5.0)


def test_digits_projection_trains_through_the_trainer(tmp_path: Path):
    train, test, info = load_data(DataSpec(name="digits", batch_size=128))
    trainer = ut.Trainer(env=None, optimizer=Projection(**FAST), max_epochs=1, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    module = TinyPolicy(info.obs_dim, info.act_dim, hidden=32, activation="relu")
    trainer.fit(module, train_dataloaders=train, val_dataloaders=test)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test/accuracy"] >= 0.85, summary
    assert summary["iterations"] == len(train)
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_recipe_with_data_block_runs(tmp_path: Path):
    proc = run_cli("fit", "digits/projection", "trainer.max_epochs=1", "optimizer.iterations=5",
                   "data.batch_size=256", "module.hidden=[16]", f"run_dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 < summary["test/accuracy"] <= 1.0 and summary["env"] is None
    assert "test accuracy" in proc.stdout


@pytest.mark.parametrize("recipe", ["digits/projection_cnn", "digits/projection_step"])
def test_cnn_and_threshold_recipes_learn(tmp_path: Path, recipe: str):
    proc = run_cli("fit", recipe, "trainer.max_epochs=1", "optimizer.iterations=10",
                   "optimizer.compile=false", "data.batch_size=512", f"run_dir={tmp_path / 'run'}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["test/accuracy"] >= 0.5, summary  # ten classes: chance is 0.1


def test_unsupported_layer_is_reported_by_the_rule(tmp_path: Path):
    train, test, info = load_data(DataSpec(name="digits", batch_size=256))
    trainer = ut.Trainer(env=None, optimizer=Projection(**FAST), max_epochs=1, seed=0,
                         num_threads=1, run_dir=tmp_path, enable_progress_bar=False)
    module = TinyPolicy(info.obs_dim, info.act_dim, hidden=8, activation="tanh")
    with pytest.raises(ValueError, match=r"'net\.1'.*Tanh"):
        trainer.fit(module, train_dataloaders=train)


def test_standardize_needs_a_linear_first_layer():
    from unitrain.policy.models import ConvNet

    module = ConvNet(64, 10, channels=(2,))
    with pytest.raises(ut.ConfigError, match="^standardize: .*first layer is nn.Linear"):
        Projection(standardize=True).attach(module)
    Projection(standardize=False).attach(module)


def test_a_network_starting_with_a_convolution_needs_unflatten():
    from torch import nn

    class Flat(ut.RLModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 10))

        def forward(self, x):
            return self.net(x)

    with pytest.raises(ut.ConfigError, match=r"^module: .*nn\.Unflatten\(1, \(channels"):
        Projection().attach(Flat())


def test_rule_fields_are_validated():
    with pytest.raises(ut.ConfigError, match="solver"):
        Projection(solver="newton")
    with pytest.raises(ut.ConfigError, match="output"):
        Projection(output="hinge")


SCRIPT = '''
import sys
import unitrain as ut
from dump import Dump
from policies import TinyPolicy
from unitrain.envs.data import DataSpec, load_data
from unitrain.policy.models import ConvNet

if __name__ == "__main__":
    train, test, info = load_data(DataSpec(name="digits", batch_size=100))
    trainer = ut.Trainer(env=None, devices=int(sys.argv[1]), strategy="ddp", max_steps=3,
                         seed=4, num_threads=1, run_dir="run", callbacks=[Dump()],
                         enable_progress_bar=False,
                         optimizer=ut.optim.Projection(iterations=5))
    if sys.argv[2] == "mlp":
        module = TinyPolicy(info.obs_dim, info.act_dim, hidden=8, activation="relu")
    else:  # convolution, average pooling, reshapes and hard thresholds
        module = ConvNet(info.obs_dim, info.act_dim, channels=(2, 3), hidden=(6,),
                         activation="step")
    trainer.fit(module, train_dataloaders=train, val_dataloaders=test)
'''


@pytest.mark.parametrize("net", ["mlp", "cnn_step"])
def test_two_processes_keep_identical_parameters(tmp_path: Path, net: str):
    r0, r1 = run_ranks(tmp_path, SCRIPT, "2", net)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["iterations"] == r1["iterations"] == 3
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
        assert torch.equal(r0["init"][key], r1["init"][key]), key
    assert any(not torch.equal(r0["init"][k], v) for k, v in r0["params"].items())
    if net == "cnn_step":
        assert any("net.1.weight" in k for k in r0["params"])


EI_SCRIPT = '''
import unitrain as ut
from dump import Dump
from policies import TinyPolicy


def sigma(trainer, module):
    rule, norm = module._ctx.rule, module._ctx.services.obs_norm
    return {"sigma": rule._sigma, "distance": rule._distance,
            "norm": None if norm is None else [b.clone() for b in (norm.count, norm.mean, norm.m2)]}


if __name__ == "__main__":
    import sys
    rule = ut.optim.EliteImitation(episodes=4, param_noise=0.1, param_noise_target=0.02,
                                   batch_size=64)
    env = ut.EnvSpec("CartPole-v1", num_envs=4, obs_norm=sys.argv[1] == "obs_norm")
    trainer = ut.Trainer(env=env, optimizer=rule, devices=2,
                         strategy="ddp", max_frames=1500, eval_every_frames=100000,
                         eval_episodes=2, seed=5, num_threads=1, run_dir="run",
                         callbacks=[Dump(extra=sigma)], enable_progress_bar=False)
    trainer.fit(TinyPolicy(4, 2, hidden=8, activation="relu"))
'''


@pytest.mark.parametrize("observations", ["raw", "obs_norm"])
def test_two_processes_keep_identical_parameters_and_noise_in_elite_imitation(
        tmp_path: Path, observations: str):
    """Each rank plays its own episodes; the fit's consensus and the measured action distance
    are combined across ranks, so parameters and the adapted σ stay identical (also with
    observations normalised by running statistics, as the CartPole recipe does)."""
    r0, r1 = run_ranks(tmp_path, EI_SCRIPT, observations)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["iterations"] >= 2
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    assert any(not torch.equal(r0["init"][k], v) for k, v in r0["params"].items())
    assert r0["sigma"] == r1["sigma"] != 0.1 and r0["distance"] == r1["distance"]
    if observations == "obs_norm":
        assert r0["norm"][0] > 0
        for a, b in zip(r0["norm"], r1["norm"], strict=True):
            assert torch.equal(a, b)
    else:
        assert r0["norm"] is None


def _services(module: ut.RLModule, spec: ut.EnvSpec) -> RunServices:
    services = RunServices(module, spec, 0, None)
    services.start(0, 1)
    return services


def test_elite_imitation_improves_cartpole(tmp_path: Path):
    spec = ut.EnvSpec("CartPole-v1", num_envs=4)
    rule = EliteImitation(fit=Projection(iterations=20), episodes=8, elite_fraction=0.25,
                          keep_elites=True, greedy_share=0.0, explore=0.1, updates=2,
                          batch_size=128)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, activation="relu")
    before = ut.evaluate(module, spec, episodes=8)["return_mean"]
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=6000, eval_every_frames=1500,
                         eval_episodes=8, seed=0, num_threads=1, run_dir=tmp_path,
                         enable_progress_bar=False)
    trainer.fit(module)
    assert trainer.summary["frames"] >= 6000
    assert trainer.summary["eval/return_mean"] > before + 20, (before, trainer.summary)


def _plain_ctx():
    from types import SimpleNamespace
    return SimpleNamespace(device=torch.device("cpu"), env_info=None,
                           all_reduce_=lambda tensor, op="mean": tensor, world_size=1)


def test_new_rl_fields_are_validated():
    with pytest.raises(ut.ConfigError, match="window"):
        EliteImitation(window=0)
    with pytest.raises(ut.ConfigError, match="step_size"):
        Projection(step_size=0.0)
    with pytest.raises(ut.ConfigError, match="step_size"):
        Projection(step_size=1.5)
    with pytest.raises(ut.ConfigError, match="greedy_share"):
        EliteImitation(greedy_share=1.5)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.fit\.lam"):
        EliteImitation(fit={"lam": 0.0})
    with pytest.raises(ut.ConfigError,
                       match=r"^optimizer\.param_noise: got -0\.1; expected a number >= 0 or null$"):
        EliteImitation(param_noise=-0.1)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.param_noise: got 0\.1; expected null "
                                             r"when sample is false"):
        EliteImitation(param_noise=0.1, sample=False)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.param_noise_target: got 0\.0; expected a "
                                             r"number > 0 or null$"):
        EliteImitation(param_noise=0.1, param_noise_target=0.0)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.param_noise_target: got 0\.1; expected "
                                             r"null when param_noise is null"):
        EliteImitation(param_noise_target=0.1)
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.param_noise: got 0\.0; expected a number "
                                             r"> 0 when param_noise_target is set"):
        EliteImitation(param_noise=0.0, param_noise_target=0.1)


def test_each_rule_serves_its_kind_of_run():
    spec = ut.EnvSpec("CartPole-v1", num_envs=2)
    with pytest.raises(ut.ConfigError, match="^env: projection fits.*use elite_imitation"):
        ut.Trainer(spec, Projection())
    with pytest.raises(ut.ConfigError, match=r"^optimizer\.fit\.output: got 'cross_entropy'; Pendulum-v1 has continuous actions"):
        ut.Trainer("Pendulum-v1", EliteImitation())


def test_each_env_slot_runs_its_quota_and_greedy_slots_take_the_argmax():
    spec = ut.EnvSpec("CartPole-v1", num_envs=4)
    rule = EliteImitation(episodes=6, explore=0.0, greedy_share=0.5)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, hidden=8, activation="relu")
    ctx = _services(module, spec)
    rule.setup(module, ctx)
    episodes, frames = rule._collect(ctx)
    # Slots 0 and 1 run two episodes, 2 and 3 one each, however long each episode lasts.
    assert sorted(e["slot"] for e in episodes) == [0, 0, 1, 1, 2, 3]
    per_slot = {i: sum(len(e["action"]) for e in episodes if e["slot"] == i) for i in range(4)}
    assert frames == 4 * max(per_slot.values())
    with torch.no_grad():
        matches = [torch.equal(module(e["observation"]).argmax(-1), e["action"])
                   for e in episodes]
    assert all(m for m, e in zip(matches, episodes) if e["slot"] < 2)
    assert not all(m for m, e in zip(matches, episodes) if e["slot"] >= 2)


def test_parameter_noise_gives_each_sampling_slot_a_perturbed_copy():
    """Slot j acts with θ + σ·ε_j (ε_j drawn in slot order, 0 in greedy slots); a redraw
    replaces the noise of the given slots only."""
    spec = ut.EnvSpec("CartPole-v1", num_envs=3)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, hidden=8, activation="relu")
    ctx = _services(module, spec)
    greedy = torch.tensor([True, False, False])
    draws = torch.Generator().set_state(ctx.generator.get_state())
    forward = _SlotNoise(module, 0.5, greedy, ctx.generator)
    forward.redraw(range(3))
    theta = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    eps = [torch.zeros_like(theta)] + [torch.randn(theta.numel(), generator=draws)
                                       for _ in range(2)]

    def by_hand(e: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        copy = TinyPolicy(4, 2, hidden=8, activation="relu")
        torch.nn.utils.vector_to_parameters(theta + 0.5 * e, copy.parameters())
        with torch.no_grad():
            return copy(obs)

    obs = torch.randn(3, 4)
    out = forward(obs, slice(0, 3))
    for j in range(3):
        torch.testing.assert_close(out[j], by_hand(eps[j], obs[j]))
    with torch.no_grad():
        torch.testing.assert_close(out[0], module(obs[0]))
    # Two of the slots alone, and a redraw of slot 2 that leaves slot 1 as it was.
    torch.testing.assert_close(forward(obs[1:], slice(1, 3)), out[1:])
    forward.redraw([2])
    eps[2] = torch.randn(theta.numel(), generator=draws)
    again = forward(obs, slice(0, 3))
    torch.testing.assert_close(again[:2], out[:2])
    torch.testing.assert_close(again[2], by_hand(eps[2], obs[2]))
    assert not torch.allclose(again[2], out[2])


def test_parameter_noise_is_drawn_anew_for_every_episode(monkeypatch):
    spec = ut.EnvSpec("CartPole-v1", num_envs=4)
    rule = EliteImitation(episodes=8, explore=0.0, greedy_share=0.25, param_noise=0.3)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, hidden=8, activation="relu")
    ctx = _services(module, spec)
    rule.setup(module, ctx)
    redrawn: list[int] = []
    redraw = _SlotNoise.redraw

    def spy(self, slots):
        slots = list(slots)
        redrawn.extend(slots)
        redraw(self, slots)

    monkeypatch.setattr(_SlotNoise, "redraw", spy)
    measured: list[tuple[_SlotNoise, list[tuple[torch.Tensor, torch.Tensor]]]] = []
    adapt = rule._adapt_noise
    monkeypatch.setattr(rule, "_adapt_noise",
                        lambda noise, played, c: (measured.append((noise, played)),
                                                  adapt(noise, played, c)))
    episodes, _ = rule._collect(ctx)
    # Every slot gets noise before its first episode and after each episode it ends.
    assert sorted(redrawn) == sorted(list(range(4)) + [e["slot"] for e in episodes])
    # Every action of a sampling slot's episode, its first included, is the argmax of the one
    # perturbed copy recorded with that episode.
    (noise, played), = measured
    assert len(played) == sum(e["slot"] > 0 for e in episodes) == 6
    for eps, obs in played:
        episode, = [e for e in episodes if e["observation"] is obs]
        assert torch.equal(noise.apply_one(eps, obs).argmax(-1), episode["action"])
    assert len({float(eps.sum()) for eps, _ in played}) == 6
    with torch.no_grad():
        matches = [torch.equal(module(e["observation"]).argmax(-1), e["action"])
                   for e in episodes]
    # The greedy slot acts with the policy itself; the sampling slots with perturbed copies,
    # deterministically (no per-step sampling: with zero noise they would match the argmax).
    assert all(m for m, e in zip(matches, episodes) if e["slot"] == 0)
    assert not all(m for m, e in zip(matches, episodes) if e["slot"] > 0)
    still = EliteImitation(episodes=8, explore=0.0, greedy_share=0.25, param_noise=0.0)
    still.setup(module, ctx)
    episodes, _ = still._collect(ctx)
    with torch.no_grad():
        assert all(torch.equal(module(e["observation"]).argmax(-1), e["action"])
                   for e in episodes)


@pytest.mark.parametrize("discrete", [True, False])
def test_parameter_noise_adapts_to_the_measured_action_distance(discrete: bool):
    """Distance: the share of visited states where a perturbed copy's action differs (discrete),
    or the RMS difference of the pre-squash means (continuous); σ grows 5% below the target and
    shrinks 5% above it."""
    from types import SimpleNamespace

    from unitrain.envs import env_info

    torch.manual_seed(0)
    spec = ut.EnvSpec("CartPole-v1" if discrete else "Pendulum-v1")
    obs_dim, act_dim = (4, 2) if discrete else (3, 1)
    module = ut.MLPPolicy(obs_dim, act_dim, hidden=[8], activation="relu", out_scale=1.0)
    module.bind_env(env_info(spec))
    ctx = SimpleNamespace(device=torch.device("cpu"), world_size=1,
                          all_reduce_=lambda tensor, op="mean": tensor)
    noise = _SlotNoise(module, 0.5, torch.tensor([False, False]), torch.Generator())
    episodes = [(torch.randn(noise.layout.numel), torch.randn(n, obs_dim)) for n in (30, 20)]
    mismatches, squares = 0.0, 0.0
    for eps, obs in episodes:
        copy = ut.MLPPolicy(obs_dim, act_dim, hidden=[8], activation="relu", out_scale=1.0)
        torch.nn.utils.vector_to_parameters(noise.theta + 0.5 * eps, copy.parameters())
        with torch.no_grad():
            mine, theirs = module(obs), copy(obs)
        mismatches += float((mine.argmax(-1) != theirs.argmax(-1)).sum())
        squares += float(((module.actions.loc(mine) - module.actions.loc(theirs)) ** 2).sum())
    expected = mismatches / 50 if discrete else math.sqrt(squares / 50)
    assert expected > 0
    for target, sigma in ((expected * 1.1, 0.5 * 1.05), (expected * 0.9, 0.5 / 1.05)):
        rule = EliteImitation(param_noise=0.5, param_noise_target=target)
        rule.module, rule._sigma = module, 0.5
        rule._adapt_noise(noise, episodes, ctx)
        assert rule._distance == pytest.approx(expected)
        assert rule._sigma == pytest.approx(sigma)
    fixed = EliteImitation(param_noise=0.5)
    fixed.module, fixed._sigma = module, 0.5
    fixed._adapt_noise(noise, episodes, ctx)
    assert fixed._distance == pytest.approx(expected) and fixed._sigma == 0.5


def test_step_size_moves_part_of_the_way_to_the_consensus():
    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 4), torch.randint(0, 2, (64,))
    full = TinyPolicy(4, 2, hidden=8, activation="relu")
    half = TinyPolicy(4, 2, hidden=8, activation="relu")
    half.load_state_dict(full.state_dict())
    start = {k: v.clone() for k, v in full.state_dict().items()}
    for module, step in ((full, 1.0), (half, 0.5)):
        rule = Projection(iterations=10, step_size=step)
        rule.attach(module)
        rule.fit([(inputs, labels)], _plain_ctx())
    for key, value in half.state_dict().items():
        torch.testing.assert_close(value, (start[key] + full.state_dict()[key]) / 2)


def test_standardize_makes_the_fit_invariant_to_input_scaling():
    torch.manual_seed(0)
    inputs, labels = torch.randn(64, 4), torch.randint(0, 2, (64,))
    scale, shift = torch.tensor([1.0, 10.0, 0.1, 3.0]), torch.tensor([0.0, 5.0, -1.0, 2.0])
    raw = TinyPolicy(4, 2, hidden=8, activation="relu")
    moved = TinyPolicy(4, 2, hidden=8, activation="relu")
    moved.load_state_dict(raw.state_dict())
    with torch.no_grad():  # the same function of ``inputs * scale + shift``
        first = moved.net[0]
        first.weight.div_(scale)
        first.bias.sub_(first.weight @ shift)
    torch.testing.assert_close(moved(inputs * scale + shift), raw(inputs))
    for module, x in ((raw, inputs), (moved, inputs * scale + shift)):
        rule = Projection(iterations=10, standardize=True, output="margin")
        rule.attach(module)
        metrics = rule.fit([(x, labels)], _plain_ctx())
        assert metrics["train/param_change"] > 0 and 0 <= metrics["train/dead_units"] <= 1
    torch.testing.assert_close(moved(inputs * scale + shift), raw(inputs), rtol=1e-4, atol=1e-4)


def test_window_fits_the_elites_of_several_iterations():
    spec = ut.EnvSpec("CartPole-v1", num_envs=4)
    rule = EliteImitation(fit=Projection(iterations=2), episodes=4, elite_fraction=0.5,
                          window=2, keep_elites=False, updates=1, batch_size=10_000)
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, hidden=8, activation="relu")
    ctx = _services(module, spec)
    rule.setup(module, ctx)
    sizes = []
    for _ in range(3):
        metrics = rule.step(ctx)
        sizes.append(sum(len(e["action"]) for e in rule._elites))
        assert len(rule._window) <= 2
    assert metrics["train/elite_pairs"] == sizes[-2] + sizes[-1]
    state = rule.state_dict()
    other = EliteImitation(window=2)
    other.load_state_dict(state)
    assert [len(w) for w in other._window] == [2, 2]


def test_class_labels_regressed_by_a_network_ending_in_a_pool():
    """Squared error on class labels: one-hot targets as wide as the network's output, whatever
    its last layer (here an average pool and a reshape)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 3), nn.ReLU(),
                        nn.AvgPool2d(2), nn.Flatten())
    # float64 inputs for a float32 network: the fit casts them like the solver does.
    inputs, labels = torch.randn(32, 16, dtype=torch.float64), torch.randint(0, 3, (32,))
    onehot = nn.functional.one_hot(labels, 3).float()
    with torch.no_grad():
        before = float(((net(inputs.float()) - onehot) ** 2).mean())
    rule = Projection(iterations=30, output="squared_error", lam=5.0)
    rule.attach(net)
    for _ in range(3):
        rule.fit([(inputs, labels)], _plain_ctx())
    with torch.no_grad():
        after = float(((net(inputs.float()) - onehot) ** 2).mean())
    assert after < 0.8 * before, (before, after)


def test_kept_elites_compete_with_new_episodes_for_a_fixed_number_of_places(monkeypatch):
    spec = ut.EnvSpec("CartPole-v1", num_envs=2)
    rule = EliteImitation(episodes=4, elite_fraction=0.5, keep_elites=True,
                          fit=Projection(iterations=2))
    torch.manual_seed(0)
    module = TinyPolicy(4, 2, hidden=8, activation="relu")
    ctx = _services(module, spec)
    rule.setup(module, ctx)

    def fake(returns):
        return [{"observation": torch.randn(5, 4), "action": torch.randint(0, 2, (5,)),
                 "return": r, "slot": i % 2} for i, r in enumerate(returns)], 20

    for returns in ([10.0, 40.0, 30.0, 20.0], [35.0, 5.0, 50.0, 15.0]):
        monkeypatch.setattr(rule, "_collect", lambda ctx, r=returns: fake(r))
        rule.step(ctx)
        # Two places (half of the 4 new episodes), whatever the number of kept elites.
        assert len(rule._elites) == 2
    assert sorted(e["return"] for e in rule._elites) == [40.0, 50.0]
