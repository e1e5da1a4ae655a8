"""The Trainer's overhead: SAC and DSAC-T through ``unitrain.Trainer`` against a plain hand loop.

The hand loop is what a user would write with TorchRL alone: a ``GymEnv`` of ``num_envs``
gymnasium copies, a ``Collector`` (uniform random actions for the warm-up), a
``ReplayBuffer`` over a ``LazyTensorStorage``, and per collected batch ``utd_ratio`` updates of
the same loss (TorchRL's ``SACLoss``; ``unitrain.rules.gradient.dsac_t_loss.DSACTLoss`` with its delayed policy,
temperature and target updates), optimisers stepped and targets moved by ``SoftUpdate``. The
Trainer runs the shipped rule (``ut.optim.SAC`` / ``ut.optim.DSACT``) with the same env, networks
(2 x 64 actor and critics), batch, warm-up, frames per batch and update-to-data ratio.

Both are timed over the same post-warm-up iterations (collection, updates and, for the Trainer,
its logging and callbacks), one thread, back to back per repeat, on Pendulum-v1; the table gives
gradient updates per second of each and their ratio (Trainer / hand loop).

    python tools/bench_loop_overhead.py --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs import GymEnv
from torchrl.modules import MLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import SACLoss, SoftUpdate, ValueEstimators

import unitrain as ut
from unitrain.rules.gradient.dsac_t_loss import DSACTLoss

ENV, NUM_ENVS, FRAMES_PER_BATCH, WARMUP, BATCH, HIDDEN = "Pendulum-v1", 4, 64, 1024, 256, (64, 64)
LR = 1e-3


class Clock(L.Callback):
    """Times each iteration of a Trainer run with the rule's update count."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args) -> None:
        self.marks.append((time.perf_counter(), module._ctx.rule.loop.updates))


def rate(marks: list[tuple[float, int]]) -> float:
    """Updates per second from the first iteration after the warm-up to the last."""
    start = next(i for i, (_, updates) in enumerate(marks) if updates > 0)
    (t0, u0), (t1, u1) = marks[start], marks[-1]
    return (u1 - u0) / (t1 - t0)


def trainer_rate(rule_name: str, frames: int, root: Path) -> float:
    common = dict(lr_actor=LR, lr_critic=LR, batch_size=BATCH, buffer_size=frames,
                  warmup_frames=WARMUP, frames_per_batch=FRAMES_PER_BATCH, utd_ratio=1.0,
                  critic_hidden=HIDDEN)
    rule = (ut.optim.SAC(lr_alpha=LR, **common) if rule_name == "sac"
            else ut.optim.DSACT(lr_alpha=LR, alpha_init=1.0, **common))
    clock = Clock()
    trainer = ut.Trainer(env=ut.EnvSpec(ENV, num_envs=NUM_ENVS, backend="gymnasium"),
                         optimizer=rule, max_frames=frames, eval_every_frames=10 * frames,
                         eval_episodes=1, seed=0, num_threads=1, run_dir=root / rule_name,
                         callbacks=[clock], enable_progress_bar=False)
    trainer.fit(ut.MLPPolicy(3, 1, hidden=HIDDEN, activation="relu", action_std="state"))
    return rate(clock.marks)


def _critic() -> nn.Module:
    return MLP(in_features=4, out_features=1, num_cells=list(HIDDEN), activation_class=nn.ReLU)


class _Cat(nn.Module):
    def __init__(self, net: nn.Module, outputs: int = 1) -> None:
        super().__init__()
        self.net = net

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], -1))


