"""Recurrent modules: the state contract and its errors, the state reset where an episode starts,
PPO's segments (time order, recomputed outputs equal to the collection's), population rules,
devices 1 vs 2 and exact resume, the refusals of the rules that train feed-forward modules only,
and a quick learning check on the memory task."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

import unitrain as ut
from unitrain.envs.batched import make_env
from unitrain.envs.info import env_info
from unitrain.envs.rollout import rollout
from unitrain.errors import ConfigError, UserError
from unitrain.optim import registered_rules
from unitrain.policy.nn import GRUCell
from unitrain.rules.gradient.recurrent import IS_INIT, STATE, segments
from unitrain.rules.population.service import ParamLayout, PopulationPolicy
from unitrain.run.services import RunServices
from unitrain.testing import check_rule

NOVEL = "unitrain/CartPoleNoVel-v1"
SMALL_GRU = functools.partial(ut.GRUPolicy, encoder=(8,), hidden=8, out_scale=1.0)


def _info(env_id: str = "CartPole-v1"):
    return env_info(ut.EnvSpec(env_id))


class TupleWithoutState(ut.RLModule):
    """A GRU that passes its hidden state in and out but declares no initial state."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, observation, state=None):
        y, h = self.gru(observation[:, None], state)
        return self.head(y[:, 0]), h


class Counter(ut.RLModule):
    """Its state counts the steps since the episode started; it logs every state it acts from
    and always pushes right (discrete) so that episodes are short."""

    def __init__(self, obs_dim: int = 4, act_dim: int = 2) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 1.0]))
        self.seen: list[torch.Tensor] = []

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, 1)

    def forward(self, observation, state):
        self.seen.append(state[:, 0].clone())
        return self.bias.expand(observation.shape[0], 2), state + 1


# ------------------------------------------------------------------ the contract's errors

def test_a_tuple_without_initial_state_is_one_line():
    with pytest.raises(ConfigError, match=r"TupleWithoutState.forward returns a tuple of 2; a "
                                          r"recurrent module declares initial_state"):
        TupleWithoutState().bind_env(_info())


def test_a_state_of_another_shape_is_one_line():
    class Shrinks(Counter):
        def forward(self, observation, state):
            return self.bias.expand(observation.shape[0], 2), state[:, :0]

    with pytest.raises(ConfigError, match=r"must return a state like its initial_state"):
        Shrinks().bind_env(_info())


def test_a_forward_without_a_state_out_is_one_line():
    class Forgets(Counter):
        def forward(self, observation, state):
            return self.bias.expand(observation.shape[0], 2)

    with pytest.raises(ConfigError, match=r"must return \(output, state\), got a Tensor"):
        Forgets().bind_env(_info())


def test_a_trained_initial_state_is_refused():
    class Learned(Counter):
        def __init__(self) -> None:
            super().__init__()
            self.h0 = nn.Parameter(torch.zeros(1))

        def initial_state(self, batch):
            return self.h0.expand(batch, 1)

    with pytest.raises(ConfigError, match=r"initial_state must be a constant"):
        Learned().bind_env(_info())


def test_act_takes_and_returns_the_state():
    module = SMALL_GRU(4, 2)
    module.bind_env(_info())
    obs = torch.randn(3, 4)
    action, state = module.act(obs)
    again, state2 = module.act(obs, state=module.initial_state(3))
    assert torch.equal(action, again) and torch.equal(state, state2)
    _, later = module.act(obs, state=state)
    assert not torch.equal(later, state)
    feedforward = ut.MLPPolicy(4, 2)
    feedforward.bind_env(_info())
    with pytest.raises(UserError, match="feed-forward"):
        feedforward.act(obs, state=state)
    # A state passed by position (where the mask goes) is refused in one line.
    with pytest.raises(UserError, match="state is passed as state="):
        module.act(obs, state)


# ------------------------------------------------------------------ reset where episodes start

