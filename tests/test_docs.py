"""The docs are tested: every Python and shell snippet in README.md and docs/ runs (with a tiny
budget), unless the doc marks it ``<!-- not run: reason -->``; a snippet marked
``<!-- file: NAME -->`` is a file the later snippets use, written as NAME; every list of logged
scalars matches the tags a real run writes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from conftest import REPO
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from unitrain.app.cli import main
from unitrain.app.config import find_recipe, load_recipe

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^\n]*?) -->\n|<!-- file: (?P<file>[^\n]*?) -->\n)?"
                   r"[ ]*```(?P<lang>python|bash|yaml)\n(?P<body>.*?)```", re.S)
TINY_FRAMES = 2048


def _snippets(doc: Path) -> list[tuple[int, str, str, str | None, str | None]]:
    """``(line, language, body, why not run, file name)`` of each snippet to run or write (a
    YAML block that names no file is an illustration)."""
    text = doc.read_text()
    return [(text[:m.start()].count("\n") + 1, m["lang"], textwrap.dedent(m["body"]), m["why"],
             m["file"]) for m in FENCE.finditer(text) if m["lang"] != "yaml" or m["file"]]


def _tiny(cmd: str) -> list[str]:
    """``cmd`` as a process with a tiny budget: ``unitrain fit`` gets a few thousand frames (or
    one epoch), ``unitrain`` runs under this interpreter."""
    args = shlex.split(cmd)
    if args[0] == "unitrain":
        args = [sys.executable, "-m", "unitrain", *args[1:]]
        if args[3] == "fit":
            recipe = load_recipe(find_recipe(args[4]))
            args += (["trainer.max_epochs=1"] if recipe.env is None else
                     [f"trainer.max_frames={TINY_FRAMES}", "trainer.eval_episodes=2"])
    return args


@pytest.mark.parametrize("doc", [d for d in DOCS if _snippets(d)], ids=lambda d: d.name)
def test_every_snippet_runs(doc: Path, tmp_path: Path, monkeypatch):
    """A doc's snippets run in order in one directory (a later one may use an earlier one's
    run); Python snippets share one namespace, a module's (the classes a doc defines, such as a
    dataclass, look their module up)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # files the doc writes import as modules
    module = types.ModuleType("__docs__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for line, lang, body, why, file in _snippets(doc):
        where = f"{doc.name}:{line}"
        if why is not None:
            assert why.strip(), f"{where}: a snippet marked not run says why"
            continue
        if file is not None:
            (tmp_path / file).write_text(body)
            continue
        if lang == "python":
            source = re.sub(r"max_frames=[\d_]+", f"max_frames={TINY_FRAMES}", body)
            exec(compile(source, where, "exec"), namespace)  # noqa: S102
            continue
        for cmd in body.splitlines():
            cmd = cmd.split(" #")[0].strip()
            if not cmd or cmd.startswith("#"):
                continue
            proc = subprocess.run(_tiny(cmd), cwd=tmp_path, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{where}: {cmd}\n{proc.stderr[-3000:]}"


# ---------------------------------------------------------------- logged scalars

def _expand(tag: str) -> list[str]:
    """``fitness/return_mean|max|min`` -> the three tags; ``novelty/mean|max`` -> two."""
    first, *alts = tag.split("|")
    prefix, leaf = first.rsplit("/", 1)
    stem = leaf.rsplit("_", 1)[0] + "_" if "_" in leaf and alts else ""
    return [first, *(f"{prefix}/{stem}{alt}" for alt in alts)]


def documented_scalars(doc: Path) -> dict[str, set[str]]:
    """The ``Logged scalars`` section of ``doc``: its bullets ``- <who>: `tag`, ...``."""
    match = re.search(r"^#+ Logged scalars\n(.*?)(?=^#|\Z)", doc.read_text(), re.M | re.S)
    assert match, f"{doc.name} has no Logged scalars section"
    section = match[1]
    out: dict[str, set[str]] = {}
    previous: set[str] = set()
    for bullet in re.findall(r"^- (.*?)(?=\n- |\n\s*\n|\Z)", section, re.M | re.S):
        who, _, tags = bullet.partition(":")
        found = {t for raw in re.findall(r"`([a-z_]+/[^`]+)`", tags) for t in _expand(raw)}
        if "scalars above" in tags:  # "- elite_imitation: the projection's scalars above and"
            found |= previous
        out[who.strip()] = previous = found
    return out


def _tags(run: Path) -> set[str]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def _matches(documented: set[str], tag: str) -> bool:
    return any(tag == d or ("NNN" in d and re.fullmatch(d.replace("NNN", r"\d+"), tag))
               for d in documented)


REINFORCE = ("env: {id: CartPole-v1}\nmodule: {target: unitrain.MLPPolicy, hidden: [64]}\n"
             "optimizer: {name: reinforce}\n")
# Off-policy updates cost ~10 ms each on this machine: past the warm-up, 512 of them show every scalar.
OFFPOLICY = ["trainer.max_frames=768", "optimizer.warmup_frames=256"]
# (doc, bullet, recipe, overrides that switch every documented scalar on)
RUNS = [
    ("ppo.md", "PPO", "cartpole/ppo", [f"trainer.max_frames={TINY_FRAMES}",
                                       "optimizer.entropy_coef=0.01"]),
    ("ppo.md", "REINFORCE", REINFORCE, [f"trainer.max_frames={TINY_FRAMES}"]),
    ("dqn.md", "DQN", "cartpole/dqn", ["trainer.max_frames=768", "optimizer.learning_starts=256"]),
    ("ddpg.md", "DDPG", "pendulum/ddpg", OFFPOLICY),
    ("td3.md", "TD3", "pendulum/td3", OFFPOLICY),
    ("sac.md", "SAC", "pendulum/sac", OFFPOLICY),
    ("dsac_t.md", "DSAC-T", "pendulum/dsac_t", OFFPOLICY),
    ("es.md", "ES", "cartpole/es", ["trainer.max_frames=6000"]),
    ("ga.md", "GA", "cartpole/ga", ["trainer.max_frames=6000", "optimizer.novelty=0.5"]),
    ("ars.md", "ARS", "cartpole/ars", ["trainer.max_frames=6000"]),
    ("cem.md", "CEM", "cartpole/cem", ["trainer.max_frames=6000"]),
    ("csa_es.md", "CSA-ES", "cartpole/csa_es", ["trainer.max_frames=6000"]),
    ("cmaes.md", "CMA-ES", "cartpole/cmaes", ["trainer.max_frames=6000"]),
    ("cbo.md", "CBO", "cartpole/cbo", ["trainer.max_frames=6000"]),
    ("cem_rl.md", "CEM-RL", "pendulum/cem_rl", ["trainer.max_frames=4000",
                                                "optimizer.utd_ratio=0.05"]),
    # The scalars, not the compiled solver (tests/projection and CI's recipe step run that):
    # compiled inside a pytest worker that earlier ran other files' trainings, Dynamo can find
    # torch's thread count changed while it traced, which a fresh process never does.
    ("projection.md", "projection", "digits/projection", ["trainer.max_epochs=1",
                                                          "optimizer.compile=false"]),
    ("projection.md", "adam", "digits/adam", ["trainer.max_epochs=1"]),
    ("projection.md", "elite_imitation", "cartpole/elite_imitation",
     [f"trainer.max_frames={TINY_FRAMES}"]),
]


@pytest.fixture(scope="module")
def trainer_scalars() -> set[str]:
    return set().union(*documented_scalars(REPO / "docs" / "guide.md").values())


@pytest.mark.parametrize("doc, who, recipe, overrides", RUNS, ids=[r[1] for r in RUNS])
def test_logged_scalars_are_the_documented_ones(doc, who, recipe, overrides, tmp_path,
                                                trainer_scalars, capsys):
    if "\n" in recipe:
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe)
        recipe = str(path)
    run = tmp_path / "run"
    assert main(["fit", recipe, f"run_dir={run}", "trainer.eval_episodes=2", *overrides]) == 0
    capsys.readouterr()
    tags = _tags(run)
    documented = documented_scalars(REPO / "docs" / doc)[who]
    own = {t for t in tags if t not in trainer_scalars}
    assert {t for t in own if not _matches(documented, t)} == set(), "logged, not documented"
    assert {d for d in documented if not any(_matches({d}, t) for t in tags)} == set(), \
        "documented, not logged"


def test_the_trainers_scalars_are_logged(tmp_path: Path, trainer_scalars, capsys):
    """Every scalar the guide lists for all runs is written by a PPO run and a supervised run."""
    assert main(["fit", "cartpole/ppo", f"run_dir={tmp_path / 'rl'}", "trainer.eval_episodes=2",
                 f"trainer.max_frames={TINY_FRAMES}"]) == 0
    assert main(["fit", "digits/adam", f"run_dir={tmp_path / 'sl'}",
                 "trainer.max_epochs=1"]) == 0
    capsys.readouterr()
    logged = _tags(tmp_path / "rl") | _tags(tmp_path / "sl")
    assert trainer_scalars - logged == set()
