"""A recipe names its loggers and callbacks (``trainer.loggers``, ``trainer.callbacks``): they write
in the run directory beside TensorBoard, and a bad entry is one line naming its key, exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import SMALL_RECIPE
from lightning.pytorch.callbacks import Callback

import unitrain as ut
from unitrain.app.cli import main


class RecordEnd(Callback):
    """Writes ``text`` to ``path`` when training ends."""

    def __init__(self, path: str, text: str = "done"):
        self.path, self.text = path, text

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(self.text)


def _recipe(tmp_path: Path, trainer_extra: str) -> Path:
    path = tmp_path / "small.yaml"
    text = SMALL_RECIPE.replace("trainer: {", "trainer: {" + trainer_extra + ", ")
    assert text != SMALL_RECIPE
    path.write_text(text)
    return path


def _eval_column(metrics: Path) -> list[float]:
    with metrics.open() as f:
        return [float(r["eval/return_mean"]) for r in csv.DictReader(f) if r["eval/return_mean"]]


def test_recipe_loggers_and_callbacks_write_in_the_run_dir(tmp_path: Path, capsys):
    marker = tmp_path / "ended.txt"
    recipe = _recipe(tmp_path, "loggers: [tensorboard, csv, mlflow], callbacks: [{target: "
                               f"test_recipe_loggers:RecordEnd, path: '{marker}', text: bye}}]")
    run = tmp_path / "run"
    assert main(["fit", str(recipe), f"run_dir={run}"]) == 0, capsys.readouterr().err
    assert marker.read_text() == "bye"
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard is still written"
    evals = _eval_column(run / "csv" / "metrics.csv")
    assert evals, "the CSV logger recorded the evaluations"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("unitrain")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "run"
    history = client.get_metric_history(mlrun.info.run_id, "eval/return_mean")
    assert [m.value for m in history] == pytest.approx(evals)


def test_named_loggers_from_python_keep_tensorboard(tmp_path: Path):
    trainer = ut.Trainer("CartPole-v1", ut.optim.PPO(frames_per_batch=128, minibatch_size=128),
                         max_frames=256, eval_episodes=1, run_dir=tmp_path / "run",
                         logger=["csv"],
                         enable_progress_bar=False)
    kinds = sorted(type(lg).__name__ for lg in trainer.loggers)
    assert kinds == ["CSVLogger", "TensorBoardLogger"]
    assert Path(trainer.loggers[0].log_dir) == tmp_path / "run" / "csv"


@pytest.mark.parametrize("extra, key, says", [
    ("loggers: [wandbx]", "trainer.loggers[0]", "unknown logger 'wandbx'; valid: tensorboard, csv, mlflow"),
    ("loggers: [csv, {name: csv, bogus: 1}]", "trainer.loggers[1].bogus",
     "not an argument of CSVLogger"),
    ("loggers: [{target: collections:OrderedDict}]", "trainer.loggers[0].target",
     "is not a lightning.pytorch.loggers.Logger subclass"),
    ("loggers: [{name: csv, target: x:Y}]", "trainer.loggers[0]", "exactly one of name: or target:"),
    ("callbacks: [{target: lightning.pytorch.callbacks.LearningRateMonitor, nope: 1}]",
     "trainer.callbacks[0].nope", "not an argument of LearningRateMonitor; valid: logging_interval"),
    ("callbacks: [{target: os.path}]", "trainer.callbacks[0].target",
     "is not a lightning.pytorch.callbacks.Callback subclass"),
    ("callbacks: [{target: nosuchpkg.mod:Cb}]", "trainer.callbacks[0].target",
     "cannot import module 'nosuchpkg.mod'"),
    ("callbacks: [3]", "trainer.callbacks[0]", "expected a mapping with target:"),
])
def test_a_bad_logger_or_callback_is_one_line(tmp_path: Path, capsys, extra, key, says):
    recipe = _recipe(tmp_path, extra)
    assert main(["fit", str(recipe), f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{key}: " in err and says in err, err
    assert not (tmp_path / "run").exists(), "nothing is written before the recipe is valid"
