"""Videos: files of deterministic episodes (CLI and Python) and episodes logged to TensorBoard,
headless, for classic control, MuJoCo and Atari."""

from __future__ import annotations

import io
import json

import imageio.v2 as imageio
import pytest
import torch
from conftest import SMALL_RECIPE
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import unitrain as ut
from unitrain.app.cli import main
from unitrain.envs import EnvSpec, env_info
from unitrain.errors import ConfigError, UserError
from unitrain.policy.models import NatureCNN, ParameterVector
from unitrain.run.video import record


def _frames(path) -> int:
    return imageio.get_reader(str(path)).count_frames()


def _mlp(spec: EnvSpec) -> ut.MLPPolicy:
    info = env_info(spec)
    return ut.MLPPolicy(info.obs_dim, info.act_dim, hidden=[16])


def test_a_cartpole_video_holds_every_frame_of_the_evaluation_episodes(tmp_path):
    spec = EnvSpec(id="CartPole-v1")
    policy = _mlp(spec)
    out = record(policy, tmp_path / "cartpole.mp4", env=spec, episodes=3, seed=5)
    # An episode of L steps is its first frame and one frame per step.
    assert out["frames"] == sum(n + 1 for n in out["lengths"])
    assert _frames(tmp_path / "cartpole.mp4") == out["frames"]
    assert out["fps"] == 50.0  # CartPole's render_fps
    # The filmed episodes are the evaluation's first episodes (same seeds, same policy).
    evaluated = ut.evaluate(policy, env=spec, episodes=3, seed=5)
    assert sum(out["returns"]) / 3 == pytest.approx(evaluated["return_mean"])
    assert sum(out["lengths"]) / 3 == pytest.approx(evaluated["length_mean"])


def test_a_gif_needs_no_extra_dependency(tmp_path):
    spec = EnvSpec(id="CartPole-v1", max_episode_steps=12)
    torch.manual_seed(0)
    out = record(_mlp(spec), tmp_path / "short.gif", env=spec)
    length = out["lengths"][0]
    assert 1 <= length <= 12 and out["frames"] == length + 1
    gif = Image.open(tmp_path / "short.gif")
    # Pillow merges identical consecutive frames; a moving cart gives distinct ones.
    assert 2 <= gif.n_frames <= length + 1 and gif.size == (600, 400)


def test_mujoco_renders_headless(tmp_path):
    spec = EnvSpec(id="HalfCheetah-v5", max_episode_steps=5)
    out = record(_mlp(spec), tmp_path / "cheetah.mp4", env=spec, episodes=2)
    assert out["lengths"] == [5, 5] and _frames(tmp_path / "cheetah.mp4") == 12
    assert out["fps"] == 20.0  # 1 / HalfCheetah's control step of 0.05 s


def test_atari_films_one_frame_per_agent_step(tmp_path):
    spec = EnvSpec(id="ALE/Pong-v5", max_episode_steps=100)  # emulator frames, no-ops included
    info = env_info(spec)
    out = record(NatureCNN(info.obs_shape, info.act_dim), tmp_path / "pong.mp4", env=spec)
    assert 1 <= out["lengths"][0] <= 25 and _frames(tmp_path / "pong.mp4") == out["lengths"][0] + 1
    assert imageio.get_reader(str(tmp_path / "pong.mp4")).get_meta_data()["size"] == (160, 210)


def test_an_env_that_cannot_render_says_so():
    spec = EnvSpec(id="unitrain/Sphere-v0", kwargs={"dim": 3})
    with pytest.raises(UserError, match=r"env.id=unitrain/Sphere-v0: cannot render videos "
                                        r"\(its render modes: none\)"):
        record(ParameterVector(3), "x.mp4", env=spec)
    with pytest.raises(UserError, match="cannot render videos"):
        ut.Trainer(env=spec, optimizer=ut.optim.CMAES(), max_frames=100, video_every_frames=50)


def test_evaluate_video_from_the_command_line(capsys, tmp_path):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(SMALL_RECIPE)
    run = tmp_path / "run"
    assert main(["fit", str(recipe), f"run_dir={run}", "trainer.max_frames=512"]) == 0
    capsys.readouterr()
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert main(["evaluate", ckpt, "--episodes", "2", "--video", str(tmp_path / "v" / "a.mp4"),
                 "--video-episodes", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    video = result["video"]
    assert _frames(tmp_path / "v" / "a.mp4") == video["frames"] == sum(video["lengths"]) + 2
    assert sum(video["returns"]) / 2 == pytest.approx(result["eval/return_mean"])
    assert main(["evaluate", ckpt, "--video", str(tmp_path / "a.avi")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unitrain: error: --video {tmp_path / 'a.avi'}: expected a file ending in .mp4 or .gif"


def test_training_logs_an_episode_video_to_tensorboard(tmp_path):
    spec = EnvSpec(id="CartPole-v1", num_envs=4)
    trainer = ut.Trainer(env=spec, optimizer=ut.optim.PPO(frames_per_batch=128, minibatch_size=128,
                                                          epochs=1),
                         max_frames=1024, eval_every_frames=256, eval_episodes=2,
                         video_every_frames=512, run_dir=tmp_path / "run",
                         enable_progress_bar=False)
    trainer.fit(_mlp(spec))
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0})
    events.Reload()
    videos = events.Images("eval/video")
    assert [v.step for v in videos] == [512, 1024]
    for v in videos:
        gif = Image.open(io.BytesIO(v.encoded_image_string))
        assert gif.format == "GIF" and (v.width, v.height) == (200, 134) and gif.n_frames >= 2
    # Off by default: no video without the setting.
    with pytest.raises(ConfigError, match="video_every_frames: got 0"):
        ut.Trainer(env=spec, optimizer=ut.optim.PPO(), video_every_frames=0)
