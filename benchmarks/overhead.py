"""Per-call overhead, start-up and cold compile time of normkit, many repeats.

    PYTHONPATH=. NUMBA_NUM_THREADS=1 python benchmarks/overhead.py [--repeats 41] [--startups 5]

- tiny batch norm, (2, 512) float32, through the public ``Norm``: ``forward(x, training=True)``,
  ``backward(dy)`` and the pair, per call; next to PyTorch's ``F.batch_norm`` forward + autograd
  backward on the same arrays (when installed), the engine's two calls alone, a lean fused pair
  of ``@njit`` kernels that checks nothing and keeps no state (a floor for any wrapper), and an
  empty ``@njit`` function taking the same arguments (Numba's dispatch);
- cold compile: CPU seconds (user + system, all threads) of a fresh process with an empty
  ``NUMBA_CACHE_DIR`` for the first ``make("batch", 64)`` forward + backward (float32, NCHW),
  and for importing normkit and running forward + backward of every registered norm once in
  float32 and float64;
- start-up: ``import normkit`` and the first batch-norm forward + backward in fresh processes
  using this checkout's Numba cache (warm: run once first), median of ``--startups``; with
  Python's bytecode cache as the environment has it and switched on (PYTHONDONTWRITEBYTECODE=1
  makes every start compile normkit's sources), next to the floor: NumPy + Numba and one trivial
  cached ``@njit`` call.

Times are medians and minima over ``--repeats`` samples (each sample a loop of calls) of wall
time, and the median of CPU time (``time.thread_time``), which a busy machine inflates less.
The 1-minute load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_STARTUP = '''
import json, time
t0 = time.perf_counter()
import numpy as np
import normkit
t1 = time.perf_counter()
x = np.ones((4, 8, 5, 5), np.float32); x[0] = 2
norm = normkit.make("batch", 8)
norm.forward(x, training=True)
norm.backward(x)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1}))
'''


def per_call(fn, repeats: int, number: int = 2000) -> dict:
    """Median and minimum wall time and median CPU time per call, microseconds."""
    for _ in range(number // 10):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t_wall, t_cpu = time.perf_counter(), time.thread_time()
        for _ in range(number):
            fn()
        cpu.append((time.thread_time() - t_cpu) / number * 1e6)
        wall.append((time.perf_counter() - t_wall) / number * 1e6)
    return {"median_us": float(np.median(wall)), "min_us": float(np.min(wall)),
            "cpu_median_us": float(np.median(cpu))}


def _lean_kernels():
    """The floor a wrapper could approach: batch norm on (N, C) as two fused @njit loops that
    check nothing, keep no running statistics and allocate only their outputs."""
    from numba import njit

    @njit(cache=False, error_model="numpy", fastmath={"reassoc"})
    def forward(x, gamma, beta, eps, y, mean, var):
        N, C = x.shape
        mean[:] = 0.0
        var[:] = 0.0
        for n in range(N):
            for c in range(C):
                mean[c] += x[n, c]
        mean /= N
        for n in range(N):
            for c in range(C):
                d = x[n, c] - mean[c]
                var[c] += d * d
        var /= N
        for n in range(N):
            for c in range(C):
                y[n, c] = (x[n, c] - mean[c]) / np.sqrt(var[c] + eps) * gamma[c] + beta[c]

    @njit(cache=False, error_model="numpy", fastmath={"reassoc"})
    def backward(dy, x, gamma, mean, var, eps, dx, dgamma, dbeta):
        N, C = x.shape
        dgamma[:] = 0.0
        dbeta[:] = 0.0
        for n in range(N):
            for c in range(C):
                dbeta[c] += dy[n, c]
                dgamma[c] += dy[n, c] * (x[n, c] - mean[c])
        for n in range(N):
            for c in range(C):
                inv = 1.0 / np.sqrt(var[c] + eps)
                dx[n, c] = gamma[c] * inv * (dy[n, c] - dbeta[c] / N
                                             - (x[n, c] - mean[c]) * inv * inv * dgamma[c] / N)
        dgamma /= np.sqrt(var + eps)

    return forward, backward


def tiny_batch_norm(repeats: int) -> dict:
    import normkit
    from numba import njit
    from normkit.kernels import _engine

    _lean_forward, _lean_backward = _lean_kernels()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    dy = rng.standard_normal((2, 512)).astype(np.float32)
    norm = normkit.make("batch", 512)
    norm.forward(x, training=True)
    norm.backward(dy)

    def pair():
        norm.forward(x, training=True)
        norm.backward(dy)

    # the engine alone on the norm's own arrays, outputs and statistics preallocated
    x4, dy4 = x.reshape(2, 512, 1, 1), dy.reshape(2, 512, 1, 1)
    y4, dx4 = np.empty_like(x4), np.empty_like(x4)
    gamma2, beta2 = norm.params["gamma"].reshape(512, 1), norm.params["beta"].reshape(512, 1)
    mean, var, count = np.empty((1, 512)), np.empty((1, 512)), np.empty(1)
    dgamma, dbeta = np.empty((512, 1)), np.empty((512, 1))
    fwd_args = (x4, 2, gamma2, beta2, 1e-5, True, _engine.NO_MASK, False, y4, mean, var, count,
                _engine.STATS_AND_APPLY)
    bwd_args = (dy4, x4, 2, gamma2, mean, var, count, 1e-5, True, False, _engine.NO_MASK, False,
                dx4, dgamma, dbeta)

    @njit(cache=False)
    def empty13(a, b, c, d, e, f, g, h, i, j, k, l, m):
        return 0

    @njit(cache=False)
    def empty15(a, b, c, d, e, f, g, h, i, j, k, l, m, n, o):
        pass

    empty13(*fwd_args)
    empty15(*bwd_args)
    g32, b32 = norm.params["gamma"], norm.params["beta"]
    m64, v64, dg64, db64 = np.empty(512), np.empty(512), np.empty(512), np.empty(512)

    def lean_pair():
        y = np.empty_like(x)
        _lean_forward(x, g32, b32, 1e-5, y, m64, v64)
        dx = np.empty_like(x)
        _lean_backward(dy, x, g32, m64, v64, 1e-5, dx, dg64, db64)

    lean_pair()
    rows = {
        "Norm.forward": per_call(lambda: norm.forward(x, training=True), repeats),
        "Norm.backward": per_call(lambda: norm.backward(dy), repeats),
        "Norm forward + backward": per_call(pair, repeats),
        "engine forward": per_call(lambda: _engine.forward(*fwd_args), repeats),
        "engine backward": per_call(lambda: _engine.backward(*bwd_args), repeats),
        "lean fused pair: no checks, no state": per_call(lean_pair, repeats),
        "empty @njit, forward's 13 arguments": per_call(lambda: empty13(*fwd_args), repeats),
        "empty @njit, backward's 15 arguments": per_call(lambda: empty15(*bwd_args), repeats),
    }
    try:
        import torch
    except ImportError:
        return rows
    torch.set_num_threads(1)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.ones(512, requires_grad=True)
    bt = torch.zeros(512, requires_grad=True)
    rm, rv, dyt = torch.zeros(512), torch.ones(512), torch.tensor(dy)

    def torch_pair():
        y = torch.nn.functional.batch_norm(xt, rm, rv, gt, bt, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xt, gt, bt), dyt)

    rows["torch forward + backward"] = per_call(torch_pair, repeats, number=500)
    return rows


_COLD_BATCH = '''
import resource, json
import numpy as np
import normkit
x = np.random.default_rng(0).standard_normal((8, 64, 7, 7)).astype(np.float32)
norm = normkit.make("batch", 64)
norm.backward(norm.forward(x, training=True))
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime}))
'''

_COLD_ALL = '''
import resource, json
import numpy as np
import normkit
options = {"ghost": {"virtual_batch_size": 2}, "group": {"num_groups": 2},
           "recurrent_batch": {"max_steps": 4}}
for dtype in (np.float32, np.float64):
    for name in normkit.available():
        shape = (4, 3, 4) if name == "recurrent_batch" else (4, 4, 3)
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        features = shape[-1] if name in ("layer", "rms", "recurrent_batch") else shape[1]
        norm = normkit.make(name, features, dtype=dtype, **options.get(name, {}))
        norm.backward(norm.forward(x, training=True))
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_s": r.ru_utime + r.ru_stime, "norms": len(normkit.available())}))
'''


def cold_compile(script: str) -> dict:
    """CPU seconds of ``script`` in a fresh process with an empty Numba cache."""
    with tempfile.TemporaryDirectory(prefix="normkit-cold-") as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                              capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# The floor of start-up: NumPy and Numba imported, one trivial cached @njit function loaded and
# called (Numba's own initialization on the first call, which imports scipy.linalg for its BLAS
# check, is part of it).
_FLOOR_MODULE = '''
from numba import njit


@njit(cache=True)
def double(x, y):
    for i in range(x.size):
        y.flat[i] = 2 * x.flat[i]
'''

_FLOOR = '''
import json, time
t0 = time.perf_counter()
import numpy as np
import numba
t1 = time.perf_counter()
import floor_module
x = np.ones((4, 8, 5, 5), np.float32)
floor_module.double(x, np.empty_like(x))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1}))
'''


def startup(runs: int, script: str = _STARTUP, env_extra: dict | None = None) -> dict:
    """Median import and first-call seconds of ``script`` in fresh processes (one warm-up run
    first, so the caches are filled)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env = {key: value for key, value in env.items() if value is not None}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    results = []
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                              capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    total = [r["import_s"] + r["first_call_s"] for r in results]
    return {"import_s": float(np.median([r["import_s"] for r in results])),
            "first_call_s": float(np.median([r["first_call_s"] for r in results])),
            "total_s": float(np.median(total)), "total_min_s": float(np.min(total)),
            "total_max_s": float(np.max(total))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=41, help="samples per measurement")
    parser.add_argument("--startups", type=int, default=5, help="fresh processes for start-up")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-compile runs")
    parser.add_argument("--cold-only", action="store_true", help="only the cold-compile runs")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    if not args.no_cold:
        print("cold compile, fresh process, empty NUMBA_CACHE_DIR (CPU seconds, all threads)")
        first = cold_compile(_COLD_BATCH)
        label = 'first make("batch", 64) forward + backward, float32 NCHW'
        print(f"{label:66s} {first['cpu_s']:6.1f}")
        every = cold_compile(_COLD_ALL)
        label = f"import + forward/backward of all {every['norms']} norms, f32 and f64"
        print(f"{label:66s} {every['cpu_s']:6.1f}\n")
        if args.cold_only:
            return
    print("tiny batch norm (2, 512) float32, training; microseconds per call")
    print(f"{'':40s} {'median':>8s} {'min':>8s} {'cpu med':>8s}")
    tiny = tiny_batch_norm(args.repeats)
    for name, t in tiny.items():
        print(f"{name:40s} {t['median_us']:8.2f} {t['min_us']:8.2f} {t['cpu_median_us']:8.2f}")
    if "torch forward + backward" in tiny:
        ratio = tiny["torch forward + backward"]["median_us"] / tiny["Norm forward + backward"]["median_us"]
        print(f"{'PyTorch / normkit, forward + backward':40s} {ratio:8.1f}x")
        lean = tiny["lean fused pair: no checks, no state"]["median_us"]
        ratio = tiny["torch forward + backward"]["median_us"] / lean
        print(f"{'PyTorch / lean fused pair':40s} {ratio:8.1f}x")
    if not args.no_startup:
        print(f"\nstart-up, warm Numba cache, median of {args.startups} fresh processes "
              f"(seconds: import + first call = total [min, max])")
        bytecode = "off" if os.environ.get("PYTHONDONTWRITEBYTECODE") else "on"
        with tempfile.TemporaryDirectory(prefix="normkit-floor-") as floor_dir:
            Path(floor_dir, "floor_module.py").write_text(_FLOOR_MODULE)
            runs = {
                f"normkit, first BN forward + backward (bytecode cache {bytecode})": {},
                "normkit, the same with Python's bytecode cache on": {"PYTHONDONTWRITEBYTECODE": None},
                "floor: numpy + numba, one cached @njit call": {
                    "PYTHONPATH": floor_dir, "NUMBA_CACHE_DIR": floor_dir},
            }
            for label, env_extra in runs.items():
                script = _FLOOR if label.startswith("floor") else _STARTUP
                s = startup(args.startups, script, env_extra)
                print(f"{label:66s} {s['import_s']:.2f} + {s['first_call_s']:.2f} = "
                      f"{s['total_s']:.2f} [{s['total_min_s']:.2f}, {s['total_max_s']:.2f}]")
    print(f"\n1-min load average: {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
