"""The one place jit options live.

Every kernel in ``normkit.kernels`` is decorated with :func:`jit` from here, so caching,
threading and the floating-point policy are decided once:

- ``cache=True``: a second process loads the machine code from ``__pycache__`` instead of
  compiling again. A kernel's machine code contains the kernels it calls (from other modules
  too), but Numba checks a cached function against its own source file only: it would keep
  serving ``batch.py``'s cached code after ``_engine.py`` changed. :func:`_drop_stale_caches`
  therefore deletes every normkit cache file whenever a module holding jitted code changed.
  Jitted code lives only in ``normkit/kernels/`` and in modules named ``_*kernels.py`` (a test
  checks it), so editing the training engine or a study does not throw the compiled kernels away.
- no ``parallel``: the engine splits large inputs over Python threads itself
  (``_engine.run_forward``), each channel/row reduced by one thread in a fixed order, so results
  do not depend on the number of threads; ``nogil=True`` lets those threads run at once.
- ``fastmath``: off by default. Reductions may opt in to ``{"reassoc"}`` only (never
  ``nnan``/``ninf``: NaN must propagate); set ``NORMKIT_STRICT_FP=1`` to switch that off too.
- threads: the kernels are serial Numba functions (no parfor, no Numba threading layer of
  their own); :func:`normkit.kernels._engine.run_forward` runs the work items of a large input
  on ``numba.get_num_threads()`` Python threads (``numba.set_num_threads`` or
  ``NUMBA_NUM_THREADS`` set it).

``NUMBA_DISABLE_JIT=1`` runs the whole package as plain Python (for coverage and debuggers).
"""
from __future__ import annotations

import hashlib
import os
import pathlib

import numba
from numba.core import types as nbtypes

_STRICT_FP = os.environ.get("NORMKIT_STRICT_FP", "") not in ("", "0")

#: Flags a reduction kernel may use; reassociation lets LLVM vectorize sums.
REDUCTION_FASTMATH = frozenset() if _STRICT_FP else frozenset({"reassoc"})


def _unliteral_call_template(dispatcher):
    """Make ``dispatcher`` type its calls from other jitted code with plain types: a constant
    argument (``True``, ``1``, a mode number) would otherwise be typed as a literal and compile
    the callee, and everything it calls, once more for each value."""
    generic = dispatcher.get_call_template

    def get_call_template(args, kws):
        return generic(tuple(nbtypes.unliteral(a) for a in args),
                       {key: nbtypes.unliteral(value) for key, value in kws.items()})

    dispatcher.get_call_template = get_call_template
    return dispatcher


def jit(*, reduction: bool = False, inline: bool = False, literals: bool = False):
    """Decorator for normkit kernels: ``numba.njit`` with the package policy.

    Compiled once per argument *types*: constants passed from jitted code are not specialized
    on unless ``literals=True`` (a kernel whose speed depends on a compile-time flag).
    """
    options = dict(cache=True, nogil=True, error_model="numpy")
    if reduction and REDUCTION_FASTMATH:
        options["fastmath"] = set(REDUCTION_FASTMATH)
    if inline:
        options["inline"] = "always"
    compile_ = numba.njit(**options)

    def decorate(function):
        dispatcher = compile_(function)
        if literals or not isinstance(dispatcher, numba.core.dispatcher.Dispatcher):
            return dispatcher                  # NUMBA_DISABLE_JIT=1: the plain function
        return _unliteral_call_template(dispatcher)
    return decorate


def _jitted_sources(package: pathlib.Path) -> list[pathlib.Path]:
    """The modules whose code can end up in a cached kernel (see the module docstring)."""
    return sorted({*package.glob("kernels/*.py"), *package.rglob("_*kernels.py")})


def _drop_stale_caches(package: pathlib.Path = pathlib.Path(__file__).resolve().parent.parent) -> None:
    """Delete normkit's Numba cache files when the jitted modules changed since they were
    written (see the module docstring). Costs one read of those sources per import."""
    if os.environ.get("NUMBA_CACHE_DIR"):      # caches live elsewhere; the user manages them
        return
    digest = hashlib.sha1()
    for path in _jitted_sources(package):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    stamp = package / "kernels" / "__pycache__" / "normkit-sources.sha1"
    try:
        if stamp.read_text() == digest.hexdigest():
            return
    except OSError:
        pass
    try:
        for cache_file in package.rglob("__pycache__/*.nb[ic]"):
            cache_file.unlink(missing_ok=True)
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:                            # a read-only install: nothing to keep fresh
        pass


_drop_stale_caches()
