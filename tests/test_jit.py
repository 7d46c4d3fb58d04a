"""The jit policy's cache guard: stale Numba caches are dropped when the sources change."""
from __future__ import annotations

import pathlib
import re

import normkit
from normkit.kernels._jit import _drop_stale_caches, _jitted_sources


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
