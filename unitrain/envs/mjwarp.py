"""The ``mjwarp`` backend: gymnasium's v5 MuJoCo locomotion tasks simulated by MuJoCo Warp.

MuJoCo Warp (https://github.com/google-deepmind/mujoco_warp, the ``mujoco-warp`` package) is
MuJoCo's physics written as NVIDIA Warp kernels: one batched ``Data`` holds ``nworld`` copies of
a model and each kernel steps them all at once, on the GPU or (slowly, kernel by kernel) on the
CPU. Here ``num_envs`` worlds of one of gymnasium's own v5 XML models live in one such ``Data``,
and everything gymnasium computes in Python per env (observations, rewards, terminations,
reset noise) is computed in torch, batched, on the env's device, over zero-copy
``warp.to_torch`` views of the simulator's arrays.

The tasks follow gymnasium 1.x's ``gymnasium/envs/mujoco`` sources:

* ``mujoco_env.py`` ``MujocoEnv``: ``reset`` (``mj_resetData``, then ``reset_model``),
  ``set_state`` (then ``mj_forward``), ``_step_mujoco_simulation`` (``mj_step`` ``frame_skip``
  times, then ``mj_rnePostConstraint`` so that ``cfrc_ext`` is filled), ``dt`` (timestep times
  frame_skip) and ``_set_action_space`` (the actuators' ``ctrlrange``);
* ``half_cheetah_v5.py``, ``hopper_v5.py``, ``walker2d_v5.py``, ``ant_v5.py`` and
  ``humanoid_v5.py``: each ``__init__``'s defaults (taken from the signature itself), ``_get_obs``,
  ``step``/``_get_rew`` (forward reward from the position before and after the frame skip,
  ``healthy_reward``, ``control_cost``, ``contact_cost``), ``is_healthy`` and ``reset_model``
  (``qpos = init_qpos + U(-s, s)``; ``qvel = init_qvel + s * N(0, 1)`` for HalfCheetah and Ant,
  ``init_qvel + U(-s, s)`` for Hopper, Walker2d and Humanoid), and ``humanoid_v5.mass_center``.

As in gymnasium, the positions a step reads after ``mj_step`` that are not ``qpos`` itself (Ant's
torso ``xpos``, Humanoid's ``xipos``, ``cinert``, ``cvel``, ``qfrc_actuator``, ``cfrc_ext``) are
those of the last substep's forward pass. MuJoCo Warp has no PGS solver: Humanoid's model (PGS in
gymnasium's XML) runs with the Newton solver, which converges to the same contact forces there.
With pyramidal friction cones (all five XML files), MuJoCo Warp orients a capsule-on-plane
contact's tangent frame differently from MuJoCo, so a sliding Ant leg meets a rotated friction
pyramid and its trajectory departs from gymnasium's after the first contacts (the dynamics are
as valid, not identical; with elliptic cones the two agree).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import gymnasium.envs.mujoco
import numpy as np
import torch
from gymnasium.spaces import Box

from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError

#: Where Warp's compiled kernels are cached unless ``WARP_CACHE_PATH`` names another folder.
DEFAULT_KERNEL_CACHE = Path("~/.cache/unitrain/warp").expanduser()


def kernel_cache_dir() -> Path:
    """The folder Warp caches its compiled kernels in: ``$WARP_CACHE_PATH`` if set, else
    :data:`DEFAULT_KERNEL_CACHE`."""
    return Path(os.environ.get("WARP_CACHE_PATH") or DEFAULT_KERNEL_CACHE)


def _warp() -> Any:
    """Import and initialise Warp with the project's kernel cache and quiet module loads."""
    try:
        import mujoco_warp  # noqa: F401
        import warp as wp
    except ImportError as e:
        raise ConfigError("backend", f"the mjwarp backend needs MuJoCo Warp ({e}); "
                                     "pip install 'unitrain[mjwarp]'") from None

    if wp.config.kernel_cache_dir is None:  # set before Warp initialises (once, here)
        wp.config.kernel_cache_dir = str(kernel_cache_dir())
        wp.config.log_level = max(wp.config.log_level, wp.LOG_WARNING)  # no line per module
    wp.init()
    return wp


