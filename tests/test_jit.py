"""The jit policy's cache guard: stale Numba caches are dropped when the sources change."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import prange

import normkit
from normkit.kernels._jit import (_drop_stale_caches, _jitted_sources, _variant, jit,
                                 serial_and_parallel)


def test_cache_files_dropped_when_sources_change_and_kept_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    package = tmp_path / "pkg"
    (package / "kernels" / "__pycache__").mkdir(parents=True)
    source = package / "kernels" / "core.py"
    source.write_text("x = 1\n")
    cache = package / "kernels" / "__pycache__" / "core.f-1.py311.nbi"
    cache.write_bytes(b"old")
    _drop_stale_caches(package)                # no stamp yet: unknown age, dropped
    assert not cache.exists()
    cache.write_bytes(b"fresh")
    _drop_stale_caches(package)                # same sources: kept
    assert cache.exists()
    source.write_text("x = 2\n")
    _drop_stale_caches(package)                # a source changed: dropped
    assert not cache.exists()


def test_other_modules_leave_the_cache_alone(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    package = tmp_path / "pkg"
    (package / "kernels" / "__pycache__").mkdir(parents=True)
    (package / "kernels" / "core.py").write_text("x = 1\n")
    (package / "nn").mkdir()
    (package / "nn" / "_kernels.py").write_text("y = 1\n")
    (package / "train.py").write_text("z = 1\n")
    cache = package / "kernels" / "__pycache__" / "core.f-1.py311.nbi"
    _drop_stale_caches(package)
    cache.write_bytes(b"fresh")
    (package / "train.py").write_text("z = 2\n")
    _drop_stale_caches(package)                # not jitted code: kept
    assert cache.exists()
    (package / "nn" / "_kernels.py").write_text("y = 2\n")
    _drop_stale_caches(package)                # jitted code elsewhere in the package: dropped
    assert not cache.exists()


def test_jitted_code_lives_only_where_the_cache_guard_looks():
    package = pathlib.Path(normkit.__file__).resolve().parent
    watched = set(_jitted_sources(package))
    jitting = {path for path in package.rglob("*.py")
               if re.search(r"_jit import|numba\.njit|@njit|numba import .*njit", path.read_text())}
    assert jitting, "the pattern finds no jitted module at all: it is out of date"
    assert jitting <= watched, sorted(str(p) for p in jitting - watched)


# A toy call tree for serial_and_parallel's variants: _loop -> _middle -> _leaf reads FLAG.
FLAG = False


@jit(inline=True)
def _leaf(x):
    return x + 1.0 if FLAG else x


@jit(inline=True)
def _middle(x):
    return 2.0 * _leaf(x)


@jit()
def _other(x):
    return x + 10.0


def _loop(x, out):
    for i in prange(x.size):
        out[i] = _middle(x[i]) + _other(x[i])


def test_a_variant_replaces_a_global_down_the_call_tree_and_copies_only_what_reads_it():
    x = np.arange(3.0)
    plain, flagged = serial_and_parallel(_loop), serial_and_parallel(_loop, "flag", FLAG=True)
    for twin in (*plain, *flagged):
        out = np.empty(3)
        twin(x, out)
        expected = 2.0 * (x + 1.0 if twin in flagged else x) + x + 10.0
        np.testing.assert_array_equal(out, expected)
    middle, reads = _variant(_middle, {"FLAG": True}, "flag")
    assert middle is not _middle and reads == {"FLAG"}
    assert _variant(_other, {"FLAG": True}, "flag") == (_other, frozenset())
    # another variant replacing what _middle reads by the same value shares its copy
    assert _variant(_middle, {"FLAG": True, "unread": 1}, "other")[0] is middle
    with pytest.raises(ValueError, match="names two different replacements"):
        _variant(_middle, {"FLAG": 2}, "flag")


def test_fast_planes_drivers_compile_one_kind_of_branch_and_the_full_ones_both():
    from normkit.kernels import _engine

    x4 = np.empty((6, 1, 10, 1))               # layer norm rows: L == 1
    assert _engine._layout(x4, 1) == _engine._ROWS_LAYOUT
    assert _engine._layout(np.empty((6, 3, 1, 5)), 6) == _engine._PLANES_LAYOUT
    assert _engine._layout(np.empty((6, 3, 1, 1)), 6) == _engine._COLUMNS_LAYOUT
    for driver, rows in ((_engine.fast_forward_rows[0], 1), (_engine.fast_forward_planes[0], 0),
                         (_engine.forward_planes_serial, -1)):
        item = driver.py_func.__globals__["_plane_forward_item"]
        normalize = item.py_func.__globals__["_normalize_group"]
        assert normalize.py_func.__globals__["_ROWS"] == rows
    assert _engine._FORWARD[_engine._ROWS_LAYOUT][0] == _engine._FORWARD[_engine._PLANES_LAYOUT][0]


def test_the_driver_variants_work_as_plain_python(tmp_path):
    """NUMBA_DISABLE_JIT=1 runs normkit as plain Python: the fast rows and planes drivers are
    then copies of plain functions (the variants' copies reach them too), and layer norm (rows)
    and batch norm (planes) still agree with the reference."""
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent("""
        import numpy as np, normkit
        from normkit import reference as ref
        from normkit.kernels import _engine
        assert _engine.fast_forward_rows[0].__globals__["_plane_forward_item"].__globals__[
            "_normalize_group"].__globals__["_ROWS"] == 1
        rng = np.random.default_rng(0)
        for name, x in (("layer", rng.standard_normal((5, 7))),
                        ("batch", rng.standard_normal((4, 3, 6)))):
            norm = normkit.make(name, x.shape[-1] if name == "layer" else 3, dtype=np.float64)
            y = norm.forward(x, training=True)
            if name == "layer":
                want = ref.layer_forward(x, np.ones(7), np.zeros(7), 1, 1e-5)[0]
            else:
                want = ref.batch_forward_train(x, np.ones(3), np.zeros(3), 1e-5)[0]
            np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        print("ok")
    """))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
