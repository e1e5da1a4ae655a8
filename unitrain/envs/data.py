"""Datasets for supervised runs: the ``data:`` block of a recipe and the loaders it builds.

A supervised run has no environment (``env: null``); the Trainer loops over a dataloader of
``(input, target)`` pairs and the rule reads the current pair from ``ctx.batch``. Evaluation
reports ``test/accuracy`` on a held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from unitrain.errors import check
from unitrain.validation import Validated

__all__ = ["DataSpec", "DataInfo", "load_data", "DATASETS"]

DATASETS = ("digits",)


@dataclass
class DataSpec(Validated):
    """A classification dataset with a fixed train/test split and standardised features.

    Args:
        name: ``"digits"`` (scikit-learn's 8x8 handwritten digits, 1797 images, 10 classes).
        batch_size: training examples per batch (per process).
        test_fraction: share of the examples held out for ``test/accuracy`` (stratified).
        seed: seed of the split (independent of the run seed, so every run sees the same split).
    """

    name: str = "digits"
    batch_size: int = 64
    test_fraction: float = 0.2
    seed: int = 0

    block: ClassVar[str] = "data"

    def validate(self) -> None:
        check(self.name in DATASETS, "name", f"one of {', '.join(DATASETS)}", self.name)
        check(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        check(0 < self.test_fraction < 1, "test_fraction", "a number in (0, 1)", self.test_fraction)
        check(self.seed >= 0, "seed", "an integer >= 0", self.seed)


@dataclass(frozen=True)
class DataInfo:
    """The shapes a module needs for a dataset (the counterpart of :class:`~unitrain.envs.EnvInfo`).

    Attributes:
        obs_dim: input features.
        act_dim: number of classes.
    """

    obs_dim: int
    act_dim: int

    def module_kwargs(self) -> dict[str, Any]:
        """Constructor arguments a module may take by name."""
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "obs_shape": (self.obs_dim,),
                "discrete": True}


def _arrays(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x, y


def load_data(spec: DataSpec) -> tuple[DataLoader, DataLoader, DataInfo]:
    """Build the shuffled training loader, the test loader and the dataset's shapes.

    Features are standardised with the training split's mean and standard deviation (constant
    features stay zero).

    Args:
        spec: the dataset.

    Returns:
        ``(train_loader, test_loader, info)``; items are ``(float32 inputs, int64 labels)``.
    """
    from sklearn.model_selection import train_test_split

    x, y = _arrays(spec)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=spec.test_fraction,
                                              random_state=spec.seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0)
    std[std == 0] = 1.0

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor((xs - mean) / std, dtype=torch.float32),
                             torch.as_tensor(ys, dtype=torch.int64))

    train = DataLoader(tensors(x_tr, y_tr), batch_size=spec.batch_size, shuffle=True)
    test = DataLoader(tensors(x_te, y_te), batch_size=512)
    return train, test, DataInfo(obs_dim=x.shape[1], act_dim=int(y.max()) + 1)
