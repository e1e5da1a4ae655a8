"""The action contract: what a module's output means, decided once by the action space.

Every update rule reads a module's output through the :class:`ActionHead` that the module holds
(``module.actions``), so the same weights mean the same policy whichever rule trained them:

- **discrete** (``Discrete(n)``): the output is ``n`` logits; the deterministic action is their
  argmax and the stochastic policy is the categorical distribution of their softmax.
- **multi-discrete** (``MultiDiscrete(nvec)``, ``k = len(nvec)`` sub-actions): the output is
  ``sum(nvec)`` logits laid out in consecutive blocks, sub-action ``i``'s ``nvec[i]`` logits
  being the ``i``-th block (``out[..., o_i : o_i + nvec[i]]``, ``o_i = nvec[0] + … +
  nvec[i-1]``). The action is ``[..., k]`` integers; the deterministic action is each block's
  argmax and the stochastic policy is ``k`` independent categoricals, one per block
  (:class:`IndependentCategoricals`: the log-probability and the entropy are the sums of the
  blocks').
- **continuous** (1-D ``Box``): the output's first ``act_dim`` entries are a pre-squash mean
  ``u``. With finite bounds the deterministic action is ``low + (tanh(u) + 1) / 2 · (high −
  low)``, and the stochastic policy is the same map applied to ``u + σ·ξ``, ``ξ ~ N(0, I)`` (a
  tanh-Gaussian, TorchRL's ``TanhNormal``), the parameterisation of SAC (Haarnoja et al. 2018,
  appendix C) and DSAC-T; with unbounded actions the map is the identity (a plain Gaussian).
  The log standard deviation ``log σ`` is, by the module's choice (``action_std``):

  - ``"param"`` (default): a learned state-independent vector ``aux.log_std`` (the module
    returns ``act_dim`` outputs);
  - ``"state"``: the module returns ``2·act_dim`` outputs, the mean and then a raw ``log σ``.

**Action masks.** An env may say which actions are allowed with every observation: a ``bool``
mask ``[..., A]`` over the logits (``A = n`` or ``sum(nvec)``, the same blocks; ``True``:
allowed). Where a mask is given, the policy is the masked one: logits of disallowed actions
are ``-inf`` (:meth:`ActionHead.mask_logits`), so the deterministic action is the argmax over
the allowed actions (per block), and the stochastic policy is the softmax over the allowed
actions only (TorchRL's ``MaskedCategorical`` per block, :meth:`ActionHead.distribution`),
whose log-probabilities and entropy are what PPO and REINFORCE optimise. Every sub-action needs
one allowed value. The mask reaches the head as ``module.act(observation, mask)`` and
``head.deterministic(out, mask)``, and in a run as the ``"action_mask"`` entry next to each
``"observation"``, filled from:

- a gymnasium env's ``info["action_mask"]`` (at reset and at every step: an array of ``A``
  entries, or for ``MultiDiscrete`` a tuple of one array per sub-action);
- a gymnasium env's ``Dict`` observation entry ``"action_mask"`` (the same values), taken out
  of the observation and handed over as if it came in the info
  (:class:`unitrain.envs.gymnasium.MaskFromObservation`): the module's ``forward`` never
  receives it and observation statistics never see it;
- a TorchRL env's ``"action_mask"`` observation entry (TorchRL's convention).

An env backend hands the masks over as its ``mask``/``final_mask`` (see
:class:`unitrain.envs.BatchedEnv`).

Rules add exploration (sampling, noise, random actions) around this policy, never another
meaning: the deterministic action of every rule is :meth:`ActionHead.deterministic`, which is
what :meth:`unitrain.RLModule.act` returns.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from unitrain.errors import ConfigError
from unitrain.policy.inputs import ModuleCall, call_module

if TYPE_CHECKING:
    from torchrl.data import Composite

    from unitrain.envs.info import EnvInfo

__all__ = ["ActionHead", "IndependentCategoricals", "LogStd", "ACTION_STD", "MASK_KEY"]

ACTION_STD = ("param", "state")
# Where a run's batches hold the action masks (next to "observation").
MASK_KEY = "action_mask"


class IndependentCategoricals(torch.distributions.Distribution):
    """Independent categoricals over consecutive blocks of logits: the stochastic policy of a
    ``MultiDiscrete(nvec)`` action space (with an optional mask of allowed actions).

    Args:
        logits: ``[..., sum(nvec)]``, block ``i`` the logits of sub-action ``i``.
        nvec: the number of values of each sub-action.
        mask: ``[..., sum(nvec)]`` bool, ``True`` where an action is allowed, or ``None``.

    Samples are ``[..., len(nvec)]`` integers; :meth:`log_prob` and :meth:`entropy` are the sums
    over the blocks.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, logits: Tensor, nvec: tuple[int, ...], mask: Tensor | None = None) -> None:
        from torchrl.modules import MaskedCategorical

        self.nvec = tuple(int(k) for k in nvec)
        blocks = logits.split(self.nvec, -1)
        if mask is None:
            self.parts = [torch.distributions.Categorical(logits=b) for b in blocks]
        else:
            masks = mask.expand_as(logits).split(self.nvec, -1)
            self.parts = [MaskedCategorical(logits=b, mask=m) for b, m in zip(blocks, masks)]
        super().__init__(logits.shape[:-1], torch.Size([len(self.nvec)]), validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        return torch.stack([d.sample(sample_shape) for d in self.parts], -1)

    def log_prob(self, value: Tensor) -> Tensor:
        value = value.long()
        return sum(d.log_prob(value[..., i]) for i, d in enumerate(self.parts))

    def entropy(self) -> Tensor:
        return sum(d.entropy() for d in self.parts)

    @property
    def mode(self) -> Tensor:
        return torch.stack([d.logits.argmax(-1) for d in self.parts], -1)

    @property
    def deterministic_sample(self) -> Tensor:
        return self.mode


class LogStd(nn.Module):
    """A learned state-independent log standard deviation (``module.aux.log_std.log_std``)."""

    def __init__(self, act_dim: int, init: float = 0.0) -> None:
        super().__init__()
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init)))


