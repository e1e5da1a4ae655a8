"""Errors that speak to the user.

A :class:`UserError` is a mistake in the user's input (a recipe, a key, an env id, a checkpoint
path). The CLI prints its one-line message and exits with code 2, without a traceback.
:func:`check_file` and :func:`check_output_path` vet the files a user names before anything reads
or writes them.
"""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """A user mistake: the message says what was wrong, where, and what would be valid."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value.

    Args:
        key: dotted key of the offending value (e.g. ``"optimizer.clip_epsilon"``).
        message: what is wrong and what would be valid.
        field: the key relative to the block that raised it (default: ``key``).
    """

    def __init__(self, key: str, message: str, field: str | None = None) -> None:
        self.key = key
        self.detail = message
        self.field = key if field is None else field
        super().__init__(f"{key}: {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix.`` in front of its key."""
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.detail, self.field)

    def under(self, prefix: str) -> "ConfigError":
        """The error keyed under ``prefix``: unchanged if its key already is, else
        ``prefix.<field>`` (a block validated in another place than its own)."""
        if self.key == prefix or self.key.startswith(prefix + "."):
            return self
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.detail,
                           self.field)


def check(condition: bool, key: str, valid: str, value: object) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds.

    Args:
        condition: the requirement on the value.
        key: the key name (relative to its config block).
        valid: a description of the valid values (``"an integer >= 1"``).
        value: the value that was given.
    """
    if not condition:
        raise ConfigError(key, f"got {value!r}; expected {valid}")


def check_file(path: str | os.PathLike, what: str, kind: str, valid: str,
               inside: tuple[str, ...] = ()) -> Path:
    """The path of a file the user named, if it is a non-empty regular file; else a
    :class:`UserError` of the form ``<what>: <what the path is instead>; <valid>``.

    Args:
        path: the path as given.
        what: how the user named it, the message's start (``"init=x.ckpt"``, or the path).
        kind: what the file should be (``"checkpoint file"``): ``no such <kind>``.
        valid: what would be valid, the message's end.
        inside: for a directory, glob patterns of the files in it to suggest instead.

    Raises:
        UserError: the path is missing, a directory, not a regular file (a device, a pipe) or
            empty.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what}: no such {kind}; {valid}")
    if p.is_dir():
        found = [str(f) for pattern in inside for f in sorted(p.glob(pattern)) if f.is_file()]
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            valid = f"give a file in it: {', '.join(found[:3])}{more}"
        raise UserError(f"{what}: a directory, not a {kind}; {valid}")
    if not p.is_file():
        raise UserError(f"{what}: not a regular file; {valid}")
    if p.stat().st_size == 0:
        raise UserError(f"{what}: an empty file (0 bytes); {valid}")
    return p


def check_output_path(path: str | os.PathLike, what: str, valid: str,
                      directory: bool = False) -> Path:
    """The path of a file (or, with ``directory``, a directory) the user asked to be written,
    if it can be created there; else a :class:`UserError` naming what is in the way. Creates
    nothing.

    Args:
        path: the path as given.
        what: how the user named it (``"--video clip.gif"``), the message's start.
        valid: what would be valid, the message's end.
        directory: the path is a directory to create or reuse (else a file to write).

    Raises:
        UserError: the path is a directory where a file is expected, a file where a directory
            is, or one of its parents is a file.
    """
    p = Path(path)
    if directory and p.exists() and not p.is_dir():
        raise UserError(f"{what}: a file, not a directory; {valid}")
    if not directory and p.is_dir():
        raise UserError(f"{what}: a directory, not a file; {valid}")
    blocker = next((a for a in p.parents if a.exists() or a.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"{what}: {blocker} is a file, not a directory; {valid}")
    return p


class TrainingDiverged(UserError):
    """Training produced non-finite values (a NaN loss, say).

    Raised by an update rule with the iteration where it happened; the run stops and the last
    checkpoint written before it stays usable.
    """