def test_rollout_resets_each_slot_where_its_episode_ends():
    module = Counter()
    module.bind_env(_info())
    module.seen.clear()
    env = make_env(ut.EnvSpec("CartPole-v1"), 0, num_envs=2)
    played = rollout(env, lambda obs, _, st: module.act(obs, state=st), quota=[2, 3], seeds=[1, 2],
                     state=module.initial_state(2))
    seen = torch.stack(module.seen)  # [steps, slots]: the state each step acted from
    for slot in range(2):
        lengths = played.lengths[played.slots == slot].tolist()
        expected = torch.cat([torch.arange(n, dtype=torch.float32) for n in lengths])
        # The hand count: 0, 1, ..., n-1 in each episode, back to 0 where the next one starts.
        assert torch.equal(seen[: len(expected), slot], expected), (slot, lengths)


def test_population_policy_steps_like_module_act():
    module = SMALL_GRU(4, 2)
    module.bind_env(_info())
    layout = ParamLayout.of(module)
    policy = PopulationPolicy(module, layout)
    flat = layout.flatten(module)
    noise = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0))
    params = torch.stack([flat, flat + 0.3 * noise])
    obs = torch.randn(5, 2, 3, 4)  # steps, individuals, slots
    # Individual i's actions equal module.act run step by step with its parameters.
    for i in range(2):
        layout.assign(module, params[i])
        st = module.initial_state(3)
        pop_state = policy.initial_state(2, 3)
        for t in range(5):
            mine, st = module.act(obs[t, i], state=st)
            theirs, pop_state = policy(params, obs[t], state=pop_state)
            assert torch.equal(theirs[i], mine)
            torch.testing.assert_close(pop_state[i], st)


# ------------------------------------------------------------------ PPO on segments

def _ppo_batch(module: ut.RLModule, **kwargs):
    spec = ut.EnvSpec(NOVEL, num_envs=4)
    services = RunServices(module, spec, 0, 10_000)
    services.start(0, 1)
    rule = ut.optim.PPO(frames_per_batch=256, **kwargs)
    rule.setup(module, services)
    return rule, rule.data.next(services)


def test_segments_keep_time_order_and_recompute_the_collection():
    torch.manual_seed(0)
    module = SMALL_GRU(2, 2)
    rule, batch = _ppo_batch(module, sequence_length=16)
    assert batch.batch_size == (4, 64)
    done = batch["next", "done"][..., 0]
    starts = batch[IS_INIT][..., 0]
    # An episode starts at the first step and right after every done, nowhere else.
    assert starts[:, 0].all() and torch.equal(starts[:, 1:], done[:, :-1])
    segs = segments(batch, 16)
    assert segs.batch_size == (16, 16)
    for env in range(4):
        for j in range(4):  # segment env * 4 + j holds steps 16 j .. 16 j + 15 of that env
            assert torch.equal(segs["observation"][env * 4 + j],
                               batch["observation"][env, 16 * j: 16 * (j + 1)])
    # The stored state is the state each step acted from: after one step it is the next one.
    state = batch[STATE, "0"]
    nxt = batch["next_recurrent_state", "0"]
    assert torch.equal(torch.where(starts[:, 1:, None], 0.0, nxt[:, :-1]), state[:, 1:])
    # Recomputed from each segment's stored start state, the log-probabilities are the
    # collection's: the first epoch's PPO ratio is 1.
    with torch.no_grad():
        dist = rule.data.actor.get_dist(segs)
        recomputed = dist.log_prob(segs["action"])
    torch.testing.assert_close(recomputed, segs["action_log_prob"], rtol=0, atol=1e-5)
    ratio = (recomputed - segs["action_log_prob"]).exp()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    # A shuffled minibatch of whole segments recomputes the same (no leak across segments).
    pick = torch.tensor([5, 0, 11])
    with torch.no_grad():
        part = rule.data.actor.get_dist(segs[pick]).log_prob(segs[pick]["action"])
    torch.testing.assert_close(part, recomputed[pick], rtol=0, atol=1e-5)


