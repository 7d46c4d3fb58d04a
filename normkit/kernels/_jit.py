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
- ``parallel``: only the drivers that split work over channels/rows (``prange``) ask for it;
  each channel/row is reduced by one thread in a fixed order, so results do not depend on the
  number of threads or on scheduling.
- ``fastmath``: off by default. Reductions may opt in to ``{"reassoc"}`` only (never
  ``nnan``/``ninf``: NaN must propagate); set ``NORMKIT_STRICT_FP=1`` to switch that off too.
- threading: the thread pool is started when this module is imported, before any cached kernel
  is loaded. A cached serial function that calls a cached ``parallel`` one otherwise runs without
  the threading layer set up and crashes (numba issue #8578); every public kernel here is such a
  caller. The layer is ``omp`` (numba's default pick where TBB is absent, made explicit so every
  machine runs the same one) unless ``NUMBA_THREADING_LAYER`` names another. With PyTorch in the
  same process there are two GNU OpenMP runtimes (numba's links the system ``libgomp``, torch
  ships its own): they coexist, each with its own pool; ``workqueue`` avoids the second runtime
  but aborts when two Python threads launch parallel kernels at once, so it is not the default.

``NUMBA_DISABLE_JIT=1`` runs the whole package as plain Python (for coverage and debuggers).
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import types

import numba
from numba.core import types as nbtypes

_STRICT_FP = os.environ.get("NORMKIT_STRICT_FP", "") not in ("", "0")

#: The threading layer normkit asks for (see the module docstring).
THREADING_LAYER = "omp"


def _start_threads() -> None:
    from numba.np.ufunc import parallel

    if not parallel._is_initialized and "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = THREADING_LAYER
        try:
            parallel._launch_threads()
        except ValueError:                     # no OpenMP runtime here: numba's own pick
            numba.config.THREADING_LAYER = "default"
    parallel._launch_threads()


_start_threads()

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


def jit(*, parallel: bool = False, reduction: bool = False, inline: bool = False,
        literals: bool = False):
    """Decorator for normkit kernels: ``numba.njit`` with the package policy.

    Compiled once per argument *types*: constants passed from jitted code are not specialized
    on unless ``literals=True`` (a kernel whose speed depends on a compile-time flag).
    """
    # parallel: only explicit ``prange`` loops run on threads; NumPy calls (np.zeros, array
    # expressions) stay serial, so a small input never wakes the thread pool by accident.
    if parallel:
        parallel = dict(prange=True, numpy=False, reduction=False, setitem=False, stencil=False,
                        fusion=False, comprehension=False, inplace_binop=False)
    options = dict(cache=True, nogil=True, parallel=parallel, error_model="numpy")
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


def serial_and_parallel(loop, variant: str = "", *, reduction: bool = False,
                        serial_inline: bool = False, **replace):
    """Two compiled twins of one driver whose outer loops are ``prange``: (serial, parallel).

    The serial twin runs on the calling thread (``prange`` acts as ``range``) and compiles
    without the parallel passes; callers pick it for small inputs, where waking the thread pool
    costs more than the work, and Python callers compile only the twin they use. Each twin is
    compiled from its own copy of the function under its own name, so their caches stay apart.

    ``variant`` names a copy that sees the values in ``replace`` (name=value) instead of the
    module's globals of those names, and so do the jitted functions it calls, down the call
    tree (copies named ``<name>_<variant>`` of those that read a replaced name, directly or
    through their callees): the same driver over other work items, or with a module constant
    (a flag Numba reads as a compile-time constant) set otherwise. Globals are read now.
    ``reduction``: compile with the reduction flags (:func:`jit`), as the work items inlined
    into the driver need. ``serial_inline``: the functions marked ``inline=True`` that the
    driver calls are inlined into the serial twin only; the parallel twin calls them as
    functions of their own (:func:`_outlined`, with their own flags; the twin then compiles
    without the reduction flags), because Numba's parallel passes cost more on the larger loop
    body than inlining saves.
    """
    names = _globals_seeing(loop, replace, variant)[0] or loop.__globals__
    outlined = {name: _outlined(names[name]) for name in loop.__code__.co_names
                if serial_inline and _is_inlined(names.get(name))}
    prefix = f"{loop.__name__}_{variant}" if variant else loop.__name__
    twins = []
    for suffix, parallel, globals_ in (("serial", False, names),
                                       ("parallel", True, {**names, **outlined})):
        flags = reduction and not (parallel and serial_inline)
        twins.append(jit(parallel=parallel, reduction=flags)(
            _renamed(loop, globals_, f"{prefix}_{suffix}")))
    return tuple(twins)


def _renamed(function, globals_, name):
    """A copy of the plain function ``function`` that reads ``globals_``, called ``name``."""
    clone = types.FunctionType(function.__code__, globals_, name, function.__defaults__,
                               function.__closure__)
    clone.__qualname__ = name
    clone.__module__ = function.__module__
    clone.__doc__ = function.__doc__
    return clone


def _recompiled(dispatcher, globals_, name, **options):
    """``dispatcher``'s function reading ``globals_``, compiled under ``name`` with the
    dispatcher's options updated by ``options``."""
    options = {**{key: value for key, value in dispatcher.targetoptions.items()
                  if key != "nopython"}, **options}    # njit sets it, and warns when it is given
    return _unliteral_call_template(
        numba.njit(**options)(_renamed(dispatcher.py_func, globals_, name)))


def _globals_seeing(function, replace, variant):
    """The globals of the plain function ``function`` with the names in ``replace`` replaced,
    and every jitted function it calls replaced by its copy that sees them too
    (:func:`_variant`), or None if nothing changes; and the replaced names it reads, directly
    or through its callees."""
    changed, reads = {}, set()
    for name in function.__code__.co_names:
        value = replace[name] if name in replace else function.__globals__.get(name)
        if _JIT_ENABLED and isinstance(value, numba.core.dispatcher.Dispatcher) \
                or not _JIT_ENABLED and isinstance(value, types.FunctionType) \
                and value.__module__.startswith("normkit."):
            value, callee_reads = _variant(value, replace, variant)
            reads |= callee_reads
        if name in replace:
            reads.add(name)
        if name in replace or value is not function.__globals__.get(name):
            changed[name] = value
    return ({**function.__globals__, **changed} if changed else None), frozenset(reads)


_JIT_ENABLED = not numba.config.DISABLE_JIT
_VARIANTS: dict = {}       # (function, replace) -> (function as it reads them, names it reads)
_COPIES: dict = {}         # (function, the replaced names it reads and their values) -> copy
_COPY_NAMES: dict = {}     # a copy's name -> its key in _COPIES


def _variant(function, replace, variant):
    """``function`` (a jitted one; a plain one with NUMBA_DISABLE_JIT=1) as it reads the
    values in ``replace``, and the replaced names it reads: a copy named
    ``<name>_<variant>`` if it or a function it calls reads one of them, else ``function``
    itself. Variants that replace the names it reads by the same values share one copy; a
    copy's name must mean one replacement (it names the copy's cache files)."""
    key = (function, frozenset(replace.items()))
    if key not in _VARIANTS:
        plain = function.py_func if _JIT_ENABLED else function
        globals_, reads = _globals_seeing(plain, replace, variant)
        copy = function
        if globals_ is not None:
            seen = (function, frozenset((name, replace[name]) for name in reads))
            if seen not in _COPIES:
                name = f"{plain.__qualname__}_{variant}"
                if _COPY_NAMES.setdefault(name, seen) != seen:
                    raise ValueError(f"variant {variant!r} of {plain.__qualname__} names two "
                                     f"different replacements")
                _COPIES[seen] = (_recompiled(function, globals_, name) if _JIT_ENABLED
                                 else _renamed(plain, globals_, name))
            copy = _COPIES[seen]
        _VARIANTS[key] = copy, reads
    return _VARIANTS[key]


def _is_inlined(value) -> bool:
    return (isinstance(value, numba.core.dispatcher.Dispatcher)
            and value.targetoptions.get("inline") == "always")


_OUTLINED: dict = {}


def _outlined(dispatcher):
    """``dispatcher``'s function compiled as a callee of its own (not inlined), with its own
    flags, under the name ``<name>_outlined`` (one per function: the drivers share it)."""
    if dispatcher not in _OUTLINED:
        function = dispatcher.py_func
        _OUTLINED[dispatcher] = _recompiled(dispatcher, function.__globals__,
                                            f"{function.__qualname__}_outlined",
                                            inline="never")
    return _OUTLINED[dispatcher]


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
