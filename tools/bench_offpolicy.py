"""DSAC-T against a SAC baseline, driven by the same unitrain loop, side by side in one run.

DSAC-T: Duan et al., "Distributional Soft Actor-Critic with Three Refinements", arXiv:2310.05858.
SAC: Haarnoja et al. 2018, "Soft Actor-Critic Algorithms and Applications" (twin Q critics,
automatic temperature), here TorchRL's ``SACLoss``.

Both rules share everything but the loss: collection, replay memory, warm-up, update-to-data
ratio, learning rates, initial temperature, the actor (the module, a tanh-Gaussian with a
state-dependent standard deviation) and the critics' architecture (MLPs with GELU layers; SAC's
output one value, DSAC-T's a mean and a spread). SAC follows its paper's protocol (policy,
temperature and targets updated on every gradient update); DSAC-T its own (every second update).
Each (env, seed) runs both rules back to back, so drifts in machine load hit them alike.

For every env the table gives, per rule over the seeds: the deterministic evaluation return at
the end of the budget (equal frames for both rules) and half way, the gradient updates per second
inside the update loop (median over iterations), and the wall time of a run. Run::

    python tools/bench_offpolicy.py --seeds 0 1 2
    python tools/bench_offpolicy.py --frames 10000 20000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule
from torch import Tensor, nn
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import SACLoss, SoftUpdate, ValueEstimators

import unitrain as ut
from unitrain.envs import env_info
from unitrain.errors import check
from unitrain.optim import DSACT
from unitrain.optim.offpolicy import OffPolicyFields, OffPolicyLoop, make_critics

if TYPE_CHECKING:
    from unitrain.module import RLModule
    from unitrain.optim.base import RuleContext

# Per env: the env spec, the module and the rule fields both rules get, and the default budget.
# Pendulum: the pendulum/dsac_t settings. HalfCheetah: a short CPU budget with
# 2 x 128 networks and one update per 4 frames (the paper's 3 x 256 at one update per frame is
# about ten times slower here).
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]] = {
    "Pendulum-v1": (
        dict(num_envs=4), dict(hidden=(64, 64)),
        dict(lr_actor=1e-3, lr_critic=1e-3, lr_alpha=1e-3, alpha_init=1.0, batch_size=256,
             buffer_size=20_000, warmup_frames=1000, frames_per_batch=64, utd_ratio=1.0,
             critic_hidden=(64, 64)),
        20_000),
    "HalfCheetah-v5": (
        dict(num_envs=4), dict(hidden=(128, 128)),
        dict(lr_actor=3e-4, lr_critic=3e-4, lr_alpha=3e-4, alpha_init=1.0, batch_size=256,
             buffer_size=100_000, warmup_frames=5000, frames_per_batch=64, utd_ratio=1.0,
             critic_hidden=(128, 128)),
        25_000),
}


class _LocScale(nn.Module):
    """``observation -> (loc, scale)`` of the module's pre-tanh Gaussian, read through the action
    contract, with the log standard deviation bounded as DSAC-T bounds it."""

    def __init__(self, module: nn.Module, log_std: nn.Module | None,
                 bounds: tuple[float, float]) -> None:
        super().__init__()
        self.module, self.bounds = module, bounds
        # ``log_std`` (action_std "param") lives under ``module.aux``, which ``module`` already
        # registers: registering it here too would give the loss two copies of it.
        self.__dict__["log_std"] = log_std

    def forward(self, observation: Tensor) -> tuple[Tensor, Tensor]:
        head = self.module.actions
        out = self.module(observation)
        return head.loc(out), head.log_std(out, self.log_std).clamp(*self.bounds).exp()


@dataclass
class SAC(OffPolicyFields):
    """SAC with TorchRL's ``SACLoss`` in the off-policy loop DSAC-T composes (fields as
    :class:`DSACT`).

    The policy is the module's tanh-Gaussian of the shared action contract (``action_std``
    ``"state"``: mean and log std from the network; ``"param"``: the learned ``aux.log_std``).
    The critics are two MLPs ``(observation, action) -> Q`` (``critic_hidden`` GELU layers)
    regressed with a squared error on ``r + gamma (1 - terminated) (min_i Q'_i(s', a') - alpha
    log pi(a'|s'))``, ``a'`` from the current policy; ``delay`` spaces the policy, temperature and
    target updates as in DSAC-T (SAC's paper: 1).
    """

    name: ClassVar[str] = "sac"
    # DSAC-T's defaults, so that both rules differ only in their loss.
    lr_actor: float = 1e-4
    lr_critic: float = 1e-4
    warmup_frames: int = 10_000
    utd_ratio: float = 0.05
    critic_hidden: tuple[int, ...] = (256, 256, 256)
    lr_alpha: float = 3e-4
    alpha_init: float = math.e
    target_entropy: float | None = None
    delay: int = 1

    log_std_bounds: ClassVar[tuple[float, float]] = DSACT.log_std_bounds
    metric_names: ClassVar[tuple[str, ...]] = (
        "loss/critic", "loss/actor", "loss/temperature", "train/alpha", "train/entropy")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lr_alpha > 0, "lr_alpha", "a number > 0", self.lr_alpha)
        check(self.alpha_init > 0, "alpha_init", "a number > 0", self.alpha_init)
        check(self.delay >= 1, "delay", "an integer >= 1", self.delay)

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.loop = OffPolicyLoop(self, module, ctx, self._explore, self.metric_names)
        log_std = module.log_std_param()
        actor_params = module.policy_parameters() + ([] if log_std is None else [log_std.log_std])
        self.actor = _LocScale(module, log_std, self.log_std_bounds)
        # Actions in [-1, 1] (TanhNormal's default bounds): what the critics and the replay see.
        actor = ProbabilisticActor(
            TensorDictModule(self.actor, in_keys=["observation"], out_keys=["loc", "scale"]),
            in_keys=["loc", "scale"], distribution_class=TanhNormal, return_log_prob=True)
        critics = [TensorDictModule(c, in_keys=["observation", "action"],
                                    out_keys=["state_action_value"])
                   for c in make_critics(module, 2, 1, self.critic_hidden, nn.GELU)]
        act_dim = module.actions.act_dim
        loss = SACLoss(actor, critics, num_qvalue_nets=2, loss_function="l2",
                       alpha_init=self.alpha_init,
                       target_entropy=(-float(act_dim) if self.target_entropy is None
                                       else self.target_entropy)).to(ctx.device)
        loss.make_value_estimator(ValueEstimators.TD0, gamma=self.gamma)
        self.loss = module.add_aux(self.name, loss)
        self.updater = SoftUpdate(self.loss, tau=self.tau)
        self.critic_opt = torch.optim.Adam(list(self.loss.qvalue_network_params.values(True, True)),
                                           lr=self.lr_critic)
        self.actor_opt = torch.optim.Adam(actor_params, lr=self.lr_actor)
        self.alpha_opt = torch.optim.Adam([self.loss.log_alpha], lr=self.lr_alpha)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.critic_opt, self.actor_opt, self.alpha_opt]

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        return self.loop.step(ctx, self._update)

    def _explore(self, observation: Tensor) -> Tensor:
        loc, scale = self.actor(observation)
        return torch.tanh(loc + scale * self.loop.draw(tuple(loc.shape)))

    def _update(self, batch: TensorDictBase, ctx: "RuleContext") -> dict[str, Tensor | float]:
        delayed = self.loop.updates % self.delay == 0
        out = self.loss(batch)
        # SACLoss detaches the critics in the actor loss and the policy in the temperature loss:
        # the three losses touch disjoint parameters.
        total, optimizers = out["loss_qvalue"], [self.critic_opt]
        if delayed:
            total = total + out["loss_actor"] + out["loss_alpha"]
            optimizers += [self.actor_opt, self.alpha_opt]
        self.loop.descend(total, optimizers, ctx)
        if delayed:
            self.updater.step()
        metrics: dict[str, Tensor | float] = {"loss/critic": out["loss_qvalue"].detach(),
                                              "train/alpha": self.loss.log_alpha.detach().exp(),
                                              "train/entropy": out["entropy"].detach()}
        if delayed:
            metrics.update({"loss/actor": out["loss_actor"].detach(),
                            "loss/temperature": out["loss_alpha"].detach()})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return self.loop.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loop.load_state_dict(state)


@dataclass
class Result:
    """One run's outcome."""

    final: float
    half: float
    updates_per_s: float
    wall_s: float


def run(env_id: str, rule_name: str, seed: int, frames: int, root: Path) -> Result:
    """Train one rule on one env and seed; read its evaluations and update rate back.

    Args:
        env_id: a key of :data:`SETTINGS`.
        rule_name: ``"dsac_t"`` or ``"sac"``.
        seed: the run seed.
        frames: the frame budget.
        root: where the run directory goes.
    """
    env_kwargs, module_kwargs, rule_kwargs, _ = SETTINGS[env_id]
    spec = ut.EnvSpec(env_id, **env_kwargs)
    rule = (DSACT if rule_name == "dsac_t" else SAC)(**rule_kwargs)
    info = env_info(spec)
    run_dir = root / f"{env_id}-{rule_name}-{seed}"
    # Evaluate about ten times per run (after the first iteration that reaches each tenth).
    eval_every_frames = max(1, frames // 10)
    trainer = ut.Trainer(env=spec, optimizer=rule, max_frames=frames,
                         eval_every_frames=eval_every_frames,
                         eval_episodes=10, seed=seed, num_threads=1, run_dir=run_dir,
                         enable_progress_bar=False)
    L.seed_everything(seed, verbose=False)
    module = ut.MLPPolicy(info.obs_dim, info.act_dim, activation="gelu", action_std="state",
                          **module_kwargs)
    trainer.fit(module)
    summary = trainer.summary
    evals, rates = _scalars(run_dir, "eval/return_mean"), _scalars(run_dir, "perf/updates_per_s")
    half = [value for step, value in evals if step <= frames // 2]
    return Result(final=summary["eval/return_mean"], half=half[-1] if half else math.nan,
                  updates_per_s=statistics.median(v for _, v in rates) if rates else math.nan,
                  wall_s=summary["wall_s"])


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(out)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:8.1f}"
    return f"{statistics.mean(values):8.1f} ± {statistics.stdev(values):6.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--frames", nargs="+", type=int, default=None,
                        help="frame budget per run: one for every env, or one per env in the "
                             "order of --envs (default: per env, see SETTINGS)")
    args = parser.parse_args()
    budgets = args.frames or [SETTINGS[env_id][3] for env_id in args.envs]
    if len(budgets) == 1:
        budgets = budgets * len(args.envs)
    if len(budgets) != len(args.envs) or min(budgets) < 1:
        parser.error("--frames: give one positive budget, or one per env")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("torchrl").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for env_id, frames in zip(args.envs, budgets):
            results: dict[str, list[Result]] = {"dsac_t": [], "sac": []}
            for seed in args.seeds:
                for rule_name in results:
                    res = run(env_id, rule_name, seed, frames, Path(tmp))
                    results[rule_name].append(res)
                    print(f"{env_id} {rule_name} seed {seed}: return {res.final:.1f} "
                          f"(half way {res.half:.1f}), {res.updates_per_s:.1f} updates/s, "
                          f"{res.wall_s:.0f} s", flush=True)
            rows.append((env_id, frames, results))

    print(f"\n{'env':<15} {'frames':>7} {'rule':<7} {'return (final)':>17} "
          f"{'return (half)':>17} {'updates/s':>10} {'wall s':>7}")
    for env_id, frames, results in rows:
        for rule_name, res in results.items():
            print(f"{env_id:<15} {frames:>7} {rule_name:<7} "
                  f"{_mean_std([r.final for r in res]):>17} {_mean_std([r.half for r in res]):>17} "
                  f"{statistics.median(r.updates_per_s for r in res):>10.1f} "
                  f"{statistics.mean(r.wall_s for r in res):>7.0f}")
        ratio = (statistics.median(r.updates_per_s for r in results["dsac_t"])
                 / statistics.median(r.updates_per_s for r in results["sac"]))
        print(f"{'':<15} {'':>7} DSAC-T/SAC update rate: {ratio:.2f}")


if __name__ == "__main__":
    main()
