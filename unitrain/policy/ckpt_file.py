"""The checkpoint file format: loadable with ``torch.load(path, weights_only=True)``.

Format 2 (unitrain 0.2.0) holds tensors, numbers, strings and plain containers only: the run
state's numpy arrays (RNG states, statistics), ``bytes`` (opaque env states) and other values
PyTorch's safe unpickler refuses are stored as tagged dicts of ``uint8`` tensors by
:func:`encode` and restored by :func:`decode`; the top-level ``"unitrain_format"`` says which
format a file is. Format 1 (unitrain 0.1.0, no ``"unitrain_format"`` key) pickled numpy
arrays; :func:`load_checkpoint_file` still reads it, with a full unpickling (see there).
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["FORMAT", "FORMAT_KEY", "encode", "decode", "load_checkpoint_file", "recorded_class"]

FORMAT = 2
FORMAT_KEY = "unitrain_format"
_TAG = "__unitrain_type__"


def _raw(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(
        0, dtype=torch.uint8)


def encode(value: Any) -> Any:
    """``value`` with numpy arrays and scalars, ``bytes`` and tuples as tagged plain dicts.

    Raises:
        TypeError: a value that is none of these, a tensor, number, string, list or dict (its
            path in the state is named).
    """
    return _encode(value, "checkpoint")


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor, torch.dtype,
                                           torch.device, torch.Size)):
        return value
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"{where}: numpy object arrays cannot be stored in a checkpoint")
        return {_TAG: "ndarray", "scalar": isinstance(value, np.generic),
                "dtype": array.dtype.str, "shape": list(array.shape),
                "data": _raw(np.ascontiguousarray(array).tobytes())}
    if isinstance(value, (bytes, bytearray)):
        return {_TAG: "bytes", "data": _raw(bytes(value))}
    if isinstance(value, dict):
        return {k: _encode(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and type(value) is tuple:
        return {_TAG: "tuple", "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a checkpoint that "
                    "torch.load(weights_only=True) reads; keep state to tensors, numbers, "
                    "strings, lists and dicts")


def decode(value: Any) -> Any:
    """Undo :func:`encode`."""
    if isinstance(value, dict):
        tag = value.get(_TAG)
        if tag == "ndarray":
            data = value["data"].numpy().tobytes()
            array = np.frombuffer(data, dtype=np.dtype(value["dtype"])).reshape(value["shape"])
            array = array.copy()
            return array[()] if value["scalar"] else array
        if tag == "bytes":
            return value["data"].numpy().tobytes()
        if tag == "tuple":
            return tuple(decode(v) for v in value["items"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu",
                         mmap: bool = False) -> Any:
    """A checkpoint file's contents, decoded: format 2 safely (``weights_only=True``).

    A file the safe unpickler refuses is taken for a format-1 checkpoint (unitrain 0.1.0
    pickled numpy arrays) and unpickled in full, as 0.1.0 did: load such files only when you
    trust them, or load and save them once with this version to convert them.

    Raises:
        Exception: whatever ``torch.load`` raises for a file that is no checkpoint at all.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # Format 1 (unitrain 0.1.0): numpy arrays pickled by class; trusted files only.
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    if isinstance(ckpt, dict) and ckpt.get(FORMAT_KEY, 1) >= 2:
        return decode(ckpt)
    return ckpt


def recorded_class(run: dict[str, Any], where: str, hint: str) -> type:
    """The module class a checkpoint's ``unitrain`` state records (``module_class``), imported.

    Raises:
        UserError: it is not importable here; the message names it and ends with ``hint`` (what
            the caller can do instead).
    """
    from unitrain.errors import ConfigError, UserError
    from unitrain.validation import import_object

    try:
        return import_object(run["module_class"], "module_class")
    except ConfigError:
        raise UserError(f"{where}: module class {run['module_class']} is not importable here; "
                        f"{hint}") from None
