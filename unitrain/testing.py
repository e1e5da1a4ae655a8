"""Conformance checks for update rules: what every rule owes the Trainer, as one call.

:func:`check_rule` trains a small task with a rule the way :class:`unitrain.Trainer` does and
asserts, naming the check that failed:

- ``keys``: every ``step`` returns the same metric keys, ``"frames"`` among them;
- ``contract``: the return the Trainer reported is that of ``module.act`` on the checkpointed
  policy, played again outside the Trainer; with ``rule_action``, the rule's own deterministic
  action is ``module.act``;
- ``determinism``: two runs with one seed report the same metrics at every step and are in the
  same state at the same step;
- ``resume``: a run interrupted after a checkpoint and resumed (``ckpt_path="last"``) restores
  the module, optimizers, rule state, counters and RNG states exactly, reports the metrics of the
  uninterrupted run at every later step, and ends with its parameters and evaluation, bit for
  bit (metrics under ``perf/`` measure the wall clock and are not compared);
- ``ranks`` (``devices=2`` and more): every rank's ``step`` returns the same keys, and every
  rank ends with the same parameters;
- ``learning`` (``min_gain``): the final evaluation beats the initial parameters' by
  ``min_gain``.

Every built-in rule passes it (``tests/test_conformance.py``), and a rule written elsewhere can
call it from its own test suite::

    from unitrain.testing import check_rule

    def test_my_rule():
        check_rule(MyRule(lr=0.1), "CartPole-v1", frames=4000, min_gain=20.0)

The helpers it is built from (:func:`assert_same`, :class:`CaptureStart`,
:func:`checkpoint_state`, :class:`StopAfter`) compare run states in tests of their own.
This module is a public facade: no layer of the package imports it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from tensordict import TensorDict

from unitrain.envs.data import DataSpec, load_data
from unitrain.envs.info import env_info
from unitrain.envs.spec import EnvSpec, as_env_spec
from unitrain.policy.ckpt_file import load_checkpoint_file
from unitrain.policy.models import MLPPolicy
from unitrain.policy.module import RLModule
from unitrain.rules.base import UpdateRule
from unitrain.rules.population.strategy import Strategy, as_rule
from unitrain.run.checkpoint import evaluate
from unitrain.run.trainer import Trainer

__all__ = ["check_rule", "RuleReport", "RuleCheckError", "assert_same", "CaptureStart",
           "checkpoint_state", "StopAfter"]

class RuleCheckError(AssertionError):
    """A conformance check failed.

    Args:
        rule: the rule's name.
        check: which check (one of ``keys``, ``contract``, ``determinism``, ``resume``,
            ``ranks``, ``learning``).
        message: what was found.
    """

    def __init__(self, rule: str, check: str, message: str) -> None:
        super().__init__(f"check_rule({rule}): the {check} check failed: {message}")
        self.rule, self.check = rule, check


@dataclasses.dataclass(frozen=True)
class RuleReport:
    """What :func:`check_rule` measured (all its checks passed).

    Attributes:
        rule: the rule's name.
        score: the score of the learning check: ``"eval/return_mean"`` or ``"test/accuracy"``.
        initial: the initial parameters' score (``None`` without ``min_gain``).
        final: the trained parameters' score.
        keys: the metric keys every step returned.
        steps: ``step`` calls of the uninterrupted run.
        frames: env frames of the uninterrupted run (0 for a supervised run).
        resumed_from: frames (epochs, for a supervised run) at the checkpoint resumed from.
        checks: the checks that ran, in order.
    """

    rule: str
    score: str
    initial: float | None
    final: float
    keys: tuple[str, ...]
    steps: int
    frames: int
    resumed_from: int
    checks: tuple[str, ...]


# ---------------------------------------------------------------------------- state helpers

def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive exact equality of nested dicts, lists, tuples, tensors, arrays and scalars.

    Args:
        a, b: the values to compare.
        path: where ``a`` and ``b`` sit in a larger value (prefixes the message).

    Raises:
        AssertionError: naming the first path at which they differ.
    """
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: a tensor and a {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, \
            f"{path}: {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}"
        assert torch.equal(a.cpu(), b.cpu()), f"{path}: {a.flatten()[:4]} != {b.flatten()[:4]}"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{path}: arrays differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: a dict and a {type(b).__name__}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), \
            f"{path}: {len(a)} items != {len(b) if isinstance(b, (list, tuple)) else b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), f"{path}: nan != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _run_state(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """What a checkpoint holds of a run's training state, copied from the live run."""
    ctx = module._ctx.services
    return {
        "params": {k: v.detach().clone() for k, v in module.state_dict().items()},
        # What Lightning checkpoints: the rule's optimizers, or the placeholder Lightning uses
        # when a gradient-free rule has none.
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "rule": copy.deepcopy(module._ctx.rule.state_dict()),
        "frames": ctx.frames,
        "iteration": ctx.iteration,
    }


class CaptureStart(L.Callback):
    """Capture the full training state at the start of training (after any checkpoint
    restore): :func:`checkpoint_state`'s fields, in :attr:`state`."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        ctx = module._ctx.services
        self.state = {**_run_state(trainer, module),
                      "torch_rng": torch.get_rng_state(),
                      "numpy_rng": np.random.get_state(),
                      "generator": ctx.generator.get_state()}


def checkpoint_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The fields of :class:`CaptureStart`, read from a loaded checkpoint (rank 0's RNG states).

    Args:
        ckpt: a checkpoint as ``torch.load`` returns it.
    """
    un = ckpt["unitrain"]
    rng = un["rng"][0]
    return {
        "params": ckpt["state_dict"],
        "optimizers": ckpt["optimizer_states"],
        "rule": un["rule"],
        "frames": un["frames"],
        "iteration": un["iteration"],
        "torch_rng": rng["torch"],
        "numpy_rng": rng["numpy"],
        "generator": rng["generator"],
    }


class StopAfter(L.Callback):
    """Interrupt an env run after the iteration that reaches ``frames``; its ``last.ckpt`` is
    written then, as an interrupted run's last checkpoint would be.

    Args:
        frames: env frames after which to stop.
    """

    def __init__(self, frames: int) -> None:
        self.frames = frames

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if module._ctx.services.frames >= self.frames:
            trainer.should_stop = True


class _Snapshot(L.Callback):
    """Copy the training state once, after the iteration that reaches ``frames`` (env runs) or
    at the end of the first epoch (supervised runs): where :class:`StopAfter` and a one-epoch
    run leave their checkpoint."""

    def __init__(self, frames: int | None) -> None:
        self.frames = frames
        self.state: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.frames is not None and self.state is None and \
                module._ctx.services.frames >= self.frames:
            self.state = _run_state(trainer, module)

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.frames is None and self.state is None:
            self.state = _run_state(trainer, module)


# ---------------------------------------------------------------------------- the runs

def default_module(obs_dim: int, act_dim: int,
                   obs_shapes: dict[str, tuple[int, ...]] | None = None) -> RLModule:
    """The module :func:`check_rule` trains unless given one: an MLP with one hidden layer of 32
    (over the entries of a ``Dict``/``Tuple`` observation, ``obs_shapes``, concatenated)."""
    return MLPPolicy(obs_dim, act_dim, hidden=(32,), obs_shapes=obs_shapes)


@dataclasses.dataclass
class _Case:
    """One rule on one task: everything a run of the check needs (picklable, for the ranks)."""

    rule: UpdateRule | Callable[[], UpdateRule]
    spec: EnvSpec | None
    module: Callable[[int, int], RLModule]
    frames: int | None
    epochs: int | None
    seed: int
    eval_episodes: int
    obs_dim: int = 0
    act_dim: int = 0

    def __post_init__(self) -> None:
        rule = self.new_rule()
        self.name = rule.name or type(getattr(rule, "strategy", rule)).__name__
        self._data: tuple[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Dataloaders stay behind: the ranks' run is an env run.
        return {**self.__dict__, "_data": None}

    @property
    def supervised(self) -> bool:
        return self.spec is None

    def new_rule(self) -> UpdateRule:
        """A rule no run has set up: a copy of the given instance, or the factory's product (a
        population strategy runs under the population service, as in the Trainer)."""
        if isinstance(self.rule, (UpdateRule, Strategy)):
            return as_rule(copy.deepcopy(self.rule))
        rule = as_rule(self.rule())
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"check_rule: rule() returned a {type(rule).__name__}, not an "
                            "UpdateRule or a Strategy")
        return rule

    def fit(self, where: Path, budget: int | None = None, ckpt: str | None = None,
            callbacks: Sequence[L.Callback] = (), steps: list[dict[str, float]] | None = None,
            initial: list[float] | None = None) -> tuple[Trainer, RLModule]:
        """Train a fresh rule and module in ``where`` (``budget``: frames or epochs); append
        every step's metrics to ``steps`` and the untrained module's score to ``initial``."""
        rule = self.new_rule()
        if steps is not None:
            _record(rule, steps)
        common = dict(optimizer=rule, seed=self.seed, num_threads=1, run_dir=where,
                      callbacks=list(callbacks), enable_progress_bar=False)
        if self.supervised:
            assert self._data is not None
            train, test = self._data
            run = Trainer(env=None, max_epochs=budget or self.epochs, **common)
            module = self._new_module(initial)
            run.fit(module, train_dataloaders=train, val_dataloaders=test, ckpt_path=ckpt)
            return run, module
        assert self.frames is not None
        run = Trainer(env=self.spec, max_frames=budget or self.frames,
                      eval_every_frames=max(1, self.frames // 4),
                      eval_episodes=self.eval_episodes, **common)
        module = self._new_module(initial)
        run.fit(module, ckpt_path=ckpt)
        return run, module

    def _new_module(self, initial: list[float] | None) -> RLModule:
        # Built after the Trainer seeded the global RNGs: every run starts from the same
        # parameters, the ones scored here.
        module = self.module(self.obs_dim, self.act_dim)
        if initial is not None:
            initial.append(_initial_score(self, module))
        return module

    def fail(self, check: str, message: str) -> RuleCheckError:
        return RuleCheckError(self.name, check, message)


def _record(rule: UpdateRule, steps: list[dict[str, float]]) -> None:
    """Wrap ``rule.step`` to append the metrics of every call to ``steps``."""
    step = rule.step

    @functools.wraps(step)
    def recording(ctx: Any) -> dict[str, float]:
        metrics = step(ctx)
        steps.append({k: float(v) for k, v in metrics.items()})
        return metrics

    rule.step = recording  # type: ignore[method-assign]


def _initial_score(case: _Case, module: RLModule) -> float:
    """The score of ``module`` as built, before training (a copy is played)."""
    module = copy.deepcopy(module)
    if case.supervised:
        assert case._data is not None
        with torch.no_grad():
            hits = sum(int((module(x).argmax(-1) == y).sum()) for x, y in case._data[1])
        return hits / len(case._data[1].dataset)
    return evaluate(module, case.spec, episodes=case.eval_episodes, seed=case.seed)["return_mean"]


# ---------------------------------------------------------------------------- the checks

def _check_keys(case: _Case, steps: list[dict[str, float]]) -> tuple[str, ...]:
    if not steps:
        raise case.fail("keys", "the run made no step")
    keys = [sorted(m) for m in steps]
    first = keys[0]
    for i, k in enumerate(keys[1:], 2):
        if k != first:
            raise case.fail("keys", f"step {i} returned other metric keys than step 1: "
                                    f"{sorted(set(k) - set(first))} added, "
                                    f"{sorted(set(first) - set(k))} missing (every step returns "
                                    "the same keys; a metric with no value this step is NaN)")
    if "frames" not in first:
        raise case.fail("keys", f"step returned {first}, without 'frames' (the env frames the "
                                "step used on this process; 0 when it used none)")
    return tuple(first)


def _check_contract(case: _Case, run: Trainer, module: RLModule,
                    rule_action: Callable[[Any, RLModule, torch.Tensor], torch.Tensor] | None
                    ) -> None:
    last = Path(run.summary["checkpoint"])
    state = load_checkpoint_file(last)["unitrain"]
    reported = run.summary["eval/return_mean"]
    if state.get("eval_frames") != state["frames"] or state.get("last_eval") is None:
        raise case.fail("contract", f"{last} holds no evaluation of its final parameters")
    replay = evaluate(last, module=case.module(case.obs_dim, case.act_dim),
                      episodes=case.eval_episodes, seed=case.seed,
                      evaluation=state["eval_count"] - 1)["return_mean"]
    if replay != reported:
        raise case.fail("contract", f"the Trainer reported eval/return_mean {reported}, but "
                                    f"module.act of the checkpointed policy returns {replay} on "
                                    "the same episodes: the policy must live in the module's "
                                    "own parameters and act through module.act")
    if rule_action is None:
        return
    info = module.env_info
    assert info is not None
    gen = torch.Generator().manual_seed(case.seed)

    def draw(shape: tuple[int, ...], image: bool) -> torch.Tensor:
        if image:
            return torch.randint(0, 256, (16, *shape), generator=gen, dtype=torch.uint8)
        return torch.randn(16, *shape, generator=gen)

    if info.obs_shapes is None:
        obs: Any = draw(info.obs_shape, info.image)
    else:  # named entries, in the env's order
        obs = TensorDict({key: draw(shape, key in info.images)
                          for key, shape in info.obs_shapes.items()}, batch_size=[16])
    obs = obs.to(module.device)
    with torch.no_grad():
        act = module.act(obs)
        if module.recurrent:  # the first step of episodes: (action, state) from initial_state
            act = act[0]
        mine = rule_action(run.rule, module, obs)
    try:
        torch.testing.assert_close(mine, act, rtol=0, atol=1e-6)
    except AssertionError as e:
        raise case.fail("contract", f"the rule's deterministic action differs from "
                                    f"module.act: {e}") from None


# Metrics that measure wall-clock time, which no two runs share.
_CLOCK_PREFIX = "perf/"


def _same_steps(case: _Case, check: str, got: list[dict[str, float]],
                expected: list[dict[str, float]], first: int, what: str, hint: str) -> None:
    """Steps ``first + 1, ...`` reported ``expected`` in the uninterrupted run; ``got`` in
    ``what``. Clock metrics (``perf/...``) are left out."""
    for i, (a, b) in enumerate(zip(got, expected), first + 1):
        for key in sorted(b):
            x, y = a.get(key), b[key]
            if key.startswith(_CLOCK_PREFIX) or x == y or (
                    x is not None and math.isnan(x) and math.isnan(y)):
                continue
            raise case.fail(check, f"step {i} reported {key} = {x} in {what} but {y} in the "
                                   f"uninterrupted run ({hint})")


def _check_resume(case: _Case, root: Path, reference: Trainer, module: RLModule,
                  snapshot: _Snapshot, steps: list[dict[str, float]], score: str) -> int:
    """Interrupt a run where ``snapshot`` was taken, resume it, compare both segments with the
    uninterrupted run (its ``steps``); return the frames (epochs) of the interruption."""
    where = root / "resumed"
    before: list[dict[str, float]] = []
    if case.supervised:
        cut, _ = case.fit(where, budget=1, steps=before)
    else:
        assert case.frames is not None
        cut, _ = case.fit(where, callbacks=[StopAfter(case.frames // 2)], steps=before)
        if snapshot.state is None or cut.summary["frames"] >= case.frames:
            raise ValueError(f"check_rule({case.name}): frames={case.frames}: the step that "
                             f"passed {case.frames // 2} frames also spent the budget, so no "
                             "run can be interrupted half-way; give a budget of several of "
                             "the rule's steps")
    ckpt = load_checkpoint_file(where / "checkpoints" / "last.ckpt")
    expected = checkpoint_state(ckpt)
    assert snapshot.state is not None
    why = ("a rule draws its randomness from ctx.generator, ctx.shared_generator or the "
           "seeded global RNGs, and keeps no state from one run to the next")
    _same_steps(case, "determinism", before, steps, 0, f"another run of seed {case.seed}", why)
    try:
        assert_same({k: expected[k] for k in snapshot.state}, snapshot.state, "state")
    except AssertionError as e:
        raise case.fail("determinism", f"two runs of seed {case.seed} differ after "
                                       f"{len(before)} steps: {e} ({why})") from None

    capture = CaptureStart()
    after: list[dict[str, float]] = []
    resumed, module2 = case.fit(where, ckpt="last", callbacks=[capture], steps=after)
    if case.supervised:
        # Lightning creates the shuffling data iterator (drawing from the torch RNG) before
        # on_train_start; the continuation shows whether the restored RNG was exact.
        del capture.state["torch_rng"], expected["torch_rng"]
    hint = ("state_dict/load_state_dict must round-trip everything the rule's steps depend on; "
            "optimizers() must list every torch optimizer it steps")
    try:
        assert_same(capture.state, expected, "restored")
    except AssertionError as e:
        raise case.fail("resume", f"the state restored from {where}/checkpoints/last.ckpt is "
                                  f"not the state saved: {e} ({hint})") from None
    _same_steps(case, "resume", after, steps[len(before):], len(before),
                f"the run resumed after step {len(before)}", hint)
    try:
        assert len(before) + len(after) == len(steps), \
            f"{len(before)} + {len(after)} steps != {len(steps)}"
        assert_same(dict(module.state_dict()), dict(module2.state_dict()), "params")
        assert_same(reference.summary[score], resumed.summary[score], score)
    except AssertionError as e:
        raise case.fail("resume", f"the run resumed after step {len(before)} ends elsewhere "
                                  f"than the uninterrupted one: {e} ({hint})") from None
    return int(ckpt["unitrain"]["frames"]) if not case.supervised else int(ckpt["epoch"]) + 1


def _ranks_payload(case: _Case, devices: int) -> bytes:
    """What the processes of the ``ranks`` check start from (checked before any run)."""
    try:
        return pickle.dumps((case, devices))
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        raise TypeError(f"check_rule(devices={devices}): the rule and module must be picklable "
                        "to reach the other processes (a rule instance, its class or "
                        "functools.partial of it, defined in an importable module; not a "
                        f"lambda): {e}") from None


def _check_ranks(case: _Case, root: Path, payload: bytes, devices: int, timeout: float) -> None:
    """Run the rule in ``devices`` processes (DDP over gloo); compare their metric keys and
    final parameters."""
    where = root / "ranks"
    where.mkdir(parents=True, exist_ok=True)
    (where / "case.pkl").write_bytes(payload)
    # The other processes import what this one can: a user's rule in their test directory too.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "unitrain.testing", "case.pkl"], cwd=where,
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        found = [line.split(" check failed: ", 1)[1] for line in proc.stderr.splitlines()
                 if "RuleCheckError: " in line and " check failed: " in line]
        if found:
            raise case.fail("ranks", found[-1])
        raise case.fail("ranks", f"the {devices}-process run failed:\n{proc.stderr[-3000:]}")
    ranks = [torch.load(where / f"rank{r}.pt", weights_only=False) for r in range(devices)]
    for r, rank in enumerate(ranks[1:], 1):
        if rank["keys"] != ranks[0]["keys"]:
            raise case.fail("ranks", f"rank {r}'s steps returned other keys than rank 0's")
        try:
            assert_same(rank["params"], ranks[0]["params"], "params")
        except AssertionError as e:
            raise case.fail("ranks", f"rank {r} ends with other parameters than rank 0: {e} "
                                     "(every rank makes the same update: it decides on what "
                                     "all ranks gathered, through ctx's collectives, with "
                                     "randomness from ctx.shared_generator)") from None


def _ranks_main(path: str) -> None:
    """A rank of the ``ranks`` check (``python -m unitrain.testing case.pkl``; Lightning starts
    the other ranks with the same command)."""
    case, devices = pickle.loads(Path(path).read_bytes())
    rule = case.new_rule()
    keys: list[list[str]] = []
    step = rule.step

    def agreeing(ctx: Any) -> dict[str, float]:
        metrics = step(ctx)
        mine = sorted(metrics)
        keys.append(mine)
        # Compared before the Trainer's own gather, which needs equal keys to line up; every
        # rank sees the same lists, so every rank raises together and none waits.
        every: list[Any] = [None] * ctx.world_size
        torch.distributed.all_gather_object(every, mine)
        if any(k != mine for k in every):
            detail = "; ".join(f"rank {r}: {k}" for r, k in enumerate(every))
            raise RuleCheckError(case.name, "ranks", f"step {len(keys)} returned other metric "
                                                     f"keys on different ranks: {detail}")
        return metrics

    rule.step = agreeing  # type: ignore[method-assign]
    run = Trainer(env=case.spec, optimizer=rule, devices=devices, strategy="ddp",
                  accelerator="cpu", max_frames=case.frames, eval_every_frames=case.frames,
                  eval_episodes=case.eval_episodes, seed=case.seed, num_threads=1,
                  run_dir="run", enable_progress_bar=False)
    module = case.module(case.obs_dim, case.act_dim)
    run.fit(module)
    params = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save({"keys": keys, "params": params}, f"rank{run.global_rank}.pt")


# ---------------------------------------------------------------------------- check_rule

def check_rule(rule: UpdateRule | Callable[[], UpdateRule], env: Any = None, *,
               frames: int | None = None, module: Callable[[int, int], RLModule] | None = None,
               data: str | tuple[Any, Any] | None = None, epochs: int | None = None,
               seed: int = 1, min_gain: float | None = None,
               rule_action: Callable[[Any, RLModule, torch.Tensor], torch.Tensor] | None = None,
               eval_episodes: int = 8, devices: int = 1,
               run_dir: str | os.PathLike | None = None, timeout: float = 600.0) -> RuleReport:
    """Check that an update rule keeps the Trainer's contract (see the module docstring).

    It trains for twice the budget (``frames`` or ``epochs``) in all: one uninterrupted run,
    and one interrupted at half its budget and resumed from its ``last.ckpt``; ``devices > 1``
    adds a run in that many processes.

    Args:
        rule: an unused rule instance (each run trains a copy), or a zero-argument callable
            returning a fresh rule (the class, ``functools.partial(MyRule, lr=0.1)``, a lambda).
        env: a gymnasium id (``"module:id"`` too), an :class:`~unitrain.EnvSpec`, or a TorchRL
            ``EnvBase`` or factory; ``None`` for a rule that trains on
            ``(input, target)`` batches (``supervised_only``), with ``data``.
        frames: the env-frame budget of an env run (several of the rule's steps: the check
            interrupts a run half-way).
        module: ``module(obs_dim, act_dim)`` builds a fresh module (a class such as
            :class:`~unitrain.MLPPolicy`, or ``functools.partial`` of one); by default an MLP
            with one hidden layer of 32 units.
        data: a supervised run's data: a dataset name (``"digits"``) or ``(train_loader,
            test_loader)`` of ``(input, label)`` batches; the test labels give the class count.
        epochs: a supervised run's budget (at least 2: the resumed run is cut after one).
        seed: the runs' seed.
        min_gain: also check learning: the final ``eval/return_mean`` (``test/accuracy``) must
            exceed the initial parameters' by more than this (``None``: no learning check).
        rule_action: ``rule_action(rule, module, obs)``: the deterministic action as the rule
            itself computes it (from its actor, its population); checked equal to
            ``module.act(obs)`` after training.
        eval_episodes: episodes per evaluation.
        devices: processes of a further run (DDP over gloo on the CPU, started as
            ``python -m unitrain.testing``) whose ranks must return the same metric keys and end
            with the same parameters; the rule and module must then be picklable and importable
            in a fresh process.
        run_dir: where the runs go (default: a temporary directory, removed afterwards).
        timeout: seconds the multi-process run may take.

    Returns:
        A :class:`RuleReport`.

    Raises:
        RuleCheckError: an ``AssertionError`` naming the check that failed (``error.check``).
        ValueError: the budget is too small to interrupt a run half-way.
    """
    spec = as_env_spec(env)
    loaders: tuple[Any, Any] | None = None
    if spec is None:
        if data is None or epochs is None or epochs < 2:
            raise ValueError("check_rule: a run without env= needs data= (a dataset name or "
                             "(train_loader, test_loader)) and epochs= >= 2")
        if isinstance(data, str):
            train, test, data_info = load_data(DataSpec(name=data))
            loaders, obs_dim, act_dim = (train, test), data_info.obs_dim, data_info.act_dim
        else:
            loaders = data
            x, _ = next(iter(data[1]))
            obs_dim = int(x[0].numel())
            act_dim = int(max(int(y.max()) for _, y in data[1])) + 1
    else:
        if frames is None or frames < 2:
            raise ValueError("check_rule: an env run needs frames= (its env-frame budget)")
        info = env_info(spec)
        obs_dim, act_dim = info.obs_dim, info.act_dim
        if module is None and info.obs_shapes is not None:  # a Dict/Tuple observation
            module = functools.partial(default_module, obs_shapes=info.obs_shapes)
    case = _Case(rule, spec, module or default_module, frames, epochs, seed, eval_episodes,
                 obs_dim=obs_dim, act_dim=act_dim)
    case._data = loaders
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="check_rule-") as tmp:
            return _check(case, Path(tmp), min_gain, rule_action, devices, timeout)
    return _check(case, Path(run_dir), min_gain, rule_action, devices, timeout)


def _check(case: _Case, root: Path, min_gain: float | None,
           rule_action: Callable[[Any, RLModule, torch.Tensor], torch.Tensor] | None,
           devices: int, timeout: float) -> RuleReport:
    score = "test/accuracy" if case.supervised else "eval/return_mean"
    checks = ["keys", "determinism", "resume"]
    payload = None
    if devices > 1:
        if case.supervised:
            raise ValueError("check_rule: devices > 1 checks env runs only")
        payload = _ranks_payload(case, devices)
    steps: list[dict[str, float]] = []
    snapshot = _Snapshot(None if case.supervised else max(1, (case.frames or 0) // 2))
    initial: list[float] | None = None if min_gain is None else []
    run, module = case.fit(root / "full", callbacks=[snapshot], steps=steps, initial=initial)
    keys = _check_keys(case, steps)
    if not case.supervised:
        _check_contract(case, run, module, rule_action)
        checks.insert(1, "contract")
    resumed_from = _check_resume(case, root, run, module, snapshot, steps, score)
    if payload is not None:
        _check_ranks(case, root, payload, devices, timeout)
        checks.append("ranks")
    final = float(run.summary[score])
    if min_gain is not None:
        assert initial
        if not final > initial[0] + min_gain:
            raise case.fail("learning", f"{score} went from {initial[0]} to {final} in "
                                        f"{case.frames or case.epochs} "
                                        f"{'frames' if case.frames else 'epochs'}; expected a "
                                        f"gain of more than {min_gain}")
        checks.append("learning")
    return RuleReport(rule=case.name, score=score, initial=initial[0] if initial else None,
                      final=final,
                      keys=keys, steps=len(steps), frames=int(run.summary["frames"]),
                      resumed_from=resumed_from, checks=tuple(checks))


if __name__ == "__main__":
    _ranks_main(sys.argv[1])
