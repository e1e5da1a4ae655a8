"""The action contract: what a module's output means, decided once by the action space.

Every update rule reads a module's output through the :class:`ActionHead` that the module holds
(``module.actions``), so the same weights mean the same policy whichever rule trained them:

- **discrete** (``Discrete(n)``): the output is ``n`` logits; the deterministic action is their
  argmax and the stochastic policy is the categorical distribution of their softmax.
- **continuous** (1-D ``Box``): the output's first ``act_dim`` entries are a pre-squash mean
  ``u``. With finite bounds the deterministic action is ``low + (tanh(u) + 1) / 2 · (high −
  low)``, and the stochastic policy is the same map applied to ``u + σ·ξ``, ``ξ ~ N(0, I)`` (a
  tanh-Gaussian, TorchRL's ``TanhNormal``), the parameterisation of SAC (Haarnoja et al. 2018,
  appendix C) and DSAC-T; with unbounded actions the map is the identity (a plain Gaussian).
  The log standard deviation ``log σ`` is, by the module's choice (``action_std``):

  - ``"param"`` (default): a learned state-independent vector ``aux.log_std`` (the module
    returns ``act_dim`` outputs);
  - ``"state"``: the module returns ``2·act_dim`` outputs, the mean and then a raw ``log σ``.

Rules add exploration (sampling, noise, random actions) around this policy, never another
meaning: the deterministic action of every rule is :meth:`ActionHead.deterministic`, which is
what :meth:`unitrain.RLModule.act` returns.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from unitrain.errors import ConfigError

if TYPE_CHECKING:
    from torchrl.data import Composite

    from unitrain.envs.info import EnvInfo

__all__ = ["ActionHead", "LogStd", "ACTION_STD"]

ACTION_STD = ("param", "state")


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

    def deterministic(self, out: Tensor) -> Tensor:
        """The deterministic action for the module's output: argmax, or the squashed mean."""
        if self.discrete:
            return out.argmax(-1)
        return self.squash(self.loc(out))

    def distribution_class(self) -> type:
        """The TorchRL distribution of the stochastic policy over env-unit actions."""
        from torchrl.modules import IndependentNormal, TanhNormal

        if self.discrete:
            return torch.distributions.Categorical
        return TanhNormal if self.bounded else IndependentNormal

    def spec(self, device: torch.device | str, *extra: str) -> "Composite":
        """TorchRL specs of a stochastic actor's outputs (one env's): the action, its log-prob,
        the distribution's parameters, and ``extra`` ``[act_dim]`` entries in ``[-1, 1]``.

        A collector given a policy whose outputs all have specs does not run the policy on a
        dummy input to discover them, so building a collector draws no random numbers.
        """
        from torchrl.data import Bounded, Categorical, Composite, Unbounded

        if self.discrete:
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

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        head = self.module.actions
        if self.output is None:
            out, carried = self.module(*inputs), ()
        else:
            out, *carried = self.output(*inputs)
        return (head.loc(out), head.log_std(out, self.log_std).clamp(*self.bounds).exp(),
                *carried)


def stochastic_actor(module: nn.Module, log_std_init: float = 0.0,
                     log_std_bounds: tuple[float, float] = (-20.0, 2.0), *,
                     output: nn.Module | None = None, in_keys: tuple = ("observation",),
                     carried: tuple = ()) -> nn.Module:
    """The module's stochastic policy as a TorchRL ``ProbabilisticActor``.

    Reads ``"observation"`` and writes ``"action"`` (env units) and ``"action_log_prob"``:
    categorical over the logits, or the squashed Gaussian of the module's mean and log std
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
        net = TensorDictModule(module if output is None else output, in_keys=list(in_keys),
                               out_keys=["logits", *carried])
        actor = ProbabilisticActor(net, in_keys=["logits"],
                                   distribution_class=head.distribution_class(),
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
