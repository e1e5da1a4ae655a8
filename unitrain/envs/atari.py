"""Atari preprocessing (Mnih et al. 2015; Machado et al. 2018) for the gymnasium backend:
no-op starts, frame skip 4 with max-pooling, 84×84 grayscale (area interpolation); or, for
``obs_type: ram``, the console's 128 bytes of RAM as the observation ("Solving Deep
Reinforcement Learning Benchmarks with Linear Policy Networks", Wong et al. 2024, plays Atari
from the RAM)."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np


# Bytes of the Atari 2600's RAM.
RAM_BYTES = 128


def register_ale() -> None:
    try:
        import ale_py
    except ImportError:  # pragma: no cover - ale-py is a declared dependency
        return
    gym.register_envs(ale_py)


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """``[size_out, size_in]`` weights that average each output cell's span of input pixels.

    Downscaling with them on both axes is area interpolation (OpenCV's ``INTER_AREA``).
    """
    scale = size_in / size_out
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(math.floor(lo), min(math.ceil(hi), size_in)):
            weights[i, j] = (min(hi, j + 1) - max(lo, j)) / scale
    return weights


class AtariFrames(gym.Wrapper):
    """Atari preprocessing (Mnih et al. 2015) without an OpenCV dependency.

    The same steps as ``gymnasium.wrappers.AtariPreprocessing`` with ``grayscale_obs=True`` and
    ``terminal_on_life_loss=False``: 1 to ``noop_max`` no-op actions after each reset, every
    action repeated ``frame_skip`` times with rewards summed, the last two grayscale screens
    max-pooled and area-resized to ``screen_size × screen_size`` uint8. With ``ram=True`` the
    observation is instead the RAM after the last emulator frame of the step, ``float32`` bytes
    divided by 255 (in ``[0, 1]``, so a linear policy's weights start on one scale), and the
    screen is never read.
    """

    def __init__(self, env: gym.Env, noop_max: int = 30, frame_skip: int = 4,
                 screen_size: int = 84, ram: bool = False) -> None:
        super().__init__(env)
        self.noop_max, self.frame_skip, self.ram = noop_max, frame_skip, ram
        self._ale = env.unwrapped.ale
        height, width = self._ale.getScreenDims()
        self._screens = np.zeros((2, height, width), dtype=np.uint8)
        self._rows = _area_weights(height, screen_size)
        self._cols = np.ascontiguousarray(_area_weights(width, screen_size).T)
        self.observation_space = (
            gym.spaces.Box(0.0, 1.0, (RAM_BYTES,), np.float32) if ram
            else gym.spaces.Box(0, 255, (screen_size, screen_size), np.uint8))

    def _observation(self) -> np.ndarray:
        if self.ram:
            return self._ale.getRAM().astype(np.float32) / 255.0
        frame = self._screens[0]
        if self.frame_skip > 1:
            frame = np.maximum(frame, self._screens[1])
        small = self._rows @ frame.astype(np.float32) @ self._cols
        return np.rint(small).astype(np.uint8)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        noops = 0
        if self.noop_max > 0:
            noops = int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))
        for _ in range(noops):
            _, _, terminated, truncated, step_info = self.env.step(0)
            info.update(step_info)
            if terminated or truncated:
                _, info = self.env.reset(seed=seed, options=options)
        if not self.ram:
            self._ale.getScreenGrayscale(self._screens[0])
            self._screens[1].fill(0)
        return self._observation(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        total, terminated, truncated, info = 0.0, False, False, {}
        for t in range(self.frame_skip):
            _, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
            if t >= self.frame_skip - 2 and not self.ram:
                self._ale.getScreenGrayscale(self._screens[self.frame_skip - 1 - t])
        return self._observation(), total, terminated, truncated, info
