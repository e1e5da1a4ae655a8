"""Loggers and callbacks named in a recipe's ``trainer:`` block (or passed by name to the Trainer).

A logger is named by a string, ``tensorboard``, ``csv`` or ``mlflow``, or by a mapping: ``{name:
csv, flush_logs_every_n_steps: 10}`` (the named logger with these arguments) or ``{target:
mypkg.loggers:MyLogger, ...}`` (any ``lightning.pytorch.loggers.Logger``). Every named logger
writes inside the run directory:

* ``tensorboard``: the run's own event files (always written unless ``tensorboard=False``
  from Python; ``compare``, ``tune`` and a resumed run's log purge read them);
* ``csv``: ``RUN/csv/metrics.csv`` and ``hparams.yaml`` (``lightning``'s ``CSVLogger``);
* ``mlflow``: an MLflow store in one SQLite file, ``RUN/mlflow.db`` (artifacts in
  ``RUN/mlartifacts``; experiment ``unitrain``, the run named after the run directory), so no
  tracking server is needed; browse it with ``mlflow ui --backend-store-uri
  sqlite:///RUN/mlflow.db``. Needs ``pip install 'unitrain[mlflow]'``.

A callback is a mapping ``{target: package.module:Class, **arguments}`` of a
``lightning.pytorch.callbacks.Callback`` subclass. Both are checked when the recipe loads (an
unknown name, a class that does not import or is not a logger/callback, an argument its
constructor does not take), with one line naming the key.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger

from unitrain.errors import ConfigError
from unitrain.validation import import_object

__all__ = ["LOGGER_NAMES", "check_callback", "check_logger", "make_callback", "make_logger"]

# The loggers a recipe names by name, with their classes (tensorboard: the run's own).
LOGGER_NAMES = ("tensorboard", "csv", "mlflow")


def _split(spec: Any, key: str, what: str) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(name, target, arguments)`` of a logger or callback entry."""
    if isinstance(spec, str):
        return spec, None, {}
    if not isinstance(spec, dict):
        raise ConfigError(key, f"got {spec!r}; expected {what}")
    args = dict(spec)
    name, target = args.pop("name", None), args.pop("target", None)
    if (name is None) == (target is None):
        raise ConfigError(key, f"got {spec!r}; expected {what} (exactly one of name: or target:)")
    return (None if name is None else str(name)), (None if target is None else str(target)), args


_LOGGER_WHAT = (f"a logger name ({', '.join(LOGGER_NAMES)}) or a mapping with name: or target: "
                "(a lightning.pytorch.loggers.Logger class path) and its arguments")
_CALLBACK_WHAT = ("a mapping with target: (a lightning.pytorch.callbacks.Callback class path, "
                  "e.g. lightning.pytorch.callbacks.LearningRateMonitor) and its arguments")


def _logger_class(spec: Any, key: str) -> tuple[type | None, dict[str, Any]]:
    """The logger class an entry names (``None`` for the run's TensorBoard) and its arguments."""
    name, target, args = _split(spec, key, _LOGGER_WHAT)
    if target is not None:
        cls = import_object(target, f"{key}.target")
        if not (inspect.isclass(cls) and issubclass(cls, Logger)):
            raise ConfigError(f"{key}.target", f"{target!r} is not a lightning.pytorch.loggers."
                                               "Logger subclass")
        return cls, args
    if name not in LOGGER_NAMES:
        raise ConfigError(key, f"unknown logger {name!r}; valid: {', '.join(LOGGER_NAMES)} (or a "
                               "mapping with target: a Logger class path)")
    if name == "tensorboard":
        if args:
            raise ConfigError(key, "the run's TensorBoard logger takes no arguments (it writes "
                                   "the run directory's event files)")
        return None, args
    if name == "mlflow":
        from lightning.pytorch.loggers.mlflow import _MLFLOW_AVAILABLE

        if not _MLFLOW_AVAILABLE:
            raise ConfigError(key, "the mlflow logger needs MLflow: pip install 'unitrain[mlflow]'")
    return {"csv": CSVLogger, "mlflow": MLFlowLogger}[name], args


def _check_arguments(cls: type, args: dict[str, Any], key: str) -> None:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n in params if n != "self"
             and params[n].kind is not inspect.Parameter.VAR_POSITIONAL]
    for arg in args:
        if arg not in valid:
            raise ConfigError(f"{key}.{arg}", f"not an argument of {cls.__qualname__}; valid: "
                                              f"{', '.join(valid)}")


def _defaults(cls: type, run_dir: Path) -> dict[str, Any]:
    """Where a named logger writes inside the run directory."""
    if cls is CSVLogger:
        return {"save_dir": str(run_dir), "name": "csv", "version": ""}
    if cls is MLFlowLogger:
        return {"experiment_name": "unitrain", "run_name": run_dir.name,
                "tracking_uri": f"sqlite:///{(run_dir / 'mlflow.db').resolve()}",
                "artifact_location": (run_dir / "mlartifacts").resolve().as_uri()}
    return {}


def check_logger(spec: Any, key: str) -> None:
    """Raise a one-line :class:`ConfigError` at ``key`` if ``spec`` names no valid logger."""
    cls, args = _logger_class(spec, key)
    if cls is not None:
        _check_arguments(cls, args, key)


def make_logger(spec: Any, run_dir: Path, key: str = "trainer.loggers") -> Logger | None:
    """The logger ``spec`` names, writing in ``run_dir`` (``None``: the run's TensorBoard)."""
    cls, args = _logger_class(spec, key)
    if cls is None:
        return None
    _check_arguments(cls, args, key)
    try:
        return cls(**{**_defaults(cls, run_dir), **args})
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"{cls.__qualname__}(...) failed: {e}") from None


def _callback_class(spec: Any, key: str) -> tuple[type, dict[str, Any]]:
    _, target, args = _split(spec, key, _CALLBACK_WHAT)
    if target is None:
        raise ConfigError(key, f"got {spec!r}; expected {_CALLBACK_WHAT}")
    cls = import_object(target, f"{key}.target")
    if not (inspect.isclass(cls) and issubclass(cls, Callback)):
        raise ConfigError(f"{key}.target", f"{target!r} is not a lightning.pytorch.callbacks."
                                           "Callback subclass")
    _check_arguments(cls, args, key)
    return cls, args


def check_callback(spec: Any, key: str) -> None:
    """Raise a one-line :class:`ConfigError` at ``key`` if ``spec`` names no valid callback."""
    _callback_class(spec, key)


def make_callback(spec: Any, key: str = "trainer.callbacks") -> Callback:
    """The callback ``spec`` names, constructed."""
    cls, args = _callback_class(spec, key)
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"{cls.__qualname__}(...) failed: {e}") from None
