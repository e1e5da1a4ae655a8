"""Videos of the deterministic policy: files (``unitrain evaluate CKPT --video PATH``,
:func:`record`) and episodes in TensorBoard (``trainer.video_every_frames``).

Episode ``k`` of a video is episode ``k`` of the corresponding deterministic evaluation: the same
seed (:func:`unitrain.envs.rollout.eval_seed`), the same observation normalisation, ``module.act``.
Filmed episodes run on gymnasium's env with ``render_mode="rgb_array"`` whatever the run's
backend (EnvPool does not render), so on the gymnasium backend a filmed episode's return is that
evaluation episode's return, and on EnvPool it is an episode of the same env from the same seed
number.

Rendering without a display:

- classic control draws with pygame on an off-screen surface (``pip install 'unitrain[video]'``);
- MuJoCo renders with OpenGL. With no ``DISPLAY`` and no ``MUJOCO_GL`` set, unitrain chooses
  ``MUJOCO_GL=egl`` (libEGL, e.g. Debian's ``libegl1`` with Mesa: software rendering on a machine
  without a GPU, hardware rendering on one with) or ``osmesa`` where only libOSMesa is installed;
  set ``MUJOCO_GL`` yourself to choose. Without either library one line says what to install;
- Atari: the emulator's screen (no OpenGL), one frame per agent step (every 4th emulator frame).

Files: ``.mp4`` is H.264 through imageio's ffmpeg (``unitrain[video]``), ``.gif`` is written with
Pillow (no extra dependency; identical consecutive frames merge into one longer frame).
TensorBoard shows a logged episode as an animated GIF under *Images*, tag ``eval/video``.
"""

from __future__ import annotations

import ctypes.util
import io
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch

from unitrain.errors import UserError, check_output_path

if TYPE_CHECKING:
    from unitrain.envs.obs_norm import ObsNorm
    from unitrain.envs.spec import EnvSpec
    from unitrain.policy.module import RLModule

__all__ = ["record", "play", "prepare_rendering", "gif_bytes", "log_video", "log_episode",
           "Sink", "VIDEO_SUFFIXES", "check_video_path"]

VIDEO_SUFFIXES = (".mp4", ".gif")
# A TensorBoard video: at most this many frames, each at most this many pixels on its longer side.
TB_MAX_FRAMES = 1000
TB_MAX_SIDE = 240


def prepare_rendering(spec: "EnvSpec") -> None:
    """Make ``spec``'s env renderable here, or raise one line saying why it cannot be.

    Chooses MuJoCo's OpenGL platform when there is no display (see the module docstring).
    """
    from unitrain.envs.spec import is_mujoco

    if spec.make is not None:
        raise UserError(f"env {spec.id}: videos are filmed from gymnasium envs' rgb_array "
                        "rendering; a TorchRL env (env.make) cannot be filmed yet")
    if not os.environ.get("DISPLAY"):
        # pygame (classic control) draws off-screen without asking for a window system.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    if is_mujoco(spec.id) and not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
        if ctypes.util.find_library("EGL"):
            os.environ["MUJOCO_GL"] = "egl"
        elif ctypes.util.find_library("OSMesa"):
            os.environ["MUJOCO_GL"] = "osmesa"
        else:
            raise UserError(f"env.id={spec.id}: cannot render without a display: MuJoCo needs "
                            "libEGL or libOSMesa (e.g. apt install libegl1) or a MUJOCO_GL that "
                            "works here")
    modes = _metadata(spec.id).get("render_modes")
    if modes is not None and "rgb_array" not in modes:
        raise UserError(f"env.id={spec.id}: cannot render videos (its render modes: "
                        f"{', '.join(modes) or 'none'})")


def _metadata(env_id: str) -> dict[str, Any]:
    """The env class's ``metadata`` (``{}`` when it cannot be read without making the env)."""
    if env_id not in gym.registry:
        return {}
    entry = gym.spec(env_id).entry_point
    if isinstance(entry, str) and ":" in entry:
        import importlib

        module, name = entry.split(":")
        try:
            entry = getattr(importlib.import_module(module), name)
        except Exception:  # the env's own import reports itself when it is made
            return {}
    return dict(getattr(entry, "metadata", None) or {})


