"""Tabular data: scikit-learn's bundled sets, LibSVM/svmlight files, and an a9a-shaped generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_sklearn(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``digits`` (1797×64, pixels scaled to [0, 1], 10 classes) or ``breast_cancer`` (569×30,
    standardised, 2 classes), bundled with scikit-learn."""
    from sklearn import datasets

    if name == "digits":
        x, y = datasets.load_digits(return_X_y=True)
        return (x / 16.0).astype(np.float32), y.astype(np.int64)
    if name == "breast_cancer":
        x, y = datasets.load_breast_cancer(return_X_y=True)
        x = (x - x.mean(0)) / x.std(0)
        return x.astype(np.float32), y.astype(np.int64)
    raise ValueError(f"dataset must be one of ['digits', 'breast_cancer'], got {name!r}")


def load_libsvm(path: str | Path, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A LibSVM/svmlight file via scikit-learn's reader: dense float32 features and labels mapped to
    0..C−1 in sorted order (so ±1 becomes 0/1)."""
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"LibSVM file {path} not found (give the task's path to a svmlight-format file)")
    x, y = load_svmlight_file(str(path), n_features=n_features)
    classes, labels = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{path}: needs at least two classes, found {classes.tolist()}")
    return np.asarray(x.todense(), dtype=np.float32), labels.astype(np.int64)


def a9a_like(num_samples: int = 32561, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic stand-in shaped like LibSVM's a9a: 123 binary features from 14 one-hot groups
    (so exactly 14 ones per row, as a9a's one-hot encoded census attributes), labels from a
    noisy logistic model with about 24% positives."""
    rng = np.random.default_rng(seed)
    group_sizes = np.array([9, 16, 7, 15, 6, 5, 2, 10, 8, 14, 3, 12, 11, 5])  # sums to 123
    x = np.zeros((num_samples, group_sizes.sum()), dtype=np.float32)
    start = 0
    for size in group_sizes:
        probs = rng.dirichlet(np.ones(size))
        x[np.arange(num_samples), start + rng.choice(size, num_samples, p=probs)] = 1.0
        start += size
    w = rng.normal(0, 1.0, x.shape[1])
    logits = x @ w
    logits = logits - np.quantile(logits, 0.76)
    y = (rng.random(num_samples) < 1 / (1 + np.exp(-3 * logits))).astype(np.int64)
    return x, y
