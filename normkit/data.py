"""Offline datasets: generated here, or shipped inside an installed package. Nothing is downloaded.

Every loader returns ``(x_train, y_train, x_test, y_test)`` as NumPy arrays, ``x`` in ``dtype``
(float32 by default), is deterministic given ``seed`` and leaves the global random state alone.

- ``load_digits``:  x (N, 64) 8x8 pixels, standardized per pixel with the training statistics;
  y int64 classes 0..9; stratified split.
- ``make_mnist1d``: x (N, 40) signals as the mnist1d generator leaves them (mean 0, std 1 over
  the whole set); y int64 classes 0..9.
- ``make_circles``: x (N, 2) points, raw (already about unit scale); y int64, 0 outer, 1 inner.
- ``load_circles_example``: scikit-learn's own ``make_circles`` points, split in order (the
  first ``n_train`` for training), as the widely copied Keras batch-norm example uses them.
- ``make_adding``:  x (N, T, 2) values and markers, raw (the task's definition); y the float sum
  of the two marked values.

For a convolution, reshape: digits ``x.reshape(-1, 1, 8, 8)``, MNIST-1D ``x[:, None, :]``.
``load_digits`` and ``make_mnist1d`` need the optional packages of ``pip install 'normkit[data]'``
(scikit-learn ships the digits; mnist1d's generator builds MNIST-1D from a seed — its download
path is never used).
"""
from __future__ import annotations

import functools
import importlib
import random
from numbers import Integral, Real

import numpy as np

__all__ = ["load_digits", "make_mnist1d", "make_circles", "load_circles_example", "make_adding"]


def _require(module: str, package: str, loader: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"normkit.data.{loader} needs the optional package {package!r}: "
                          f"pip install 'normkit[data]'") from error


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _check_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _split(x, y, test_fraction: float, rng: np.random.Generator):
    """A random (not stratified) split of already shuffled or exchangeable samples."""
    n_test = max(1, int(round(len(y) * test_fraction)))
    order = rng.permutation(len(y))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# ---------------------------------------------------------------------------------------------

