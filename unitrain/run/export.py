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

if TYPE_CHECKING:
    from unitrain.envs.obs_norm import ObsNorm
    from unitrain.policy.module import RLModule

__all__ = ["FORMATS", "StandalonePolicy", "export"]

FORMATS = ("pt2", "onnx")


class StandalonePolicy(nn.Module):
    """``observation -> action`` of a bound module, with frozen observation statistics.

    Args:
        module: an :class:`~unitrain.RLModule` bound to its env (``module.actions``).
        norm: the run's observation normalisation, or ``None``.
    """

    def __init__(self, module: "RLModule", norm: "ObsNorm | None" = None) -> None:
        super().__init__()
        self.module = module
        self.head = module.actions
        self.normalise = norm is not None and bool(norm.count > 1)
        if self.normalise:
            assert norm is not None
            # The same float32 values ObsNorm.forward computes from its float64 statistics.
            self.register_buffer("mean", norm.mean.to(torch.float32))
            self.register_buffer("std", (norm.m2 / norm.count).sqrt().to(torch.float32) + norm.eps)
            self.clip = float(norm.clip)

    def forward(self, observation: Tensor) -> Tensor:
        if self.normalise:
            observation = ((observation - self.mean) / self.std).clamp(-self.clip, self.clip)
        return self.head.deterministic(self.module(observation))


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
    dtype = torch.uint8 if info.image else torch.float32
    example = torch.zeros((2, *info.obs_shape), dtype=dtype, device=policy.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if format == "pt2":
            program = torch.export.export(
                wrapper, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, str(out))
        else:
            _onnx(wrapper, example, out)
    return out


def _onnx(wrapper: nn.Module, example: Tensor, out: Path) -> Any:
    # The TorchScript-based exporter: it needs no onnxscript, and the graph has no control flow.
    torch.onnx.export(wrapper, (example,), str(out), input_names=["observation"],
                      output_names=["action"], dynamo=False,
                      dynamic_axes={"observation": {0: "batch"}, "action": {0: "batch"}})
