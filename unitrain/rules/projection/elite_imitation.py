"""Elite imitation: a policy fitted by projection to the actions of its own best episodes.

Reinforcement learning with the projection-based training of Bergmeister et al., "A
projection-based framework for gradient-free and parallel learning" (arXiv:2506.05878). Each
iteration runs ``episodes`` whole episodes with exploring actions of the current policy, keeps the
``(observation, action)`` pairs of those with the highest returns (the elites), and fits the
policy to those actions with the composed :class:`~unitrain.rules.projection.rule.Projection` rule
(``fit``), as the cross-entropy method does with a parametric policy (Rubinstein 1999; Szita &
Lőrincz 2006).

Both action spaces of the action contract (:mod:`unitrain.policy.action`) are supported:

- **discrete**: actions are drawn from the softmax of the logits or, in a share of the env slots,
  are their argmax, plus a share of uniformly random actions; the logits are fitted to the elite
  actions as class labels (any ``fit.output``; cross-entropy by default).
- **continuous** (1-D ``Box``): actions are the module's pre-squash mean ``u`` plus Gaussian noise
  ``noise_std · ξ`` (or ``u`` itself in a share of the env slots), squashed into the bounds as the
  contract does, plus a share of uniformly random actions within the bounds. Each step records
  the pre-squash value that produced its action (for a random action, the inverse of the squash,
  ``atanh`` of the action in ``[-1, 1]`` clipped to ``±(1 − 1e-6)``), and the mean outputs are
  fitted to the elites' values with the squared-error output constraint (``fit.output:
  squared_error``, a proximal step of ``lam``/2 · ‖u − target‖²). The exploration noise is the
  rule's own, so the module must have ``action_std: param`` (its ``aux.log_std`` is neither used
  nor trained here).

Parameter-space exploration (``param_noise``): instead of noise on each action, a sampling slot
acts deterministically with the policy's parameters plus ``param_noise · ε``, one ``ε ~ N(0, I)``
per episode (Rückstieß, Felder & Schmidhuber, "State-Dependent Exploration for Policy Gradient
Methods", ECML 2008; Plappert et al., "Parameter Space Noise for Exploration", ICLR 2018). Its
episodes are then consistent: the same state always gets the same action, so an elite episode
shows a behaviour that can be fitted, not a lucky draw of per-step noise, and the fitted policy
grows confident where the elites agree. The perturbed copies are applied to their slots in one
call through the population rules' batched policy (:class:`unitrain.rules.population.service.PopulationPolicy`).

Common start states (``starts``): where returns depend on the random initial state (Pendulum), the
best returns mostly mark the easiest starts, not the best actions. With ``starts = k`` the
episodes run in waves of one per env slot; each wave draws ``k`` start states (seeded resets),
slot ``i`` starts from the wave's start ``i mod k``, and the elites are the best
``elite_fraction`` of each start's episodes, so actions compete only against actions from the
same state (common random numbers for the initial state, as in PEGASUS:
Ng & Jordan, "PEGASUS: A policy search method for large MDPs and POMDPs", UAI 2000). The starts
change every iteration (seeded from the run seed, the iteration and the rank).

Episodes are played by :func:`unitrain.envs.rollout.rollout`: env slot ``i`` plays a fixed share of the
iteration's episodes (``episodes // n``, one more for the first ``episodes % n`` slots), so the
kept episodes are the first ones each slot started, however long they last. With several
processes each rank collects its own episodes and fits its own elites; the projection consensus
is averaged across ranks (see :mod:`unitrain.rules.projection.rule`), so parameters stay identical.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from unitrain.envs.rollout import Step, rollout
from unitrain.envs.spec import derive_seed
from unitrain.errors import ConfigError, UserError, check
from unitrain.policy.inputs import call_module
from unitrain.policy.recurrent import recurrent_layer, refuse_recurrent
from unitrain.rules.base import UpdateRule
from unitrain.rules.population.service import ParamLayout, PopulationPolicy
from unitrain.rules.projection.rule import Projection
from unitrain.rules.registry import register_rule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["EliteImitation"]


# Random stream of the common start states.
_STREAM_STARTS = 131

# Continuous random actions are drawn in [-1, 1] and clipped this far inside before the atanh
# that gives their pre-squash targets (atanh(1 - 1e-6) ≈ 7.25).
_UNIT_CLIP = 1.0 - 1e-6


class _WithoutAux(nn.Module):
    """The policy of a module without its ``aux`` networks, for the projection fit.

    A continuous module started from another rule's checkpoint holds that rule's ``aux.log_std``,
    which this rule neither uses nor fits; the fit sees the module's other children (shared, so
    fitting them fits the module) and the module's own forward pass.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, child in module.named_children():
            if name != "aux":
                self.add_module(name, child)
        self.__dict__["policy"] = module  # not registered: its aux stays outside the fit

    def forward(self, observation: Tensor) -> Tensor:
        return self.policy(observation)


