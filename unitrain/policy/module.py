"""``RLModule``: the user's networks, as a LightningModule whose iterations belong to an update rule.

Users subclass :class:`RLModule`, build their networks in ``__init__`` and write ``forward``:

- discrete actions: ``forward(observation) -> logits`` of shape ``[..., n_actions]``
  (``MultiDiscrete(nvec)``: ``[..., sum(nvec)]``, one block of logits per sub-action);
- continuous actions: ``forward(observation) -> pre-squash mean`` of shape ``[..., act_dim]``
  (or ``[..., 2 * act_dim]``, the mean then a log standard deviation, when the module sets
  ``action_std = "state"``); the action is the mean squashed into the env's bounds.

A ``Dict`` (or ``Tuple``) observation reaches ``forward`` as keyword arguments by name
(``forward(self, image, vector)``); :func:`unitrain.policy.inputs.call_module` is the one place
that calls the module on an observation.

A module with a memory (a GRU, an LSTM) declares ``initial_state(batch) -> state`` and writes
``forward(observation, state) -> (output, state)``; the contract is in
:mod:`unitrain.policy.recurrent`.

What the output means is decided once, by the action space, in :mod:`unitrain.policy.action`: every
update rule reads it through ``module.actions``, and :meth:`RLModule.act` is the deterministic
action whichever rule trained the module.

Everything else (the training step, evaluation, checkpoint contents, the dataloader Lightning
expects) has defaults supplied here and by the update rule chosen on the :class:`~unitrain.Trainer`.
Networks that a rule adds (a value function, critics) live under ``module.aux``: they are moved,
checkpointed and synchronised with the module, and :meth:`RLModule.policy_parameters` leaves them
out, so population rules evolve only the policy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lightning as L
import torch
from torch import nn

from unitrain.errors import ConfigError, UserError
from unitrain.policy.action import ACTION_STD, ActionHead, LogStd
from unitrain.policy.ckpt_file import load_checkpoint_file, recorded_class
from unitrain.policy.inputs import call_module
from unitrain.policy.recurrent import (check_recurrent, is_recurrent, module_step,
                                       observation_batch)

if TYPE_CHECKING:
    from unitrain.envs.info import EnvInfo

__all__ = ["RLModule", "RunHooks"]


class RunHooks(Protocol):
    """What a run attaches to a module (``module._ctx``; :class:`unitrain.run.adapter.RunAdapter`):
    the module's Lightning hooks hand over to it, so a user's module carries no loop code."""

    rule: Any

    def setup(self) -> None: ...
    def train_iterable(self) -> Any: ...
    def val_iterable(self) -> Any: ...
    def training_step(self, dataloader_iter: Iterator[Any]) -> None: ...
    def validation_step(self, batch: Any) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RLModule(L.LightningModule):
    """Base class for modules trained by unitrain's update rules.

    Constructor arguments of subclasses are recorded as hyperparameters (so a checkpoint can
    rebuild the module); recipes may leave ``obs_dim``, ``act_dim``, ``obs_shape`` and
    ``discrete`` out, and they are filled in from the environment.

    Attributes:
        action_std: for continuous actions, where the policy's log standard deviation comes
            from: ``"param"`` (a learned vector ``aux.log_std``; ``forward`` returns ``act_dim``
            values) or ``"state"`` (``forward`` returns ``2 * act_dim`` values: mean, log std).
            Set it in ``__init__`` (``MLPPolicy`` takes it as an argument).
    """

    action_std: str = "param"
    # The run's frozen observation statistics, set by load_from_checkpoint.
    obs_norm: Any = None

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Recorded to rebuild the module from a checkpoint, not sent to the loggers: the Trainer
        # logs the whole run's configuration, the module's arguments included (module/*).
        self.save_hyperparameters(logger=False)
        self._ctx: RunHooks | None = None
        self.env_info: EnvInfo | None = None
        self._actions: ActionHead | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles of the module (TorchRL losses deep-copy their networks) leave the
        # run context behind: envs, generators and the rule belong to the run, not the networks.
        state = super().__getstate__()
        state["_ctx"] = None
        return state

    # ------------------------------------------------------------------ user-facing helpers
    def add_aux(self, name: str, net: nn.Module) -> nn.Module:
        """Register an auxiliary network (value function, critic) under ``self.aux[name]``.

        An existing network of that name (from the user, or from a restored run) is kept.
        """
        if not hasattr(self, "aux"):
            self.aux = nn.ModuleDict()
        if name not in self.aux:
            self.aux[name] = net
        return self.aux[name]

    def named_policy_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters of the policy: all trainable parameters except those under ``aux``."""
        for name, p in self.named_parameters():
            if not name.startswith("aux.") and p.requires_grad:
                yield name, p

    def policy_parameters(self) -> list[nn.Parameter]:
        """See :meth:`named_policy_parameters`."""
        return [p for _, p in self.named_policy_parameters()]

    def bind_env(self, info: "EnvInfo", check: bool = True) -> ActionHead:
        """Attach the env's action space: builds :attr:`actions` and checks the output size.

        Args:
            info: the env's shapes and action space.
            check: run ``forward`` once on a zero observation to check its output size.

        Raises:
            ConfigError: the output size does not fit the action space, or ``action_std`` is
                not ``"param"``/``"state"``.
        """
        if self.action_std not in ACTION_STD:
            raise ConfigError("module.action_std",
                              f"got {self.action_std!r}; expected 'param' or 'state'")
        self.env_info = info
        self._actions = ActionHead(info, self.action_std)
        if check:
            with torch.no_grad():
                out = check_recurrent(self, info.zero_observation(1, self.device))
            self._actions.check(out, type(self).__name__)
        return self._actions

    @property
    def actions(self) -> ActionHead:
        """The :class:`~unitrain.policy.action.ActionHead` reading this module's output."""
        if self._actions is None:
            raise RuntimeError(f"{type(self).__name__} has no action space yet; fit or evaluate "
                               "it (or call bind_env) first")
        return self._actions

    def log_std_param(self, init: float = 0.0) -> LogStd | None:
        """The learned state-independent log std ``aux.log_std`` (created on first use), or
        ``None`` when the std is state-dependent or actions are discrete."""
        head = self.actions
        if head.discrete or head.std == "state":
            return None
        return self.add_aux("log_std", LogStd(head.act_dim, init).to(self.device))

    @property
    def recurrent(self) -> bool:
        """Whether the module keeps a state (it defines ``initial_state``)."""
        return is_recurrent(self)

    def act(self, observation: Any, mask: torch.Tensor | None = None, *,
            state: Any = None) -> Any:
        """The deterministic action: argmax of the logits (per block for multi-discrete actions;
        over the actions ``mask`` allows, where the env gives action masks), or the squashed
        mean in the bounds.

        A recurrent module takes and returns its state: ``act(observation, state=state) ->
        (action, state)`` for a batch ``[B, ...]``; ``state=None`` starts from
        ``initial_state(B)``.

        Args:
            observation: a tensor ``[..., *obs_shape]``, or for a ``Dict``/``Tuple`` observation
                its named entries (a TensorDict or a dict; ``forward`` receives them by name).
            mask: ``[..., A]`` bool, the allowed actions (``None``: all).
            state: a recurrent module's state (keyword only).

        Raises:
            UserError: a state given to a feed-forward module, or a mask that is not a bool
                tensor (a recurrent module's state passed by position).
        """
        if mask is not None and not (isinstance(mask, torch.Tensor)
                                     and mask.dtype == torch.bool):
            raise UserError(f"{type(self).__name__}.act: mask must be a bool tensor of the "
                            "allowed actions; a recurrent module's state is passed as state=")
        if not self.recurrent:
            if state is not None:
                raise UserError(f"{type(self).__name__}.act: a state was given, but the module "
                                "is feed-forward (it defines no initial_state)")
            return self.actions.deterministic(call_module(self, observation), mask)
        if state is None:
            state = self.initial_state(observation_batch(observation))
        out, state = module_step(self, observation, state)
        return self.actions.deterministic(out, mask), state

    def load_policy(self, checkpoint: str | os.PathLike) -> None:
        """Load the policy (and ``aux.log_std``) of any unitrain checkpoint into this module.

        The other rule's auxiliary networks (critics, value functions) are left out, so a policy
        trained by one rule can start training with another.

        Raises:
            UserError: the file is not a readable unitrain checkpoint or its policy parameters
                do not fit this module.
        """
        path = Path(checkpoint)
        try:
            ckpt = load_checkpoint_file(path)
            state = ckpt["state_dict"]
        except Exception as e:  # a missing, truncated or foreign file
            raise UserError(f"init={checkpoint}: not a readable unitrain checkpoint "
                            f"({type(e).__name__})") from None
        own = {k: v for k, v in state.items()
               if not k.startswith("aux.") or k.startswith("aux.log_std.")}
        run = ckpt.get("unitrain") or {}
        theirs = run.get("action_std") or (run.get("module_hparams") or {}).get("action_std")
        head = self._actions
        if head is not None and not head.discrete and theirs in ACTION_STD and theirs != head.std:
            own = self._other_std(own, head.act_dim)
        if any(k.startswith("aux.log_std.") for k in own):
            head = self._actions
            if head is not None and not head.discrete and head.std == "param":
                self.log_std_param()
            else:
                own = {k: v for k, v in own.items() if not k.startswith("aux.log_std.")}
        mine = {k for k in self.state_dict() if not k.startswith("aux.")}
        missing = sorted(mine - set(own))
        if missing:
            raise UserError(f"init={checkpoint}: parameters {', '.join(missing[:3])} are not in "
                            f"the checkpoint (it holds another module)")
        try:
            self.load_state_dict(own, strict=False)
        except RuntimeError as e:
            raise UserError(f"init={checkpoint}: {str(e).splitlines()[-1].strip()}") from None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None,
                             hparams_file: Any = None, strict: bool | None = None,
                             **kwargs: Any) -> "RLModule":
        """The trained module of a unitrain checkpoint, ready to act.

        The module is rebuilt from its recorded constructor arguments (``kwargs`` override
        them), its policy parameters (and ``aux.log_std``) are loaded strictly, its action space
        is bound (:attr:`actions`, :meth:`act`), and :attr:`obs_norm` holds the run's frozen
        observation statistics (``None`` without ``env.obs_norm``): the deterministic action
        for a raw observation ``obs`` is ``module.act(module.obs_norm(obs))`` then. The rule's
        networks (critics, value functions) stay out; the module is returned in eval mode. Called
        on ``RLModule`` itself, the checkpoint's recorded class is imported.

        Args:
            checkpoint_path: a unitrain checkpoint (either format).
            map_location: device for the parameters (default: CPU).
            hparams_file: not supported (the checkpoint records the arguments).
            strict: ``False`` ignores policy parameters that do not fit (default: strict).
            **kwargs: constructor arguments overriding the recorded ones.

        Raises:
            UserError: the file is not a unitrain checkpoint, or its class or parameters do not
                fit.
        """
        from unitrain.envs.info import EnvInfo, env_info
        from unitrain.envs.obs_norm import make_obs_norm
        from unitrain.envs.spec import EnvSpec
        if hparams_file is not None:
            raise UserError("load_from_checkpoint: hparams_file is not supported; unitrain "
                            "checkpoints record the module's arguments")
        try:
            ckpt = load_checkpoint_file(checkpoint_path, map_location=map_location or "cpu")
            run, weights = ckpt["unitrain"], ckpt["state_dict"]
        except Exception as e:
            raise UserError(f"{checkpoint_path}: not a readable unitrain checkpoint "
                            f"({type(e).__name__})") from None
        if cls is RLModule:
            cls = recorded_class(run, str(checkpoint_path),
                                 "call load_from_checkpoint on that class")
        module = cls(**{**(run.get("module_hparams") or {}), **kwargs})
        recorded = run.get("env_info")
        if recorded is not None:
            info = EnvInfo.from_record(recorded)
        elif run.get("env") is not None:  # a checkpoint before 0.2.0: read the env's spaces
            info = env_info(EnvSpec.from_record(run["env"], str(checkpoint_path)))
        else:
            info = None
        if info is not None:
            module.bind_env(info)
        own = {k: v for k, v in weights.items()
               if not k.startswith("aux.") or k.startswith("aux.log_std.")}
        if any(k.startswith("aux.log_std.") for k in own):
            module.log_std_param()
        try:
            module.load_state_dict(own, strict=strict is not False)
        except RuntimeError as e:
            raise UserError(f"{checkpoint_path}: its parameters do not fit "
                            f"{cls.__name__}: {str(e).splitlines()[-1].strip()}") from None
        norm = None
        if run.get("obs_norm") is not None and info is not None:
            norm = make_obs_norm(info)
            norm.load_state_dict(run["obs_norm"])
        # Not a submodule: the statistics belong to the run's env, not to the parameters.
        module.__dict__["obs_norm"] = norm
        if map_location is not None:
            module.to(map_location)
        return module.eval()

    def _other_std(self, theirs: dict[str, torch.Tensor], act_dim: int) -> dict[str, torch.Tensor]:
        """A checkpoint's parameters for this module when the two read the std differently.

        The output layer's tensors are the ones whose first dimension is ``act_dim`` in one
        module and ``2 * act_dim`` in the other. From ``param`` to ``state``: the mean rows are
        copied and the log-std rows become the checkpoint's ``aux.log_std`` (zero weights, the
        log std as bias), so the policy is the same distribution. From ``state`` to ``param``:
        the mean rows are kept and ``aux.log_std`` starts at the rule's initial value.
        """
        out = dict(theirs)
        mine = self.state_dict()
        log_std = theirs.get("aux.log_std.log_std")
        for key, value in theirs.items():
            target = mine.get(key)
            if target is None or target.shape == value.shape or target.shape[1:] != value.shape[1:]:
                continue
            if (value.shape[0], target.shape[0]) == (act_dim, 2 * act_dim):
                grown = torch.zeros_like(target)
                grown[:act_dim] = value
                if grown.ndim == 1 and log_std is not None:
                    grown[act_dim:] = log_std
                out[key] = grown
            elif (value.shape[0], target.shape[0]) == (2 * act_dim, act_dim):
                out[key] = value[:act_dim].clone()
        return out

    # ------------------------------------------------------------------ Lightning plumbing
    # Every hook hands over to the run's adapter (unitrain.run.adapter), set by unitrain.Trainer.
    def setup(self, stage: str) -> None:
        if self._ctx is not None and stage == "fit":
            self._ctx.setup()

    def configure_optimizers(self) -> Any:
        # An empty list (not None) tells Lightning that a gradient-free rule has no optimizer.
        return self._ctx.rule.optimizers() if self._ctx is not None else []

    def train_dataloader(self) -> Any:
        assert self._ctx is not None, "RLModule.train_dataloader: the module is not attached to a unitrain.Trainer"
        return self._ctx.train_iterable()

    def val_dataloader(self) -> Any:
        assert self._ctx is not None
        return self._ctx.val_iterable()

    def training_step(self, dataloader_iter: Iterator[Any]) -> None:
        # The iterator itself (not a prefetched batch): the adapter ends an evaluation period
        # right after the iteration that completes it.
        assert self._ctx is not None
        self._ctx.training_step(dataloader_iter)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        assert self._ctx is not None
        self._ctx.validation_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self._ctx is not None:
            self._ctx.on_validation_epoch_end()

    def on_train_start(self) -> None:
        if self._ctx is not None:
            self._ctx.on_train_start()

    def on_train_end(self) -> None:
        if self._ctx is not None:
            self._ctx.on_train_end()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ctx is not None:
            checkpoint["unitrain"] = self._ctx.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ctx is not None and "unitrain" in checkpoint:
            self._ctx.load_state_dict(checkpoint["unitrain"])
