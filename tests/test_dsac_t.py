"""DSACTLoss against a direct computation of the DSAC-T formulas on a hand-sized batch."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torch.distributions import Normal
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import LossModule, SoftUpdate

from unitrain.rules.gradient.dsac_t_loss import DSACTLoss, make_dsac_t_networks

pytestmark = pytest.mark.filterwarnings("ignore:No target network updater")

GAMMA = 0.99
EPS = 0.1
MIN_STD = 1e-4
ALPHA = math.e
SHIFT = 0.2

ACTOR_W = [[0.5, -0.3], [0.2, 0.1]]
ACTOR_B = [0.1, -1.0]
CRITIC_W = ([[0.4, -0.2, 0.7], [0.1, 0.3, -0.2]], [[-0.3, 0.5, 0.6], [0.2, -0.1, 0.1]])
CRITIC_B = ([0.2, 0.0], [0.1, 0.5])


class LinearActor(nn.Module):
    """obs (2) -> (loc, raw_scale), one linear layer."""

    def __init__(self, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor(weight))
            self.lin.bias.copy_(torch.tensor(bias))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.lin(obs)
        return out[..., :1], out[..., 1:]


class LinearCritic(nn.Module):
    """(obs (2), action (1)) -> (mean, raw_std), one linear layer."""

    def __init__(self, weight: list[list[float]], bias: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor(weight))
            self.lin.bias.copy_(torch.tensor(bias))

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        out = self.lin(torch.cat([obs, action], -1))
        return out[..., :1], out[..., 1:]


def make_loss(**kwargs) -> DSACTLoss:
    critics = [LinearCritic(w, b) for w, b in zip(CRITIC_W, CRITIC_B)]
    return DSACTLoss(LinearActor(ACTOR_W, ACTOR_B), critics, **kwargs)


def make_batch() -> TensorDict:
    terminated = torch.tensor([[False], [False], [True]])
    return TensorDict({
        "observation": torch.tensor([[0.5, -1.0], [1.0, 0.2], [-0.4, 0.8]]),
        "action": torch.tensor([[0.3], [-0.7], [0.9]]),
        ("next", "observation"): torch.tensor([[0.1, 0.4], [-0.6, 1.2], [0.9, -0.3]]),
        ("next", "reward"): torch.tensor([[1.0], [-4.0], [2.0]]),
        ("next", "terminated"): terminated,
        ("next", "done"): terminated.clone(),
    }, [3])


# ---------------------------------------------------------------- the formulas, written out

def ref_policy(weight: Tensor, bias: Tensor, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    out = obs @ weight.T + bias
    loc, log_std = out[:, :1], out[:, 1:].clamp(-20.0, 0.5)
    pre_tanh = loc + log_std.exp() * noise
    action = torch.tanh(pre_tanh)
    log_prob = (Normal(loc, log_std.exp()).log_prob(pre_tanh) - torch.log(1 - action ** 2)).sum(-1)
    return action, log_prob


def ref_critic(weight: Tensor, bias: Tensor, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
    out = torch.cat([obs, action], -1) @ weight.T + bias
    return out[:, 0], torch.log1p(torch.exp(out[:, 1])) + MIN_STD


def ref_targets(batch: TensorDict, noise: Tensor, xi: Tensor) -> tuple[Tensor, Tensor]:
    """y_q and y_z with the initial (= target) weights."""
    next_obs = batch["next", "observation"]
    next_action, next_logp = ref_policy(torch.tensor(ACTOR_W), torch.tensor(ACTOR_B), next_obs,
                                        noise)
    q1, s1 = ref_critic(torch.tensor(CRITIC_W[0]), torch.tensor(CRITIC_B[0]), next_obs, next_action)
    q2, s2 = ref_critic(torch.tensor(CRITIC_W[1]), torch.tensor(CRITIC_B[1]), next_obs, next_action)
    first = q1 <= q2
    q_next = torch.where(first, q1, q2)
    z_next = q_next + xi.clamp(-3, 3) * torch.where(first, s1, s2)
    reward = batch["next", "reward"][:, 0]
    not_done = 1.0 - batch["next", "terminated"][:, 0].float()
    y_q = reward + GAMMA * not_done * (q_next - ALPHA * next_logp)
    y_z = reward + GAMMA * not_done * (z_next - ALPHA * next_logp)
    return y_q, y_z


def shift_online_weights(loss: DSACTLoss, shift: float) -> None:
    """Move the online networks away from their targets (no SoftUpdate involved)."""
    with torch.no_grad():
        for params in (loss.actor_network_params, loss.qvalue_network_params):
            for p in params.values(True, True):
                p.add_(shift)


def draws(seed: int, n: int) -> tuple[Tensor, Tensor]:
    torch.manual_seed(seed)
    return torch.randn(n, 1), torch.randn(n)


# ---------------------------------------------------------------- critic loss

def test_critic_loss_value_and_gradients_match_the_formulas() -> None:
    loss, batch = make_loss(), make_batch()
    shift_online_weights(loss, SHIFT)  # targets keep the initial weights
    torch.manual_seed(0)
    value, info = loss.critic_loss(batch)
    value.backward()

    noise, xi = draws(0, 3)
    y_q, y_z = ref_targets(batch, noise, xi)
    total = torch.zeros(())
    clipped_any, unclipped_any = False, False
    weights, biases, closed_form = [], [], []
    for i in range(2):
        w = (torch.tensor(CRITIC_W[i]) + SHIFT).requires_grad_()
        b = (torch.tensor(CRITIC_B[i]) + SHIFT).requires_grad_()
        q, s = ref_critic(w, b, batch["observation"], batch["action"])
        qd, sd = q.detach(), s.detach()
        omega = sd.mean()
        outside = (y_z - qd).abs() > 3 * omega
        clipped_any |= bool(outside.any())
        unclipped_any |= bool((~outside).any())
        y_b = qd + (y_z - qd).clamp(-3 * omega, 3 * omega)
        total = total + (omega ** 2 + EPS) * torch.mean(
            -(y_q - qd) / (sd ** 2 + EPS) * q - ((qd - y_b) ** 2 - sd ** 2) / (sd ** 3 + EPS) * s)
        weights.append(w)
        biases.append(b)
        raw = (torch.cat([batch["observation"], batch["action"]], -1) @ w.T + b)[:, 1].detach()
        closed_form.append(torch.stack([
            (omega ** 2 + EPS) * torch.mean(-(y_q - qd) / (sd ** 2 + EPS)),
            (omega ** 2 + EPS) * torch.mean(-((qd - y_b) ** 2 - sd ** 2) / (sd ** 3 + EPS)
                                            * torch.sigmoid(raw)),
        ]))
    assert clipped_any and unclipped_any, "the batch should exercise both sides of the clip"
    total.backward()

    torch.testing.assert_close(value, total)
    torch.testing.assert_close(info["target_value"], y_q)
    torch.testing.assert_close(info["target_sample"], y_z)
    params = loss.qvalue_network_params
    for i in range(2):
        torch.testing.assert_close(params["lin", "weight"].grad[i], weights[i].grad)
        torch.testing.assert_close(params["lin", "bias"].grad[i], biases[i].grad)
        torch.testing.assert_close(params["lin", "bias"].grad[i], closed_form[i])


def test_critic_loss_leaves_actor_gradients_at_zero() -> None:
    loss = make_loss()
    loss.critic_loss(make_batch())[0].backward()
    assert loss.qvalue_network_params["lin", "weight"].grad.abs().sum() > 0
    for p in loss.actor_network_params.values(True, True):
        assert p.grad is None or not p.grad.any()
    assert loss.log_alpha.grad is None


# ---------------------------------------------------------------- actor and temperature

def test_actor_loss_value_and_gradients_match_the_formulas() -> None:
    loss, batch = make_loss(), make_batch()
    shift_online_weights(loss, SHIFT)  # the actor loss must use the online networks
    torch.manual_seed(1)
    value, info = loss.actor_loss(batch)
    value.backward()

    noise, _ = draws(1, 3)
    w = (torch.tensor(ACTOR_W) + SHIFT).requires_grad_()
    b = (torch.tensor(ACTOR_B) + SHIFT).requires_grad_()
    action, logp = ref_policy(w, b, batch["observation"], noise)
    q1, q2 = (ref_critic(torch.tensor(CRITIC_W[i]) + SHIFT, torch.tensor(CRITIC_B[i]) + SHIFT,
                         batch["observation"], action)[0] for i in range(2))
    expected = torch.mean(ALPHA * logp - torch.minimum(q1, q2))
    expected.backward()

    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(info["log_prob"], logp.detach())
    torch.testing.assert_close(loss.actor_network_params["lin", "weight"].grad, w.grad)
    torch.testing.assert_close(loss.actor_network_params["lin", "bias"].grad, b.grad)


def test_actor_loss_leaves_critic_gradients_at_zero() -> None:
    loss = make_loss()
    loss.actor_loss(make_batch())[0].backward()
    assert loss.actor_network_params["lin", "weight"].grad.abs().sum() > 0
    for p in loss.qvalue_network_params.values(True, True):
        assert p.grad is None or not p.grad.any()
    assert loss.log_alpha.grad is None


def test_alpha_loss_value_and_direction() -> None:
    loss = make_loss()
    with pytest.raises(RuntimeError, match="target_entropy"):
        loss.alpha_loss(torch.zeros(3))
    loss.actor_loss(make_batch())  # reveals |A| = 1, so the target entropy is -1

    log_prob = torch.tensor([0.5, 1.0, 3.0])
    value = loss.alpha_loss(log_prob)
    torch.testing.assert_close(value, -torch.tensor(1.0) * (log_prob - 1.0).mean())

    for log_prob, moves_up in ((torch.full((3,), -3.0), False), (torch.full((3,), 4.0), True)):
        loss.log_alpha.grad = None
        before = loss.log_alpha.item()
        loss.alpha_loss(log_prob).backward()
        with torch.no_grad():
            loss.log_alpha -= 0.1 * loss.log_alpha.grad
        # Entropy above the target (-log_prob > -1) lowers alpha; below it raises alpha.
        assert (loss.log_alpha.item() > before) == moves_up


# ---------------------------------------------------------------- omega and target clipping

def test_omega_is_a_moving_average_of_the_batch_std() -> None:
    loss, batch = make_loss(tau_b=0.2), make_batch()
    assert not loss.omega_initialized

    def batch_std(obs: Tensor) -> Tensor:
        return torch.stack([ref_critic(torch.tensor(CRITIC_W[i]), torch.tensor(CRITIC_B[i]), obs,
                                       batch["action"])[1].mean() for i in range(2)])

    loss.critic_loss(batch)
    first = batch_std(batch["observation"])
    torch.testing.assert_close(loss.omega, first)

    shifted = batch.clone()
    shifted["observation"] = batch["observation"] * 3.0 + 1.0
    loss.critic_loss(shifted)
    expected = 0.8 * first + 0.2 * batch_std(shifted["observation"])
    torch.testing.assert_close(loss.omega, expected)

    loss.eval()
    loss.critic_loss(batch)
    torch.testing.assert_close(loss.omega, expected)


def test_target_sample_is_clipped_at_three_omega() -> None:
    # Both critics predict Q = 0. The first's sigma is softplus(0) everywhere; the second's raw
    # sigma is 1 + action, so its sigma differs from sample to sample and its omega (the batch
    # mean of sigma) differs from each sample's sigma: the clip must use omega, per critic.
    first = LinearCritic([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [0.0, 0.0])
    second = LinearCritic([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]], [0.0, 1.0])
    loss = DSACTLoss(LinearActor(ACTOR_W, ACTOR_B), [first, second])
    batch = make_batch()
    batch["next", "terminated"] = torch.ones(3, 1, dtype=torch.bool)
    rewards = [1.0, 3.0, -5.0]
    batch["next", "reward"] = torch.tensor(rewards).unsqueeze(-1)
    _, info = loss.critic_loss(batch)

    def sigma(raw: float) -> float:
        return math.log1p(math.exp(raw)) + MIN_STD

    actions = [row[0] for row in batch["action"].tolist()]
    omega = [sigma(0.0), sum(sigma(1.0 + a) for a in actions) / 3]  # 0.693..., 1.478...
    torch.testing.assert_close(loss.omega, torch.tensor(omega))
    torch.testing.assert_close(info["omega"], torch.tensor(omega))
    # y_z = r (terminal); y_b = Q + clamp(y_z - Q, -3 omega, 3 omega) with Q = 0: the first
    # critic (bound 2.08) keeps 1 and clips 3 and -5, the second (bound 4.44) keeps 1 and 3 and
    # clips -5 (a per-sample bound, 3 sigma, would clip 3 at 2.56 and keep -5 under 6.11).
    expected = torch.tensor([[max(-3 * w, min(3 * w, r)) for r in rewards] for w in omega])
    torch.testing.assert_close(info["target_sample"], torch.tensor(rewards))
    torch.testing.assert_close(info["target_sample_clipped"], expected)


# ---------------------------------------------------------------- target networks

def test_target_parameters_move_only_on_soft_update() -> None:
    loss = make_loss()
    updater = SoftUpdate(loss, tau=0.25)
    targets = [loss.target_actor_network_params, loss.target_qvalue_network_params]
    before = [t.clone() for t in targets]

    optimiser = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        out = loss(make_batch())
        (out["loss_qvalue"] + out["loss_actor"] + out["loss_alpha"]).backward()
        optimiser.step()
    for target, old in zip(targets, before):
        assert (target == old).all()
    sources = [loss.actor_network_params, loss.qvalue_network_params]
    assert not (sources[0] == before[0]).all() and not (sources[1] == before[1]).all()

    updater.step()
    for target, old, source in zip(targets, before, sources):
        for key, value in target.items(True, True):
            torch.testing.assert_close(value, old[key] + 0.25 * (source[key].detach() - old[key]))


# ---------------------------------------------------------------- module plumbing

def test_forward_outputs_and_priority() -> None:
    loss, reference, batch = make_loss(), make_loss(), make_batch()
    torch.manual_seed(2)
    out = loss(batch)
    assert set(out.keys()) == set(loss.out_keys)
    assert all(v.shape == () for v in out.values())
    torch.manual_seed(2)
    critic_value, critic_info = reference.critic_loss(make_batch())
    actor_value, _ = reference.actor_loss(make_batch())
    torch.testing.assert_close(out["loss_qvalue"], critic_value)
    torch.testing.assert_close(out["loss_actor"], actor_value)
    torch.testing.assert_close(batch["td_error"], critic_info["td_error"])
    torch.testing.assert_close(out["alpha"], torch.tensor(ALPHA))


def test_state_dict_round_trip_keeps_omega_and_log_alpha() -> None:
    loss = make_loss()
    optimiser = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(3):
        optimiser.zero_grad()
        out = loss(make_batch())
        (out["loss_qvalue"] + out["loss_actor"] + out["loss_alpha"]).backward()
        optimiser.step()

    zero = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    fresh = DSACTLoss(LinearActor([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0]),
                      [LinearCritic(zero, [0.0, 0.0]), LinearCritic(zero, [0.0, 0.0])])
    assert not torch.equal(fresh.omega, loss.omega)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(fresh.omega, loss.omega)
    assert bool(fresh.omega_initialized)
    torch.testing.assert_close(fresh.log_alpha, loss.log_alpha)
    assert fresh.log_alpha.item() != 1.0
    torch.manual_seed(5)
    a = loss(make_batch())
    torch.manual_seed(5)
    b = fresh(make_batch())
    torch.testing.assert_close(a, b)


def test_tensordict_actor_matches_plain_actor() -> None:
    class LocScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.actor = LinearActor(ACTOR_W, ACTOR_B)

        def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
            loc, raw_scale = self.actor(obs)
            return loc, raw_scale.clamp(-20.0, 0.5).exp()

    td_actor = ProbabilisticActor(
        TensorDictModule(LocScale(), in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"], distribution_class=TanhNormal)
    critics = [LinearCritic(w, b) for w, b in zip(CRITIC_W, CRITIC_B)]
    td_loss, plain_loss = DSACTLoss(td_actor, critics), make_loss()
    torch.manual_seed(3)
    td_out = td_loss(make_batch())
    torch.manual_seed(3)
    plain_out = plain_loss(make_batch())
    torch.testing.assert_close(td_out, plain_out)


def test_set_keys_dtype_and_module_type() -> None:
    loss = make_loss().double()
    assert isinstance(loss, LossModule)
    loss.set_keys(observation="obs")
    batch = make_batch().apply(lambda x: x.double() if x.is_floating_point() else x)
    batch.rename_key_("observation", "obs")
    batch.rename_key_(("next", "observation"), ("next", "obs"))
    out = loss(batch)
    assert out["loss_qvalue"].dtype == torch.float64
    assert loss.omega.dtype == torch.float64
    assert "obs" in loss.in_keys and ("next", "obs") in loss.in_keys


def test_default_networks_follow_the_paper() -> None:
    actor, critics = make_dsac_t_networks(5, 3)
    assert len(critics) == 2 and critics[0] is not critics[1]
    for net in (actor, *critics):
        linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
        assert [m.out_features for m in linears[:-1]] == [256, 256, 256]
        assert sum(isinstance(m, nn.GELU) for m in net.modules()) == 3
    loc, raw_scale = actor(torch.zeros(4, 5))
    assert loc.shape == raw_scale.shape == (4, 3)
    mean, raw_std = critics[0](torch.zeros(4, 5), torch.zeros(4, 3))
    assert mean.shape == raw_std.shape == (4, 1)
    with pytest.raises(TypeError):
        DSACTLoss(actor, critics[0])


# ---------------------------------------------------------------- learning

@pytest.fixture
def single_thread():
    """Tiny tensors gain nothing from intra-op threads, and a busy machine makes them costly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_delayed_updates_learn_a_one_step_bandit(single_thread: None) -> None:
    torch.manual_seed(0)
    actor, critics = make_dsac_t_networks(1, 1, hidden=(32, 32))
    loss = DSACTLoss(actor, critics, alpha_init=0.1)
    updater = SoftUpdate(loss, tau=0.005)
    n = 64
    action = torch.rand(n, 1) * 2 - 1
    reward = 1.0 - 4.0 * (action - 0.3) ** 2
    done = torch.ones(n, 1, dtype=torch.bool)
    batch = TensorDict({"observation": torch.zeros(n, 1), "action": action,
                        ("next", "observation"): torch.zeros(n, 1), ("next", "reward"): reward,
                        ("next", "terminated"): done, ("next", "done"): done}, [n])
    critic_opt = torch.optim.Adam(list(loss.qvalue_network_params.values(True, True)), lr=3e-3)
    actor_opt = torch.optim.Adam(list(loss.actor_network_params.values(True, True)), lr=3e-3)
    alpha_opt = torch.optim.Adam([loss.log_alpha], lr=3e-3)

    def critic_state() -> tuple[float, float]:
        value, info = loss.critic_loss(batch)
        return float(((info["pred_value"] - reward[:, 0]) ** 2).mean()), abs(value.item())

    def greedy_action() -> float:
        with torch.no_grad():
            return torch.tanh(actor(torch.zeros(1, 1))[0]).item()

    start_error, start_loss = critic_state()
    start_action = greedy_action()
    for step in range(300):
        critic_opt.zero_grad()
        loss.critic_loss(batch)[0].backward()
        critic_opt.step()
        if step % 2 == 0:
            actor_opt.zero_grad()
            alpha_opt.zero_grad()
            actor_value, info = loss.actor_loss(batch)
            (actor_value + loss.alpha_loss(info["log_prob"])).backward()
            actor_opt.step()
            alpha_opt.step()
            updater.step()
    end_error, end_loss = critic_state()
    # The surrogate (5) vanishes where Q = y_q and sigma = |Q - y_b|, so its magnitude falls too.
    assert end_error < 0.01 * start_error
    assert end_loss < 0.1 * start_loss
    assert abs(greedy_action() - 0.3) < min(0.1, abs(start_action - 0.3))
