"""Offline datasets: shapes, dtypes, determinism given the seed, the stratified split, no network,
no file written, the global random state untouched, and a clear error for a missing extra."""
from __future__ import annotations

import random
import socket
import sys
import urllib.request

import numpy as np
import pytest

from normkit import data


class NetworkUsed(AssertionError):
    pass


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Any attempt to open a connection fails the test; the working directory is empty."""
    def refuse(*args, **kwargs):
        raise NetworkUsed(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    try:
        import requests                                        # mnist1d's download path uses it
    except ImportError:
        pass
    else:
        monkeypatch.setattr(requests, "get", refuse)
        monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert list(tmp_path.iterdir()) == [], "a loader wrote files into the working directory"


def _check_split(split, n_features_shape, y_dtype, dtype=np.float32):
    x_train, y_train, x_test, y_test = split
    assert x_train.shape[1:] == x_test.shape[1:] == n_features_shape
    assert len(x_train) == len(y_train) and len(x_test) == len(y_test)
    assert x_train.dtype == x_test.dtype == dtype
    assert y_train.dtype == y_test.dtype == y_dtype
    assert np.isfinite(x_train).all() and np.isfinite(x_test).all()


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b))


def test_digits_split_is_stratified_standardized_and_seeded(offline):
    split = data.load_digits(seed=3)
    _check_split(split, (64,), np.int64)
    x_train, y_train, x_test, y_test = split
    assert len(y_train) + len(y_test) == 1797
    assert abs(len(y_test) - 0.25 * 1797) <= 1
    train_counts, test_counts = np.bincount(y_train, minlength=10), np.bincount(y_test, minlength=10)
    expected = (train_counts + test_counts) * len(y_test) / 1797
    assert np.all(np.abs(test_counts - expected) <= 1)         # stratified: per class within 1
    x64 = x_train.astype(np.float64)
    used = x64.std(axis=0) > 0
    assert used.sum() > 55                                     # a few border pixels are always 0
    np.testing.assert_allclose(x64.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(x64.std(axis=0)[used], 1, rtol=1e-6)
    assert _same(split, data.load_digits(seed=3))
    assert not np.array_equal(y_test, data.load_digits(seed=4)[3])
    raw = data.load_digits(seed=3, standardize=False, dtype=np.float64)
    assert raw[0].dtype == np.float64 and raw[0].min() == 0 and raw[0].max() == 16


def test_mnist1d_is_generated_offline_deterministically(offline):
    np.random.seed(123)
    random.seed(123)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    split = data.make_mnist1d(seed=5, num_samples=200)
    _check_split(split, (40,), np.int64)
    x_train, y_train, x_test, y_test = split
    assert len(y_train) == 160 and len(y_test) == 40
    assert set(np.unique(np.concatenate([y_train, y_test]))) == set(range(10))
    assert np.bincount(np.concatenate([y_train, y_test])).tolist() == [20] * 10
    x_all = np.concatenate([x_train, x_test])
    assert abs(x_all.mean()) < 1e-4 and abs(x_all.std() - 1) < 1e-4
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
    x_train[:] = 0                                              # the cached copy is not shared
    again = data.make_mnist1d(seed=5, num_samples=200)
    assert not np.array_equal(again[0], x_train)
    data._mnist1d.cache_clear()                                # rebuilt from the seed: identical
    assert _same(again, data.make_mnist1d(seed=5, num_samples=200))
    assert not np.array_equal(again[0], data.make_mnist1d(seed=6, num_samples=200)[0])


def test_circles_are_two_noisy_rings(offline):
    split = data.make_circles(n=400, noise=0.05, factor=0.4, seed=1)
    _check_split(split, (2,), np.int64)
    x = np.concatenate([split[0], split[2]])
    y = np.concatenate([split[1], split[3]])
    assert len(y) == 400 and np.bincount(y).tolist() == [200, 200] and len(split[3]) == 80
    radius = np.linalg.norm(x, axis=1)
    assert abs(np.median(radius[y == 0]) - 1.0) < 0.02 and abs(np.median(radius[y == 1]) - 0.4) < 0.02
    assert _same(split, data.make_circles(n=400, noise=0.05, factor=0.4, seed=1))
    assert not np.array_equal(split[0], data.make_circles(n=400, noise=0.05, factor=0.4, seed=2)[0])
    clean = data.make_circles(n=10, noise=0.0, seed=0, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(clean[0], axis=1)[clean[1] == 0], 1.0)


def test_adding_problem_targets_are_the_marked_sums(offline):
    split = data.make_adding(num_samples=300, seq_len=20, seed=2)
    _check_split(split, (20, 2), np.float32)
    for x, y in (split[:2], split[2:]):
        values, markers = x[..., 0], x[..., 1]
        assert ((values >= 0) & (values < 1)).all()
        assert (markers.sum(axis=1) == 2).all() and set(np.unique(markers)) == {0.0, 1.0}
        assert (markers[:, :10].sum(axis=1) == 1).all()          # one marker in each half
        np.testing.assert_allclose(y, (values * markers).sum(axis=1), rtol=1e-6)
    assert _same(split, data.make_adding(num_samples=300, seq_len=20, seed=2))
    y = np.concatenate([split[1], split[3]])
    assert abs(np.mean((y - 1) ** 2) - 1 / 6) < 0.05


@pytest.mark.parametrize("call, message", [
    (lambda: data.load_digits(seed=-1), "seed"),
    (lambda: data.load_digits(test_fraction=1.0), "test_fraction"),
    (lambda: data.make_mnist1d(num_samples=205), "multiple of 10"),
    (lambda: data.make_circles(n=2), "n must"),
    (lambda: data.make_circles(factor=1.5), "factor"),
    (lambda: data.make_adding(seq_len=1), "seq_len"),
    (lambda: data.make_adding(dtype=np.int32), "dtype"),
])
def test_bad_arguments_are_refused(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize("loader, module", [("load_digits", "sklearn"), ("make_mnist1d", "mnist1d")])
def test_a_missing_optional_package_names_the_extra(monkeypatch, loader, module):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] + [module]:
        monkeypatch.setitem(sys.modules, name, None)            # import of it now fails
    with pytest.raises(ImportError, match=r"normkit\[data\]"):
        getattr(data, loader)(seed=0)


def test_the_offline_fixture_traps_connections(offline):
    with pytest.raises(NetworkUsed):
        urllib.request.urlopen("http://127.0.0.1:9/")
    with pytest.raises(NetworkUsed):
        socket.create_connection(("127.0.0.1", 9))
    requests = pytest.importorskip("requests")
    with pytest.raises(NetworkUsed):
        requests.get("http://127.0.0.1:9/")