def test_a_sequence_length_that_does_not_divide_the_steps_is_one_line(tmp_path: Path):
    trainer = ut.Trainer(ut.EnvSpec(NOVEL, num_envs=4),
                         ut.optim.PPO(frames_per_batch=256, sequence_length=48), max_frames=256,
                         run_dir=tmp_path, enable_progress_bar=False)
    with pytest.raises(ConfigError, match=r"optimizer.sequence_length.*must divide the steps per "
                                          r"env of a batch .* = 64\); got 48"):
        trainer.fit(SMALL_GRU(2, 2))


# ------------------------------------------------------------------ devices and resume

@pytest.mark.parametrize("name,kwargs,frames", [
    ("ppo", dict(lr=1e-3, frames_per_batch=128, minibatch_size=64, epochs=2,
                 sequence_length=16), 512),
    ("es", dict(population=8, sigma=0.1, lr=0.05, max_episode_steps=60), 1200),
])
def test_recurrent_rules_resume_exactly_and_agree_across_devices(name, kwargs, frames,
                                                                 tmp_path: Path):
    report = check_rule(registered_rules()[name](**kwargs), ut.EnvSpec(NOVEL, num_envs=4),
                        frames=frames, module=SMALL_GRU, run_dir=tmp_path, eval_episodes=2,
                        devices=2)
    assert list(report.checks) == ["keys", "contract", "determinism", "resume", "ranks"]


def test_reinforce_trains_a_recurrent_module(tmp_path: Path):
    report = check_rule(ut.optim.REINFORCE(frames_per_batch=128), ut.EnvSpec(NOVEL, num_envs=4),
                        frames=512, module=SMALL_GRU, run_dir=tmp_path, eval_episodes=2)
    assert list(report.checks) == ["keys", "contract", "determinism", "resume"]


# ------------------------------------------------------------------ refusals

REFUSED = {
    "sac": "sac trains feed-forward modules only (its replay memory keeps single transitions",
    "td3": "td3 trains feed-forward modules only (its replay memory",
    "ddpg": "ddpg trains feed-forward modules only (its replay memory",
    "dsac_t": "dsac_t trains feed-forward modules only (its replay memory",
    "cem_rl": "cem_rl trains feed-forward modules only (its replay memory",
    "dqn": "dqn trains feed-forward modules only (its replay memory keeps single transitions, "
           "without recurrent states, and its Q-values are of one observation); GRUPolicy is "
           "recurrent (initial_state); train it with ppo, reinforce or a population rule",
    "elite_imitation": "elite_imitation trains feed-forward modules only (the solver projects "
                       "onto the graphs of feed-forward layers; gru (GRUCell) is recurrent)",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_rules_for_feed_forward_modules_refuse_a_recurrent_one(name: str, tmp_path: Path):
    env = "CartPole-v1" if name in ("elite_imitation", "dqn") else "Pendulum-v1"
    trainer = ut.Trainer(ut.EnvSpec(env, num_envs=2), registered_rules()[name](), max_frames=8,
                         run_dir=tmp_path, enable_progress_bar=False)
    info = _info(env)
    with pytest.raises(ConfigError) as e:
        trainer.fit(SMALL_GRU(info.obs_dim, info.act_dim))
    assert str(e.value).startswith("optimizer: " + REFUSED[name]), str(e.value)
    assert "\n" not in str(e.value)


def test_the_projection_rule_names_the_recurrent_layer():
    rule = registered_rules()["projection"]()
    with pytest.raises(ConfigError, match=r"projection trains feed-forward modules only .*; "
                                          r"gru \(GRU\) is recurrent"):
        rule.check_module(_GRUInside())


class _GRUInside(ut.RLModule):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 8)

    def initial_state(self, batch):
        return torch.zeros(batch, 8)

    def forward(self, observation, state):
        return observation, state


# ------------------------------------------------------------------ learning