@dataclass(frozen=True)
class _Task:
    """One gymnasium v5 locomotion task: its gymnasium env class and how its step reads."""

    env_class: str          # gymnasium.envs.mujoco.<module>:<class>
    qvel_noise: str         # "normal" or "uniform" (reset_model)
    skip: int               # qpos entries dropped from the observation when excluded
    progress: str           # "qpos0" | "body_xpos" | "mass_center": the forward position
    clip_qvel: bool = False
    needs_forces: bool = False   # reads cfrc_ext (mj_rnePostConstraint after the frame skip)
    needs_kinematics: bool = False  # a reset observation reads cinert/cvel/xipos


TASKS: dict[str, _Task] = {
    "HalfCheetah-v5": _Task("half_cheetah_v5:HalfCheetahEnv", "normal", 1, "qpos0"),
    "Hopper-v5": _Task("hopper_v5:HopperEnv", "uniform", 1, "qpos0", clip_qvel=True),
    "Walker2d-v5": _Task("walker2d_v5:Walker2dEnv", "uniform", 1, "qpos0", clip_qvel=True),
    "Ant-v5": _Task("ant_v5:AntEnv", "normal", 2, "body_xpos", needs_forces=True),
    "Humanoid-v5": _Task("humanoid_v5:HumanoidEnv", "uniform", 2, "mass_center",
                         needs_forces=True, needs_kinematics=True),
}

#: Constructor arguments that only concern rendering: accepted and ignored.
_RENDER_KWARGS = {"default_camera_config", "render_mode", "width", "height", "camera_id",
                  "camera_name", "max_geom", "visual_options"}


def _env_class(task: _Task) -> type:
    import importlib

    module, name = task.env_class.split(":")
    return getattr(importlib.import_module(f"gymnasium.envs.mujoco.{module}"), name)