class ActionHead:
    """Reads a module's output as actions of one action space (see the module docstring).

    Args:
        info: the env's action space.
        std: ``"param"`` or ``"state"`` (continuous actions; ignored for discrete ones).
    """

    def __init__(self, info: "EnvInfo", std: str = "param") -> None:
        if std not in ACTION_STD:
            raise ConfigError("module.action_std", f"got {std!r}; expected 'param' or 'state'")
        self.discrete = info.discrete
        self.act_dim = info.act_dim
        self.nvec: tuple[int, ...] | None = info.nvec
        self.masked = info.masked
        self.std = std
        self.env_id = info.id
        self.bounded = (not info.discrete and info.action_low is not None
                        and bool(torch.isfinite(info.action_low).all()
                                 & torch.isfinite(info.action_high).all()))
        self.low = info.action_low
        self.high = info.action_high

    def __deepcopy__(self, memo: dict) -> "ActionHead":
        # Bounds are constants shared by every copy (TorchRL losses deep-copy their networks).
        clone = copy.copy(self)
        memo[id(self)] = clone
        return clone

    # ------------------------------------------------------------------ shapes
    @property
    def outputs(self) -> int:
        """The module's output size this head expects."""
        if self.discrete:
            return self.act_dim
        return 2 * self.act_dim if self.std == "state" else self.act_dim

    def describe(self) -> str:
        """What the output must hold, for error messages."""
        if self.nvec is not None:
            return (f"{self.act_dim} logits ({self.env_id} has MultiDiscrete({list(self.nvec)}) "
                    "actions: one block of logits per sub-action, in order)")
        if self.discrete:
            return f"{self.act_dim} logits ({self.env_id} has {self.act_dim} discrete actions)"
        if self.std == "state":
            return (f"{self.outputs} values: the pre-squash mean ({self.act_dim}) then the log std "
                    f"({self.act_dim}), because action_std is 'state'")
        return (f"{self.act_dim} values: the pre-squash mean ({self.env_id} has {self.act_dim}-d "
                "actions; set action_std: state for a state-dependent std from 2x outputs)")

    def check(self, out: Tensor, owner: str) -> None:
        """Raise a :class:`ConfigError` unless ``out``'s last dim is :attr:`outputs`."""
        if not isinstance(out, Tensor):
            raise ConfigError("module", f"{owner}.forward returns a {type(out).__name__}; "
                                        f"expected a tensor of {self.describe()}")
        size = int(out.shape[-1]) if out.ndim else 1
        if size != self.outputs:
            raise ConfigError("module", f"{owner}.forward returns {size} outputs per observation; "
                                        f"expected {self.describe()}")

    # ------------------------------------------------------------------ reading outputs
    def loc(self, out: Tensor) -> Tensor:
        """The pre-squash mean ``u`` ``[..., act_dim]`` (continuous)."""
        return out[..., : self.act_dim]

    def log_std(self, out: Tensor, param: nn.Module | None) -> Tensor:
        """The raw log standard deviation ``[..., act_dim]`` (continuous).

        Args:
            out: the module's output.
            param: the module's :class:`LogStd` (``"param"`` mode).
        """
        loc = self.loc(out)
        if self.std == "state":
            return out[..., self.act_dim: 2 * self.act_dim]
        assert param is not None, "action_std 'param' needs the module's aux.log_std"
        return param.log_std.to(loc).expand_as(loc)

    def to_env(self, unit: Tensor) -> Tensor:
        """Map an action in ``[-1, 1]`` to the env's bounds (identity when unbounded)."""
        if not self.bounded:
            return unit
        low, high = self.low.to(unit), self.high.to(unit)
        return low + (unit + 1.0) * (0.5 * (high - low))

    def squash(self, pre: Tensor) -> Tensor:
        """Map a pre-squash action to env units: ``to_env(tanh(pre))`` (identity if unbounded)."""
        return self.to_env(torch.tanh(pre)) if self.bounded else pre

    def mask_logits(self, out: Tensor, mask: Tensor | None) -> Tensor:
        """The logits with disallowed actions (``mask`` ``False``) at ``-inf``; ``out`` itself
        when ``mask`` is ``None``."""
        if mask is None:
            return out
        return out.masked_fill(~mask.to(torch.bool), float("-inf"))

    def deterministic(self, out: Tensor, mask: Tensor | None = None) -> Tensor:
        """The deterministic action for the module's output: the argmax (per block for
        multi-discrete actions, over the allowed actions where ``mask`` is given), or the
        squashed mean."""
        if self.discrete:
            logits = self.mask_logits(out, mask)
            if self.nvec is not None:
                return torch.stack([b.argmax(-1) for b in logits.split(self.nvec, -1)], -1)
            return logits.argmax(-1)
        return self.squash(self.loc(out))

    def distribution(self, out: Tensor, mask: Tensor | None = None
                     ) -> torch.distributions.Distribution:
        """The stochastic policy of discrete (or multi-discrete) actions for the module's
        output, masked where ``mask`` is given."""
        from torchrl.modules import MaskedCategorical

        assert self.discrete, "ActionHead.distribution: discrete actions only"
        if self.nvec is not None:
            return IndependentCategoricals(out, self.nvec, mask)
        if mask is not None:
            return MaskedCategorical(logits=out, mask=mask.to(torch.bool))
        return torch.distributions.Categorical(logits=out)

    def distribution_class(self) -> type:
        """The TorchRL distribution of the stochastic policy over env-unit actions."""
        from torchrl.modules import IndependentNormal, MaskedCategorical, TanhNormal

        if self.nvec is not None:
            return IndependentCategoricals
        if self.discrete:
            return MaskedCategorical if self.masked else torch.distributions.Categorical
        return TanhNormal if self.bounded else IndependentNormal

    def spec(self, device: torch.device | str, *extra: str) -> "Composite":
        """TorchRL specs of a stochastic actor's outputs (one env's): the action, its log-prob,
        the distribution's parameters, and ``extra`` ``[act_dim]`` entries in ``[-1, 1]``.

        A collector given a policy whose outputs all have specs does not run the policy on a
        dummy input to discover them, so building a collector draws no random numbers.
        """
        from torchrl.data import Bounded, Categorical, Composite, MultiCategorical, Unbounded

        if self.nvec is not None:
            entries = {"logits": Unbounded((self.act_dim,), device=device),
                       "action": MultiCategorical(torch.tensor(self.nvec), (len(self.nvec),),
                                                  device=device)}
        elif self.discrete:
            entries = {"logits": Unbounded((self.act_dim,), device=device),
                       "action": Categorical(self.act_dim, (), device=device)}
        else:
            shape = (self.act_dim,)
            action = (Bounded(self.low, self.high, shape, device=device) if self.bounded
                      else Unbounded(shape, device=device))
            entries = {"loc": Unbounded(shape, device=device),
                       "scale": Unbounded(shape, device=device), "action": action}
            entries.update({key: Bounded(-1.0, 1.0, shape, device=device) for key in extra})
        entries["action_log_prob"] = Unbounded((), device=device)
        return Composite(entries, device=device)

    def distribution_kwargs(self, device: torch.device | str) -> dict:
        """Constructor arguments of :meth:`distribution_class` besides ``loc``/``scale``."""
        if self.nvec is not None:
            return {"nvec": self.nvec}
        if self.discrete or not self.bounded:
            return {}
        return {"low": self.low.to(device), "high": self.high.to(device), "tanh_loc": False}


