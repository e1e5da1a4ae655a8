"""Errors that speak to the user.

A :class:`UserError` is a mistake in the user's input (a recipe, a key, an env id, a checkpoint
path). The CLI prints its one-line message and exits with code 2, without a traceback.
"""

from __future__ import annotations


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


class TrainingDiverged(UserError):
    """Training produced non-finite values (a NaN loss, say).

    Raised by an update rule with the iteration where it happened; the run stops and the last
    checkpoint written before it stays usable.
    """
