"""The ``envpool`` backend: EnvPool's C++ envs on threads of their own (Weng et al. 2022,
"EnvPool: A Highly Parallel Reinforcement Learning Environment Execution Engine")."""

from __future__ import annotations

from typing import Any

import numpy as np

from unitrain.envs.spec import EnvSpec, envpool_id


class EnvPoolVector:
    """The ``envpool`` backend: EnvPool's C++ pool of ``num_envs`` envs (stepped on up to
    ``num_threads`` threads of its own), made to autoreset in the same step.

    EnvPool autoresets on the step *after* an episode ends (that step ignores its action and
    returns reward 0); here the slots whose episode ended are reset right away with a partial
    ``reset(env_id=...)``, so every step is a real step of every slot, as with gymnasium.
    EnvPool seeds each env once, when the pool is made (a seed per env); a seeded reset
    therefore makes a new pool with those seeds (about 0.1 s for 64 MuJoCo envs), so an episode
    seeded with ``s`` is the same whichever slot plays it.
    Atari ids get the settings of the gymnasium path (no-op starts, frame skip 4 with
    max-pooling, 84×84 grayscale, ``frame_stack`` frames, sticky actions 0.25, no fire reset, no
    episodic life, unclipped rewards), the preprocessing done in C++.
    """

    name = "envpool"

    def __init__(self, spec: EnvSpec, num_envs: int, seed: int | None, num_threads: int) -> None:
        self.kwargs: dict[str, Any] = {"num_envs": num_envs, "batch_size": num_envs,
                                       "num_threads": num_threads}
        if spec.max_episode_steps is not None:
            self.kwargs["max_episode_steps"] = spec.max_episode_steps
        if spec.is_atari:
            self.kwargs.update(repeat_action_probability=0.25, noop_max=30, frame_skip=4,
                               episodic_life=False, reward_clip=False, use_fire_reset=False,
                               stack_num=spec.frame_stack, img_height=84, img_width=84,
                               gray_scale=True)
        self.task = envpool_id(spec.id)
        self.num_envs = num_envs
        self.seeds = self._seeds(seed or 0)
        self.pool = self._make()
        self.stepped = False
        self.observation_space = self.pool.observation_space
        self.action_space = self.pool.action_space

    def _seeds(self, seed: int | list[int]) -> list[int]:
        return [int(s) for s in seed] if isinstance(seed, list) else [
            int(seed) + i for i in range(self.num_envs)]

    def _make(self) -> Any:
        import envpool

        return envpool.make_gymnasium(self.task, seed=self.seeds, **self.kwargs)

    def reset(self, seed: int | list[int] | None) -> np.ndarray:
        if seed is not None:
            seeds = self._seeds(seed)
            if seeds != self.seeds or self.stepped:
                self.pool.close()
                self.seeds = seeds
                self.pool = self._make()
        self.stepped = True
        obs, _ = self.pool.reset()
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray | None]:
        self.send(action)
        return self.recv()

    def send(self, action: np.ndarray) -> None:
        """Hand the actions to EnvPool's threads and return at once."""
        self.pool.send(action)

    def recv(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """Wait for the step :meth:`send` started; reset the slots whose episode ended."""
        obs, reward, terminated, truncated, _ = self.pool.recv()
        done = terminated | truncated
        if not done.any():
            return obs, reward, terminated, truncated, None
        ended = np.flatnonzero(done)
        first, _ = self.pool.reset(env_id=ended)
        final = obs
        obs = obs.copy()
        obs[ended] = first
        return obs, reward, terminated, truncated, final

    def state(self) -> None:
        """EnvPool's envs cannot be saved: a resumed run starts their episodes afresh."""
        return None

    def load(self, state: bytes) -> None:
        raise ValueError("an EnvPool env has no saved state to load")

    def close(self) -> None:
        self.pool.close()