class _SlotNoise:
    """Parameter-space noise per env slot: slot ``j`` acts with ``θ + σ · ε_j``.

    ``ε_j ~ N(0, I)`` is drawn by :meth:`redraw` (once per episode), and stays 0 in greedy slots.
    The copies are applied in one call through the population rules' batched policy.

    Args:
        module: the policy (``θ`` is its policy parameters at construction).
        sigma: the noise's standard deviation ``σ``.
        greedy: ``[n]`` which slots act with ``θ`` itself.
        generator: the source of ``ε``.
    """

    def __init__(self, module: "RLModule", sigma: float, greedy: Tensor,
                 generator: torch.Generator) -> None:
        self.layout = ParamLayout.of(module)
        self.theta = self.layout.flatten(module)
        self.sigma, self.greedy, self.generator = sigma, greedy, generator
        self.batched = PopulationPolicy(module, self.layout, act=call_module)
        self.eps = torch.zeros(len(greedy), self.layout.numel, dtype=self.theta.dtype,
                               device=self.theta.device)
        # Each slot's parameters θ + σ·ε, kept from one redraw to the next (not rebuilt per step).
        self.params = self.theta.expand(len(greedy), -1).clone()

    def redraw(self, slots: Iterable[int]) -> None:
        """Draw new noise for these slots (greedy ones keep none)."""
        for i in slots:
            if not self.greedy[i]:
                self.eps[i] = torch.randn(self.layout.numel, generator=self.generator,
                                          dtype=self.theta.dtype).to(self.theta.device)
                self.params[i] = self.theta + self.sigma * self.eps[i]

    def __call__(self, observation: Tensor, slots: slice) -> Tensor:
        """The outputs ``[k, ...]`` of the slots ``slots`` for their observations ``[k, ...]``."""
        return self.batched(self.params[slots], observation.unsqueeze(1)).squeeze(1)

    def apply_one(self, eps: Tensor, observation: Tensor) -> Tensor:
        """Every row of ``observation`` through the one copy ``θ + σ · eps``."""
        params = (self.theta + self.sigma * eps).unsqueeze(0)
        return self.batched(params, observation.unsqueeze(0)).squeeze(0)


