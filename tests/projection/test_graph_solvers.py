"""The feasibility problem of a ReLU network and the solvers over its two-set split."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from unitrain.policy.nn import Step
from unitrain.rules.projection import (CrossEntropyOutput, LinearStage, MarginOutput, Method,
                                       OneVsRestOutput, OutputConstraint, ProjectionGraph,
                                       SquaredErrorOutput, State, alternating_projections,
                                       douglas_rachford, fit_batch, solve)

DT = torch.float64


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(DT)


class _Block(nn.Module):
    """A container whose forward applies its children in registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6, bias=False)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x))


class _Reversed(nn.Module):
    """A container whose forward does not follow registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x))


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def _architectures() -> list[nn.Module]:
    torch.manual_seed(0)
    nets: list[nn.Module] = [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 2)),
        nn.Sequential(
            nn.ReLU(), nn.Linear(4, 5), nn.ReLU(), nn.ReLU(), nn.Identity(), nn.Linear(5, 2)
        ),
        nn.Sequential(
            _Block(), nn.Sequential(nn.Linear(6, 3), nn.ReLU()), nn.Linear(3, 2, bias=False)
        ),
        nn.Linear(4, 2),
    ]
    return [n.to(DT) for n in nets]


def _states_close(a: State, b: State, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize(
    ("net", "name", "kind"),
    [
        (nn.Sequential(nn.Linear(4, 8), nn.Tanh()), "'1'", "torch.nn.modules.activation.Tanh"),
        (
            nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Conv1d(1, 1, 1))),
            "'1.1'",
            "torch.nn.modules.conv.Conv1d",
        ),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "'1'", "BatchNorm1d"),
        (nn.Sequential(nn.Linear(4, 4), _Scaled()), "'1'", "_Scaled"),
        (nn.Tanh(), "'<root>'", "Tanh"),
    ],
)
def test_unsupported_layer_is_named(net: nn.Module, name: str, kind: str) -> None:
    with pytest.raises(ValueError) as info:
        ProjectionGraph(net)
    message = str(info.value)
    assert name in message and kind in message
    assert "torch.nn.Linear" in message and "torch.nn.ReLU" in message


def test_network_without_linear_layer_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"at least one torch\.nn\.Linear"):
        ProjectionGraph(nn.Sequential(nn.ReLU()))


def test_forward_out_of_registration_order_is_rejected() -> None:
    graph = ProjectionGraph(_Reversed().to(DT))
    with pytest.raises(ValueError, match="registration order"):
        graph.init_state(torch.randn(3, 4, dtype=DT))


def test_stages_fuse_relu_into_linear() -> None:
    graph = ProjectionGraph(_architectures()[2])
    assert [type(s).__name__ for s in graph.stages] == [
        "ActivationStage",
        "LinearStage",
        "ActivationStage",
        "LinearStage",
    ]
    hidden, last = graph.stages[1], graph.stages[3]
    assert isinstance(hidden, LinearStage) and isinstance(last, LinearStage)
    assert hidden.relu and hidden.relu_name == "2"
    assert not last.relu


# ----------------------------------------------------------------------------- initialisation


@pytest.mark.parametrize("index", range(5))
def test_forward_initialisation_is_feasible(index: int) -> None:
    net = _architectures()[index]
    x = torch.randn(6, 4, dtype=DT)
    graph = ProjectionGraph(net)
    state = graph.init_state(x)
    own = net(x).detach()
    output = SquaredErrorOutput(1.0)
    assert _states_close(graph.project_ops(state, output, own), state, 1e-12)
    assert _states_close(graph.project_consistency(state, x), state, 1e-12)
    for method in (douglas_rachford, alternating_projections):
        result = method(graph, state, x, own, output, iterations=3)
        assert result.violation.shape == (3,)
        assert torch.all(result.violation < 1e-12)


def test_parameters_round_trip_and_consensus_is_the_mean() -> None:
    net = _mlp(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph = ProjectionGraph(net)
    x = torch.randn(5, 4, dtype=DT)
    state = graph.init_state(x)
    graph.write_parameters(state)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    state["0.w"] = state["0.w"] + torch.randn_like(state["0.w"])
    state["1.b"] = state["1.b"] + torch.randn_like(state["1.b"])
    consensus = graph.consensus_parameters(state)
    assert set(consensus) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    graph.write_parameters(state)
    first, second = net[0], net[2]
    assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
    assert torch.allclose(first.weight, state["0.w"].mean(0))
    assert torch.allclose(second.bias, state["1.b"].mean(0))
    assert torch.allclose(consensus["0.weight"], first.weight)


def test_a_consistent_state_writes_its_consensus_exactly_at_any_batch_size() -> None:
    """Copies that all hold one value give that value bit for bit, whatever the batch size (the
    mean of the copies may round differently for different batch sizes, and processes with
    different batches would drift apart)."""
    net = _mlp(4)
    graph = ProjectionGraph(net)
    values = {key: torch.randn_like(param, dtype=DT) / 3 for key, _, param, _ in graph._params()}
    written = []
    for batch in (3, 7, 11, 13):
        state = graph.init_state(torch.randn(batch, 4, dtype=DT))
        for key, _, _, stage in graph._params():
            state[key] = stage.param_expand(values[key], state[key].shape)
        graph.write_parameters(state, consistent=True)
        written.append(torch.nn.utils.parameters_to_vector(net.parameters()).clone())
        for key, _, param, _ in graph._params():
            assert torch.equal(param.detach(), values[key].to(param.dtype)), (batch, key)
    assert all(torch.equal(w, written[0]) for w in written)


def test_consistency_keeps_data_fixed_and_averages_copies() -> None:
    net = _mlp(2)
    graph = ProjectionGraph(net)
    x = torch.randn(4, 4, dtype=DT)
    state = {k: v + torch.randn_like(v) for k, v in graph.init_state(x).items()}
    proj = graph.project_consistency(state, x)
    assert torch.equal(proj["0.x"], x.unsqueeze(1).expand(4, 8, 4))
    # Stage 0 is Linear+ReLU, stage 1 the output layer; the hidden activation has 1 + 2 copies:
    # the ReLU's output and one per unit of the output layer.
    expected = (state["0.y"] + state["1.x"].sum(1)) / 3
    assert torch.allclose(proj["0.y"], expected) and torch.allclose(proj["1.x"][:, 1], expected)
    assert torch.allclose(proj["out"], 0.5 * (state["1.y"] + state["out"]))
    assert torch.allclose(proj["1.w"][3], state["1.w"].mean(0))
    assert _states_close(graph.project_consistency(proj, x), proj, 1e-12)


# ----------------------------------------------------------------------------- solvers


def test_douglas_rachford_is_the_textbook_iteration() -> None:
    """The one-projection-per-iteration form equals ``z <- z/2 + R_B R_A z / 2``."""
    net = _mlp(3)
    graph = ProjectionGraph(net)
    x = torch.randn(7, 4, dtype=DT)
    targets = torch.randn(7, 2, dtype=DT)
    output = SquaredErrorOutput(2.0)
    z = graph.init_state(x)
    result = douglas_rachford(graph, z, x, targets, output, iterations=6)
    for _ in range(6):
        pa = graph.project_ops(z, output, targets)
        ra = {k: 2 * pa[k] - z[k] for k in z}
        pb = graph.project_consistency(ra, x)
        rb = {k: 2 * pb[k] - ra[k] for k in z}
        last_shadow = pa
        z = {k: 0.5 * z[k] + 0.5 * rb[k] for k in z}
    assert _states_close(result.state, graph.project_consistency(last_shadow, x), 1e-10)


def test_reduce_mean_hook_gives_the_single_process_result() -> None:
    """Two ranks (threads) with unequal batches reproduce the full-batch solve."""
    x = torch.randn(16, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    targets = torch.randn(16, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    output = SquaredErrorOutput(1.0)
    reference = _mlp(4)
    # Seeding is process-wide, so the ranks' networks are built here rather than in the threads.
    nets = [_mlp(4), _mlp(4)]
    full = ProjectionGraph(reference)
    full_result = douglas_rachford(full, full.init_state(x), x, targets, output, iterations=8)
    expected = full.consensus_parameters(full_result.state)

    barrier = threading.Barrier(2, timeout=30)
    slots: list[Tensor] = [torch.empty(0), torch.empty(0)]
    calls = [0, 0]
    results: list[dict[str, Tensor] | None] = [None, None]

    def run(rank: int, rows: slice) -> None:
        def reduce_mean(t: Tensor) -> Tensor:
            calls[rank] += 1
            slots[rank] = t.clone()
            barrier.wait()
            mean = 0.5 * (slots[0] + slots[1])
            barrier.wait()
            return mean

        graph = ProjectionGraph(nets[rank])
        state = graph.init_state(x[rows])
        res = douglas_rachford(graph, state, x[rows], targets[rows], output, 8, reduce_mean)
        results[rank] = graph.consensus_parameters(res.state)

    threads = [
        threading.Thread(target=run, args=(0, slice(0, 5))),
        threading.Thread(target=run, args=(1, slice(5, 16))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert calls == [9, 9]  # one per iteration, and one for the starting point
    for rank_result in results:
        assert rank_result is not None
        for key, value in expected.items():
            assert torch.allclose(rank_result[key], value, atol=1e-10), key


def test_solver_arguments_are_checked() -> None:
    graph = ProjectionGraph(_mlp(5))
    x = torch.randn(3, 4, dtype=DT)
    state = graph.init_state(x)
    with pytest.raises(ValueError, match="unknown projection method"):
        bad: Any = "adam"
        solve(graph, state, x, x[:, :2], SquaredErrorOutput(), method=bad)
    with pytest.raises(ValueError, match="iterations"):
        douglas_rachford(graph, state, x, x[:, :2], SquaredErrorOutput(), iterations=0)


# ----------------------------------------------------------------------------- realisable problem


def _teacher_problem(batch: int = 32) -> tuple[Tensor, Tensor, nn.Sequential]:
    """Inputs, a teacher's outputs on them, and a student of the teacher's shape (4 -> 8 -> 2)."""
    teacher = _mlp(100)
    x = torch.randn(batch, 4, dtype=DT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        targets = teacher(x)
    return x, targets, _mlp(200)


def _fit(
    student: nn.Module,
    x: Tensor,
    targets: Tensor,
    output: OutputConstraint,
    method: Method,
    iterations: int,
) -> tuple[nn.Module, Tensor]:
    net = _mlp(0)
    net.load_state_dict(student.state_dict())
    graph = ProjectionGraph(net)
    result = solve(
        graph, graph.init_state(x), x, targets, output, method=method, iterations=iterations
    )
    graph.write_parameters(result.state)
    assert torch.all(torch.isfinite(result.violation))
    return net, result.violation


def test_douglas_rachford_fits_a_teacher_regression() -> None:
    x, targets, student = _teacher_problem()
    net, violation = _fit(student, x, targets, SquaredErrorOutput(1.0), "douglas_rachford", 200)
    # The iteration is not monotone on this non-convex problem; judge its last stretch.
    assert violation[-25:].min() < violation[0] / 20
    with torch.no_grad():
        before = ((student(x) - targets) ** 2).mean()
        after = ((net(x) - targets) ** 2).mean()
    assert after < before / 5


def test_alternating_projections_also_fit_the_teacher() -> None:
    x, targets, student = _teacher_problem()
    net, violation = _fit(
        student, x, targets, SquaredErrorOutput(1.0), "alternating_projections", 100
    )
    assert violation[-1] < violation[0] / 1.5
    with torch.no_grad():
        before = ((student(x) - targets) ** 2).mean()
        after = ((net(x) - targets) ** 2).mean()
    assert after < before / 2


@pytest.mark.parametrize(
    "output", [MarginOutput(1.0), OneVsRestOutput()], ids=["margin", "one_vs_rest"]
)
def test_douglas_rachford_classifies_teacher_labels(output: OutputConstraint) -> None:
    x, scores, student = _teacher_problem()
    labels = scores.argmax(-1)
    net, violation = _fit(student, x, labels, output, "douglas_rachford", 300)
    assert violation[-25:].min() < violation[0] / 5
    with torch.no_grad():
        acc_before = (student(x).argmax(-1) == labels).double().mean()
        acc_after = (net(x).argmax(-1) == labels).double().mean()
    assert acc_after >= 0.95 and acc_after > acc_before


def test_douglas_rachford_with_cross_entropy_lowers_the_loss() -> None:
    # Cross-entropy has no minimiser on separable data, so there is no feasible point to reach;
    # the proximal steps still drive the loss down.
    x, scores, student = _teacher_problem()
    labels = scores.argmax(-1)
    net, _ = _fit(student, x, labels, CrossEntropyOutput(5.0), "douglas_rachford", 150)
    with torch.no_grad():
        loss_before = nn.functional.cross_entropy(student(x), labels)
        loss_after = nn.functional.cross_entropy(net(x), labels)
        acc_before = (student(x).argmax(-1) == labels).double().mean()
        acc_after = (net(x).argmax(-1) == labels).double().mean()
    assert loss_after < loss_before / 2 and acc_after >= 0.9 and acc_after > acc_before


def test_fit_batch_trains_over_mini_batches() -> None:
    x, targets, student = _teacher_problem(batch=64)
    net = _mlp(0)
    net.load_state_dict(student.state_dict())
    graph = ProjectionGraph(net)
    with torch.no_grad():
        before = ((net(x) - targets) ** 2).mean()
    for _ in range(2):
        for rows in (slice(0, 32), slice(32, 64)):
            result = fit_batch(
                graph, x[rows], targets[rows], SquaredErrorOutput(1.0), iterations=40
            )
            assert result.violation.shape == (40,)
    with torch.no_grad():
        after = ((net(x) - targets) ** 2).mean()
    assert after < before / 3


# ----------------------------------------------------------------------------- warm, compiled


def _digits_like(batch: int, seed: int) -> tuple[Tensor, Tensor, nn.Sequential]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, generator=g)
    labels = torch.randint(0, 3, (batch,), generator=g)
    torch.manual_seed(seed)
    return x, labels, nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_warm_started_inner_solves_follow_the_exact_iteration() -> None:
    """A few warm-started Newton steps per iteration track the solves done to rounding."""
    x, labels, net = _digits_like(32, 0)
    graph = ProjectionGraph(net)
    state = graph.init_state(x)
    output = CrossEntropyOutput(5.0)
    exact = douglas_rachford(graph, state, x, labels, output, iterations=30)
    warm = douglas_rachford(graph, state, x, labels, output, iterations=30, warm_start=True)
    # The first iteration starts the inner solves cold (multipliers 0, the logits) and stays
    # within a few percent; the later ones within 1%.
    assert torch.allclose(warm.violation[0], exact.violation[0], rtol=3e-2)
    assert not torch.equal(warm.violation[0], exact.violation[0])
    assert torch.allclose(warm.violation[1:], exact.violation[1:], rtol=1e-2)
    ours = graph.consensus_parameters(warm.state)
    for key, value in graph.consensus_parameters(exact.state).items():
        assert torch.allclose(ours[key], value, atol=5e-3), key
    # The warm-started state is a point of the consistency set, like the exact one.
    assert _states_close(warm.state, graph.project_consistency(warm.state, x), 1e-6)


@pytest.mark.compiled
def test_compiled_iterations_equal_the_uncompiled_ones() -> None:
    """torch.compile changes the speed, not the iterates; other batch sizes run uncompiled."""
    x, labels, net = _digits_like(24, 1)
    graph = ProjectionGraph(net)
    output = CrossEntropyOutput(5.0)
    state = graph.init_state(x)
    plain = douglas_rachford(graph, state, x, labels, output, iterations=12, warm_start=True)
    compiled = douglas_rachford(graph, state, x, labels, output, iterations=12, compile=True)
    assert graph.compiled_batch == 24
    assert torch.allclose(compiled.violation, plain.violation, rtol=1e-4, atol=1e-6)
    assert _states_close(compiled.state, plain.state, 1e-4)
    # A smaller batch runs padded to the compiled size, with the same iterates as unpadded.
    small_state = graph.init_state(x[:10])
    small = douglas_rachford(graph, small_state, x[:10], labels[:10], output, iterations=12,
                             compile=True)
    small_plain = douglas_rachford(graph, small_state, x[:10], labels[:10], output,
                                   iterations=12, warm_start=True)
    assert graph.compiled_batch == 24 and small.violation.shape == (12,)
    assert torch.allclose(small.violation, small_plain.violation, rtol=1e-4, atol=1e-6)
    assert small.state["out"].shape[0] == 10
    assert _states_close(small.state, small_plain.state, 1e-4)


@pytest.mark.compiled
def test_compiled_problems_of_equal_shapes_each_run_their_own_program(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Problems that differ only in their operations never share a compiled program.

    Two networks of identical shapes and weights (a ReLU, then a hard threshold) are solved
    compiled one after the other, the first graph freed before the second is built (which may
    then get its ``id``): each gives its own uncompiled iterates, on the full batch and on a
    padded smaller one. No call of the compiled step skips Dynamo's guards, and one compiled
    program per problem serves its first iteration, its later ones and the padded batch.
    """
    stances: list[dict[str, Any]] = []
    set_stance = torch.compiler.set_stance

    def recording_set_stance(*args: Any, **kwargs: Any) -> Any:
        stances.append(kwargs)
        return set_stance(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording_set_stance)
    x, labels, _ = _digits_like(24, 1)
    output = CrossEntropyOutput(5.0)
    from torch._dynamo.utils import counters

    programs_compiled = counters["stats"]
    for activation in (nn.ReLU, Step):
        torch.manual_seed(3)
        graph = ProjectionGraph(nn.Sequential(nn.Linear(6, 5), activation(), nn.Linear(5, 3)))
        programs = programs_compiled["unique_graphs"]
        for rows in (slice(None), slice(0, 10)):
            state = graph.init_state(x[rows])
            plain = douglas_rachford(graph, state, x[rows], labels[rows], output, iterations=6,
                                     warm_start=True)
            compiled = douglas_rachford(graph, state, x[rows], labels[rows], output,
                                        iterations=6, compile=True)
            assert torch.allclose(compiled.violation, plain.violation, rtol=1e-4, atol=1e-6)
            assert _states_close(compiled.state, plain.state, 1e-4)
        assert graph.compiled_batch == 24
        # At most one new program: none when an earlier test compiled the same problem.
        assert programs_compiled["unique_graphs"] - programs <= 1, activation
        del graph
    assert not any(kwargs.get("skip_guard_eval_unsafe") for kwargs in stances), stances
