"""The one place jit options live.

Every kernel in ``normkit.kernels`` is decorated with :func:`jit` from here, so caching,
threading and the floating-point policy are decided once:

- ``cache=True``: a second process loads the machine code from ``__pycache__`` instead of
  compiling again.
- ``parallel``: only the drivers that split work over channels/rows (``prange``) ask for it;
  each channel/row is reduced by one thread in a fixed order, so results do not depend on the
  number of threads or on scheduling.
- ``fastmath``: off by default. Reductions may opt in to ``{"reassoc"}`` only (never
  ``nnan``/``ninf``: NaN must propagate); set ``NORMKIT_STRICT_FP=1`` to switch that off too.

``NUMBA_DISABLE_JIT=1`` runs the whole package as plain Python (for coverage and debuggers).
"""
from __future__ import annotations

import os
import types

import numba

_STRICT_FP = os.environ.get("NORMKIT_STRICT_FP", "") not in ("", "0")

# Start numba's thread pool now, before any kernel runs. A cached kernel that calls a parallel
# one (every public kernel calling a ``serial_and_parallel`` twin) is stored without numba's
# "start the threads on reload" hook when the parallel callee itself came from the cache in the
# session that compiled the caller (numba 0.6x); loading it in a fresh process then calls a null
# pointer (segfault). ``get_num_threads`` is the public call that starts the pool.
numba.get_num_threads()

#: Flags a reduction kernel may use; reassociation lets LLVM vectorize sums.
REDUCTION_FASTMATH = frozenset() if _STRICT_FP else frozenset({"reassoc"})


def jit(*, parallel: bool = False, reduction: bool = False, inline: bool = False):
    """Decorator for normkit kernels: ``numba.njit`` with the package policy."""
    options = dict(cache=True, nogil=True, parallel=parallel, error_model="numpy")
    if reduction and REDUCTION_FASTMATH:
        options["fastmath"] = set(REDUCTION_FASTMATH)
    if inline:
        options["inline"] = "always"
    return numba.njit(**options)


def serial_and_parallel(loop):
    """Two compiled twins of one driver whose outer loop is ``prange``: (serial, parallel).

    The serial twin runs on the calling thread (``prange`` acts as ``range``); callers pick it for
    small inputs, where waking the thread pool costs more than the work. Each twin is compiled
    from its own copy of the function under its own name, so their on-disk caches stay apart.
    """
    twins = []
    for suffix, parallel in (("serial", False), ("parallel", True)):
        clone = types.FunctionType(loop.__code__, loop.__globals__, f"{loop.__name__}_{suffix}",
                                   loop.__defaults__, loop.__closure__)
        clone.__qualname__ = f"{loop.__qualname__}_{suffix}"
        clone.__module__ = loop.__module__
        clone.__doc__ = loop.__doc__
        twins.append(jit(parallel=parallel)(clone))
    return tuple(twins)
