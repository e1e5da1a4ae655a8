"""Reading a network into stages: the layers projection training supports and how they fuse.

Part of projection-based training (Bergmeister et al., "A projection-based framework for
gradient-free and parallel learning", arXiv:2506.05878). The module tree is walked in
registration order down to its supported leaves (:data:`SUPPORTED_LAYERS`); a linear or
convolution layer and the activation directly after it become one stage
(:mod:`unitrain.rules.projection.stages`). Anything else is refused with a message that names the
layer and lists what is supported.
"""

from __future__ import annotations

from torch import nn

from unitrain.policy.nn import Step
from unitrain.rules.projection.stages import (ACTIVATIONS, ActivationStage, ConvStage, DotStage,
                                              LinearStage, PoolStage, ReshapeStage, Stage)

__all__ = ["SUPPORTED_LAYERS", "qualified_name", "split_stages"]

SUPPORTED_LAYERS = (
    "torch.nn.Linear, torch.nn.Conv2d (zero padding, one group), torch.nn.AvgPool2d (no "
    "padding), torch.nn.ReLU, unitrain.policy.nn.Step, torch.nn.Flatten, torch.nn.Unflatten, "
    "torch.nn.Identity, and containers of these "
    "(torch.nn.Sequential, or modules without parameters of their own whose forward applies "
    "their children in registration order)"
)


def qualified_name(prefix: str, name: str) -> str:
    """``name`` inside the module named ``prefix`` (the root's own name is ``""``)."""
    return f"{prefix}.{name}" if prefix else name


def _unsupported(label: str, kind: str, why: str) -> ValueError:
    return ValueError(f"projection training does not support layer {label!r} of type {kind}"
                      f"{why}; supported: {SUPPORTED_LAYERS}")


def _check_leaf(label: str, module: nn.Module) -> None:
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise _unsupported(label, kind, " with groups, non-zero padding modes or string "
                                            "padding (give the padding as numbers)")
    if isinstance(module, nn.AvgPool2d):
        padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
        if any(padding) or module.ceil_mode or module.divisor_override is not None:
            raise _unsupported(label, kind, " with padding, ceil_mode or divisor_override")


_LEAVES = (nn.Linear, nn.Conv2d, nn.AvgPool2d, nn.ReLU, Step, nn.Flatten, nn.Unflatten)


def _flatten(module: nn.Module, prefix: str, out: list[tuple[str, nn.Module]]) -> None:
    if isinstance(module, _LEAVES):
        _check_leaf(prefix or "<root>", module)
        out.append((prefix, module))
        return
    if isinstance(module, nn.Identity):
        return
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    label = prefix or "<root>"
    children = list(module.named_children())
    own = [n for n, _ in module.named_parameters(recurse=False)]
    own += [n for n, _ in module.named_buffers(recurse=False)]
    if not children or own:
        reason = f" (it holds tensors of its own: {', '.join(own)})" if own and children else ""
        raise _unsupported(label, kind, reason)
    for name, child in children:
        _flatten(child, qualified_name(prefix, name), out)


def split_stages(module: nn.Module) -> list[Stage]:
    """The stages of ``module``, in the order its layers apply.

    Args:
        module: a network built from the layers of :data:`SUPPORTED_LAYERS`.

    Returns:
        One stage per layer, with an activation that directly follows a linear or convolution
        layer fused into that layer's stage.

    Raises:
        ValueError: a layer is not supported, or none is a linear or convolution layer to train.
    """
    leaves: list[tuple[str, nn.Module]] = []
    _flatten(module, "", leaves)
    stages: list[Stage] = []
    i = 0
    while i < len(leaves):
        name, leaf = leaves[i]
        if isinstance(leaf, (nn.Linear, nn.Conv2d)):
            cls = LinearStage if isinstance(leaf, nn.Linear) else ConvStage
            follow = leaves[i + 1] if i + 1 < len(leaves) else None
            if follow is not None and type(follow[1]) in ACTIVATIONS:
                stages.append(cls(name, ACTIVATIONS[type(follow[1])], follow[0], module=leaf))
                i += 2
                continue
            stages.append(cls(name, module=leaf))
        elif isinstance(leaf, nn.AvgPool2d):
            stages.append(PoolStage(name, module=leaf))
        elif isinstance(leaf, (nn.Flatten, nn.Unflatten)):
            stages.append(ReshapeStage(name, leaf))
        else:
            stages.append(ActivationStage(name, ACTIVATIONS[type(leaf)]))
        i += 1
    if not any(isinstance(s, DotStage) for s in stages):
        raise ValueError(
            "projection training needs at least one torch.nn.Linear or torch.nn.Conv2d layer "
            f"to train; supported: {SUPPORTED_LAYERS}"
        )
    return stages