@register_rule("elite_imitation")
@dataclass
class EliteImitation(UpdateRule):
    """Fit the policy by projection to the actions of its best episodes.

    The defaults are the settings measured on CartPole (``docs/projection.md``): a calibrated,
    relaxed fit (cross-entropy with ``lam`` 1, 20 solver iterations on standardised inputs, 30%
    of the way to each consensus) of one batch per iteration, with a quarter of the env slots
    acting greedily. Continuous actions need ``fit.output: squared_error`` (the recipe
    ``pendulum/elite_imitation`` gives the settings measured on Pendulum).

    Args:
        fit: the projection fit of the elite pairs (a :class:`Projection` block: solver,
            iterations, output, lam, margin, step_size, standardize). Discrete actions are
            fitted as class labels; continuous ones as real pre-squash targets, which needs
            ``output: squared_error``.
        episodes: episodes collected per iteration on each rank.
        elite_fraction: share of the iteration's episode count kept as elites, by return.
        keep_elites: rank the previous elites together with the new episodes, so the
            demonstrations never get worse.
        explore: probability of a uniformly random action at each step while collecting
            (continuous actions: uniform within the bounds, which must be finite).
        sample: draw the other actions from the policy (discrete: the softmax of the logits;
            continuous: the pre-squash mean plus ``noise_std`` Gaussian noise), else act
            deterministically (argmax, or the squashed mean); discrete exploration shrinks as
            the fitted logits grow confident, continuous exploration stays at ``noise_std``.
        greedy_share: share of the env slots that act deterministically even when ``sample``
            is on (``explore`` still applies). Their episodes show what the deterministic policy
            earns; once it earns the most, they become the elites, so the greedy policy is a
            fixed point of the fit instead of being pulled toward the sampled policy's weaker
            episodes.
        param_noise: ``None`` (sampling slots add noise to each action, as ``sample`` says) or
            the standard deviation of parameter-space noise: a sampling slot then acts
            deterministically (argmax, or the pre-squash mean) with the policy's parameters plus
            ``param_noise · ε``, ``ε ~ N(0, I)`` drawn anew for each episode; ``explore`` still
            applies. Needs ``sample: true``.
        param_noise_target: ``None`` (``param_noise`` stays fixed) or the action distance the
            parameter noise is kept at: after each iteration ``σ`` grows by 5% if the perturbed
            copies acted closer to the policy than this, else shrinks by 5% (Plappert et al.
            2018). The distance is the share of visited states where a copy's action differs
            from the policy's (discrete), or the root mean square difference of their
            pre-squash means (continuous). A policy that grows confident needs ever larger
            parameter changes to act differently; a fixed ``σ`` then stops exploring.
        noise_std: continuous actions: standard deviation of the Gaussian noise added to the
            pre-squash mean ``u`` when sampling, in ``u``'s units (with bounds, the default 2,
            sends about half of the noisy actions of a centred mean beyond 90% of the way to a
            bound; the Pendulum recipe uses 1). Ignored for discrete actions.
        batch_size: elite pairs per fitted batch.
        updates: batches fitted per iteration.
        window: the elites of the last ``window`` iterations are fitted together (each
            iteration's elites are chosen among that iteration's episodes, plus the previous
            elites when ``keep_elites``); more and more varied pairs make each fit generalise.
        starts: ``None`` (each episode from the env's own random start) or the number of
            start states shared by the env slots: the episodes run in waves of one per slot
            (``episodes`` a multiple of ``env.num_envs``), slot ``i`` of a wave starting from
            that wave's start ``i mod starts``, and elites are ranked among the episodes of each
            start (at most ``env.num_envs``; not with ``keep_elites``). The greedy slots are the
            first ones, so with ``starts`` above their number some starts have no greedy
            episode.
    """

    # The projection fit reads the module's stages on one flat input.
    named_observations: ClassVar[bool] = False

    def check_module(self, module: "RLModule") -> None:
        refuse_recurrent(module, self.name, "the solver projects onto the graphs of feed-forward "
                                            f"layers; {recurrent_layer(module)} is recurrent")

    fit: Projection = field(default_factory=lambda: Projection(
        iterations=20, lam=1.0, step_size=0.3, standardize=True))
    episodes: int = bounded(16, "[1, inf]")
    elite_fraction: float = bounded(0.3, "(0, 1]")
    keep_elites: bool = False
    explore: float = bounded(0.05, "[0, 1]")
    sample: bool = True
    greedy_share: float = bounded(0.25, "[0, 1]")
    param_noise: float | None = bounded(None, "[0, inf)", null=True)
    param_noise_target: float | None = bounded(None, "(0, inf)", null=True)
    noise_std: float = bounded(2.0, "[0, inf)")
    batch_size: int = bounded(512, "[1, inf]")
    updates: int = bounded(1, "[1, inf]")
    window: int = bounded(1, "[1, inf]")
    starts: int | None = bounded(None, "[1, inf]", null=True)

    def validate(self) -> None:
        check(self.param_noise is None or self.sample, "param_noise",
              "null when sample is false (no slot explores)", self.param_noise)
        check(self.param_noise_target is None or self.param_noise is not None,
              "param_noise_target", "null when param_noise is null (no parameter noise to adapt)",
              self.param_noise_target)
        check(self.param_noise_target is None or not self.param_noise == 0, "param_noise",
              "a number > 0 when param_noise_target is set (a zero noise cannot be scaled)",
              self.param_noise)
        check(self.starts is None or not self.keep_elites, "starts",
              "null when keep_elites is true (elites from other starts are not comparable)",
              self.starts)

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        if self.starts is not None and self.starts > env.num_envs:
            raise ConfigError("optimizer.starts",
                              f"got {self.starts}; each start needs an env slot of its own: "
                              f"expected at most env.num_envs={env.num_envs}")
        if self.starts is not None and self.episodes % env.num_envs:
            raise ConfigError("optimizer.episodes",
                              f"got {self.episodes}; with starts the episodes run in full waves "
                              f"of one per env slot: expected a multiple of "
                              f"env.num_envs={env.num_envs}")
        if info.discrete:
            return
        if self.fit.output != "squared_error":
            raise ConfigError("optimizer.fit.output",
                              f"got {self.fit.output!r}; {info.id} has continuous actions, which "
                              "elite_imitation fits as real targets: expected squared_error")
        bounded = (info.action_low is not None and info.action_high is not None
                   and bool(torch.isfinite(info.action_low).all()
                            & torch.isfinite(info.action_high).all()))
        if self.explore > 0 and not bounded:
            raise ConfigError("optimizer.explore",
                              f"got {self.explore!r}; {info.id} has unbounded actions, so there "
                              "is no uniformly random action: expected 0")

    def setup(self, module: "RLModule", ctx: "RuleContext") -> None:
        info = ctx.env_info
        if info is None:
            raise UserError("elite_imitation needs an env: give the Trainer env=...")
        head = module.actions
        if not head.discrete and head.std != "param":
            raise ConfigError("module.action_std",
                              f"got {head.std!r}; elite_imitation fits only the pre-squash mean "
                              "and explores with its own noise_std, so a state-dependent log std "
                              "would stay untrained: expected 'param'")
        net = getattr(module, "projection_net", None)
        has_aux = isinstance(getattr(module, "aux", None), nn.Module)
        self.fit.attach(module if isinstance(net, nn.Module) or not has_aux
                        else _WithoutAux(module))
        self.module = module
        self._sigma = self._sigma_used = self.param_noise
        self._distance: float | None = None
        self._elites: list[dict[str, Any]] = []
        # The elite sets of the last ``window`` iterations, newest last.
        self._window: list[list[dict[str, Any]]] = []

    # ------------------------------------------------------------------ one iteration
    def step(self, ctx: "RuleContext") -> dict[str, float]:
        episodes, frames = self._collect(ctx)
        returns = [e["return"] for e in episodes]
        pool = episodes + (self._elites if self.keep_elites else [])
        # Elites per start state (all in one group without common starts): the best
        # ``elite_fraction`` of that start's new episodes in number. Stable sort: among equal
        # returns, the newer episodes (listed first) win.
        self._elites = []
        for start in sorted({e.get("start", 0) for e in episodes}):
            members = [e for e in pool if e.get("start", 0) == start]
            new = sum(e.get("start", 0) == start for e in episodes)
            members.sort(key=lambda e: -e["return"])
            self._elites += members[:max(1, math.ceil(self.elite_fraction * new))]
        keep = len(self._elites)
        self._window = (self._window + [self._elites])[-self.window:]
        fitted = [e for elites in self._window for e in elites]
        # Discrete: the actions are the class labels; continuous: their pre-squash targets.
        key = "action" if self.module.actions.discrete else "target"
        obs = torch.cat([e["observation"] for e in fitted])
        act = torch.cat([e[key] for e in fitted])
        batches = []
        for _ in range(self.updates):
            idx = torch.randperm(len(obs), generator=ctx.generator)[: self.batch_size]
            batches.append((obs[idx], act[idx]))
        metrics = self.fit.fit(batches, ctx)
        metrics.update({
            "train/elite_return_mean": sum(e["return"] for e in self._elites) / keep,
            "train/collect_return_mean": sum(returns) / len(returns),
            "train/elite_pairs": float(len(obs)),
            "frames": float(frames),
        })
        if self._distance is not None:
            metrics["train/param_noise"] = float(self._sigma_used)
            metrics["train/action_distance"] = self._distance
        return metrics

    @torch.no_grad()
    def _collect(self, ctx: "RuleContext") -> tuple[list[dict[str, Any]], int]:
        """Run ``episodes`` whole episodes with exploring actions of the current policy.

        Returns:
            The episodes (``observation``, ``action``, ``return``, the env ``slot`` that ran
            them and, for continuous actions, the pre-squash ``target`` of each action) and the
            env steps taken.
        """
        env = ctx.train_env()
        n = env.num_envs
        head = self.module.actions
        act_dim = head.act_dim
        greedy = torch.arange(n) < round(self.greedy_share * n)
        perturbed = self.sample and self.param_noise is not None
        noise = _SlotNoise(self.module, self._sigma, greedy, ctx.generator) if perturbed else None

        def output(obs: Tensor, slots: slice) -> Tensor:
            if noise is not None:
                return noise(obs.to(ctx.device), slots)
            return self.module(obs.to(ctx.device))

        def policy(obs: Tensor, slots: slice) -> Tensor:
            k = obs.shape[0]
            logits = output(obs, slots).cpu().double()
            action = logits.argmax(-1)
            if self.sample and not perturbed:
                probs = torch.softmax(logits, -1)
                sampled = torch.multinomial(probs, 1, generator=ctx.generator).squeeze(-1)
                action = torch.where(greedy[slots], action, sampled)
            random_action = torch.randint(act_dim, (k,), generator=ctx.generator)
            explore = torch.rand(k, generator=ctx.generator) < self.explore
            return torch.where(explore, random_action, action)

        # Continuous: the pre-squash targets of the actions in flight, per slot group (keyed by
        # its first slot), oldest first; every policy call's step is observed once, in order.
        pending: dict[int, deque[Tensor]] = {sl.start: deque() for sl in env.parts}

        def continuous_policy(obs: Tensor, slots: slice) -> Tensor:
            k = obs.shape[0]
            pre = head.loc(output(obs, slots)).cpu()
            if self.sample and not perturbed:
                xi = torch.randn(k, act_dim, generator=ctx.generator, dtype=pre.dtype)
                noisy = pre + self.noise_std * xi
                pre = torch.where(greedy[slots].unsqueeze(-1), pre, noisy)
            if head.bounded:
                unit = torch.rand(k, act_dim, generator=ctx.generator, dtype=pre.dtype) * 2 - 1
                random_pre = torch.atanh(unit.clamp(-_UNIT_CLIP, _UNIT_CLIP))
                explore = torch.rand(k, generator=ctx.generator) < self.explore
                pre = torch.where(explore.unsqueeze(-1), random_pre, pre)
            pending[slots.start].append(pre)
            return head.squash(pre)

        obs_buf: list[list[Tensor]] = [[] for _ in range(n)]
        act_buf: list[list[Tensor]] = [[] for _ in range(n)]
        tgt_buf: list[list[Tensor]] = [[] for _ in range(n)]
        trajectories: list[tuple[int, Tensor, Tensor, Tensor | None, Tensor | None]] = []
        perturbed_episodes: list[tuple[Tensor, Tensor]] = []  # (ε, observations) of each
        # The noise an episode that just ended was played with, until its record is kept.
        played_with: dict[int, Tensor] = {}

        def episode_ended(slots: Tensor) -> None:
            # A new episode starts with new noise, before the policy picks its first action.
            for i in slots.tolist():
                if not greedy[i]:
                    played_with[i] = noise.eps[i].clone()
            noise.redraw(slots.tolist())

        def record(step: Step) -> None:
            targets: dict[int, Tensor] = {}
            if not head.discrete:
                # A group that stepped has an active slot; one that sat the step out has none.
                for sl in env.parts:
                    if bool(step.active[sl].any()):
                        pre = pending[sl.start].popleft()
                        targets.update({i: pre[i - sl.start] for i in range(sl.start, sl.stop)})
            for i in step.active.nonzero().squeeze(-1).tolist():
                obs_buf[i].append(step.observation[i].reshape(-1).clone())
                act_buf[i].append(step.action[i])
                if targets:
                    tgt_buf[i].append(targets[i])
                if step.ended[i]:
                    trajectories.append((i, torch.stack(obs_buf[i]), torch.stack(act_buf[i]),
                                         torch.stack(tgt_buf[i]) if tgt_buf[i] else None,
                                         None if noise is None or greedy[i]
                                         else played_with.pop(i)))
                    obs_buf[i], act_buf[i], tgt_buf[i] = [], [], []

        if self.starts is None:
            # One rollout: slot i plays its share of the episodes from the env's own starts.
            waves = [([self.episodes // n + (i < self.episodes % n) for i in range(n)], None)]
        else:
            # Waves of one episode per slot, every episode seeded: slot i of wave w starts from
            # start (w, i mod starts).
            waves = []
            for w in range(self.episodes // n):
                starts = [derive_seed(ctx.seed, _STREAM_STARTS, ctx.iteration, ctx.rank, w, k)
                          for k in range(self.starts)]
                waves.append(([1] * n, [starts[i % self.starts] for i in range(n)]))
        episodes, steps = [], 0
        for w, (quota, seeds) in enumerate(waves):
            trajectories.clear()
            if noise is not None:
                noise.redraw(range(n))
            for queue in pending.values():
                queue.clear()
            played = rollout(env, policy if head.discrete else continuous_policy, quota=quota,
                             seeds=seeds, observe=record,
                             on_end=episode_ended if noise is not None else None)
            steps += played.steps
            for (slot, o, a, t, e), r in zip(trajectories, played.returns.tolist(), strict=True):
                episode = {"observation": o, "action": a, "return": float(r), "slot": slot,
                           "start": 0 if seeds is None else w * self.starts + slot % self.starts}
                if t is not None:
                    episode["target"] = t
                episodes.append(episode)
                if e is not None:
                    perturbed_episodes.append((e, o))
        if noise is not None:
            self._adapt_noise(noise, perturbed_episodes, ctx)
        return episodes, steps

    @torch.no_grad()
    def _adapt_noise(self, noise: _SlotNoise, episodes: list[tuple[Tensor, Tensor]],
                     ctx: "RuleContext") -> None:
        """Measure how far the perturbed copies acted from the policy, and adapt ``σ``.

        The distance is measured on the observations each perturbed episode visited: the share
        of them where its action differs from the policy's (discrete), or the root mean square
        difference of the pre-squash means (continuous); summed over every rank's episodes. With
        ``param_noise_target``, ``σ`` grows by 5% after an iteration below the target and shrinks
        by 5% after one above it (Plappert et al. 2018's adaptive scaling).
        """
        head = self.module.actions
        total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        for eps, obs in episodes:
            obs = obs.to(ctx.device)
            mine, theirs = self.module(obs), noise.apply_one(eps, obs)
            if head.discrete:
                total[0] += (mine.argmax(-1) != theirs.argmax(-1)).sum()
            else:
                total[0] += ((head.loc(mine) - head.loc(theirs)) ** 2).mean(-1).sum()
            total[1] += len(obs)
        self._sigma_used = noise.sigma
        ctx.all_reduce_(total, "sum")
        if total[1] == 0:
            return
        distance = float(total[0] / total[1])
        self._distance = distance if head.discrete else math.sqrt(distance)
        if self.param_noise_target is not None:
            self._sigma *= 1.05 if self._distance < self.param_noise_target else 1 / 1.05

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"elites": [dict(e) for e in getattr(self, "_elites", [])],
                "window": [[dict(e) for e in elites] for elites in getattr(self, "_window", [])],
                "param_noise": getattr(self, "_sigma", self.param_noise)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._elites = [dict(e) for e in state.get("elites", [])]
        self._window = [[dict(e) for e in elites] for elites in state.get("window", [])]
        # An adapted σ carries over; a fixed one is the config's.
        saved = state.get("param_noise")
        self._sigma = (saved if saved is not None and self.param_noise is not None
                       and self.param_noise_target is not None else self.param_noise)