class _LocScale(nn.Module):
    """``observation -> (loc, scale)`` of the module's Gaussian over pre-squash actions."""

    def __init__(self, module: nn.Module, log_std: LogStd | None,
                 bounds: tuple[float, float], output: nn.Module | None = None) -> None:
        super().__init__()
        self.module = module
        # ``log_std`` lives under ``module.aux``, which ``module`` already registers.
        self.__dict__["log_std"] = log_std
        self.bounds = bounds
        self.output = output

    def forward(self, *inputs: Any) -> tuple[Tensor, ...]:
        head = self.module.actions
        if self.output is None:
            out, carried = call_module(self.module, inputs[0]), ()
        else:
            out, *carried = self.output(*inputs)
        return (head.loc(out), head.log_std(out, self.log_std).clamp(*self.bounds).exp(),
                *carried)


def stochastic_actor(module: nn.Module, log_std_init: float = 0.0,
                     log_std_bounds: tuple[float, float] = (-20.0, 2.0), *,
                     output: nn.Module | None = None, in_keys: tuple = ("observation",),
                     carried: tuple = ()) -> nn.Module:
    """The module's stochastic policy as a TorchRL ``ProbabilisticActor``.

    Reads ``"observation"`` (a sub-TensorDict of named entries for a ``Dict`` observation) and
    writes ``"action"`` (env units) and ``"action_log_prob"``:
    categorical over the logits (independent categoricals over their blocks for multi-discrete
    actions; masked by the batch's ``"action_mask"`` when the env gives masks), or the squashed
    Gaussian of the module's mean and log std
    (clamped to ``log_std_bounds``; ``aux.log_std`` starts at ``log_std_init`` when created here).

    Args:
        module: an :class:`~unitrain.RLModule` bound to its env (``module.actions``).
        log_std_init: initial value of a newly created ``aux.log_std``.
        log_std_bounds: clamp of the log standard deviation.
        output: ``(*in_keys values) -> (module output, *carried values)``, the network that
            computes the module's output (a recurrent module's, from its state); ``None``: the
            module itself on ``"observation"``.
        in_keys: what ``output`` reads.
        carried: the keys of the further values ``output`` returns (written beside the
            distribution's parameters).
    """
    from tensordict.nn import TensorDictModule
    from torchrl.modules import ProbabilisticActor

    head: ActionHead = module.actions
    if head.discrete:
        net = TensorDictModule(ModuleCall(module) if output is None else output,
                               in_keys=list(in_keys), out_keys=["logits", *carried])
        keys = {"logits": "logits", **({"mask": MASK_KEY} if head.masked else {})}
        actor = ProbabilisticActor(net, in_keys=keys,
                                   distribution_class=head.distribution_class(),
                                   distribution_kwargs=head.distribution_kwargs(module.device),
                                   return_log_prob=True)
    else:
        net = TensorDictModule(_LocScale(module, module.log_std_param(log_std_init),
                                         log_std_bounds, output),
                               in_keys=list(in_keys), out_keys=["loc", "scale", *carried])
        actor = ProbabilisticActor(net, in_keys=["loc", "scale"],
                                   distribution_class=head.distribution_class(),
                                   distribution_kwargs=head.distribution_kwargs(module.device),
                                   return_log_prob=True)
    # Specs of every output spare a collector the dry run that discovers them (a random draw).
    actor.spec = head.spec(module.device)
    return actor