def test_ppo_with_a_gru_learns_the_memory_task(tmp_path: Path):
    # A seeded short run on CartPole without velocities (the recipe's settings, fewer frames).
    rule = ut.optim.PPO(lr=2e-3, frames_per_batch=512, minibatch_size=256, epochs=4, gamma=0.99,
                        gae_lambda=0.95, sequence_length=16)
    trainer = ut.Trainer(ut.EnvSpec(NOVEL, num_envs=8), rule, max_frames=30_000,
                         eval_episodes=8, run_dir=tmp_path, enable_progress_bar=False, seed=0)
    trainer.fit(ut.GRUPolicy(2, 2, encoder=(32,), hidden=32, out_scale=1.0))
    assert trainer.summary["eval/return_mean"] > 150.0


# ------------------------------------------------------------------ evaluate, video, export

def test_evaluate_films_and_refuses_export_of_a_recurrent_run(capsys, tmp_path: Path):
    import json

    from unitrain.app.cli import main

    run = tmp_path / "run"
    assert main(["fit", "cartpole_novel/cem_gru", f"run_dir={run}", "trainer.max_frames=600",
                 "optimizer.population=4", "optimizer.max_episode_steps=40"]) == 0
    capsys.readouterr()
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["evaluate", ckpt, "--episodes", "2", "--video", str(tmp_path / "a.gif"),
                 "--video-episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    # The filmed episodes are the evaluation's: the state is carried and reset the same way.
    assert sum(result["video"]["returns"]) / 2 == pytest.approx(result["eval/return_mean"])
    assert main(["export", ckpt, "--out", str(tmp_path / "p.pt2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unitrain: error: export: GRUPolicy is recurrent (initial_state)")


# ------------------------------------------------------------------ named entries and masks

class PhaseGRU(ut.RLModule):
    """A GRU over TrapDict's ``phase`` entry: the entry by name, the state by keyword."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.hidden = hidden
        self.cell = GRUCell(4, hidden)
        self.head = nn.Linear(hidden, 4)

    def initial_state(self, batch: int) -> torch.Tensor:
        return torch.zeros(batch, self.hidden)

    def forward(self, phase: torch.Tensor, state: torch.Tensor):
        h = self.cell(phase, state)
        return self.head(h), h


def test_act_steps_a_named_observation_with_its_mask_and_state():
    from tensordict import TensorDict

    module = PhaseGRU()
    module.bind_env(env_info(ut.EnvSpec("userenvs:TrapDict-v0")))
    obs = TensorDict(phase=torch.eye(4), batch_size=[4])
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    action, state = module.act(obs, mask)
    # By hand: the module's forward on the entry by name, then the argmax over allowed actions.
    out, h = module(phase=torch.eye(4), state=torch.zeros(4, 16))
    assert torch.equal(state, h)
    assert torch.equal(action, out.masked_fill(~mask, float("-inf")).argmax(-1))
    assert bool(mask[torch.arange(4), action].all())
    again, later = module.act(dict(obs.items()), mask, state=state)
    _, h2 = module(phase=torch.eye(4), state=h)
    assert torch.equal(later, h2)


@pytest.mark.parametrize("rule,frames", [
    (ut.optim.PPO(lr=3e-3, frames_per_batch=256, minibatch_size=64, epochs=4, anneal_lr=False,
                  sequence_length=16), 6000),
    (ut.optim.CEM(population=16), 8000)], ids=["ppo", "cem"])
def test_a_recurrent_module_learns_a_dict_env_with_its_mask(rule, frames, tmp_path: Path):
    import userenvs

    userenvs.Trap.masked_taken = 0
    torch.manual_seed(0)
    trainer = ut.Trainer(ut.EnvSpec("userenvs:TrapDict-v0", num_envs=4, obs_norm=True), rule,
                         max_frames=frames, run_dir=tmp_path, logger=False,
                         enable_progress_bar=False, eval_episodes=8)
    trainer.fit(PhaseGRU())
    assert trainer.summary["eval/return_mean"] >= 30
    assert userenvs.Trap.masked_taken == 0
