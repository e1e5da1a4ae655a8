"""Off-policy actor-critic training: what DDPG and DSAC-T share.

Both rules (:mod:`unitrain.rules.gradient.ddpg`, Lillicrap et al. 2016, "Continuous control with deep
reinforcement learning"; :mod:`unitrain.rules.gradient.dsac_t`, Duan et al., "Distributional Soft
Actor-Critic with Three Refinements", arXiv:2310.05858) learn from a replay memory of past
transitions instead of the latest batch. A rule composes :class:`OffPolicyLoop`, which owns
everything that does not depend on the loss, and keeps its own ``step``: ``return
self.loop.step(ctx, self.update)``. Their shared hyperparameters are the fields of
:class:`OffPolicyFields`.

- **Actions.** The module is the actor through the shared action contract
  (:mod:`unitrain.policy.action`): its pre-squash mean ``u`` gives the action ``tanh(u)`` in ``[-1, 1]``,
  scaled affinely to the env's bounds. Critics and the replay memory see the ``[-1, 1]`` action,
  so one set of hyperparameters fits every action range; the deterministic action is
  ``module.act``, as for every rule.
- **Collection.** Each iteration collects ``frames_per_batch`` transitions per process through a
  TorchRL collector (``ctx.collector``) with the rule's exploration (a function of the
  observation giving actions in ``[-1, 1]``), drawn from the loop's seeded generator.
- **Warm-up.** Until a process has collected ``warmup_frames`` transitions its actions are
  uniform on ``[-1, 1]``; no gradient step is taken before the memory holds
  ``max(warmup_frames, batch_size)`` transitions. Collecting them happens inside one iteration.
- **Update-to-data ratio.** After warm-up, ``utd_ratio`` gradient updates are made per collected
  frame (fractions carry over between iterations), each on ``batch_size`` transitions sampled
  uniformly from the memory (:class:`~unitrain.envs.replay.Replay`); the rule's ``update(batch, ctx)`` makes one.
- **Several processes.** Every process collects with its own seeds into its own memory; gradients
  are averaged across processes before every optimizer step, so parameters, target networks and
  optimizer states stay identical.
- **Divergence.** Gradients are checked after averaging (the same verdict on every process); a
  non-finite one stops the run with :class:`~unitrain.errors.TrainingDiverged` before any
  parameter changes, so the last checkpoint and the in-memory parameters stay usable.
- **Checkpoints.** The loss module (critics, target networks, and any other state of the loss)
  is registered under ``module.aux[<rule name>]`` and saved with the module; the optimizers with
  the run; the frame and update counters, and with ``save_buffer`` the replay memory, in the
  rule's state (:meth:`OffPolicyLoop.state_dict`).

Critics: a module that defines ``make_critic()`` supplies its own — each call returns a new
network ``(observation, action) -> output`` with ``action`` in ``[-1, 1]`` (the output each rule
expects is on its page); otherwise the rule builds MLP critics over the flattened observation
concatenated with the action (``critic_hidden`` units).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModule, TensorDictModuleBase
from torch import Tensor, nn
from torchrl.data import Composite
from torchrl.modules import MLP
from torchrl.objectives import SoftUpdate

from unitrain.envs.observation import batch_shape, flat_observation
from unitrain.envs.replay import Replay
from unitrain.errors import ConfigError, TrainingDiverged, UserError, check
from unitrain.rules.base import UpdateRule
from unitrain.validation import bounded

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.action import ActionHead
    from unitrain.policy.module import RLModule
    from unitrain.rules.base import RuleContext

__all__ = ["CriticFields", "OffPolicyFields", "OffPolicyLoop", "Critic", "LeanModule",
           "PolyakUpdate", "TargetCopy", "adam", "critic_steps", "make_critics"]


class LeanModule(TensorDictModule):
    """A ``TensorDictModule`` that writes its module's tensors into the input TensorDict as
    they are.

    The losses call their networks several times per gradient update; the generic path
    converts every output with ``TensorDict.from_any`` (type probes, among them an import
    lookup) and goes through keyword dispatch. Called with a TensorDict alone, this one reads
    ``in_keys``, calls the module and sets ``out_keys``; any other call takes the generic
    path. Parameters and state-dict keys are those of a ``TensorDictModule``.
    """

    def forward(self, tensordict: TensorDictBase | None = None, *args: Any,
                **kwargs: Any) -> TensorDictBase:
        if args or kwargs or self._kwargs is not None or not isinstance(tensordict,
                                                                        TensorDictBase):
            return super().forward(tensordict, *args, **kwargs)
        outputs = self.module(*(tensordict.get(key) for key in self.in_keys))
        if not isinstance(outputs, tuple):
            outputs = (outputs,)
        if len(outputs) != len(self.out_keys) or not all(isinstance(t, Tensor) for t in outputs):
            raise RuntimeError(f"{type(self.module).__name__} returned {len(outputs)} "
                               f"outputs for out_keys {self.out_keys}")
        for key, value in zip(self.out_keys, outputs):
            tensordict.set(key, value)
        return tensordict


class Critic(nn.Module):
    """The default critic: an MLP over ``[flatten(observation), action]``.

    A named observation (``Dict``/``Tuple``) is read as its entries flattened and concatenated
    in the documented order (:func:`unitrain.envs.observation.flat_observation`), images
    included (as float values 0-255).

    Args:
        obs_shape: observation shape, or ``{name: shape}`` of named entries (flattened before
            the first layer).
        act_dim: action size.
        hidden: hidden layer widths.
        activation: hidden activation class.
        outputs: output features (1 for a Q-value; 2 for DSAC-T's mean and raw std).
    """

    def __init__(self, obs_shape: tuple[int, ...] | dict[str, tuple[int, ...]], act_dim: int,
                 hidden: tuple[int, ...], activation: type[nn.Module], outputs: int) -> None:
        super().__init__()
        self.layout = (dict(obs_shape) if isinstance(obs_shape, dict)
                       else tuple(int(s) for s in obs_shape))
        size = (sum(math.prod(s) for s in obs_shape.values()) if isinstance(obs_shape, dict)
                else math.prod(obs_shape))
        self.net = MLP(in_features=size + act_dim, out_features=outputs,
                       num_cells=list(hidden), activation_class=activation)

    def forward(self, observation: Any, action: Tensor) -> Tensor:
        """The critic's outputs, ``[..., outputs]``.

        Args:
            observation: ``[..., *obs_shape]``, or named entries.
            action: ``[..., act_dim]`` in ``[-1, 1]``.
        """
        obs = flat_observation(observation, self.layout)
        return self.net(torch.cat([obs.to(action.dtype), action], dim=-1))


def make_critics(module: "RLModule", count: int, outputs: int, hidden: tuple[int, ...],
                 activation: type[nn.Module]) -> list[nn.Module]:
    """``count`` distinct critics: the module's ``make_critic()`` or default MLPs.

    Args:
        module: the user's module (bound to its env).
        count: critics to build.
        outputs: output features of a default critic.
        hidden: hidden widths of a default critic.
        activation: hidden activation of a default critic.
    """
    make = getattr(module, "make_critic", None)
    if callable(make):
        critics = [make() for _ in range(count)]
        if not all(isinstance(c, nn.Module) for c in critics):
            raise UserError(f"{type(module).__name__}.make_critic() must return an nn.Module")
        return critics
    info = module.env_info
    assert info is not None
    return [Critic(info.layout, info.act_dim, hidden, activation, outputs)
            for _ in range(count)]


class PolyakUpdate(SoftUpdate):
    """TorchRL's ``SoftUpdate`` moving every target tensor in one ``torch._foreach_lerp_``.

    The same update, ``target <- target + (1 - eps) (source - target)`` with ``eps = 1 - tau``,
    on the same (source, target) pairs ``SoftUpdate`` finds at construction, without walking
    the loss's parameter TensorDicts on every step.
    """

    def pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """The (source, target) tensors this update moves, found on the first call."""
        pairs = self.__dict__.get("_pairs")
        if pairs is None:
            if not self.initialized:
                raise RuntimeError(f"{type(self).__name__} must be initialized (init_()) first")
            sources, targets = [], []
            for key, source in self._sources.items(True, True):
                key = key if isinstance(key, tuple) else (key,)
                sources.append(source)
                targets.append(self._targets.get(("target_" + key[0], *key[1:])))
            if any(t.requires_grad for t in targets):
                raise RuntimeError("the target parameter is part of a graph.")
            pairs = self.__dict__["_pairs"] = (sources, targets)
        return pairs

    def step(self) -> None:
        sources, targets = self.pairs()
        with torch.no_grad():
            torch._foreach_lerp_(targets, sources, 1 - self.eps)


class TargetCopy(PolyakUpdate):
    """The hard target update: every call of :meth:`step` copies every source tensor into its
    target (TorchRL's ``HardUpdate`` copies only on every ``interval + 1``-th call)."""

    def __init__(self, loss_module: Any) -> None:
        with warnings.catch_warnings():
            # SoftUpdate warns about its eps = 1 - tau = 0, which a copy never uses.
            warnings.filterwarnings("ignore", message="Found an eps value")
            super().__init__(loss_module, tau=1.0)

    def step(self) -> None:
        sources, targets = self.pairs()
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)


def adam(params: Any, lr: float) -> torch.optim.Adam:
    """Adam with its fused implementation (one kernel for all parameters) where the
    parameters' device has one, else the multi-tensor one."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused, foreach=None if fused else True)


def critic_steps(rule: "CriticFields", loss: nn.Module, critic_params: Any, actor_params: Any,
                 log_alpha: Tensor | None = None
                 ) -> tuple[SoftUpdate, torch.optim.Adam, torch.optim.Adam, torch.optim.Adam | None]:
    """What every rule with target critics steps: the Polyak update of ``loss``'s target
    networks (``rule.tau``), Adam on its critics (``rule.lr_critic``), Adam on the actor
    (``rule.lr_actor``) and, for a learned temperature, Adam on its logarithm
    (``rule.lr_alpha``).

    Args:
        rule: the hyperparameters.
        loss: a TorchRL loss with target networks.
        critic_params: the loss's critic parameters (a ``TensorDict`` of them).
        actor_params: the actor's parameters.
        log_alpha: the temperature's logarithm, or ``None`` without one.

    Returns:
        ``(updater, critic optimizer, actor optimizer, temperature optimizer or None)``.
    """
    return (PolyakUpdate(loss, tau=rule.tau),
            adam(critic_params.values(True, True), rule.lr_critic),
            adam(actor_params, rule.lr_actor),
            None if log_alpha is None else adam([log_alpha], rule.lr_alpha))


class _Explorer(TensorDictModuleBase):
    """The collector's policy: the rule's exploration (or uniform warm-up actions).

    Writes ``"action"`` in env units (what the env steps with) and ``"action_unit"`` in
    ``[-1, 1]`` (what the replay memory keeps); for discrete actions both are the action's
    index, and warm-up actions are uniform over the indices. The user's module is registered so that the
    collector sees parameters already on the policy device and runs this object as it is.
    """

    in_keys = ["observation"]
    out_keys = ["action", "action_unit"]

    def __init__(self, loop: "OffPolicyLoop", module: nn.Module,
                 explore: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.__dict__["loop"] = loop
        self.__dict__["explore"] = explore
        self.random = True
        # Output specs spare the collector a dry run of the policy (a draw of exploration noise).
        # Discrete actions are indices both for the env and for the memory.
        spec = loop.head.spec(loop.device, "action_unit")
        unit = spec["action"] if loop.head.discrete else spec["action_unit"]
        self.spec = Composite(action=spec["action"], action_unit=unit, device=loop.device)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        observation = tensordict.get("observation")
        head = self.loop.head
        with torch.no_grad():
            if self.random and head.discrete:
                shape = batch_shape(observation, self.loop.obs_shape)
                unit = torch.randint(head.act_dim, shape, generator=self.loop.generator,
                                     device="cpu").to(self.loop.device)
            elif self.random:
                shape = (*batch_shape(observation, self.loop.obs_shape), head.act_dim)
                unit = self.loop.draw(shape, uniform=True) * 2.0 - 1.0
            else:
                unit = self.explore(observation)
        tensordict.set("action_unit", unit)
        tensordict.set("action", head.to_env(unit))
        return tensordict


@dataclass
class CriticFields(UpdateRule):
    """The hyperparameters of an actor learning from twin critics over a replay memory (fields
    and their checks only): what the off-policy rules and CEM-RL share. A recurrent module is
    refused: the replay memory keeps single transitions, without states or burn-in.

    Args:
        lr_actor: Adam step size of the actor (the module).
        lr_critic: Adam step size of the critics.
        gamma: discount factor.
        tau: Polyak step of the target networks, in (0, 1].
        batch_size: transitions per gradient update.
        buffer_size: replay memory capacity per process (oldest transitions are overwritten).
        warmup_frames: transitions per process collected before the first update (the memory
            then holds at least ``max(warmup_frames, batch_size)``).
        utd_ratio: gradient updates per collected frame after warm-up (update-to-data ratio).
        critic_hidden: hidden widths of the default critics.
        save_buffer: save the replay memory in checkpoints, so a resumed run continues with it
            (about ``buffer_size x (2 obs_dim + act_dim + 3) x 4`` bytes per checkpoint when
            full); otherwise a resumed run refills ``max(warmup_frames, batch_size)``
            transitions with its current policy before updating again.
    """

    feedforward_only = "its replay memory keeps single transitions, without recurrent states"

    lr_actor: float = bounded(3e-4, "(0, inf]")
    lr_critic: float = bounded(3e-4, "(0, inf]")
    gamma: float = bounded(0.99, "(0, 1]")
    tau: float = bounded(0.005, "(0, 1]")
    batch_size: int = bounded(256, "[1, buffer_size]")
    buffer_size: int = bounded(1_000_000, "[1, inf]")
    warmup_frames: int = bounded(10_000, "[0, buffer_size]")
    utd_ratio: float = bounded(1.0, "(0, inf]")
    critic_hidden: tuple[int, ...] = bounded((256, 256), "[1, inf]")
    save_buffer: bool = False

    action_spaces: ClassVar[tuple[str, ...]] = ("continuous",)

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        if info.discrete:
            raise ConfigError("env.id", f"{info.id} has discrete actions ({info.act_dim}); "
                                        f"{self.name} needs a continuous (Box) action space "
                                        "(for discrete actions use dqn, ppo or reinforce)")
        bounds = (info.action_low, info.action_high)
        if any(b is None or not bool(torch.isfinite(b).all()) for b in bounds):
            raise ConfigError("env.id", f"{info.id} has unbounded actions; {self.name} squashes "
                                        "actions into the env's bounds, which must be finite")

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Those :func:`critic_steps` made: critics, actor and, if learned, the temperature."""
        return [self.critic_opt, self.actor_opt] + ([self.alpha_opt] if self.alpha_opt else [])

# Fewer gradient updates than this in a whole run is worth a warning: the critics of the
# off-policy rules barely start to fit in a few hundred updates.
FEW_UPDATES = 1_000


@dataclass
class OffPolicyFields(CriticFields):
    """The hyperparameters every off-policy actor-critic rule shares: :class:`CriticFields`
    and how much it collects per iteration.

    Args:
        frames_per_batch: transitions collected per iteration per process, a multiple of
            ``env.num_envs`` (``None``: one step of every env).
        compile: compile the rule's loss computations (forward and backward) with
            ``torch.compile``: faster updates once compiled, at the price of a compilation of
            tens of seconds on the first updates of every process (worth it for long runs;
            see ``docs/offpolicy_speed.md``).
    """

    frames_per_batch: int | None = bounded(None, "[1, inf]", null=True)
    compile: bool = False

    def step(self, ctx: "RuleContext") -> dict[str, float]:
        """One iteration of the rule's :class:`OffPolicyLoop`, with the rule's ``_update``."""
        return self.loop.step(ctx, self._update)

    def check_env(self, env: "EnvSpec", info: "EnvInfo") -> None:
        super().check_env(env, info)
        if self.frames_per_batch is not None:
            check(self.frames_per_batch % env.num_envs == 0, "optimizer.frames_per_batch",
                  f"a multiple of env.num_envs={env.num_envs}", self.frames_per_batch)

    def budget_warning(self, max_frames: int, processes: int) -> str | None:
        # As OffPolicyLoop schedules them: no update before a process holds
        # max(warmup_frames, batch_size) transitions, then utd_ratio updates per frame.
        per_process = max_frames // max(1, processes)
        ready = max(self.warmup_frames, self.batch_size)
        if per_process <= ready:
            field = "warmup_frames" if self.warmup_frames >= self.batch_size else "batch_size"
            return (f"{self.name} makes no update in {max_frames:,} frames: each process "
                    f"collects {ready:,} frames before its first one (optimizer.{field}); "
                    f"lower optimizer.{field} or raise trainer.max_frames")
        updates = math.floor(self.utd_ratio * (per_process - ready))
        if updates < FEW_UPDATES:
            return (f"{self.name} makes about {updates:,} updates in {max_frames:,} frames "
                    f"({ready:,} warm-up frames, then optimizer.utd_ratio={self.utd_ratio:g} "
                    f"per frame), fewer than {FEW_UPDATES:,}; raise optimizer.utd_ratio or "
                    "trainer.max_frames, or lower optimizer.warmup_frames")
        return None


def _mean(values: list[Tensor | float]) -> float:
    """The mean of per-update metrics (tensors on one device, or numbers), as a float."""
    device = next((v.device for v in values if isinstance(v, Tensor)), None)
    return float(torch.stack([torch.as_tensor(v, device=device).detach().reshape(())
                              .to(torch.float64) for v in values]).mean())


class OffPolicyLoop:
    """Replay, warm-up, collection and the update-to-data schedule of an off-policy rule.

    Args:
        rule: the rule's hyperparameters (its name is used in messages).
        module: the user's module, bound to a continuous, bounded action space (or a discrete
            one, for a rule that acts by index: DQN).
        ctx: the run's services.
        explore: ``observation -> action in [-1, 1]`` (an index for discrete actions), the
            rule's exploration (no gradient).
        metric_names: the per-update metrics the rule's ``update`` returns (reported as NaN,
            hence not logged, in iterations without updates, so every step has the same keys).
    """

    def __init__(self, rule: CriticFields, module: "RLModule", ctx: "RuleContext",
                 explore: Callable[[Tensor], Tensor], metric_names: tuple[str, ...]) -> None:
        info = ctx.env_info
        if info is None:
            raise UserError(f"{rule.name}: needs an env; give the Trainer env=...")
        self.head: ActionHead = module.actions
        # A rule that fills the memory itself (CEM-RL) has no frames_per_batch and never collects.
        per_batch = getattr(rule, "frames_per_batch", None)
        self.frames_per_batch = per_batch or ctx.env_spec.num_envs
        self.rule, self.metric_names = rule, metric_names
        self.obs_shape = info.layout
        self.generator = ctx.generator
        self.device = ctx.device
        self.replay = Replay(rule.buffer_size, rule.batch_size, ctx.generator, ctx.device)
        self.env: Any = None
        self._collector: Iterator[TensorDictBase] | None = None
        self._explorer = _Explorer(self, module, explore)
        self.collected = 0       # frames this process collected, warm-up included
        self.trained_frames = 0  # frames collected in iterations that began with a ready memory
        self.updates = 0         # gradient updates made

    def remember(self, transitions: TensorDictBase) -> None:
        """Add transitions this process played outside the loop's own collection (CEM-RL's
        population episodes) to the memory; they count as collected frames."""
        self.replay.extend(transitions)
        self.collected += transitions.numel()

    def count_update(self) -> None:
        """Count a gradient update made outside :meth:`step` (CEM-RL's critic steps)."""
        self.updates += 1

    def draw(self, shape: tuple[int, ...], uniform: bool = False) -> Tensor:
        """Standard normal (or uniform on [0, 1)) draws from the loop's generator, on the device."""
        draw = torch.rand if uniform else torch.randn
        return draw(shape, generator=self.generator).to(self.device)

    def step(self, ctx: "RuleContext",
             update: Callable[[TensorDictBase, "RuleContext"], dict[str, Tensor | float]]
             ) -> dict[str, float]:
        """Collect one iteration's frames, then make the updates they are due.

        Args:
            ctx: the run's services.
            update: one gradient update on a replayed batch, returning its metrics.
        """
        if self._collector is None:
            self.env = ctx.train_env()
            self._collector = iter(ctx.collector(self._explorer, self.frames_per_batch))
        rule = self.rule
        ready_size = max(rule.warmup_frames, rule.batch_size)
        ready = len(self.replay) >= ready_size
        frames = self._collect()
        while len(self.replay) < ready_size:
            frames += self._collect()
        if ready:
            self.trained_frames += frames
        due = math.floor(rule.utd_ratio * self.trained_frames + 1e-9) - self.updates
        # Metrics stay tensors until the iteration's updates are done: one reduction per key
        # instead of a host synchronisation per update.
        values: dict[str, list[Tensor | float]] = {}
        start = time.perf_counter()
        for _ in range(due):
            for key, value in self.update_once(update, ctx).items():
                values.setdefault(key, []).append(value)
        elapsed = time.perf_counter() - start
        nan = float("nan")
        metrics = {key: _mean(values[key]) if key in values else nan
                   for key in self.metric_names}
        metrics.update({"optim/updates": float(due), "train/updates_total": float(self.updates),
                        "train/buffer_size": float(len(self.replay)),
                        "perf/updates_per_s": due / elapsed if due else nan,
                        "frames": float(frames)})
        return metrics

    def compiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a loss computation) through ``torch.compile`` if the rule's ``compile`` is
        set, else ``fn`` itself. Random draws inside keep eager semantics (the same
        generator), so a compiled run resumes and replicates across processes exactly.

        TorchRL wraps every loss method in one function, whose compiled versions count against
        torch's recompile limit per function (8 by default): a process that sets up many
        compiled rules (more than four) runs the later ones eagerly."""
        if not getattr(self.rule, "compile", False):
            return fn
        return torch.compile(fn, dynamic=False, options={"fallback_random": True})

    def update_once(self, update: Callable[[TensorDictBase, "RuleContext"],
                                           dict[str, Tensor | float]],
                    ctx: "RuleContext") -> dict[str, Tensor | float]:
        """One gradient update on a freshly sampled batch, counted; returns its metrics."""
        metrics = update(self.replay.sample(), ctx)
        self.updates += 1
        return metrics

    def _collect(self) -> int:
        assert self._collector is not None
        self._explorer.random = self.collected < self.rule.warmup_frames
        batch = next(self._collector)
        batch.set("action", batch.get("action_unit"))
        self.replay.extend(batch)
        self.collected += batch.numel()
        return batch.numel()

    def descend(self, loss: Tensor, optimizers: list[torch.optim.Optimizer],
                ctx: "RuleContext", max_grad_norm: float | None = None) -> None:
        """One step of ``optimizers`` on ``loss``, gradients averaged across processes.

        Args:
            loss: a scalar whose gradient reaches the optimizers' parameters.
            optimizers: the optimizers to step.
            ctx: the run's services (collectives, iteration number).
            max_grad_norm: rescale the averaged gradients to at most this total 2-norm
                (``None``: no clipping).

        Raises:
            TrainingDiverged: a gradient is NaN or infinite (no parameter is changed).
        """
        params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        ctx.all_reduce_grads(params)
        grads = [p.grad for p in params if p.grad is not None]
        norm = nn.utils.get_total_norm(grads) if grads else None
        # Averaged gradients are identical on every rank, so every rank stops together.
        if norm is not None and not bool(torch.isfinite(norm)):
            raise TrainingDiverged(
                f"{self.rule.name}: non-finite gradients (a NaN or infinite loss) at iteration "
                f"{ctx.iteration + 1}, gradient update {self.updates + 1}; the run stopped and "
                "its last checkpoint holds the last finite state (try lower learning rates)")
        if max_grad_norm is not None and norm is not None:
            nn.utils.clip_grads_with_norm_(grads, max_grad_norm, norm)
        for opt in optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        """Counters, and the replay memory when the rule saves it."""
        return {"collected": self.collected, "trained_frames": self.trained_frames,
                "updates": self.updates,
                "replay": self.replay.state_dict() if self.rule.save_buffer else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.collected = int(state["collected"])
        self.trained_frames = int(state["trained_frames"])
        self.updates = int(state["updates"])
        if self.rule.save_buffer and state.get("replay") is not None:
            self.replay.load_state_dict(state["replay"])