def load_digits(seed=0, *, test_fraction=0.25, standardize=True, dtype=np.float32):
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), split stratified by class.

    ``seed`` fixes the split. With ``standardize`` each pixel is centered and scaled by the
    training set's mean and std (pixels constant in training keep std 1), so x_test uses the
    same affine map. Returns x (N, 64) and int64 labels.
    """
    seed, test_fraction = _check_seed(seed), _check_fraction("test_fraction", test_fraction)
    dtype = _check_dtype(dtype)
    datasets = _require("sklearn.datasets", "scikit-learn", "load_digits")
    model_selection = _require("sklearn.model_selection", "scikit-learn", "load_digits")
    x, y = datasets.load_digits(return_X_y=True)             # (1797, 64) pixel values 0..16
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    if standardize:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return (x_train.astype(dtype), y_train.astype(np.int64),
            x_test.astype(dtype), y_test.astype(np.int64))


def make_mnist1d(seed=0, *, num_samples=5000, train_fraction=0.8, dtype=np.float32):
    """MNIST-1D (Greydanus, 2020) built locally by the ``mnist1d`` package's generator
    (``mnist1d.data.make_dataset``) with its default transforms: signals of length 40, 10
    classes, ``num_samples // 10`` per class (a multiple of 10 is required), shuffled, then the
    first ``train_fraction`` for training. The generator standardizes the whole set (one mean,
    one std). The package seeds NumPy's and Python's global generators; their states are
    restored afterwards. The result is cached in memory per arguments (copies are returned).
    """
    seed = _check_seed(seed)
    num_samples = _check_count("num_samples", num_samples, 20)
    if num_samples % 10:
        raise ValueError(f"num_samples must be a multiple of 10 (equal classes), got {num_samples}")
    train_fraction = _check_fraction("train_fraction", train_fraction)
    dtype = _check_dtype(dtype)
    _require("mnist1d.data", "mnist1d", "make_mnist1d")
    return tuple(a.copy() for a in _mnist1d(seed, num_samples, train_fraction, dtype))


@functools.lru_cache(maxsize=4)
def _mnist1d(seed: int, num_samples: int, train_fraction: float, dtype: np.dtype):
    generator = importlib.import_module("mnist1d.data")
    args = generator.get_dataset_args()
    args.seed, args.num_samples, args.train_split = seed, num_samples, train_fraction
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = generator.make_dataset(args)                   # no download, no file written
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = (data["x"].astype(dtype), data["y"].astype(np.int64),
              data["x_test"].astype(dtype), data["y_test"].astype(np.int64))
    for a in arrays:
        a.flags.writeable = False                             # the cached copy stays as built
    return arrays


def make_circles(n=1000, *, noise=0.1, factor=0.5, seed=0, test_fraction=0.2, dtype=np.float32):
    """Two concentric circles in the plane (scikit-learn's ``make_circles`` construction): n // 2
    points evenly spaced on the unit circle (label 0), the rest on the circle of radius
    ``factor`` (label 1), plus Gaussian noise of std ``noise`` on each coordinate; then a random
    train/test split. Returns x (N, 2) and int64 labels."""
    n = _check_count("n", n, 4)
    if isinstance(noise, bool) or not isinstance(noise, Real) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if isinstance(factor, bool) or not isinstance(factor, Real) or not 0 < factor < 1:
        raise ValueError(f"factor must be a number in (0, 1), got {factor!r}")
    test_fraction, dtype = _check_fraction("test_fraction", test_fraction), _check_dtype(dtype)
    rng = np.random.default_rng(_check_seed(seed))
    n_outer = n // 2
    n_inner = n - n_outer
    angles_outer = np.linspace(0, 2 * np.pi, n_outer, endpoint=False)
    angles_inner = np.linspace(0, 2 * np.pi, n_inner, endpoint=False)
    x = np.concatenate([
        np.stack([np.cos(angles_outer), np.sin(angles_outer)], axis=1),
        factor * np.stack([np.cos(angles_inner), np.sin(angles_inner)], axis=1),
    ])                                                        # (n, 2)
    y = np.concatenate([np.zeros(n_outer, np.int64), np.ones(n_inner, np.int64)])
    x = x + noise * rng.standard_normal(x.shape)
    x_train, y_train, x_test, y_test = _split(x, y, test_fraction, rng)
    return x_train.astype(dtype), y_train, x_test.astype(dtype), y_test


def load_circles_example(n_samples=1000, *, noise=0.1, random_state=1, factor=0.8, n_train=500,
                         dtype=np.float32):
    """scikit-learn's ``make_circles(n_samples, noise=noise, random_state=random_state,
    factor=factor)`` (scikit-learn's own points, shuffled as it shuffles them; its default
    factor is 0.8), the first ``n_train`` points for training and the rest for testing, as the
    Keras batch-norm example does. Returns x (N, 2) and int64 labels (0 outer, 1 inner)."""
    n_samples = _check_count("n_samples", n_samples, 4)
    n_train = _check_count("n_train", n_train, 1)
    if n_train >= n_samples:
        raise ValueError(f"n_train must be below n_samples ({n_samples}), got {n_train}")
    if isinstance(noise, bool) or not isinstance(noise, Real) or noise < 0:
        raise ValueError(f"noise must be a number >= 0, got {noise!r}")
    if isinstance(factor, bool) or not isinstance(factor, Real) or not 0 < factor < 1:
        raise ValueError(f"factor must be a number in (0, 1), got {factor!r}")
    random_state, dtype = _check_seed(random_state), _check_dtype(dtype)
    datasets = _require("sklearn.datasets", "scikit-learn", "load_circles_example")
    x, y = datasets.make_circles(n_samples=n_samples, noise=noise, random_state=random_state,
                                 factor=factor)                  # (n, 2), labels 0/1
    y = y.astype(np.int64)
    return x[:n_train].astype(dtype), y[:n_train], x[n_train:].astype(dtype), y[n_train:]


def make_adding(num_samples=10000, seq_len=50, *, seed=0, test_fraction=0.2, dtype=np.float32):
    """The adding problem (Hochreiter & Schmidhuber, 1997; as in Le et al., 2015): x (N, T, 2),
    channel 0 values drawn from U(0, 1), channel 1 a marker with exactly two ones, one at a
    random step of the first half [0, T // 2) and one of the second half [T // 2, T); the target
    is the sum of the two marked values (so predicting 1 gives a mean squared error of 1/6).
    Returns float targets of ``dtype``."""
    num_samples = _check_count("num_samples", num_samples, 2)
    seq_len = _check_count("seq_len", seq_len, 2)
    test_fraction, dtype = _check_fraction("test_fraction", test_fraction), _check_dtype(dtype)
    rng = np.random.default_rng(_check_seed(seed))
    values = rng.uniform(0, 1, (num_samples, seq_len))        # (N, T)
    half = seq_len // 2
    first = rng.integers(0, half, num_samples)
    second = rng.integers(half, seq_len, num_samples)
    markers = np.zeros((num_samples, seq_len))
    rows = np.arange(num_samples)
    markers[rows, first] = 1
    markers[rows, second] = 1
    x = np.stack([values, markers], axis=2)                   # (N, T, 2)
    y = values[rows, first] + values[rows, second]            # (N,)
    x_train, y_train, x_test, y_test = _split(x, y, test_fraction, rng)
    return x_train.astype(dtype), y_train.astype(dtype), x_test.astype(dtype), y_test.astype(dtype)
