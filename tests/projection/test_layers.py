"""Convolution, average pooling, reshapes and the hard threshold in the feasibility problem.

Each check is against an independent computation: the consistency projection against a loop
over every copy of every pixel, its optimality against consistent points of other networks,
and the operation-wise projection against the graph of every operation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from unitrain.policy.models import ConvNet
from unitrain.policy.nn import Step
from unitrain.rules.projection import (ConvStage, CrossEntropyOutput, PoolStage, ProjectionGraph,
                                       SquaredErrorOutput, State, douglas_rachford, fit_batch)

DT = torch.float64


def _nets() -> list[nn.Sequential]:
    """Networks covering padding, stride, dilation, rectangular kernels, no bias, pooling
    with and without overlap, standalone activations and the hard threshold."""
    return [
        nn.Sequential(nn.Unflatten(1, (2, 5, 5)), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                      nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 4)),
        nn.Sequential(nn.Unflatten(1, (1, 6, 6)),
                      nn.Conv2d(1, 2, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
                      Step(), nn.Conv2d(2, 2, 2, bias=False), nn.Flatten(), nn.Linear(12, 5),
                      Step(), nn.Linear(5, 3)),
        nn.Sequential(nn.Unflatten(1, (2, 4, 4)), nn.AvgPool2d(2, stride=1), nn.ReLU(),
                      nn.Conv2d(2, 2, 2), nn.Flatten(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(4, 6), Step(), nn.Linear(6, 3)),
    ]


def _inputs(net: nn.Sequential, batch: int, seed: int) -> Tensor:
    first = net[0]
    width = first.in_features if isinstance(first, nn.Linear) else \
        int(torch.tensor(first.unflattened_size).prod())
    return torch.randn(batch, width, dtype=DT, generator=torch.Generator().manual_seed(seed))


def _net(index: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return _nets()[index].to(DT)


def _perturbed(state: State, seed: int, scale: float = 0.5) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, dtype=v.dtype, generator=g) for k, v in state.items()}


def _inner(a: State, b: State) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _sub(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


# ----------------------------------------------------------------------------- construction


def test_stages_of_a_cnn() -> None:
    graph = ProjectionGraph(ConvNet(64, 10, channels=(4, 6), activation="step"))
    kinds = [type(s).__name__ for s in graph.stages]
    assert kinds == ["ReshapeStage", "ConvStage", "PoolStage", "ConvStage", "PoolStage",
                     "ReshapeStage", "LinearStage"]
    conv = graph.stages[1]
    assert isinstance(conv, ConvStage) and conv.activation == "step"
    assert "conv+step(1->4, 3x3)" in repr(graph) and "avgpool(2)" in repr(graph)


@pytest.mark.parametrize(("layer", "words"), [
    (nn.Conv2d(2, 2, 3, groups=2), "groups"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "padding modes"),
    (nn.Conv2d(2, 2, 3, padding="same"), "string padding"),
    (nn.AvgPool2d(2, padding=1), "padding"),
    (nn.MaxPool2d(2), "MaxPool2d"),
])
def test_unsupported_variants_are_named(layer: nn.Module, words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        ProjectionGraph(nn.Sequential(nn.Unflatten(1, (2, 4, 4)), layer, nn.Flatten(),
                                      nn.Linear(8, 2)))
    assert "'1'" in str(info.value) and "torch.nn.Conv2d" in str(info.value)


# ----------------------------------------------------------------------------- forward state


@pytest.mark.parametrize("index", range(4))
def test_forward_state_is_feasible_and_a_fixed_point(index: int) -> None:
    net = _net(index, index)
    x = _inputs(net, 5, index)
    graph = ProjectionGraph(net)
    state = graph.init_state(x)
    own = net(x).detach()
    assert torch.allclose(state["out"], own, atol=1e-12)
    output = SquaredErrorOutput(1.0)
    projected = graph.project_ops(state, output, own)
    consistent = graph.project_consistency(state, x)
    for key in state:
        assert torch.allclose(projected[key], state[key], atol=1e-10), key
        assert torch.allclose(consistent[key], state[key], atol=1e-12), key
    result = douglas_rachford(graph, state, x, own, output, iterations=3)
    assert torch.all(result.violation < 1e-10)


# ----------------------------------------------------------------------------- set A


@pytest.mark.parametrize("index", range(4))
def test_projected_operations_lie_on_their_graphs(index: int) -> None:
    """Hundreds of dot, bias-activation and pooling operations per case, each on its graph."""
    net = _net(index, 10 + index)
    x = _inputs(net, 8, index)
    graph = ProjectionGraph(net)
    for trial in range(3):
        state = _perturbed(graph.init_state(x), 100 * index + trial)
        new = graph.project_ops(state, SquaredErrorOutput(1.0), torch.zeros_like(state["out"]))
        checked = 0
        for i, stage in enumerate(graph.stages):
            p = f"{i}."
            if isinstance(stage, PoolStage):
                assert torch.allclose(new[p + "y"], new[p + "x"].mean(-1), atol=1e-12)
                checked += new[p + "y"].numel()
            elif hasattr(stage, "module") and isinstance(stage.module, (nn.Linear, nn.Conv2d)):
                dot = torch.linalg.vecdot(new[p + "w"], new[p + "x"])
                assert torch.allclose(new[p + "d_dot"], dot, rtol=1e-5, atol=1e-5)
                pre = new[p + "d_act"] + (new[p + "b"] if p + "b" in new else 0.0)
                act = getattr(stage, "activation", "identity")
                if act == "step":
                    on, off = new[p + "y"] == 1, new[p + "y"] == 0
                    assert torch.all(on | off)
                    assert torch.all(pre[on] >= -1e-12) and torch.all(pre[off] <= 1e-12)
                elif act == "relu":
                    assert torch.allclose(new[p + "y"], pre.clamp_min(0.0), atol=1e-12)
                else:
                    assert torch.allclose(new[p + "y"], pre, atol=1e-12)
                checked += dot.numel()
        assert checked >= 40


# ----------------------------------------------------------------------------- set B


def _pixel_copies_by_loop(graph: ProjectionGraph, state: State, i: int) -> tuple[Tensor, Tensor]:
    """Sum and count of stage ``i``'s copies of each of its input pixels, by enumeration."""
    stage = graph.stages[i]
    mod = stage.module  # type: ignore[union-attr]
    c_in, h, w = stage.in_shape
    x = state[f"{i}.x"]
    batch = x.shape[0]
    total = torch.zeros(batch, c_in, h, w, dtype=DT)
    count = torch.zeros(c_in, h, w, dtype=DT)
    kh, kw = (mod.kernel_size if isinstance(mod.kernel_size, tuple)
              else (mod.kernel_size, mod.kernel_size))
    stride = mod.stride if isinstance(mod.stride, tuple) else (mod.stride, mod.stride)
    pad = getattr(mod, "padding", 0)
    pad = pad if isinstance(pad, tuple) else (pad, pad)
    dil = getattr(mod, "dilation", (1, 1))
    out_h = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (w + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    conv = isinstance(stage, ConvStage)
    for oy, ox, ky, kx in itertools.product(range(out_h), range(out_w), range(kh), range(kw)):
        iy = oy * stride[0] - pad[0] + ky * dil[0]
        ix = ox * stride[1] - pad[1] + kx * dil[1]
        if not (0 <= iy < h and 0 <= ix < w):
            continue  # a padding zero, not a pixel
        pos = oy * out_w + ox
        for c in range(c_in):
            if conv:  # patch layout (channel, ky, kx); one copy per output channel
                k = (c * kh + ky) * kw + kx
                total[:, c, iy, ix] += x[:, :, pos, k].sum(1)
                count[c, iy, ix] += x.shape[1]
            else:  # pooling: channel by channel, window layout (ky, kx)
                total[:, c, iy, ix] += x[:, c, pos, ky * kw + kx]
                count[c, iy, ix] += 1
    return total, count


@pytest.mark.parametrize("index", range(3))
def test_consistency_is_the_mean_of_every_pixels_copies(index: int) -> None:
    net = _net(index, 20 + index)
    x = _inputs(net, 3, index)
    graph = ProjectionGraph(net)
    state = _perturbed(graph.init_state(x), 7 + index)
    proj = graph.project_consistency(state, x)
    windows = [i for i, s in enumerate(graph.stages) if isinstance(s, (ConvStage, PoolStage))]
    for i in windows:
        prev = max((j for j in range(i) if f"{j}.y" in state), default=None)
        total, count = _pixel_copies_by_loop(graph, state, i)
        if prev is None:  # the data: every copy of a pixel, and only of a pixel, equals it
            value = x.reshape(total.shape)
        else:
            value = (state[f"{prev}.y"].reshape(total.shape) + total) / (count + 1)
            assert torch.allclose(proj[f"{prev}.y"].reshape(total.shape), value, atol=1e-12)
        back, _ = _pixel_copies_by_loop(graph, proj, i)
        copies = count.clamp_min(1)
        assert torch.allclose(back / copies, torch.where(count > 0, value, 0.0), atol=1e-12)
        if isinstance(graph.stages[i], ConvStage):
            # Each filter's consensus is the mean over samples and positions of its copies.
            assert torch.allclose(proj[f"{i}.w"][0, :, 0], state[f"{i}.w"].mean((0, 2)))
            assert torch.allclose(proj[f"{i}.w"][2, :, -1], state[f"{i}.w"].mean((0, 2)))
            # Copies that read the padding are data: zero.
            pads = graph.stages[i].module.padding  # type: ignore[union-attr]
            if any(pads):
                assert torch.any(proj[f"{i}.x"] == 0)


@pytest.mark.parametrize("index", range(4))
def test_consistency_is_the_nearest_consistent_point(index: int) -> None:
    """P_B(s) is consistent, and s - P_B(s) is orthogonal to the consistent set around it:
    the forward states of other networks of the same shape on the same inputs lie in B."""
    net = _net(index, 30 + index)
    x = _inputs(net, 4, index)
    graph = ProjectionGraph(net)
    s = _perturbed(graph.init_state(x), 40 + index)
    p = graph.project_consistency(s, x)
    assert all(torch.allclose(a, b, atol=1e-12)
               for a, b in zip(graph.project_consistency(p, x).values(), p.values(), strict=True))
    residual = _sub(s, p)
    base = _inner(residual, residual)
    for seed in range(6):
        other = ProjectionGraph(_net(index, 500 + seed)).init_state(x)
        assert abs(float(_inner(residual, _sub(other, p)))) < 1e-9 * (1 + float(base))
        assert float(_inner(_sub(s, other), _sub(s, other))) >= float(base) - 1e-9


# ----------------------------------------------------------------------------- training


def test_douglas_rachford_fits_a_cnn_batch() -> None:
    """Batches of a CNN with cross-entropy: the fitted parameters lower the loss."""
    torch.manual_seed(0)
    net = ConvNet(16, 3, image=(1, 4, 4), channels=(3,), pool=2).net.to(DT)
    x = torch.randn(24, 16, dtype=DT)
    labels = torch.randint(0, 3, (24,))
    net.requires_grad_(False)
    before = nn.functional.cross_entropy(net(x), labels)
    graph = ProjectionGraph(net)
    for _ in range(3):
        result = fit_batch(graph, x, labels, CrossEntropyOutput(5.0), iterations=40)
    after = nn.functional.cross_entropy(net(x), labels)
    assert float(after) < 0.7 * float(before), (before, after)
    assert result.violation[-1] < result.violation[:5].max()


def test_douglas_rachford_trains_a_hard_threshold_network() -> None:
    """A network the gradient cannot train: projection raises its training accuracy."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, dtype=DT, generator=g)
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).long() + (x[:, 2] > 0.8).long()
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(4, 16), Step(), nn.Linear(16, 3)).to(DT)
    graph = ProjectionGraph(net)

    def accuracy() -> float:
        return float((net(x).argmax(-1) == labels).double().mean())

    start = accuracy()
    for _ in range(4):
        fit_batch(graph, x, labels, CrossEntropyOutput(5.0), iterations=30)
    assert accuracy() >= max(0.8, start + 0.2), (start, accuracy())


def test_step_module_passes_no_gradient_unless_straight_through() -> None:
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
    out = Step()(x)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 1.0])) and not out.requires_grad
    ste = Step(straight_through=True)(x)
    assert torch.equal(ste, out)
    ste.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))
