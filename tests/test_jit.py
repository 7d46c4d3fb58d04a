"""The jit policy's cache guard: stale Numba caches are dropped when the sources change."""
from __future__ import annotations

from normkit.kernels._jit import _drop_stale_caches


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
