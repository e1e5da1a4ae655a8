"""Checkpoint format 2: ``torch.load(path, weights_only=True)`` reads every checkpoint a run
writes (no pickled numpy arrays or classes), and unitrain restores its numpy and bytes state
from it exactly. Format 1 (0.1.0) files still load: ``tests/test_old_checkpoints.py``."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from policies import TinyPolicy

import unitrain as ut
from unitrain.policy.ckpt_file import FORMAT, FORMAT_KEY, decode, encode, load_checkpoint_file
from unitrain.policy.models import MLPPolicy

RUNS = {
    "ppo": ("CartPole-v1", lambda: ut.optim.PPO(frames_per_batch=128, minibatch_size=128,
                                                 epochs=1), 512),
    "sac": ("Pendulum-v1", lambda: ut.optim.SAC(warmup_frames=64, buffer_size=1000), 256),
    "es": ("CartPole-v1", lambda: ut.optim.ES(), 3000),
}


@pytest.mark.parametrize("rule", sorted(RUNS))
def test_checkpoints_load_with_weights_only(rule: str, tmp_path: Path):
    env, make_rule, frames = RUNS[rule]
    trainer = ut.Trainer(env, make_rule(), max_frames=frames, run_dir=tmp_path, eval_episodes=1,
                         enable_progress_bar=False)
    info = trainer.env_info
    trainer.fit(MLPPolicy(obs_dim=info.obs_dim, act_dim=info.act_dim, discrete=info.discrete,
                          hidden=[16]))
    for path in (trainer.summary["checkpoint"], trainer.summary["best_checkpoint"]):
        raw = torch.load(path, weights_only=True)
        assert raw[FORMAT_KEY] == FORMAT == 2
        state = load_checkpoint_file(path)["unitrain"]
        # The numpy RNG state comes back as numpy set_state takes it.
        np_state = state["rng"][0]["numpy"]
        assert isinstance(np_state, tuple) and isinstance(np_state[1], np.ndarray)
        assert np_state[1].dtype == np.uint32


def test_encode_round_trips_numpy_bytes_and_tuples():
    rng = np.random.RandomState(3)
    state = {"numpy": rng.get_state(), "python": random.Random(4).getstate(),
             "scalar": np.float32(1.5), "env": b"\x00\x01opaque", "empty": b"",
             "nested": [{"a": (1, "b", None)}], "tensor": torch.arange(3)}
    encoded = encode(state)
    buffer = __import__("io").BytesIO()
    torch.save(encoded, buffer)
    buffer.seek(0)
    back = decode(torch.load(buffer, weights_only=True))
    assert back["python"] == state["python"]
    assert back["env"] == state["env"] and back["empty"] == b""
    assert back["nested"] == state["nested"]
    assert type(back["scalar"]) is np.float32 and back["scalar"] == 1.5
    restored = np.random.RandomState()
    restored.set_state(back["numpy"])
    assert restored.randint(1 << 30) == rng.randint(1 << 30)
    assert torch.equal(back["tensor"], state["tensor"])


def test_state_that_cannot_be_stored_safely_is_named():
    with pytest.raises(TypeError, match=r"checkpoint\['rule'\]\['x'\]: a TinyPolicy cannot"):
        encode({"rule": {"x": TinyPolicy(obs_dim=4, act_dim=2, hidden=4)}})
