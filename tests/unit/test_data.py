"""Loaders read small files of their formats exactly; missing data errors say how to install it."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgluon.tasks.data import shakespeare as shk
from fedgluon.tasks.data.idx import FASHION_MNIST_DIR, load_mnist_like, read_idx
from fedgluon.tasks.data.synthetic import leaf_synthetic
from fedgluon.tasks.data.tabular import a9a_like, load_libsvm, load_sklearn

DATA = Path(__file__).parents[1] / "data"


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_small_files(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    x, y = load_mnist_like(tmp_path, "train")
    assert x.shape == (3, 28, 28) and x.dtype == np.uint8 and y.tolist() == [7, 0, 9]
    assert np.array_equal(x, images) and x[0, 0, :3].tolist() == images[0, 0, :3].tolist()


def test_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_mnist_like(tmp_path, "test")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 2), np.uint8), False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="expected"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist_like(tmp_path, "validation")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).exists(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist():
    x, y = load_mnist_like(FASHION_MNIST_DIR, "test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,) and sorted(np.unique(y).tolist()) == list(range(10))


def test_libsvm_small_file_exact():
    x, y = load_libsvm(DATA / "small.svm")
    assert x.shape == (4, 4) and x.dtype == np.float32 and y.tolist() == [1, 0, 1, 0]
    assert x[0].tolist() == [0.5, 0.0, -1.25, 0.0] and x[1, 3] == np.float32(1e-3) and x[3].tolist() == [0, 0, 0.75, 0]
    with pytest.raises(FileNotFoundError, match="LibSVM file"):
        load_libsvm(DATA / "missing.svm")


def test_sklearn_and_a9a_shapes():
    x, y = load_sklearn("digits")
    assert x.shape == (1797, 64) and x.max() <= 1 and set(np.unique(y)) == set(range(10))
    x, y = load_sklearn("breast_cancer")
    assert x.shape == (569, 30) and abs(float(x.mean())) < 1e-5
    x, y = a9a_like(5000, seed=1)
    assert x.shape == (5000, 123) and (x.sum(1) == 14).all() and 0.15 < y.mean() < 0.35
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_sklearn("iris")


def test_leaf_synthetic_reproducible_and_heterogeneous():
    a, b = leaf_synthetic(5, 1.0, 1.0, seed=4), leaf_synthetic(5, 1.0, 1.0, seed=4)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    means = torch.stack([x.mean(0) for x, _ in leaf_synthetic(5, 0.0, 5.0, seed=0)])
    assert means.std(0).mean() > 1.0  # β = 5: client input distributions differ


PLAY = """THE PLAY

DRAMATIS PERSONAE
ONE, a man
TWO, a woman

ACT I.

Scene I. A place.

[Enter ONE and TWO]

ONE.
First line of one,
second line of one.

Two.
A reply from two.

THREE
Unmarked speaker.
[Exit]
"""


def test_parse_play_all_speaker_formats():
    speeches = shk.parse_play(PLAY, "p")
    assert [(s.role, s.text) for s in speeches] == [
        ("ONE", "First line of one,\nsecond line of one.\n"), ("TWO", "A reply from two.\n"),
        ("THREE", "Unmarked speaker.\n")]


def test_shakespeare_corpus_split_without_leaking():
    corpus = shk.build_corpus(test_fraction=0.1)
    train = "".join(corpus.train.values())
    speeches = shk.load_speeches()
    assert len(train) + len(corpus.test) == sum(len(s.text) for s in speeches)
    long_test = [s.text for s in speeches if len(s.text) > 300 and s.text in corpus.test]
    assert long_test and not any(t in train for t in long_test)
    assert len(corpus.train) > 50 and len(corpus.vocab) < 100
    x, y = shk.windows(corpus.encode("abcdefghij"), 4, stride=2)
    assert x.shape == (3, 4) and np.array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(FileNotFoundError, match="available"):
        shk.load_speeches(("hamlet",))
