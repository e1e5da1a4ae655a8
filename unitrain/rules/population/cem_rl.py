"""CEM-RL: a CEM population of actors, half of which learn from a shared TD3 (or DSAC-T) critic.

Reference: A. Pourchot, O. Sigaud, "CEM-RL: Combining evolutionary and gradient-based methods
for policy search", ICLR 2019 (arXiv:1810.01222).

Each generation:

1. The CEM strategy (:class:`~unitrain.rules.population.cem.CEM`, as the ``cem`` rule) samples
   ``population`` actors ``θᵢ = μ + √Σ ⊙ εᵢ`` from seeds shared by every process.
2. Once the replay memory is ready, the first ``gradient_actors`` of them (half the population by
   default) learn from the shared critic, one after another. For actor ``i``: the critic makes
   ``utd_ratio · F / gradient_actors`` TD3 updates with actor ``i`` as the target policy
   (clipped double-Q with target policy smoothing), then the actor makes ``utd_ratio · F``
   deterministic policy-gradient steps ``∇θ Q₁(s, μθ(s))`` with a freshly reset Adam; ``F`` is
   the number of frames the previous generation played. So the critic sees ``utd_ratio`` updates
   per frame, like TD3, and every gradient actor as many actor steps.
3. The population evaluation (:class:`~unitrain.rules.population.service.PopulationEvaluation`, as for every
   population rule) plays every actor's episodes with its deterministic action ``module.act``;
   every transition goes into the replay memory of the off-policy loop
   (:class:`~unitrain.rules.gradient.offpolicy.OffPolicyLoop`: memory, warm-up, gradient steps averaged
   across processes).
4. CEM refits its mean and diagonal variance to the best half of *all* evaluated actors, the
   gradient-trained ones included (their offsets ``θᵢ − μ`` are what they became).

The critic is TorchRL's ``TD3Loss`` over two MLP critics (or the module's ``make_critic()``),
registered as ``module.aux["cem_rl"]``; actions are the shared contract's ``tanh`` actions in
``[-1, 1]``. With ``critic="dsac_t"`` it is the twin distributional critics of DSAC-T (Duan et
al., arXiv:2310.05858; :class:`~unitrain.rules.gradient.dsac_t_loss.DSACTLoss`) instead: the critic's target
policy is actor ``i``'s tanh-Gaussian (the module's action contract, its standard deviation
from ``action_std``), a gradient actor takes DSAC-T's entropy-regularised policy steps and the
temperature steps with it (learned, shared by all actors, like ``aux.log_std`` with
``action_std: param``); the population is still evaluated with the deterministic
``module.act``. The module's parameters are CEM's mean, so ``module.act`` is the deterministic
action of the distribution's centre, as for ``cem``.

Several processes: every process holds the whole population (sampled from shared seeds) and makes
every gradient step with gradients averaged across processes (each samples its own memory, filled
with the episodes of its share), so actors, critics and the CEM distribution stay identical on
every rank.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.objectives import TD3Loss

from unitrain.errors import ConfigError
from unitrain.rules.gradient.dsac_t import dsac_t_loss
from unitrain.rules.gradient.dsac_t_loss import DSACTLoss
from unitrain.rules.gradient.offpolicy import CriticFields, OffPolicyLoop, critic_steps
from unitrain.rules.gradient.td3 import td3_loss
from unitrain.rules.population.cem import CEM, CEMFields
from unitrain.rules.population.service import PopulationEvaluation, noise_source, noise_table
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded, one_of

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.rollout import Step
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CEMRL"]

_NOISE = 26  # shared random stream of the actors' seeds
_METRICS = ("loss/critic", "loss/actor", "train/q_mean")
_DSAC_T_METRICS = _METRICS + ("loss/temperature", "train/alpha")


@register_rule("cem_rl")
@dataclass
class CEMRL(CEMFields, CriticFields):
    """CEM-RL (Pourchot & Sigaud 2019) with a TD3 or DSAC-T critic; the defaults are the paper's.

    A composition: a :class:`~unitrain.rules.population.cem.CEM` strategy (its fields,
    :class:`~unitrain.rules.population.cem.CEMFields`: ``population``, ``sigma``,
    ``elite_fraction``, ``noise_*``, ``episodes``, ...), the population evaluation, and the
    off-policy loop with its critics (the fields of
    :class:`~unitrain.rules.gradient.offpolicy.CriticFields`):

    Args:
        gradient_actors: actors per generation that learn from the critic (``None``: half the
            population).
        lr_actor: Adam step size of a gradient actor (its moments reset for every actor).
        lr_critic: Adam step size of the critics.
        gamma: discount factor.
        tau: Polyak step of the target critics, per critic update.
        batch_size: transitions per gradient update.
        buffer_size: replay memory capacity per process.
        warmup_frames: frames (all processes) of pure CEM generations before gradient steps.
        utd_ratio: critic updates per frame of the previous generation, and actor steps of each
            gradient actor per such frame.
        critic_hidden: hidden widths of the default critics (the paper's 400-300).
        policy_noise: standard deviation of TD3's target policy smoothing noise.
        noise_clip: bound of the smoothing noise.
        save_buffer: save the replay memory in checkpoints.
        critic: ``"td3"`` (the paper's) or ``"dsac_t"`` (DSAC-T's distributional critics and
            entropy-regularised actor steps).
        lr_alpha: ``dsac_t`` only: Adam step size of the temperature's logarithm.
        alpha_init: ``dsac_t`` only: initial temperature.
        target_entropy: ``dsac_t`` only: target policy entropy (``None``: ``-act_dim``).
    """

    population: int = 10
    sigma: float = math.sqrt(1e-3)  # the paper's initial variance 1e-3
    gradient_actors: int | None = bounded(None, "[0, population]", null=True)
    lr_actor: float = 1e-3
    lr_critic: float = 1e-3
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 100
    buffer_size: int = 1_000_000
    warmup_frames: int = 10_000
    utd_ratio: float = 1.0
    critic_hidden: tuple[int, ...] = (400, 300)
    policy_noise: float = bounded(0.2, "[0, inf]")
    noise_clip: float = bounded(0.5, "[0, inf]")
    save_buffer: bool = False
    critic: str = one_of("td3", "td3", "dsac_t")
    lr_alpha: float = bounded(3e-4, "(0, inf]")
    alpha_init: float = bounded(math.e, "(0, inf]")
    target_entropy: float | None = None

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        CriticFields.check_env(self, env, info)
        if env.obs_norm:
            raise ConfigError("env.obs_norm", "cem_rl replays raw observations to its critic; "
                                              "set env.obs_norm: false")

    @property
    def learners(self) -> int:
        return self.population // 2 if self.gradient_actors is None else self.gradient_actors

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        self.module = module
        # The CEM strategy samples the actors and refits to them (from a stream of its own).
        self.cem = CEM(**{f.name: getattr(self, f.name) for f in dataclasses.fields(CEMFields)})
        self.cem.noise_stream = _NOISE
        self.pop = PopulationEvaluation(self.cem, module, ctx)
        self.layout = self.pop.layout
        self.table = noise_table(self, self.layout.numel)
        self.cem.start(ctx, module, self.layout)
        self.metric_names = _DSAC_T_METRICS if self.critic == "dsac_t" else _METRICS
        self.loop = OffPolicyLoop(self, module, ctx, lambda obs: obs,  # type: ignore[arg-type]
                                  self.metric_names)
        if self.critic == "dsac_t":
            loss, actor_params = dsac_t_loss(self, module, ctx)
        else:
            loss, actor_params = td3_loss(self, module, ctx), module.policy_parameters()
        self.loss: TD3Loss | DSACTLoss = module.add_aux(self.name, loss)
        if type(self.loss) is not type(loss):
            raise ConfigError("optimizer.critic",
                              f"got {self.critic!r}, but the module already holds a "
                              f"{type(self.loss).__name__} critic under aux.{self.name} (from an "
                              "earlier run): use the same critic or a fresh module")
        self.updater, self.critic_opt, self.actor_opt, self.alpha_opt = critic_steps(
            self, self.loss, self.loss.qvalue_network_params, actor_params,
            self.loss.log_alpha if isinstance(self.loss, DSACTLoss) else None)
        self.frames_seen = 0  # frames of every generation so far, all processes
        self.last_frames = 0  # frames of the previous generation, all processes

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        with noise_source(self.table):
            return self._generation(ctx)

    def _generation(self, ctx: "RuleContext") -> dict[str, float]:
        gen, count = self.pop.generation, self.population
        mean = self.layout.flatten(self.module)
        ask = self.cem.ask(ctx, gen, mean)
        actors = ask.params(range(count))  # θⱼ = μ + √Σ ⊙ εⱼ
        metrics: dict[str, float] = dict.fromkeys(self.metric_names, math.nan)
        before = self.loop.updates
        trained = self._ready(ctx)
        if trained:
            metrics.update(self._learn(actors, ctx))
        self.layout.assign(self.module, mean)

        played = dataclasses.replace(ask, params=lambda idx: actors[list(idx)],
                                     offset=lambda j: actors[j] - mean,
                                     offset_bound=float((actors - mean).abs().max()),
                                     observe=self._remember)
        ev = self.pop.evaluate(ctx, count, played.params, played.seeds, observe=played.observe)
        self.frames_seen += ev.frames
        self.last_frames = ev.frames

        # CEM refits to every actor as it was played, the gradient-trained ones included.
        told = self.cem.tell(ctx, gen, played, ev)
        assert told.theta is not None
        self.layout.assign(self.module, told.theta)
        order = torch.argsort(ev.fitness, descending=True, stable=True)[:self.cem.elites].tolist()
        # How the critic's pupils fared against the plain CEM samples (NaN before they learn).
        pupils = self.learners if trained else 0
        metrics.update(self.pop.finish_generation(ctx, ev, ev.local_frames, (mean, told.theta)))
        metrics.update({
            **told.metrics,
            "fitness/gradient_mean": ev.fitness[:pupils].mean().item() if pupils else math.nan,
            "fitness/cem_mean": ev.fitness[pupils:].mean().item() if pupils < count else math.nan,
            "fitness/gradient_elites": float(sum(j < pupils for j in order)) if pupils else math.nan,
            "optim/updates": float(self.loop.updates - before),
            "train/updates_total": float(self.loop.updates),
            "train/buffer_size": float(len(self.loop.replay))})
        return metrics

    def _ready(self, ctx: "RuleContext") -> bool:
        """Whether the memory is ready, on every process alike."""
        if self.learners == 0 or self.frames_seen < max(self.warmup_frames, self.batch_size):
            return False
        least = ctx.all_reduce_(torch.tensor([float(len(self.loop.replay))], device=ctx.device),
                                "min")
        return float(least.item()) >= self.batch_size

    def _learn(self, actors: Tensor, ctx: "RuleContext") -> dict[str, float]:
        """Train the first :attr:`learners` actors in place, one after another, with the critic."""
        steps = math.floor(self.utd_ratio * self.last_frames + 1e-9)
        critic_steps = steps // self.learners
        sums = dict.fromkeys(self.metric_names, 0.0)
        counts = dict.fromkeys(self.metric_names, 0)

        def add(name: str, value: Tensor | float) -> None:
            sums[name] += float(value)
            counts[name] += 1

        loss = self.loss
        for i in range(self.learners):
            self.layout.assign(self.module, actors[i])
            # Actor i is the critic's target policy while the critic learns.
            loss.target_actor_network_params.update_(loss.actor_network_params.detach())
            for _ in range(critic_steps):
                batch = self.loop.replay.sample()
                if isinstance(loss, DSACTLoss):
                    critic_loss, info = loss.critic_loss(batch)
                else:
                    critic_loss, info = loss.value_loss(batch)
                self.loop.descend(critic_loss, [self.critic_opt], ctx)
                if isinstance(loss, DSACTLoss):
                    ctx.all_reduce_(loss.omega, "mean")
                self.updater.step()
                self.loop.count_update()
                add("loss/critic", critic_loss.detach())
                add("train/q_mean", info["pred_value"].mean())
            self.actor_opt.state.clear()  # a fresh Adam for every actor, as in the paper
            for _ in range(steps):
                batch = self.loop.replay.sample()
                actor_loss, info = loss.actor_loss(batch)
                if self.alpha_opt is not None:
                    alpha_loss = loss.alpha_loss(info["log_prob"])
                    # Disjoint parameters: one backward serves both losses.
                    self.loop.descend(actor_loss + alpha_loss, [self.actor_opt, self.alpha_opt],
                                      ctx)
                    add("loss/temperature", alpha_loss.detach())
                    add("train/alpha", loss.alpha)
                else:
                    self.loop.descend(actor_loss, [self.actor_opt], ctx)
                add("loss/actor", actor_loss.detach())
            actors[i] = self.layout.flatten(self.module)
        return {k: sums[k] / counts[k] for k in self.metric_names if counts[k]}

    def _remember(self, step: "Step") -> None:
        """Keep the transitions of a population step (its active slots) in the memory."""
        on = step.active
        if not bool(on.any()):
            return
        nxt = step.next
        head = self.loop.head
        low, high = head.low.to(step.action), head.high.to(step.action)
        unit = ((step.action - low) / (high - low) * 2.0 - 1.0).clamp(-1.0, 1.0)

        def stored(obs: Any) -> Any:  # named entries keep their dtypes (uint8 images)
            return obs if isinstance(obs, TensorDictBase) else obs.to(torch.float32)

        self.loop.remember(TensorDict({
            "observation": stored(step.observation[on]),
            "action": unit[on].to(torch.float32),
            "next": {"observation": stored(nxt["observation"][on]),
                     "reward": nxt["reward"][on].to(torch.float32),
                     # An episode the population's step cap ended is done, not terminated.
                     "done": (nxt["done"].reshape(-1) | step.ended)[on].reshape(-1, 1),
                     "terminated": nxt["terminated"][on]},
        }, batch_size=[int(on.sum())]))

    def state_dict(self) -> dict[str, Any]:
        return {**self.pop.state_dict(), **self.cem.state_dict(), **self.loop.state_dict(),
                "frames_seen": self.frames_seen, "last_frames": self.last_frames}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pop.load_state_dict(state)
        self.cem.load_state_dict(state)
        self.loop.load_state_dict(state)
        self.frames_seen = int(state["frames_seen"])
        self.last_frames = int(state["last_frames"])
