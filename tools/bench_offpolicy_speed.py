"""Off-policy update speed: unitrain's SAC, TD3, DDPG and DSAC-T against a plain PyTorch loop.

The plain loop is what one writes with ``torch.nn`` and ``torch.optim`` alone: the same
networks (an MLP actor, MLP critics of the same widths; two critics for SAC, TD3 and DSAC-T, one
for DDPG; GELU critics with a mean and a standard deviation for DSAC-T), a replay memory of
preallocated tensors indexed by one random index tensor, Adam, Polyak target updates, and each
rule's schedule (SAC: actor, temperature and targets every update; TD3 and DSAC-T: every second;
DDPG: every update). Two measures, one thread each:

- **steady state**: gradient updates per second on a memory of Pendulum-v1 transitions
  (4 envs, batch 256): for unitrain, the rule's own update (replay sampling, loss, optimizer
  steps, target update, per-update metrics) called after a short Trainer run has filled its
  memory; for the plain loop, its update on a memory of the same size. Both alternate in one
  process, ``--chunk`` updates at a time, so a drift in machine load hits both alike; the rate
  given is the median over chunks.
- **whole process** (``--whole``): wall time of ``unitrain fit pendulum/<rule>`` with the
  widths, batch and frame budget overridden, against this script's plain loop run as a process
  (``--plain RULE``: the same env, collection of 64 frames per iteration with the same warm-up,
  the same updates), start-up included; runs alternate.

    python tools/bench_offpolicy_speed.py                      # steady state, widths 64 and 256
    python tools/bench_offpolicy_speed.py --whole --frames 5000
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RULES = ("sac", "td3", "ddpg", "dsac_t")
OBS, ACT, NUM_ENVS, BATCH, FRAMES_PER_BATCH, WARMUP, LR = 3, 1, 4, 256, 64, 1000, 1e-3
GAMMA = {"sac": 0.99, "td3": 0.98, "ddpg": 0.98, "dsac_t": 0.99}  # as the pendulum recipes


# ------------------------------------------------------------------------------ plain loop
def mlp(inp: int, out: int, width: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, out))


class Plain:
    """One rule's networks, optimizers and update in plain PyTorch."""

    def __init__(self, rule: str, width: int) -> None:
        self.rule, self.gamma, self.tau, self.count = rule, GAMMA[rule], 0.005, 0
        stochastic = rule in ("sac", "dsac_t")
        self.actor = mlp(OBS, 2 * ACT if stochastic else ACT, width)
        outputs, act = (2, nn.GELU) if rule == "dsac_t" else (1, nn.ReLU)
        self.critics = nn.ModuleList(mlp(OBS + ACT, outputs, width, act)
                                     for _ in range(1 if rule == "ddpg" else 2))
        self.target_critics = [_frozen_copy(c) for c in self.critics]
        self.target_actor = _frozen_copy(self.actor) if rule != "sac" else None
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=LR)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=LR)
        self.log_alpha = torch.zeros((), requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=LR)
        self.omega = torch.ones(2)
        self.sources = list(self.critics.parameters()) + (
            list(self.actor.parameters()) if self.target_actor is not None else [])
        self.targets = [p for c in self.target_critics for p in c.parameters()] + (
            list(self.target_actor.parameters()) if self.target_actor is not None else [])

    def sample(self, actor: nn.Module, obs: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_std = actor(obs).chunk(2, -1)
        log_std = log_std.clamp(-20.0, 2.0 if self.rule == "sac" else 0.5)
        noise = torch.randn_like(loc)
        u = loc + log_std.exp() * noise
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)
        return torch.tanh(u), log_prob

    def q(self, critics, obs: Tensor, action: Tensor) -> list[Tensor]:
        x = torch.cat([obs, action], -1)
        return [c(x) for c in critics]

    def step(self, opt: torch.optim.Optimizer, loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def update(self, obs: Tensor, action: Tensor, reward: Tensor, next_obs: Tensor,
               terminated: Tensor) -> None:
        rule, alive = self.rule, (1.0 - terminated) * self.gamma
        delayed = rule in ("sac", "ddpg") or self.count % 2 == 0
        self.count += 1
        if rule == "dsac_t":
            self.update_dsac_t(obs, action, reward, next_obs, alive, delayed)
        else:
            with torch.no_grad():
                alpha = self.log_alpha.exp()
                if rule == "sac":
                    next_action, next_log_prob = self.sample(self.actor, next_obs)
                else:
                    next_action = torch.tanh(self.target_actor(next_obs))
                    if rule == "td3":
                        noise = (0.2 * torch.randn_like(next_action)).clamp(-0.5, 0.5)
                        next_action = (next_action + noise).clamp(-1.0, 1.0)
                next_q = torch.stack(self.q(self.target_critics, next_obs, next_action)).amin(0)
                if rule == "sac":
                    next_q = next_q - alpha * next_log_prob.unsqueeze(-1)
                target = reward + alive * next_q
            q = self.q(self.critics, obs, action)
            self.step(self.critic_opt, sum(F.mse_loss(qi, target) for qi in q))
            if delayed:
                if rule == "sac":
                    new_action, log_prob = self.sample(self.actor, obs)
                    min_q = torch.stack(self.q(self.critics, obs, new_action)).amin(0)
                    self.step(self.actor_opt, (alpha * log_prob - min_q.squeeze(-1)).mean())
                    self.step(self.alpha_opt,
                              -(self.log_alpha * (log_prob.detach() - ACT)).mean())
                else:
                    new_action = torch.tanh(self.actor(obs))
                    self.step(self.actor_opt, -self.q(self.critics[:1], obs, new_action)[0].mean())
        if delayed:
            with torch.no_grad():
                torch._foreach_lerp_(self.targets, self.sources, self.tau)

    def update_dsac_t(self, obs, action, reward, next_obs, alive, delayed) -> None:
        """The DSAC-T losses (Duan et al., arXiv:2310.05858, eqs. 1-5), written out."""
        with torch.no_grad():
            alpha = self.log_alpha.exp()
            next_action, next_log_prob = self.sample(self.target_actor, next_obs)
            outs = torch.stack(self.q(self.target_critics, next_obs, next_action))
            next_mean, next_std = outs[..., :1], F.softplus(outs[..., 1:]) + 1e-6
            chosen = next_mean.argmin(0, keepdim=True)
            next_q = next_mean.gather(0, chosen).squeeze(0)
            next_z = next_q + torch.randn_like(next_q).clamp(-3, 3) * next_std.gather(
                0, chosen).squeeze(0)
            bonus = alpha * next_log_prob.unsqueeze(-1)
            target_q = reward + alive * (next_q - bonus)
            target_z = reward + alive * (next_z - bonus)
        outs = torch.stack(self.q(self.critics, obs, action))
        mean, std = outs[..., :1], F.softplus(outs[..., 1:]) + 1e-6
        mean_sg, std_sg = mean.detach(), std.detach()
        self.omega.lerp_(std_sg.mean((1, 2)), self.tau)
        omega = self.omega.view(2, 1, 1)
        bound = 3 * omega
        target_b = mean_sg + torch.maximum(torch.minimum(target_z - mean_sg, bound), -bound)
        mean_term = -(target_q - mean_sg) / (std_sg.pow(2) + 0.1) * mean
        std_term = -((mean_sg - target_b).pow(2) - std_sg.pow(2)) / (std_sg.pow(3) + 0.1) * std
        loss = ((omega.pow(2) + 0.1) * (mean_term + std_term)).sum(0).mean()
        optimizers = [self.critic_opt]
        if delayed:
            new_action, log_prob = self.sample(self.actor, obs)
            x = torch.cat([obs, new_action], -1)
            min_q = torch.stack([c(x)[..., 0] for c in _detached(self.critics)]).amin(0)
            loss = loss + (alpha * log_prob - min_q).mean()
            loss = loss - (self.log_alpha * (log_prob.detach() - ACT)).mean()
            optimizers += [self.actor_opt, self.alpha_opt]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()


def _frozen_copy(net: nn.Module) -> nn.Module:
    import copy
    out = copy.deepcopy(net)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _detached(critics: nn.ModuleList) -> list:
    """The critics evaluated with detached parameters (the actor's gradient only)."""
    return [lambda x, c=c: torch.func.functional_call(
        c, {k: v.detach() for k, v in c.named_parameters()}, x) for c in critics]


class Memory:
    """Preallocated transition tensors, sampled with one index tensor."""

    def __init__(self, capacity: int) -> None:
        self.obs = torch.zeros(capacity, OBS)
        self.action = torch.zeros(capacity, ACT)
        self.reward = torch.zeros(capacity, 1)
        self.next_obs = torch.zeros(capacity, OBS)
        self.terminated = torch.zeros(capacity, 1)
        self.size, self.cursor, self.capacity = 0, 0, capacity

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        n = obs.shape[0]
        idx = (torch.arange(n) + self.cursor) % self.capacity
        self.obs[idx], self.action[idx], self.reward[idx] = obs, action, reward
        self.next_obs[idx], self.terminated[idx] = next_obs, terminated
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self) -> tuple[Tensor, ...]:
        idx = torch.randint(self.size, (BATCH,))
        return (self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx],
                self.terminated[idx])