class _DSACTActor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(in_features=3, out_features=2, num_cells=list(HIDDEN),
                       activation_class=nn.ReLU)

    def forward(self, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(observation).chunk(2, -1)
        return loc, raw


class _DSACTCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(in_features=4, out_features=2, num_cells=list(HIDDEN),
                       activation_class=nn.GELU)

    def forward(self, observation: torch.Tensor, action: torch.Tensor):
        out = self.net(torch.cat([observation, action], -1))
        return out[..., :1], out[..., 1:]


def hand_rate(rule_name: str, frames: int) -> float:
    torch.manual_seed(0)
    env = GymEnv(ENV, num_envs=NUM_ENVS)
    env.set_seed(0)
    scale = 2.0  # Pendulum's torque bound
    if rule_name == "sac":
        net = nn.Sequential(MLP(in_features=3, out_features=2, num_cells=list(HIDDEN),
                                activation_class=nn.ReLU), NormalParamExtractor())
        actor = ProbabilisticActor(
            TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
            in_keys=["loc", "scale"], distribution_class=TanhNormal,
            distribution_kwargs={"low": -scale, "high": scale}, return_log_prob=True,
            spec=env.action_spec)
        critics = [TensorDictModule(_Cat(_critic()), in_keys=["observation", "action"],
                                    out_keys=["state_action_value"]) for _ in range(2)]
        loss = SACLoss(actor, critics, num_qvalue_nets=2, loss_function="l2", alpha_init=1.0)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=0.99)
        policy = actor
        actor_params = list(loss.actor_network_params.values(True, True))
    else:
        dsac_actor = _DSACTActor()
        loss = DSACTLoss(dsac_actor, [_DSACTCritic(), _DSACTCritic()], gamma=0.99,
                         alpha_init=1.0)
        actor_params = list(dsac_actor.parameters())

        class _Policy(nn.Module):
            def forward(self, observation: torch.Tensor) -> torch.Tensor:
                loc, raw = dsac_actor(observation)
                return scale * torch.tanh(loc + raw.clamp(-20, 0.5).exp() * torch.randn_like(loc))

        policy = TensorDictModule(_Policy(), in_keys=["observation"], out_keys=["action"])
    updater = SoftUpdate(loss, tau=0.005)
    critic_opt = torch.optim.Adam(list(loss.qvalue_network_params.values(True, True)), lr=LR)
    actor_opt = torch.optim.Adam(actor_params, lr=LR)
    alpha_opt = torch.optim.Adam([loss.log_alpha], lr=LR)
    collector = Collector(env, policy, frames_per_batch=FRAMES_PER_BATCH,
                                  total_frames=frames, init_random_frames=WARMUP)
    buffer = ReplayBuffer(storage=LazyTensorStorage(frames), batch_size=BATCH)
    marks, updates = [], 0
    for batch in collector:
        batch = batch.reshape(-1)
        if rule_name == "dsac_t":  # DSACTLoss reads actions in [-1, 1]
            batch.set("action", batch.get("action") / scale)
        buffer.extend(batch)
        if len(buffer) >= WARMUP:
            for _ in range(batch.numel()):
                sample = buffer.sample()
                if rule_name == "sac":
                    out = loss(sample)
                    total = out["loss_qvalue"] + out["loss_actor"] + out["loss_alpha"]
                    opts = [critic_opt, actor_opt, alpha_opt]
                    delayed = True
                else:
                    delayed = updates % 2 == 0
                    total, _ = loss.critic_loss(sample)
                    opts = [critic_opt]
                    if delayed:
                        actor_loss, info = loss.actor_loss(sample)
                        total = total + actor_loss + loss.alpha_loss(info["log_prob"])
                        opts += [actor_opt, alpha_opt]
                for opt in opts:
                    opt.zero_grad()
                total.backward()
                for opt in opts:
                    opt.step()
                if delayed:
                    updater.step()
                updates += 1
        marks.append((time.perf_counter(), updates))
    collector.shutdown()
    return rate(marks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6144)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rule_name in ("sac", "dsac_t"):
            ours, hand = [], []
            for r in range(args.repeats):
                hand.append(hand_rate(rule_name, args.frames))
                ours.append(trainer_rate(rule_name, args.frames, Path(tmp) / str(r)))
                print(f"{rule_name} repeat {r}: hand loop {hand[-1]:.1f} updates/s, "
                      f"Trainer {ours[-1]:.1f} updates/s", flush=True)
            rows[rule_name] = (statistics.median(hand), statistics.median(ours))
    print(f"\n{'rule':<8} {'hand loop':>10} {'Trainer':>10} {'Trainer/hand':>13}   (updates/s, "
          f"median of {args.repeats}; {ENV}, {NUM_ENVS} envs, batch {BATCH}, 2 x 64 networks)")
    for rule_name, (hand, ours) in rows.items():
        print(f"{rule_name:<8} {hand:>10.1f} {ours:>10.1f} {ours / hand:>13.2f}")


if __name__ == "__main__":
    main()
