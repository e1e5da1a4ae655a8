"""A checkpoint's policy as a standalone file: raw observations in, env actions out.

The exported graph is what evaluation does to an observation: the run's observation
normalisation (frozen statistics, when the run had ``env.obs_norm``), the module's ``forward``,
and the action contract's deterministic action (:meth:`ActionHead.deterministic
<unitrain.policy.action.ActionHead.deterministic>`: argmax of the logits, or the mean squashed
into the action bounds), so its actions equal ``module.act`` on normalised observations.

- ``pt2``: :func:`torch.export.export`, saved with :func:`torch.export.save`; load it with
  ``torch.export.load(path).module()`` and only ``torch`` installed.
- ``onnx``: ``torch.onnx.export`` (input ``observation``, output ``action``, any batch size);
  run it with ``onnxruntime.InferenceSession(path)``.

A ``Dict``/``Tuple`` observation's entries are inputs by name: the ``pt2`` module is called with
a dict of them, ``module({"image": ..., "vector": ...})``, and the ONNX graph has one input per
entry, named by its key.

``unitrain export CKPT --format pt2 --out policy.pt2`` calls :func:`export`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from unitrain.errors import UserError
from unitrain.policy.inputs import call_module

if TYPE_CHECKING:
    from unitrain.envs.obs_norm import NamedObsNorm, ObsNorm
    from unitrain.policy.module import RLModule

__all__ = ["FORMATS", "StandalonePolicy", "export"]

FORMATS = ("pt2", "onnx")


class _Frozen(nn.Module):
    """An :class:`~unitrain.envs.ObsNorm`'s normalisation with its statistics frozen."""

    def __init__(self, norm: "ObsNorm") -> None:
        super().__init__()
        # The same float32 values ObsNorm.forward computes from its float64 statistics.
        self.register_buffer("mean", norm.mean.to(torch.float32))
        self.register_buffer("std", (norm.m2 / norm.count).sqrt().to(torch.float32) + norm.eps)
        self.clip = float(norm.clip)

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std).clamp(-self.clip, self.clip)


class StandalonePolicy(nn.Module):
    """``observation -> action`` of a bound module, with frozen observation statistics
    (``(observation, action_mask) -> action`` for an env with action masks: the argmax over the
    allowed actions).

    A module over a ``Dict``/``Tuple`` observation takes a dict of its entries by name
    (``policy({"image": ..., "vector": ...})``); each normalised entry is normalised on the way
    in.

    Args:
        module: an :class:`~unitrain.RLModule` bound to its env (``module.actions``).
        norm: the run's observation normalisation, or ``None``.
    """

    def __init__(self, module: "RLModule", norm: "ObsNorm | NamedObsNorm | None" = None) -> None:
        super().__init__()
        self.module = module
        self.head = module.actions
        info = module.env_info
        self.names = None if info is None or info.obs_shapes is None else list(info.obs_shapes)
        # A Box observation's frozen normalisation (``norm``), or each named entry's (``norms``).
        self.norm: nn.Module | None = None
        self.norms = nn.ModuleDict()
        if norm is not None and hasattr(norm, "norms"):
            self.norms.update({key: _Frozen(n) for key, n in norm.norms.items()
                               if bool(n.count > 1)})
        elif norm is not None and bool(norm.count > 1):
            self.norm = _Frozen(norm)

    def forward(self, observation: Any, action_mask: Tensor | None = None) -> Tensor:
        if self.names is None:
            if self.norm is not None:
                observation = self.norm(observation)
            return self.head.deterministic(call_module(self.module, observation), action_mask)
        named = {key: self.norms[key](observation[key]) if key in self.norms
                 else observation[key] for key in self.names}
        return self.head.deterministic(call_module(self.module, named), action_mask)


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, format: str | None = None,
           module: "RLModule | None" = None) -> Path:
    """Write a checkpoint's deterministic policy as a standalone ``pt2`` or ``onnx`` file.

    Args:
        checkpoint: a unitrain checkpoint.
        out: the file to write.
        format: ``"pt2"`` or ``"onnx"`` (default: from ``out``'s suffix).
        module: the module to load the policy into (a class defined in a script); by default
            the checkpoint's recorded class.

    Returns:
        The path written.

    Raises:
        UserError: an unknown format, an unreadable checkpoint, a run without an env, or a
            recurrent module.
    """
    from unitrain.run.checkpoint import policy_and_env

    out = Path(out)
    format = format or out.suffix.lstrip(".")
    if format not in FORMATS:
        raise UserError(f"export: format {format!r} is not one of {', '.join(FORMATS)} "
                        "(give --format or an .onnx/.pt2 file name)")
    policy, spec, norm = policy_and_env(checkpoint, None, module)
    del spec
    if policy.recurrent:
        raise UserError(f"export: {type(policy).__name__} is recurrent (initial_state); export "
                        "writes feed-forward policies (one observation in, one action out); "
                        "evaluate or film it with unitrain evaluate instead")
    policy.eval()
    wrapper = StandalonePolicy(policy, norm).eval()
    info = policy.env_info
    assert info is not None
    example = info.zero_observation(2, policy.device)
    # Inputs by name: "observation", or the entries of a Dict/Tuple observation; then
    # "action_mask" for an env with action masks.
    inputs = ({"observation": example} if info.obs_shapes is None
              else {key: example[key] for key in info.obs_shapes})
    args: tuple[Any, ...] = (example if info.obs_shapes is None else dict(inputs),)
    if info.masked:  # the exported policy takes the observations' action masks too
        mask = torch.ones((2, info.act_dim), dtype=torch.bool, device=policy.device)
        inputs["action_mask"] = mask
        args += (mask,)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if format == "pt2":
            batch = torch.export.Dim("batch")
            dims: tuple[Any, ...] = ({0: batch} if info.obs_shapes is None
                                     else {key: {0: batch} for key in info.obs_shapes},)
            if info.masked:
                dims += ({0: batch},)
            program = torch.export.export(wrapper, args, dynamic_shapes=dims)
            torch.export.save(program, str(out))
        else:
            _onnx(wrapper, inputs, out)
    return out


class _Positional(nn.Module):
    """The policy's named inputs as positional ones, in order (what the ONNX exporter traces):
    the observation's entries, then the action masks if ``masked``."""

    def __init__(self, policy: nn.Module, names: list[str], masked: bool) -> None:
        super().__init__()
        self.policy, self.names, self.masked = policy, names, masked

    def forward(self, *inputs: Tensor) -> Tensor:
        entries = inputs[:-1] if self.masked else inputs
        return self.policy(dict(zip(self.names, entries)), *inputs[len(entries):])


def _onnx(wrapper: nn.Module, inputs: dict[str, Tensor], out: Path) -> Any:
    # The TorchScript-based exporter: it needs no onnxscript, and the graph has no control flow.
    names = list(inputs)
    entries = [key for key in names if key != "action_mask"]
    model = (wrapper if entries == ["observation"]
             else _Positional(wrapper, entries, "action_mask" in inputs))
    torch.onnx.export(model, tuple(inputs.values()), str(out),
                      input_names=names, output_names=["action"], dynamo=False,
                      dynamic_axes={**{key: {0: "batch"} for key in names},
                                    "action": {0: "batch"}})