def _settings(env_id: str, task: _Task, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The gymnasium env's constructor defaults (its signature), overridden by the registered
    kwargs and then ``kwargs``; unknown names are a :class:`ConfigError`."""
    params = inspect.signature(_env_class(task).__init__).parameters
    defaults = {k: p.default for k, p in params.items()
                if k != "self" and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    given = {**gym.spec(env_id).kwargs, **kwargs}
    unknown = sorted(set(given) - set(defaults) - _RENDER_KWARGS)
    if unknown:
        raise ConfigError("kwargs", f"the mjwarp backend's {env_id} takes none of {unknown}; "
                                    f"valid: {', '.join(sorted(defaults))}")
    return {**defaults, **{k: v for k, v in given.items() if k not in _RENDER_KWARGS}}


def _model_path(xml_file: str) -> Path:
    """gymnasium's ``expand_model_path``: a bare file name is one of its package assets."""
    if xml_file.startswith(("/", ".", "~")):
        path = Path(xml_file).expanduser()
    else:
        path = Path(gym.envs.mujoco.__file__).resolve().parent / "assets" / xml_file
    if not path.is_file():
        raise ConfigError("kwargs.xml_file", f"no MuJoCo model at {path}")
    return path


class MJWarpVector:
    """``num_envs`` worlds of a gymnasium v5 MuJoCo task stepped together by MuJoCo Warp.

    A torch-native backend: :meth:`reset` and :meth:`step` take and return torch tensors on
    :attr:`device`. Worlds whose episode ends (termination, or ``max_episode_steps`` reached:
    the spec's value, else the registered 1000) are reset in the same step with gymnasium's
    reset noise, drawn from a ``torch.Generator`` per slot (slot ``i`` seeded ``seed + i``), so a
    seed replays the same episodes.

    On CUDA the frame skip (``frame_skip`` calls of ``mujoco_warp.step``, then
    ``rne_postconstraint`` where forces are read) is captured once as a CUDA graph and replayed
    each step; on the CPU the kernels are launched one by one (Warp runs CPU kernels serially;
    ``num_threads`` is unused). Warp compiles each model's kernels on first use (about 20-60 s
    per model on the CPU) into :func:`kernel_cache_dir`, and loads them from there afterwards.

    Args:
        spec: the env: ``id`` one of :data:`TASKS`, ``kwargs`` the gymnasium v5 constructor
            arguments (the render-only ones are ignored), ``max_episode_steps`` the time limit.
        num_envs: worlds simulated together.
        seed: slot ``i``'s reset noise is seeded ``seed + i`` (``None``: fresh entropy).
        num_threads: unused (the interface of the other backends).
        device: the torch/Warp device (default: CUDA when available, else the CPU).
    """

    name = "mjwarp"
    torch_native = True

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int = 1,
                 device: torch.device | str | None = None) -> None:
        if spec.id not in TASKS:
            raise ConfigError("id", f"the mjwarp backend runs {', '.join(TASKS)}, not {spec.id!r}")
        import mujoco

        wp = _warp()
        import mujoco_warp as mjw

        self._wp, self._mjw = wp, mjw
        self.task = TASKS[spec.id]
        self.settings = s = _settings(spec.id, self.task, dict(spec.kwargs))
        self.num_envs = num_envs
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_episode_steps = int(spec.max_episode_steps or
                                     gym.spec(spec.id).max_episode_steps or 1000)

        self.mjm = mjm = mujoco.MjModel.from_xml_path(str(_model_path(s["xml_file"])))
        mjd = mujoco.MjData(mjm)
        self.frame_skip = int(s["frame_skip"])
        self.dt = float(mjm.opt.timestep) * self.frame_skip
        f64: dict[str, Any] = {"device": self.device, "dtype": torch.float64}
        self.init_qpos = torch.as_tensor(mjd.qpos.copy(), **f64)
        self.init_qvel = torch.as_tensor(mjd.qvel.copy(), **f64)
        if mjm.opt.solver == mujoco.mjtSolver.mjSOL_PGS:
            mjm.opt.solver = mujoco.mjtSolver.mjSOL_NEWTON  # MuJoCo Warp has CG and Newton only
        self._build_spaces(mjm)

        self._wp_device = "cpu" if self.device.type == "cpu" else f"cuda:{self.device.index}"
        with wp.ScopedDevice(self._wp_device):
            self.m = mjw.put_model(mjm)
            self.d = mjw.make_data(mjm, nworld=num_envs)
        t = wp.to_torch
        d = self.d
        self.qpos, self.qvel, self.ctrl = t(d.qpos), t(d.qvel), t(d.ctrl)
        self._state = [t(d.qacc_warmstart), t(d.qfrc_applied), t(d.xfrc_applied), t(d.time)]
        if mjm.na:
            self._state.append(t(d.act))
        self.xpos, self.xipos = t(d.xpos), t(d.xipos)
        self.cinert, self.cvel = t(d.cinert), t(d.cvel)
        self.qfrc_actuator, self.cfrc_ext = t(d.qfrc_actuator), t(d.cfrc_ext)
        self.body_mass = torch.as_tensor(mjm.body_mass, dtype=torch.float32, device=self.device)
        if self.task.progress == "body_xpos":
            body = s["main_body"]
            self.main_body = (body if isinstance(body, int) else
                              mujoco.mj_name2id(mjm, mujoco.mjtObj.mjOBJ_BODY, body))

        self._graph: Any = None
        self._stream: Any = None  # on CUDA: a torch stream of our own, and Warp's view of it
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
            self._wp_stream = wp.stream_from_torch(self._stream)
        self.elapsed = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.fresh = torch.zeros(num_envs, dtype=torch.bool, device=self.device)
        self._before = torch.zeros(num_envs, dtype=torch.float32, device=self.device)
        self._seed_slots(seed)

    # -- spaces, seeding ----------------------------------------------------------------------

    def _build_spaces(self, mjm: Any) -> None:
        s, task = self.settings, self.task
        low, high = mjm.actuator_ctrlrange.copy().astype(np.float32).T
        self.action_space = Box(low=low, high=high, dtype=np.float32)
        size = mjm.nq + mjm.nv
        if s["exclude_current_positions_from_observation"]:
            size -= task.skip
        nb = mjm.nbody - 1
        for key, width in (("include_cinert_in_observation", 10 * nb),
                           ("include_cvel_in_observation", 6 * nb),
                           ("include_qfrc_actuator_in_observation", mjm.nv - 6),
                           ("include_cfrc_ext_in_observation", 6 * nb)):
            if s.get(key):
                size += width
        self.observation_space = Box(low=-np.inf, high=np.inf, shape=(size,), dtype=np.float64)

    def _seed_slots(self, seed: int | list[int] | None) -> None:
        if seed is None:
            seeds = [int(x) for x in np.random.SeedSequence().generate_state(self.num_envs)]
        elif isinstance(seed, list):
            if len(seed) != self.num_envs:
                raise ValueError(f"{len(seed)} seeds for {self.num_envs} envs")
            seeds = [int(x) for x in seed]
        else:
            seeds = [int(seed) + i for i in range(self.num_envs)]
        self.generators = [torch.Generator(device=self.device).manual_seed(x) for x in seeds]

    def _noise(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """gymnasium's ``reset_model`` noise for ``slots``: ``init_qpos + U(-s, s)`` and
        ``init_qvel`` plus ``s * N(0, 1)`` or ``U(-s, s)`` as the task defines."""
        scale = float(self.settings["reset_noise_scale"])
        nq, nv = self.init_qpos.numel(), self.init_qvel.numel()
        f64: dict[str, Any] = {"device": self.device, "dtype": torch.float64}
        qpos = torch.empty(len(slots), nq, **f64)
        qvel = torch.empty(len(slots), nv, **f64)
        normal = self.task.qvel_noise == "normal"
        for row, slot in enumerate(slots):
            g = self.generators[slot]
            qpos[row] = torch.rand(nq, generator=g, **f64)
            qvel[row] = (torch.randn if normal else torch.rand)(nv, generator=g, **f64)
        qpos = self.init_qpos + (2 * qpos - 1) * scale
        qvel = self.init_qvel + (qvel * scale if normal else (2 * qvel - 1) * scale)
        return qpos, qvel

    # -- physics ------------------------------------------------------------------------------

    def _frames(self) -> None:
        """gymnasium's ``_step_mujoco_simulation``: ``frame_skip`` steps, then the forces."""
        for _ in range(self.frame_skip):
            self._mjw.step(self.m, self.d)
        if self.task.needs_forces:
            self._mjw.rne_postconstraint(self.m, self.d)

    def _simulate(self) -> None:
        wp = self._wp
        if self.device.type == "cpu":
            with wp.ScopedDevice(self._wp_device):
                self._frames()
            return
        # CUDA: the frame skip is one graph, captured on the first step and replayed after, on a
        # stream of its own ordered after (and before) the torch work of the current stream.
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with wp.ScopedDevice(self._wp_device), wp.ScopedStream(self._wp_stream):
            if self._graph is None:
                with wp.ScopedCapture() as capture:
                    self._frames()
                self._graph = capture.graph
            wp.capture_launch(self._graph)
        current.wait_stream(self._stream)

    def simulate(self, action: torch.Tensor) -> None:
        """The physics alone: set the controls and run one frame skip (no observation, reward
        or reset; for benchmarks)."""
        self.ctrl.copy_(torch.as_tensor(action, device=self.device, dtype=torch.float32))
        self._simulate()

    def _refresh_kinematics(self) -> None:
        """What ``mj_forward`` gives a reset observation: positions, inertias, velocities."""
        mjw = self._mjw
        with self._wp.ScopedDevice(self._wp_device):
            if self._stream is not None:
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                scope: Any = self._wp.ScopedStream(self._wp_stream)
            else:
                scope = contextlib.nullcontext()
            with scope:
                mjw.kinematics(self.m, self.d)
                mjw.com_pos(self.m, self.d)
                mjw.com_vel(self.m, self.d)
        if self._stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._stream)

    # -- the task in torch ---------------------------------------------------------------------

    def _position(self) -> torch.Tensor:
        """The forward coordinate the reward differentiates (x of qpos, a body or the CoM)."""
        progress = self.task.progress
        if progress == "qpos0":
            return self.qpos[:, 0].clone()
        if progress == "body_xpos":
            return self.xpos[:, self.main_body, 0].clone()
        mass = self.body_mass
        return (self.xipos[:, :, 0] * mass).sum(1) / mass.sum()

    def observe(self) -> torch.Tensor:
        """``_get_obs`` of every world, float32 ``[N, obs_dim]``."""
        s, task = self.settings, self.task
        parts = [self.qpos[:, task.skip:] if s["exclude_current_positions_from_observation"]
                 else self.qpos]
        parts.append(self.qvel.clamp(-10, 10) if task.clip_qvel else self.qvel)
        n = self.num_envs
        fresh = self.fresh[:, None]
        if s.get("include_cinert_in_observation"):
            parts.append(self.cinert[:, 1:].reshape(n, -1))
        if s.get("include_cvel_in_observation"):
            parts.append(self.cvel[:, 1:].reshape(n, -1))
        if s.get("include_qfrc_actuator_in_observation"):
            # after mj_resetData (ctrl 0), mj_forward's actuator forces are 0
            parts.append(self.qfrc_actuator[:, 6:].masked_fill(fresh, 0.0))
        if s.get("include_cfrc_ext_in_observation"):
            forces = self._forces()[:, 1:].reshape(n, -1)
            parts.append(forces)
        return torch.cat(parts, dim=1).to(torch.float32)

    def _forces(self) -> torch.Tensor:
        """``cfrc_ext`` as the observation reads it (Ant clips it to ``contact_force_range``); a
        reset world's is 0 (``mj_forward`` does not compute it)."""
        forces = self.cfrc_ext.masked_fill(self.fresh[:, None, None], 0.0)
        if "contact_force_range" in self.settings:
            low, high = self.settings["contact_force_range"]
            forces = forces.clamp(float(low), float(high))
        return forces

    def _healthy(self) -> torch.Tensor:
        s, qpos = self.settings, self.qpos
        env = self.task.env_class
        if env.startswith("hopper"):
            z, angle = qpos[:, 1], qpos[:, 2]
            state = torch.cat([qpos, self.qvel], 1)[:, 2:]
            lo, hi = s["healthy_state_range"]
            ok = ((lo < state) & (state < hi)).all(1)
            return ok & _open(z, s["healthy_z_range"]) & _open(angle, s["healthy_angle_range"])
        if env.startswith("walker2d"):
            z, angle = qpos[:, 1], qpos[:, 2]
            return _open(z, s["healthy_z_range"]) & _open(angle, s["healthy_angle_range"])
        if env.startswith("ant"):
            state = torch.cat([qpos, self.qvel], 1)
            low, high = s["healthy_z_range"]
            z = qpos[:, 2]
            return torch.isfinite(state).all(1) & (float(low) <= z) & (z <= float(high))
        if env.startswith("humanoid"):
            return _open(qpos[:, 2], s["healthy_z_range"])
        return torch.ones(self.num_envs, dtype=torch.bool, device=self.device)  # HalfCheetah

    def _reward(self, action: torch.Tensor, velocity: torch.Tensor,
                healthy: torch.Tensor) -> torch.Tensor:
        s = self.settings
        reward = s["forward_reward_weight"] * velocity
        if "healthy_reward" in s:
            reward = reward + healthy.to(reward.dtype) * s["healthy_reward"]
        reward = reward - s["ctrl_cost_weight"] * action.square().sum(1)
        if "contact_force_range" in s:  # Ant: the clipped forces' squares
            reward = reward - s["contact_cost_weight"] * self._forces().square().sum((1, 2))
        if "contact_cost_range" in s:  # Humanoid: the forces' squares, the cost clipped
            low, high = s["contact_cost_range"]
            cost = s["contact_cost_weight"] * self.cfrc_ext.square().sum((1, 2))
            reward = reward - cost.clamp(float(low), float(high))
        return reward

    # -- the protocol --------------------------------------------------------------------------

    def set_state(self, qpos: torch.Tensor, qvel: torch.Tensor,
                  worlds: torch.Tensor | None = None) -> torch.Tensor:
        """Start new episodes in ``worlds`` (a bool mask, default all) from ``qpos``/``qvel``
        (rows for those worlds): ``mj_resetData`` then gymnasium's ``set_state``. Returns every
        world's observation."""
        if worlds is None:
            worlds = torch.ones(self.num_envs, dtype=torch.bool, device=self.device)
        self._restart(worlds, torch.as_tensor(qpos, device=self.device),
                      torch.as_tensor(qvel, device=self.device))
        return self.observe()

    def _restart(self, worlds: torch.Tensor, qpos: torch.Tensor, qvel: torch.Tensor) -> None:
        self.qpos[worlds] = qpos.to(torch.float32)
        self.qvel[worlds] = qvel.to(torch.float32)
        self.ctrl[worlds] = 0.0
        for array in self._state:
            array[worlds] = 0
        self.elapsed[worlds] = 0
        self.fresh = worlds.clone()
        if self.task.needs_kinematics:
            self._refresh_kinematics()
        before = self._position_after_reset()
        self._before = torch.where(worlds, before, self._before)

    def _position_after_reset(self) -> torch.Tensor:
        if self.task.progress == "body_xpos" and not self.task.needs_kinematics:
            # a free-jointed body's xpos is its qpos[0:3] (Ant's torso)
            return self.qpos[:, 0].clone()
        return self._position()

    def reset(self, seed: int | list[int] | None = None) -> torch.Tensor:
        if seed is not None:
            self._seed_slots(seed)
        qpos, qvel = self._noise(list(range(self.num_envs)))
        return self.set_state(qpos, qvel)

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor | None]:
        action = torch.as_tensor(action, device=self.device, dtype=torch.float32)
        self.ctrl.copy_(action)
        self._simulate()
        self.fresh = torch.zeros_like(self.fresh)
        after = self._position()
        velocity = (after - self._before) / self.dt
        self._before = after
        obs = self.observe()
        healthy = self._healthy()
        reward = self._reward(action, velocity, healthy)
        terminated = ~healthy if self.settings.get("terminate_when_unhealthy") else \
            torch.zeros_like(healthy)
        self.elapsed += 1
        truncated = self.elapsed >= self.max_episode_steps
        done = terminated | truncated
        if not bool(done.any()):
            return obs, reward, terminated, truncated, None
        slots = torch.nonzero(done).flatten().tolist()
        qpos, qvel = self._noise(slots)
        self._restart(done, qpos, qvel)
        final = obs
        obs = torch.where(done[:, None], self.observe(), final)
        return obs, reward, terminated, truncated, final

    def state(self) -> None:
        """The worlds cannot be saved: a resumed run starts their episodes afresh."""

    def load(self, state: Any) -> None:
        if state is not None:
            raise ValueError("an mjwarp env has no saved state to load")

    def close(self) -> None:
        self._graph = None


def _open(x: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    low, high = bounds
    return (float(low) < x) & (x < float(high))

