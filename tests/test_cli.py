"""The command line: bad input gives one line, exit code 2, no traceback; listing; evaluate."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import REPO, SMALL_RECIPE, run_cli

from unitrain.app.cli import main
from unitrain.app.config import SHIPPED
from unitrain.policy.ckpt_file import load_checkpoint_file


def _fail(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_missing_recipe(capsys, tmp_path):
    err = _fail(capsys, "fit", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in err and "no such recipe file" in err


def test_yaml_syntax_error(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env:\n  id: CartPole-v1\n  num_envs: [1, 2\n")
    err = _fail(capsys, "fit", str(bad))
    assert "bad.yaml" in err and "YAML syntax error at line" in err


def test_unknown_key(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "optimizer.lr_rate=0.1")
    assert "small.yaml" in err and "optimizer.lr_rate" in err and "valid keys:" in err
    assert "lr," in err  # the valid keys are listed


def test_wrong_type(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "optimizer.clip=abc")
    assert "optimizer.clip" in err and "'abc'" in err and "expected a number" in err


@pytest.mark.parametrize("override,key,valid", [
    ("trainer.max_frames=-5", "trainer.max_frames", "> 0"),
    ("env.num_envs=0", "env.num_envs", ">= 1"),
    ("optimizer.clip=1.5", "optimizer.clip", "(0, 1)"),
])
def test_out_of_range(capsys, small_recipe, override, key, valid):
    err = _fail(capsys, "fit", str(small_recipe), override)
    assert key in err and valid in err


def test_unknown_env(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "env.id=CartPole-v2")
    assert "env.id" in err and "CartPole-v2" in err and "CartPole-v1" in err


def test_unknown_rule(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "optimizer.name=sgd")
    assert "optimizer.name" in err and "'sgd'" in err and "ppo" in err


def test_unknown_module_argument(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "module.width=3")
    assert "module.width" in err and "hidden" in err


def test_resume_missing_checkpoint(capsys, small_recipe, tmp_path):
    err = _fail(capsys, "fit", str(small_recipe), f"resume={tmp_path / 'x.ckpt'}")
    assert "resume=" in err and "no checkpoint" in err
    err = _fail(capsys, "fit", str(small_recipe), f"run_dir={tmp_path / 'empty'}", "resume=last")
    assert "resume=last" in err


def test_resume_corrupt_checkpoint_keeps_files(capsys, small_recipe, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    corrupt = run / "checkpoints" / "last.ckpt"
    corrupt.write_bytes(b"\x80\x04 not a checkpoint")
    err = _fail(capsys, "fit", str(small_recipe), f"run_dir={run}", "resume=last")
    assert "not a readable checkpoint" in err
    assert corrupt.read_bytes() == b"\x80\x04 not a checkpoint"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "last.ckpt"]


FIXTURE_CKPT = REPO / "tests" / "fixtures" / "checkpoints_0_1_0" / "cartpole_es.ckpt"

# Files that are not what they are named as: (argv, the file the error names, what it says). The
# paths are relative to a directory holding the files of `_bad_files`.
BAD_FILES = {
    "fit: a checkpoint as recipe": (["fit", "runs/x/checkpoints/last.ckpt"],
                                    "runs/x/checkpoints/last.ckpt",
                                    "a binary file (a checkpoint?)"),
    "fit: a directory as recipe": (["fit", "empty_dir"], "empty_dir",
                                   "a directory, not a recipe file"),
    "fit: a directory of recipes": (["fit", "recipes"], "recipes",
                                    "give a file in it: recipes/a.yaml, recipes/b.yaml"),
    "fit: an empty recipe": (["fit", "empty.yaml"], "empty.yaml", "an empty file (0 bytes)"),
    "fit: a recipe of comments": (["fit", "comments.yaml"], "comments.yaml", "no YAML content"),
    "fit: a list as recipe": (["fit", "list.yaml"], "list.yaml", "holds a list, not a mapping"),
    "fit: a value as recipe": (["fit", "scalar.yaml"], "scalar.yaml",
                               "holds a single value ('cartpole/ppo'), not a mapping"),
    "fit: init= a text file": (["fit", "small.yaml", "init=notes.txt"], "init=notes.txt",
                               "a text file, not a checkpoint"),
    "fit: init= a directory": (["fit", "small.yaml", "init=empty_dir"], "init=empty_dir",
                               "a directory, not a checkpoint file"),
    "fit: init= an empty file": (["fit", "small.yaml", "init=empty.ckpt"], "init=empty.ckpt",
                                 "an empty file (0 bytes)"),
    "fit: resume= a text file": (["fit", "small.yaml", "resume=notes.txt"], "resume=notes.txt",
                                 "a text file, not a checkpoint"),
    "fit: resume= a run directory": (["fit", "small.yaml", "resume=runs/x"], "resume=runs/x",
                                     "give a file in it: runs/x/checkpoints/last.ckpt"),
    "fit: resume= an empty file": (["fit", "small.yaml", "resume=empty.ckpt"],
                                   "resume=empty.ckpt", "an empty file (0 bytes)"),
    "fit: resume=last a directory": (["fit", "small.yaml", "run_dir=odd", "resume=last"],
                                     "resume=last: odd/checkpoints/last.ckpt",
                                     "a directory, not a checkpoint file"),
    "fit: run_dir= a file": (["fit", "small.yaml", "run_dir=notes.txt"], "notes.txt",
                             "cannot write to notes.txt (Not a directory)"),
    "evaluate: a text file": (["evaluate", "notes.txt"], "notes.txt",
                              "a text file, not a checkpoint"),
    "evaluate: a recipe": (["evaluate", "small.yaml"], "small.yaml",
                           "a text file, not a checkpoint"),
    "evaluate: a directory": (["evaluate", "empty_dir"], "empty_dir",
                              "a directory, not a checkpoint file"),
    "evaluate: an empty file": (["evaluate", "empty.ckpt"], "empty.ckpt",
                                "an empty file (0 bytes)"),
    "evaluate: --video a directory": (
        ["evaluate", "runs/x/checkpoints/last.ckpt", "--video", "empty_dir"], "--video empty_dir",
        "a directory, not a file"),
    "evaluate: --video a directory named .gif": (
        ["evaluate", "runs/x/checkpoints/last.ckpt", "--video", "dir.gif"], "--video dir.gif",
        "a directory, not a file"),
    "evaluate: --video under a file": (
        ["evaluate", "runs/x/checkpoints/last.ckpt", "--video", "notes.txt/clip.gif"],
        "--video notes.txt/clip.gif", "notes.txt is a file, not a directory"),
    "compare: a checkpoint as recipe": (["compare", "runs/x/checkpoints/last.ckpt"],
                                        "runs/x/checkpoints/last.ckpt", "a binary file"),
    "compare: a checkpoint as recipe, --python": (
        ["compare", "runs/x/checkpoints/last.ckpt", "--python", "policies:TinyPolicy"],
        "runs/x/checkpoints/last.ckpt", "a binary file"),
    "compare: a directory as recipe": (["compare", "small.yaml", "empty_dir"], "empty_dir",
                                       "a directory, not a recipe file"),
    "compare: an empty recipe": (["compare", "small.yaml", "empty.yaml"], "empty.yaml",
                                 "an empty file (0 bytes)"),
    "compare: --out a file": (["compare", "small.yaml", "--out", "notes.txt"], "--out notes.txt",
                              "a file, not a directory"),
    "compare: --out under a file": (["compare", "small.yaml", "--out", "notes.txt/cmp"],
                                    "--out notes.txt/cmp", "notes.txt is a file, not a directory"),
}


def _bad_files(root) -> None:
    (root / "runs" / "x" / "checkpoints").mkdir(parents=True)
    (root / "runs" / "x" / "checkpoints" / "last.ckpt").write_bytes(FIXTURE_CKPT.read_bytes())
    (root / "odd" / "checkpoints" / "last.ckpt").mkdir(parents=True)
    (root / "empty_dir").mkdir()
    (root / "dir.gif").mkdir()
    (root / "recipes").mkdir()
    for name in ("a.yaml", "b.yaml"):
        (root / "recipes" / name).write_text(SMALL_RECIPE)
    (root / "small.yaml").write_text(SMALL_RECIPE)
    (root / "notes.txt").write_text("hello\n")
    (root / "empty.yaml").write_text("")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "comments.yaml").write_text("# a recipe, some day\n\n")
    (root / "list.yaml").write_text("- cartpole/ppo\n- cartpole/es\n")
    (root / "scalar.yaml").write_text("cartpole/ppo\n")


def _contents(root) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_file_that_is_not_what_it_should_be_is_one_line(capsys, tmp_path, monkeypatch, case):
    argv, named, says = BAD_FILES[case]
    _bad_files(tmp_path)
    before = _contents(tmp_path)
    monkeypatch.chdir(tmp_path)
    err = _fail(capsys, *argv)
    assert err.startswith(f"unitrain: error: {named}: ") or \
        err.startswith(f"unitrain: error: run_dir: cannot write to {named} "), err
    assert says in err and "; " in err, err  # what is wrong; what would be valid
    assert capsys.readouterr().out == ""
    assert _contents(tmp_path) == before  # nothing written, nothing lost


def test_a_checkpoint_given_as_a_recipe_is_one_line_in_a_fresh_process(tmp_path):
    _bad_files(tmp_path)
    proc = run_cli("fit", "runs/x/checkpoints/last.ckpt", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "unitrain: error: runs/x/checkpoints/last.ckpt: a binary file (a checkpoint?), not a "
        "recipe YAML; evaluate a checkpoint with `unitrain evaluate runs/x/checkpoints/last.ckpt`, "
        "or train from it with `unitrain fit RECIPE init=runs/x/checkpoints/last.ckpt`"]
    assert proc.stdout == ""


def test_bad_override_syntax(capsys, small_recipe):
    err = _fail(capsys, "fit", str(small_recipe), "optimizer.lr")
    assert "key=value" in err


def test_error_in_fresh_process_has_no_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_RECIPE)
    proc = run_cli("fit", str(recipe), "optimizer.lr_rate=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_missing_optional_dependency_is_one_line(tmp_path):
    pytest.importorskip("gymnasium")
    try:
        import Box2D  # noqa: F401
        pytest.skip("Box2D is installed here")
    except ImportError:
        pass
    recipe = tmp_path / "r.yaml"
    recipe.write_text(SMALL_RECIPE)
    proc = run_cli("fit", str(recipe), "env.id=LunarLander-v3", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "env.id=LunarLander-v3: Box2D is not installed" in proc.stderr
    assert "unitrain[box2d]" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_recipes_lists_shipped(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    shipped = sorted(p.relative_to(SHIPPED).with_suffix("").as_posix()
                     for p in SHIPPED.glob("*/*.yaml"))
    assert shipped and all(name in out for name in shipped)
    lines = out.splitlines()[:len(shipped)]
    starts = {len(line) - len(line.split("  ", 1)[1].lstrip()) for line in lines}
    assert len(starts) == 1, "the descriptions start in one column"
    assert f"(in {SHIPPED};" in out


def test_fit_then_evaluate(capsys, small_recipe, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", str(small_recipe), f"run_dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("eval/return_mean", "frames", "wall_s", "checkpoint"):
        assert summary[key] is not None
    assert summary["frames"] >= 2048
    capsys.readouterr()
    assert main(["evaluate", summary["checkpoint"], "--episodes", "4", "--seed", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval/episodes"] == 4
    assert result["frames"] == summary["frames"]
    # The checkpoint holds the module's weights: evaluation matches the run's own final evaluation
    # protocol (deterministic policy) up to episode seeds, and is reproducible.
    assert main(["evaluate", summary["checkpoint"], "--episodes", "4", "--seed", "0"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval/return_mean"] == result["eval/return_mean"]
    ckpt = load_checkpoint_file(summary["checkpoint"])
    assert ckpt["unitrain"]["frames"] == summary["frames"]
    # The run's env with settings changed: a time limit of 5 steps cuts every episode there.
    assert main(["evaluate", summary["checkpoint"], "env.max_episode_steps=5",
                 "env.backend=gymnasium", "--episodes", "3"]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["eval/length_mean"] == 5.0 and cut["eval/return_max"] <= 5.0
    assert cut["env_overrides"] == {"max_episode_steps": 5, "backend": "gymnasium"}
    for bad, says in (("trainer.devices=2", "trainer.devices=2: evaluate takes env overrides"),
                      ("env.colour=red", "env.colour: not an env setting; one of"),
                      ("env.max_episode_steps=0", "max_episode_steps")):
        err = _fail(capsys, "evaluate", summary["checkpoint"], bad)
        assert says in err, err


@pytest.mark.parametrize("field", ["clip", "entropy_coef", "value_coef", "epochs",
                                   "minibatch_size", "gae_lambda"])
def test_reinforce_takes_only_its_own_fields(capsys, tmp_path, field):
    recipe = tmp_path / "reinforce.yaml"
    recipe.write_text("env: {id: CartPole-v1}\noptimizer: {name: reinforce, lr: 0.01}\n")
    err = _fail(capsys, "fit", str(recipe), f"optimizer.{field}=1")
    assert f"optimizer.{field}: unknown key" in err and "frames_per_batch" in err
    import unitrain as ut

    with pytest.raises(TypeError, match=field):  # not one of REINFORCE's fields
        ut.optim.REINFORCE(**{field: 1})


def test_shipped_recipes_come_with_a_regular_install(tmp_path):
    """``pip install .`` (not editable): the recipes are in the package, found by name from any
    directory, and a path relative to the current directory still works."""
    import subprocess
    import sys

    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheel_dir), str(REPO)], check=True,
                   cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), *map(str, wheel_dir.glob("*.whl"))], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text((SHIPPED / "cartpole" / "ppo.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(target)}
    script = ("from unitrain.app.config import SHIPPED, find_recipe\n"
              "from unitrain.app.config import load_recipe\n"
              "print(SHIPPED)\n"
              "for name in ('cartpole/ppo', 'recipes/cartpole/ppo.yaml', 'mine.yaml'):\n"
              "    print(load_recipe(find_recipe(name)).source)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, check=True,
                         capture_output=True, text=True).stdout.splitlines()
    installed = target / "unitrain" / "recipes"
    assert out == [str(installed), str(installed / "cartpole" / "ppo.yaml"),
                   str(installed / "cartpole" / "ppo.yaml"), "mine.yaml"]
    listing = subprocess.run([sys.executable, "-m", "unitrain", "recipes"], cwd=elsewhere,
                             env=env, check=True, capture_output=True, text=True).stdout
    assert "cartpole/ppo " in listing and str(installed) in listing