def plain_run(rule: str, width: int, frames: int, seed: int = 0) -> float:
    """A whole plain training run on Pendulum-v1 (gymnasium vector env); returns updates/s."""
    import gymnasium as gym
    torch.manual_seed(seed)
    env = gym.vector.SyncVectorEnv([lambda: gym.make("Pendulum-v1")] * NUM_ENVS)
    obs, _ = env.reset(seed=seed)
    plain, memory = Plain(rule, width), Memory(frames)
    collected, updates, start = 0, 0, None
    while collected < frames:
        for _ in range(FRAMES_PER_BATCH // NUM_ENVS):
            o = torch.as_tensor(obs, dtype=torch.float32)
            with torch.no_grad():
                if collected < WARMUP:
                    a = torch.rand(NUM_ENVS, ACT) * 2 - 1
                elif rule in ("sac", "dsac_t"):
                    a = plain.sample(plain.actor, o)[0]
                else:
                    a = (torch.tanh(plain.actor(o)) + 0.1 * torch.randn(NUM_ENVS, ACT)).clamp(-1, 1)
            obs, reward, term, trunc, info = env.step(2.0 * a.numpy())
            next_o = torch.as_tensor(obs, dtype=torch.float32)
            final = info.get("final_obs", info.get("final_observation"))
            if final is not None:
                for i in range(NUM_ENVS):
                    if term[i] or trunc[i]:
                        next_o[i] = torch.as_tensor(final[i], dtype=torch.float32)
            memory.add(o, a, torch.as_tensor(reward, dtype=torch.float32).unsqueeze(-1), next_o,
                       torch.as_tensor(term, dtype=torch.float32).unsqueeze(-1))
            collected += NUM_ENVS
        if memory.size >= max(WARMUP, BATCH):
            start = start or time.perf_counter()
            for _ in range(FRAMES_PER_BATCH):
                plain.update(*memory.sample())
                updates += 1
    return updates / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ unitrain
def unitrain_rule(rule: str, width: int, buffer: int, compile: bool = False):
    import unitrain as ut
    common = dict(lr_actor=LR, lr_critic=LR, batch_size=BATCH, buffer_size=buffer,
                  warmup_frames=WARMUP, frames_per_batch=FRAMES_PER_BATCH, utd_ratio=1.0,
                  critic_hidden=(width, width), gamma=GAMMA[rule],
                  **({"compile": True} if compile else {}))
    if rule == "sac":
        return ut.optim.SAC(lr_alpha=LR, **common)
    if rule == "dsac_t":
        return ut.optim.DSACT(lr_alpha=LR, alpha_init=1.0, **common)
    return ut.optim.TD3(**common) if rule == "td3" else ut.optim.DDPG(**common)


def steady(rule: str, width: int, updates: int, chunk: int,
           compile: bool = False) -> tuple[float, float]:
    """Steady-state updates/s of the plain loop and of unitrain's rule, interleaved."""
    import lightning as L

    import unitrain as ut
    result: dict[str, float] = {}

    class Measure(L.Callback):
        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            rule_obj, ctx = module._ctx.rule, module._ctx.services
            loop = rule_obj.loop
            memory = Memory(len(loop.replay))
            rows = loop.replay.buffer.storage[: len(loop.replay)]
            memory.add(rows["observation"], rows["action"], rows["next", "reward"],
                       rows["next", "observation"], rows["next", "terminated"].float())
            plain = Plain(rule, width)

            def ours() -> None:
                for _ in range(chunk):
                    # One update as OffPolicyLoop.step makes it (works on older versions too).
                    rule_obj._update(loop.replay.sample(), ctx)
                    loop.updates += 1

            def theirs() -> None:
                for _ in range(chunk):
                    plain.update(*memory.sample())

            rates: dict[str, list[float]] = {"plain": [], "unitrain": []}
            ours(), theirs()  # warm up both (and compile, with --compile)
            for _ in range(max(1, updates // chunk)):
                for name, fn in (("plain", theirs), ("unitrain", ours)):
                    t = time.perf_counter()
                    fn()
                    rates[name].append(chunk / (time.perf_counter() - t))
            # The median chunk: robust to bursts of load from other processes.
            result.update({k: statistics.median(v) for k, v in rates.items()})

    if compile:
        # Every rule's losses go through TorchRL's one loss wrapper, whose compiled versions
        # share torch's per-function recompile limit: start each measure afresh.
        torch._dynamo.reset()
    frames = WARMUP + FRAMES_PER_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        trainer = ut.Trainer(env=ut.EnvSpec("Pendulum-v1", num_envs=NUM_ENVS,
                                            backend="gymnasium"),
                             optimizer=unitrain_rule(rule, width, frames, compile),
                             max_frames=frames,
                             eval_every_frames=10 * frames, eval_episodes=1, seed=0,
                             num_threads=1, run_dir=Path(tmp), callbacks=[Measure()],
                             enable_progress_bar=False)
        std = "state" if rule in ("sac", "dsac_t") else "param"
        trainer.fit(ut.MLPPolicy(OBS, ACT, hidden=(width, width), activation="relu",
                                 action_std=std))
    return result["plain"], result["unitrain"]


def whole(rule: str, width: int, frames: int, tmp: Path,
          compile: bool = False) -> tuple[float, float]:
    """Wall seconds of a plain process and of ``unitrain fit pendulum/<rule>``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plain_cmd = [sys.executable, __file__, "--plain", rule, "--widths", str(width),
                 "--frames", str(frames)]
    hidden = f"[{width},{width}]"
    ours_cmd = [sys.executable, "-m", "unitrain", "fit", f"pendulum/{rule}",
                f"module.hidden={hidden}", f"optimizer.critic_hidden={hidden}",
                f"optimizer.buffer_size={frames}", f"trainer.max_frames={frames}",
                "trainer.num_threads=1", f"run_dir={tmp / rule / str(width)}",
                f"trainer.eval_every_frames={10 * frames}", "trainer.eval_episodes=1"]
    if compile:
        ours_cmd.append("optimizer.compile=true")
    walls = []
    for cmd in (plain_cmd, ours_cmd):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
    return walls[0], walls[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES)
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--updates", type=int, default=600, help="per side, steady state")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--whole", action="store_true", help="whole processes instead")
    parser.add_argument("--frames", type=int, default=5000, help="frames of a whole run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--compile", action="store_true",
                        help="unitrain's rules with compile=true (compilation not timed in the "
                             "steady state; timed in whole processes)")
    parser.add_argument("--plain", choices=RULES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.plain:
        print(f"{plain_run(args.plain, args.widths[0], args.frames):.1f} updates/s")
        return
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rule in args.rules:
            for width in args.widths:
                got = [whole(rule, width, args.frames, Path(tmp), args.compile) if args.whole
                       else steady(rule, width, args.updates, args.chunk, args.compile)
                       for _ in range(args.repeats)]
                plain, ours = (statistics.median(g[i] for g in got) for i in (0, 1))
                rows.append((rule, width, plain, ours))
                print(f"{rule} {width}: plain {plain:.2f}, unitrain {ours:.2f}", flush=True)
    unit = "wall s" if args.whole else "updates/s"
    what = (f"whole processes, {args.frames} frames" if args.whole
            else f"steady state, {args.updates} updates each")
    what += ", unitrain compiled" if args.compile else ""
    print(f"\n{'rule':<8} {'width':>5} {'plain':>9} {'unitrain':>9} {'ratio':>6}   ({unit}; "
          f"{what}; Pendulum-v1, {NUM_ENVS} envs, batch {BATCH}, one thread)")
    for rule, width, plain, ours in rows:
        ratio = plain / ours if args.whole else ours / plain
        print(f"{rule:<8} {width:>5} {plain:>9.1f} {ours:>9.1f} {ratio:>6.2f}")


if __name__ == "__main__":
    main()