class _Filmed(gym.Wrapper):
    """Hands every rendered frame of the next ``wanted`` episodes to ``sink``: the first
    observation's frame, then one per step (an episode of ``L`` steps gives ``L + 1`` frames)."""

    def __init__(self, env: gym.Env, sink: Callable[[np.ndarray], None]) -> None:
        super().__init__(env)
        self.sink = sink
        self.wanted = 0

    def _film(self) -> None:
        try:
            frame = self.env.render()
        except gym.error.DependencyNotInstalled as e:
            what = str(e).split(",")[0].strip().rstrip(".")
            raise UserError(f"env.id={self.env.spec.id if self.env.spec else '?'}: cannot "
                            f"render: {what}; pip install 'unitrain[video]'") from None
        except Exception as e:  # an OpenGL context that cannot be made, a missing library
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"env.id={self.env.spec.id if self.env.spec else '?'}: cannot "
                            f"render: {first}") from None
        self.sink(np.asarray(frame, dtype=np.uint8))

    def reset(self, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        out = self.env.reset(**kwargs)
        if self.wanted > 0:
            self._film()
        return out

    def step(self, action: Any) -> tuple[Any, Any, bool, bool, dict[str, Any]]:
        out = self.env.step(action)
        if self.wanted > 0:
            self._film()
            if out[2] or out[3]:
                self.wanted -= 1
        return out


def _fps(env: gym.Env, spec: "EnvSpec") -> float:
    """Playback rate: the env's ``render_fps`` (MuJoCo's is 1 / its control step); Atari's 60 Hz
    screen at one frame per agent step (4 emulator frames)."""
    if spec.is_atari:
        return 15.0
    return float(env.metadata.get("render_fps") or 30)


class Sink:
    """Where :func:`play` puts frames: :meth:`start` once with the playback rate, then every
    frame."""

    def start(self, fps: float) -> None:
        self.fps = fps

    def __call__(self, frame: np.ndarray) -> None:
        raise NotImplementedError


@torch.no_grad()
def play(policy: "RLModule", spec: "EnvSpec", norm: "ObsNorm | None", episodes: int, seed: int,
         evaluation: int, sink: Sink) -> list[tuple[float, int]]:
    """Play ``policy.act`` for ``episodes`` episodes of evaluation number ``evaluation``, every
    frame to ``sink``; ``(return, length)`` of each."""
    from unitrain.envs.batched import BatchedEnv
    from unitrain.envs.rollout import eval_seed, rollout

    prepare_rendering(spec)
    env = BatchedEnv(spec, 0, norm, update_norm=False, num_envs=1, render_mode="rgb_array")
    filmed = _Filmed(env.backend.vec.envs[0], sink)
    env.backend.vec.envs[0] = filmed
    sink.start(_fps(filmed, spec))
    device = policy.device
    was_training = policy.training
    policy.eval()
    played = []
    try:
        for k in range(episodes):
            filmed.wanted = 1
            seeds = [eval_seed(seed, evaluation, k)]
            if policy.recurrent:
                # The rollout passes (observation, slots[, mask], state).
                out = rollout(env, lambda obs, _, *rest: _on_cpu(policy.act(
                    obs.to(device), *(m.to(device) for m in rest[:-1]), state=rest[-1])),
                              seeds=seeds, state=policy.initial_state(1))
            else:
                out = rollout(env, lambda obs, _, *mask: policy.act(
                    obs.to(device), *(m.to(device) for m in mask)).cpu(), seeds=seeds)
            ret, length = out.by_slot()
            played.append((float(ret[0]), int(length[0])))
    finally:
        policy.train(was_training)
        env.close()
    return played


def _on_cpu(out: tuple[torch.Tensor, Any]) -> tuple[torch.Tensor, Any]:
    """A recurrent ``act``'s action on the CPU (the filmed env's), its state where it is."""
    return out[0].cpu(), out[1]


class _FileWriter(Sink):
    """Frames to ``path``: ``.mp4`` through imageio's ffmpeg, ``.gif`` through Pillow."""

    def __init__(self, path: Path) -> None:
        self.path, self.fps = path, 30.0
        self.count = 0
        self._frames: list[np.ndarray] = []
        self._mp4: Any = None
        if path.suffix == ".mp4":
            try:
                import imageio.v2  # noqa: F401
                import imageio_ffmpeg  # noqa: F401
            except ImportError:
                raise UserError(f"--video {path}: writing .mp4 needs imageio-ffmpeg: pip install "
                                "'unitrain[video]' (or write a .gif)") from None

    def start(self, fps: float) -> None:
        super().start(fps)
        if self.path.suffix == ".mp4":
            import imageio.v2 as imageio

            # H.264 in yuv420p wants even sizes: frames are padded (see __call__), not scaled.
            self._mp4 = imageio.get_writer(str(self.path), fps=fps, macro_block_size=1,
                                           ffmpeg_log_level="error")

    def __call__(self, frame: np.ndarray) -> None:
        self.count += 1
        if self._mp4 is not None:
            h, w = frame.shape[:2]
            if h % 2 or w % 2:
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            self._mp4.append_data(frame)
        else:
            self._frames.append(frame)

    def close(self) -> None:
        if self._mp4 is not None:
            self._mp4.close()
        elif self._frames:
            self.path.write_bytes(gif_bytes(self._frames, self.fps))


def check_video_path(path: str | os.PathLike) -> Path:
    """``path`` if a video can be written there (creates nothing).

    Raises:
        UserError: the path is a directory, lies under a file, or does not end in a video suffix.
    """
    p = Path(path)
    valid = f"expected a file ending in {' or '.join(VIDEO_SUFFIXES)}"
    if p.is_dir():
        raise UserError(f"--video {path}: a directory, not a file; {valid}, "
                        f"e.g. {p / 'episode.mp4'}")
    check_output_path(p, f"--video {path}", f"{valid} in a directory (created if missing)")
    if p.suffix not in VIDEO_SUFFIXES:
        raise UserError(f"--video {path}: {valid}")
    return p


def record(policy: "RLModule | str | os.PathLike", path: str | os.PathLike,
           env: "str | EnvSpec | None" = None, episodes: int = 1, seed: int = 0,
           module: "RLModule | None" = None, evaluation: int = 0) -> dict[str, Any]:
    """Write ``episodes`` deterministic episodes of a module or checkpoint to a video file.

    Args:
        policy, env, module: as for :func:`unitrain.evaluate` (a checkpoint brings its run's env
            and observation statistics).
        path: ``*.mp4`` or ``*.gif``; its directory is created.
        episodes: episodes one after another in the file (those of :func:`unitrain.evaluate`
            with the same ``seed`` and ``evaluation``).

    Returns:
        ``path``, ``frames`` written, ``fps``, and the ``returns`` and ``lengths`` of the episodes.
    """
    from unitrain.run.checkpoint import policy_and_env

    path = check_video_path(path)
    if episodes < 1:
        raise UserError(f"--video-episodes: got {episodes}; expected an integer >= 1")
    policy, spec, norm = policy_and_env(policy, env, module)
    prepare_rendering(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = _FileWriter(path)
    try:
        played = play(policy, spec, norm, episodes, seed, evaluation, writer)
    finally:
        writer.close()
    return {"path": str(path), "frames": writer.count, "fps": writer.fps,
            "returns": [r for r, _ in played], "lengths": [n for _, n in played]}


def gif_bytes(frames: list[np.ndarray], fps: float) -> bytes:
    """An animated GIF (looping) of RGB ``frames`` at ``fps``."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)
    return buffer.getvalue()


def log_video(writer: Any, tag: str, frames: list[np.ndarray], fps: float, step: int) -> None:
    """Add ``frames`` to a TensorBoard ``SummaryWriter`` as an animated GIF (what TensorBoard
    shows as a video) at ``step``."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    h, w, c = frames[0].shape
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=gif_bytes(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


class _Frames(Sink):
    """Frames kept for TensorBoard: at most :data:`TB_MAX_FRAMES`, each at most
    :data:`TB_MAX_SIDE` pixels wide or high."""

    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []

    def __call__(self, frame: np.ndarray) -> None:
        if len(self.frames) < TB_MAX_FRAMES:
            step = math.ceil(max(frame.shape[:2]) / TB_MAX_SIDE)
            self.frames.append(frame[::step, ::step] if step > 1 else frame)


def log_episode(writer: Any, policy: "RLModule", spec: "EnvSpec", norm: "ObsNorm | None",
                seed: int, evaluation: int, step: int, tag: str = "eval/video") -> tuple[float, int]:
    """Film episode 0 of evaluation ``evaluation`` and add it to TensorBoard at ``step``;
    its ``(return, length)``."""
    frames = _Frames()
    played = play(policy, spec, norm, 1, seed, evaluation, frames)
    log_video(writer, tag, frames.frames, frames.fps, step)
    return played[0]
