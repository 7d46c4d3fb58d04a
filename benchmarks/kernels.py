"""Kernel benchmarks: normkit against its NumPy reference and PyTorch, and the memory floor.

    python benchmarks/kernels.py                 # every case; results/bench/kernels.csv + table
    python benchmarks/kernels.py --quick         # shorter sampling (a first look)
    python benchmarks/kernels.py --cases bn_nchw,ln_rows --no-jit

Every case is timed in one process, all implementations interleaved (see ``_timing``), warm:
compilation happens before timing and is reported separately (the JIT story: a fresh process
with an empty cache, then a second process with the cache filled). Implementations:

    normkit        normkit.make(...).forward / .backward (checks, state; a fresh output per call)
    normkit-out    the same writing into an ``out=`` array the caller keeps
    kernel         the functional kernel with an ``out=`` array (no checks, no allocation)
    numpy          normkit.reference (plain NumPy; timed right after the others, on its own,
                   since one call takes up to a second)
    torch          torch.nn.functional on CPU, torch.set_num_threads = Numba's thread count;
                   backward is torch.autograd.grad of the recorded forward. For FRN and the
                   EvoNorms: timm's layer (normkit.testing.timm_layers); for switchable norm
                   and DyT, which timm lacks, a plain PyTorch function

The floor of a case is the bytes that must move (forward: read x, write y; backward: read x and
dy, write dx) over the streaming bandwidth of this machine, measured in the same run as a large
NumPy copy (the best of several measurements, so the floor is not inflated by a busy spell).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import normkit  # noqa: E402
from normkit import reference as ref  # noqa: E402
from normkit.kernels import batch, group, layer  # noqa: E402

from _timing import interleaved, stream_bandwidth, warm_up_threads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5


@dataclass(frozen=True)
class Case:
    key: str            # short id, also the --cases filter
    label: str          # for the table
    norm: str           # registry name
    shape: tuple
    dtype: type = np.float32
    directions: tuple = ("fwd", "bwd")
    training: bool = True
    kwargs: tuple = ()  # extra make() keyword arguments, as (name, value) pairs


CASES = [
    Case("bn_nchw", "BN train (32,64,56,56)", "batch", (32, 64, 56, 56)),
    Case("bn_nchw_wide", "BN train (256,256,14,14)", "batch", (256, 256, 14, 14)),
    Case("bn_nc", "BN (N,C) (4096,1024)", "batch", (4096, 1024)),
    Case("bn_nc_small", "BN (N,C) (64,512)", "batch", (64, 512)),
    Case("bn_eval", "BN eval (32,64,56,56)", "batch", (32, 64, 56, 56), directions=("fwd",),
         training=False),
    Case("ln_rows", "LN (8192,1024)", "layer", (8192, 1024)),
    Case("ln_tokens", "LN (64,128,768)", "layer", (64, 128, 768)),
    Case("gn", "GN 32 groups (32,64,56,56)", "group", (32, 64, 56, 56), kwargs=(("num_groups", 32),)),
    Case("rms", "RMS (8192,1024)", "rms", (8192, 1024)),
    Case("bn_tiny", "BN tiny (2,512)", "batch", (2, 512)),
    Case("bn_nchw_f64", "BN train f64 (32,64,56,56)", "batch", (32, 64, 56, 56), dtype=np.float64),
    # The batch-independent competitors; their peer is timm's layer where timm has it (FRN,
    # EvoNorm-S0/B0), else plain PyTorch. No functional-kernel or NumPy column for them.
    Case("frn", "FRN+TLU (32,64,56,56)", "frn", (32, 64, 56, 56)),
    Case("evonorm_s0", "EvoNorm-S0 32 groups (32,64,56,56)", "evonorm_s0", (32, 64, 56, 56),
         kwargs=(("num_groups", 32),)),
    Case("evonorm_b0", "EvoNorm-B0 train (32,64,56,56)", "evonorm_b0", (32, 64, 56, 56)),
    Case("switchable", "Switchable train (32,64,56,56)", "switchable", (32, 64, 56, 56)),
    Case("dyt", "DyT (32,64,56,56)", "dyt", (32, 64, 56, 56)),
    # Weight standardization is a layer option, not a norm: the case times the standardization
    # of a Conv2d(64, 64, 3x3) weight (what a layer on (32,64,56,56) adds per step) and its
    # backward, against timm's StdConv2d expression (F.batch_norm over the reshaped weight).
    Case("ws", "WS of a Conv2d(64,64,3x3) weight (64,64,3,3)", "ws", (64, 64, 3, 3)),
]
#: Cases with a functional kernel (``kernel`` column) and a NumPy reference backward.
KERNEL_NORMS = ("batch", "layer", "rms", "group")


def _features(case: Case):
    return case.shape[-1] if case.norm in ("layer", "rms") else case.shape[1]


# ---------------------------------------------------------------------------------------------
# The implementations of one case, as zero-argument functions per direction
# ---------------------------------------------------------------------------------------------

def _weight_standardization(case, x, dy, out):
    """The standardizer of a Conv2d with ``weight_standardization=True`` on ``x`` as its weight
    (forward: the standardized (out, fan_in) rows; backward: dL/dW from dL/dW_hat)."""
    from normkit.nn import Conv2d
    C_out, C_in, KH, KW = case.shape
    conv = Conv2d(C_in, C_out, (KH, KW), padding=1, rng=np.random.default_rng(3),
                  weight_standardization=True, ws_eps=EPS, dtype=case.dtype)
    conv.params["weight"][...] = x
    standardizer, rows, dy_rows = conv._standardizer, conv._weight_rows(), dy.reshape(C_out, -1)
    conv._standardize()
    y, dx = (np.empty_like(rows), np.empty_like(rows)) if out else (None, None)
    return {"fwd": lambda: standardizer.forward(rows, training=True, out=y),
            "bwd": lambda: standardizer.backward(dy_rows, out=dx)}, standardizer


def _normkit(case, x, dy, out):
    if case.norm == "ws":
        return _weight_standardization(case, x, dy, out)
    norm = normkit.make(case.norm, _features(case), dtype=case.dtype, **dict(case.kwargs))
    rng = np.random.default_rng(3)
    for value in norm.params.values():
        value[...] = rng.uniform(0.5, 1.5, value.shape)
    if not case.training:
        norm.forward(x, training=True)         # non-trivial running statistics
    norm.forward(x, training=case.training)
    norm.backward(dy)
    y, dx = (np.empty_like(x), np.empty_like(x)) if out else (None, None)
    return {"fwd": lambda: norm.forward(x, training=case.training, out=y),
            "bwd": lambda: norm.backward(dy, out=dx)}, norm


def _kernel(case, x, dy, norm):
    """The functional kernel on the norm's own parameters, outputs into preallocated arrays."""
    if case.norm not in KERNEL_NORMS:
        return {}
    out, dout = np.empty_like(x), np.empty_like(x)
    gamma = norm.params["gamma"].reshape(-1)
    if case.norm == "batch" and case.training:
        _, mean, var = batch.forward_train(x, gamma, norm.params["beta"], EPS, out)
        return {"fwd": lambda: batch.forward_train(x, gamma, norm.params["beta"], EPS, out),
                "bwd": lambda: batch.backward(dy, x, gamma, mean, var, EPS, dout)}
    if case.norm == "batch":
        rm, rv = norm.state["running_mean"], norm.state["running_var"]
        return {"fwd": lambda: batch.forward_eval(x, gamma, norm.params["beta"], rm, rv, EPS, out)}
    if case.norm == "layer":
        beta = norm.params["beta"].reshape(-1)
        _, mean, var = layer.forward(x, gamma, beta, EPS, out)
        return {"fwd": lambda: layer.forward(x, gamma, beta, EPS, out),
                "bwd": lambda: layer.backward(dy, x, gamma, mean, var, EPS, dout)}
    if case.norm == "rms":
        _, mean_square = layer.rms_forward(x, gamma, EPS, out)
        return {"fwd": lambda: layer.rms_forward(x, gamma, EPS, out),
                "bwd": lambda: layer.rms_backward(dy, x, gamma, mean_square, EPS, dout)}
    G = dict(case.kwargs)["num_groups"]
    _, mean, var = group.forward(x, gamma, norm.params["beta"], G, EPS, out)
    return {"fwd": lambda: group.forward(x, gamma, norm.params["beta"], G, EPS, out),
            "bwd": lambda: group.backward(dy, x, gamma, G, mean, var, EPS, dout)}


def _numpy(case, x, dy, norm):
    if case.norm not in KERNEL_NORMS:
        return {}
    p = {k: v.copy() for k, v in norm.params.items()}
    if case.norm == "batch" and case.training:
        return {"fwd": lambda: ref.batch_forward_train(x, p["gamma"], p["beta"], EPS),
                "bwd": lambda: ref.batch_backward(dy, x, p["gamma"], EPS)}
    if case.norm == "batch":
        rm, rv = norm.state["running_mean"], norm.state["running_var"]
        return {"fwd": lambda: ref.batch_forward_eval(x, p["gamma"], p["beta"], rm, rv, EPS)}
    if case.norm == "layer":
        return {"fwd": lambda: ref.layer_forward(x, p["gamma"], p["beta"], 1, EPS),
                "bwd": lambda: ref.layer_backward(dy, x, p["gamma"], 1, EPS)}
    if case.norm == "rms":
        return {"fwd": lambda: ref.rms_forward(x, p["gamma"], 1, EPS),
                "bwd": lambda: ref.rms_backward(dy, x, p["gamma"], 1, EPS)}
    G = dict(case.kwargs)["num_groups"]
    return {"fwd": lambda: ref.group_forward(x, p["gamma"], p["beta"], G, EPS),
            "bwd": lambda: ref.group_backward(dy, x, p["gamma"], G, EPS)}


def _competitor_peer(torch, case, norm):
    """timm's module for FRN and the EvoNorms (parameters copied from ``norm``), a plain
    PyTorch function for switchable norm and DyT; in training mode."""
    from normkit.testing import timm_layers
    C = case.shape[1]
    if case.norm == "ws":                      # timm's StdConv2d.forward, its weight part
        F = torch.nn.functional

        def standardize(weight):
            return F.batch_norm(weight.reshape(1, case.shape[0], -1), None, None,
                                training=True, momentum=0.0, eps=EPS).reshape_as(weight)
        return standardize, []
    p = {k: torch.tensor(v, requires_grad=True) for k, v in norm.params.items()}
    if case.norm in ("frn", "evonorm_s0", "evonorm_b0"):
        if case.norm == "frn":
            module = timm_layers("filter_response_norm").FilterResponseNormTlu2d(C, eps=norm.eps)
            theirs = {"gamma": module.weight, "beta": module.bias, "tau": module.tau}
        elif case.norm == "evonorm_s0":
            module = timm_layers("evo_norm").EvoNorm2dS0(C, groups=norm.num_groups, eps=norm.eps)
            theirs = {"gamma": module.weight, "beta": module.bias, "v": module.v}
        else:
            module = timm_layers("evo_norm").EvoNorm2dB0(C, eps=norm.eps)
            theirs = {"gamma": module.weight, "beta": module.bias, "v": module.v}
        with torch.no_grad():
            for key, param in theirs.items():
                param.copy_(torch.from_numpy(norm.params[key]))
        return module.train(), list(theirs.values())
    view = (1, C, 1, 1)
    if case.norm == "dyt":
        return (lambda inp: p["gamma"].view(view) * torch.tanh(p["alpha"] * inp)
                + p["beta"].view(view)), list(p.values())
    running_mean, running_var = torch.zeros(C), torch.ones(C)

    def switchable(inp):
        inst_var, inst_mean = torch.var_mean(inp, dim=(2, 3), unbiased=False, keepdim=True)
        layer_var, layer_mean = torch.var_mean(inp, dim=(1, 2, 3), unbiased=False, keepdim=True)
        batch_var, batch_mean = torch.var_mean(inp, dim=(0, 2, 3), unbiased=False, keepdim=True)
        with torch.no_grad():                  # the running averages, as normkit updates them
            n = inp.numel() // C
            running_mean.mul_(0.9).add_(0.1 * batch_mean.view(-1))
            running_var.mul_(0.9).add_(0.1 * n / (n - 1) * batch_var.view(-1))
        w_mean, w_var = torch.softmax(p["mean_weight"], 0), torch.softmax(p["var_weight"], 0)
        mean = w_mean[0] * inst_mean + w_mean[1] * layer_mean + w_mean[2] * batch_mean
        var = w_var[0] * inst_var + w_var[1] * layer_var + w_var[2] * batch_var
        return (inp - mean) * torch.rsqrt(var + norm.eps) * p["gamma"].view(view) \
            + p["beta"].view(view)
    return switchable, list(p.values())


def _torch(torch, case, x, dy, norm):
    F = torch.nn.functional
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    if case.norm not in KERNEL_NORMS:
        forward, params = _competitor_peer(torch, case, norm)
        xg = xt.clone().requires_grad_(True)
        recorded = forward(xg)
        return {"fwd": lambda: forward(xt),
                "bwd": lambda: torch.autograd.grad(recorded, (xg, *params), dyt,
                                                   retain_graph=True)}
    p = {k: torch.tensor(v.reshape(-1) if case.norm != "layer" else v, requires_grad=True)
         for k, v in norm.params.items()}
    state = {k: torch.tensor(v) for k, v in norm.state.items() if k != "num_batches_tracked"}
    D = _features(case)
    if case.norm == "batch":
        def forward(inp):
            return F.batch_norm(inp, state["running_mean"], state["running_var"], p["gamma"],
                                p["beta"], training=case.training, momentum=0.1, eps=EPS)
    elif case.norm == "layer":
        def forward(inp):
            return F.layer_norm(inp, (D,), p["gamma"], p["beta"], EPS)
    elif case.norm == "rms":
        def forward(inp):
            return F.rms_norm(inp, (D,), p["gamma"], EPS)
    else:
        G = dict(case.kwargs)["num_groups"]

        def forward(inp):
            return F.group_norm(inp, G, p["gamma"], p["beta"], EPS)
    xg = xt.clone().requires_grad_(True)
    recorded = forward(xg)
    inputs = (xg, *p.values())
    return {"fwd": lambda: forward(xt),
            "bwd": lambda: torch.autograd.grad(recorded, inputs, dyt, retain_graph=True)}


# ---------------------------------------------------------------------------------------------
# Running the cases
# ---------------------------------------------------------------------------------------------

def run_case(case, torch, args):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(case.shape) * 2 + 0.5).astype(case.dtype)
    dy = rng.standard_normal(case.shape).astype(case.dtype)
    impls = {}
    t0 = time.perf_counter()
    impls["normkit"], norm = _normkit(case, x, dy, out=False)
    impls["normkit-out"], _ = _normkit(case, x, dy, out=True)
    impls["kernel"] = _kernel(case, x, dy, norm)
    first_call = time.perf_counter() - t0
    if not args.no_numpy:
        impls["numpy"] = _numpy(case, x, dy, norm)
    if torch is not None:
        impls["torch"] = _torch(torch, case, x, dy, norm)
    rows = []
    for direction in case.directions:
        fns = {name: fns[direction] for name, fns in impls.items()
               if name != "numpy" and direction in fns}
        timings = interleaved(fns, max_time=args.max_time, min_rounds=args.min_rounds,
                              gap=args.gap)
        if direction in impls.get("numpy", {}):   # up to a second a call: timed on its own
            timings.update(interleaved({"numpy": impls["numpy"][direction]}, min_rounds=3,
                                       max_time=args.max_time / 2))
        for name, t in timings.items():
            rows.append(dict(case=case.key, label=case.label, shape="x".join(map(str, case.shape)),
                             dtype=np.dtype(case.dtype).name, impl=name, direction=direction,
                             median_us=t.median * 1e6, iqr_us=t.iqr * 1e6,
                             samples=len(t.samples), calls_per_sample=t.number))
    return rows, first_call


def _ratios(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["x_floor"] = df.median_us / df.floor_us
    torch_us = df[df.impl == "torch"].set_index(["case", "direction"]).median_us
    key = pd.MultiIndex.from_frame(df[["case", "direction"]])
    df["torch_over_this"] = torch_us.reindex(key).to_numpy() / df.median_us.to_numpy()
    return df


def markdown_table(df: pd.DataFrame) -> str:
    """One row per case and direction: medians (IQR), x floor, and speed-up over PyTorch."""
    lines = ["| case | dir | floor µs | normkit µs | ×floor | vs torch | out= µs | kernel µs | "
             "×floor | vs torch | torch µs | ×floor | numpy µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, direction), g in df.groupby(["label", "direction"], sort=False):
        r = g.set_index("impl")

        def us(impl):
            if impl not in r.index:
                return "–"
            return f"{r.median_us[impl]:,.0f} ±{r.iqr_us[impl]:,.0f}" if r.median_us[impl] >= 100 \
                else f"{r.median_us[impl]:.1f} ±{r.iqr_us[impl]:.1f}"

        def ratio(impl, col, fmt="{:.2f}"):
            return fmt.format(r[col][impl]) if impl in r.index and np.isfinite(r[col][impl]) else "–"

        lines.append(" | ".join([
            f"| {label}", direction, f"{r.floor_us.iloc[0]:,.0f}",
            us("normkit"), ratio("normkit", "x_floor"), ratio("normkit", "torch_over_this", "{:.2f}×"),
            us("normkit-out"), us("kernel"), ratio("kernel", "x_floor"),
            ratio("kernel", "torch_over_this", "{:.2f}×"), us("torch"), ratio("torch", "x_floor"),
            us("numpy")]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Targets: the performance goals the kernels were built to
# ---------------------------------------------------------------------------------------------

def targets(df: pd.DataFrame, jit: dict | None) -> list[tuple[str, str, bool]]:
    r = df.set_index(["case", "direction", "impl"])

    def get(case, direction, impl, col):
        try:
            return float(r.loc[(case, direction, impl), col])
        except KeyError:
            return float("nan")

    out = []

    def check(text, value_text, ok):
        out.append((text, value_text, bool(ok)))

    for impl in ("normkit", "kernel"):
        f, s = get("bn_nchw", "fwd", impl, "x_floor"), get("bn_nchw", "fwd", impl, "torch_over_this")
        check(f"BN fwd NCHW (32,64,56,56), {impl}: <= 1.15x floor and >= 3.5x faster than torch",
              f"{f:.2f}x floor, {s:.2f}x torch", f <= 1.15 and s >= 3.5)
        f, s = get("bn_nchw", "bwd", impl, "x_floor"), get("bn_nchw", "bwd", impl, "torch_over_this")
        check(f"BN bwd NCHW (32,64,56,56), {impl}: <= 1.3x floor and >= 1.3x faster than torch",
              f"{f:.2f}x floor, {s:.2f}x torch", f <= 1.3 and s >= 1.3)
        for direction in ("fwd", "bwd"):
            s = get("bn_nc", direction, impl, "torch_over_this")
            check(f"BN (N,C) (4096,1024) {direction}, {impl}: >= 1.2x faster than torch",
                  f"{s:.2f}x torch", s >= 1.2)
        s = get("ln_rows", "fwd", impl, "torch_over_this")
        check(f"LN (8192,1024) fwd, {impl}: no slower than torch", f"{s:.2f}x torch", s >= 1.0)
        s = get("ln_rows", "bwd", impl, "torch_over_this")
        check(f"LN (8192,1024) bwd, {impl}: >= 1.3x faster than torch", f"{s:.2f}x torch", s >= 1.3)
    f, b = get("bn_tiny", "fwd", "normkit", "median_us"), get("bn_tiny", "bwd", "normkit", "median_us")
    check("Tiny BN (2,512) through Norm: < 5 µs per call (forward, backward)",
          f"fwd {f:.1f} µs, bwd {b:.1f} µs", f < 5 and b < 5)
    if jit:
        t = jit["warm"]["import_s"] + jit["warm"]["first_call_s"]["batch fwd+bwd (Norm)"]
        check("Warm cache: import normkit + first BN fwd/bwd < 1 s", f"{t:.2f} s", t < 1.0)
    return out


# ---------------------------------------------------------------------------------------------
# The JIT story: first calls in a fresh process (cold cache), then again (warm cache)
# ---------------------------------------------------------------------------------------------

_FIRST_CALLS = textwrap.dedent('''
    import json, time
    t0 = time.perf_counter()
    import numpy as np
    import normkit
    from normkit.kernels import batch, group, layer
    t_import = time.perf_counter() - t0
    f32 = np.float32
    x4 = np.ones((4, 8, 5, 5), f32); x4[0] = 2; x2 = np.ones((6, 8), f32); x2[0] = 2
    g = np.ones(8, f32); b = np.zeros(8, f32)
    calls = {}
    def first(name, fn):
        t = time.perf_counter(); out = fn(); calls[name] = time.perf_counter() - t; return out
    def norm_step():
        n = normkit.make("batch", 8); n.forward(x4, training=True); n.backward(x4)
    first("batch fwd+bwd (Norm)", norm_step)
    _, m, v = first("batch.forward_train", lambda: batch.forward_train(x4, g, b, 1e-5))
    first("batch.backward", lambda: batch.backward(x4, x4, g, m, v, 1e-5))
    first("batch.forward_eval", lambda: batch.forward_eval(x4, g, b, g, g, 1e-5))
    _, m, v = first("batch.forward_train (N,C)", lambda: batch.forward_train(x2, g, b, 1e-5))
    first("batch.backward (N,C)", lambda: batch.backward(x2, x2, g, m, v, 1e-5))
    _, m, v = first("layer.forward", lambda: layer.forward(x2, g, b, 1e-5))
    first("layer.backward", lambda: layer.backward(x2, x2, g, m, v, 1e-5))
    _, ms = first("layer.rms_forward", lambda: layer.rms_forward(x2, g, 1e-5))
    first("layer.rms_backward", lambda: layer.rms_backward(x2, x2, g, ms, 1e-5))
    _, m, v = first("group.forward", lambda: group.forward(x4, g, b, 4, 1e-5))
    first("group.backward", lambda: group.backward(x4, x4, g, 4, m, v, 1e-5))
    print(json.dumps({"import_s": t_import, "first_call_s": calls}))
''')


def jit_story() -> dict:
    """Import time and first-call times in a fresh process with an empty cache (compilation),
    then in a second fresh process with that cache (loading)."""
    story = {}
    with tempfile.TemporaryDirectory(prefix="normkit-numba-cache-") as cache_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _FIRST_CALLS], env=env, check=True,
                                  capture_output=True, text=True)
            story[label] = json.loads(done.stdout.strip().splitlines()[-1])
            story[label]["process_s"] = time.perf_counter() - t
    return story


def jit_table(story: dict) -> str:
    lines = ["| | cold cache (compiles) s | warm cache (loads) s |", "|---|---:|---:|",
             f"| import normkit | {story['cold']['import_s']:.2f} | {story['warm']['import_s']:.2f} |"]
    for name, cold in story["cold"]["first_call_s"].items():
        lines.append(f"| first call: {name} | {cold:.2f} | {story['warm']['first_call_s'][name]:.3f} |")
    lines.append(f"| whole process | {story['cold']['process_s']:.1f} | "
                 f"{story['warm']['process_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def machine_description(threads: int, bandwidths, loads) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba.np.ufunc.parallel as numba_parallel
    layer_name = numba.threading_layer() if numba_parallel._is_initialized else "?"
    return (f"{cpu}, {os.cpu_count()} CPUs, {threads} threads (Numba layer {layer_name!r}), "
            f"streaming bandwidth {max(bandwidths) / 1e9:.1f} GB/s (NumPy copy of 256 MiB; "
            f"measurements {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)}); "
            f"1-min load average {loads[0]:.1f} before, {loads[1]:.1f} after (other processes "
            f"share the cores: more than ~0.5 means the figures are pessimistic); "
            f"Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}"
            + (f", PyTorch {sys.modules['torch'].__version__}" if "torch" in sys.modules else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", help="comma-separated case keys: " + ",".join(c.key for c in CASES))
    parser.add_argument("--quick", action="store_true", help="shorter sampling")
    parser.add_argument("--no-jit", action="store_true", help="skip the JIT story (two processes)")
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    parser.add_argument("--max-time", type=float, default=None, help="seconds of sampling per direction")
    parser.add_argument("--gap", type=float, default=2e-3,
                        help="idle seconds between samples, so one runtime's spinning OpenMP "
                             "workers do not steal the cores of the next sample (default 2e-3)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "kernels.csv")
    args = parser.parse_args(argv)
    args.max_time = args.max_time or (1.0 if args.quick else 2.5)
    args.min_rounds = 5 if args.quick else 9
    cases = CASES if not args.cases else [c for c in CASES if c.key in args.cases.split(",")]

    torch = None
    if not args.no_torch:
        import torch
    threads = numba.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)

    load_before = os.getloadavg()[0]
    story = None if args.no_jit else jit_story()
    bandwidths = [stream_bandwidth()]
    warm_up_threads()
    rows, first_calls = [], {}
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case.label} {np.dtype(case.dtype).name}", file=sys.stderr)
        case_rows, first_calls[case.key] = run_case(case, torch, args)
        rows += case_rows
        if i == len(cases) // 2:
            bandwidths.append(stream_bandwidth())
    bandwidths.append(stream_bandwidth())
    bandwidth = max(bandwidths)

    df = pd.DataFrame(rows)
    df["floor_us"] = df.apply(lambda r: _floor_us(r, cases, bandwidth), axis=1)   # final bandwidth
    df = _ratios(df)
    df["threads"] = threads
    df["bandwidth_gbs"] = bandwidth / 1e9
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.4g")

    machine = machine_description(threads, bandwidths, (load_before, os.getloadavg()[0]))
    print(f"\nMachine: {machine}\n")
    print(markdown_table(df))
    if story:
        print("\nJIT story (fresh processes, NUMBA_CACHE_DIR in a temporary directory):\n")
        print(jit_table(story))
        (args.out.parent / "jit.json").write_text(json.dumps(story, indent=2))
    print("\nTargets (the performance goals):\n")
    for text, value, ok in targets(df, story):
        print(f"- [{'x' if ok else ' '}] {text}: {value}")
    (args.out.parent / "machine.txt").write_text(machine + "\n")
    print(f"\nwrote {args.out}", file=sys.stderr)


def _floor_us(row, cases, bandwidth):
    """Bytes that must move (forward: x in, y out; backward: x and dy in, dx out) / bandwidth."""
    case = next(c for c in cases if c.key == row.case)
    nbytes = int(np.prod(case.shape)) * np.dtype(case.dtype).itemsize
    return (2 if row.direction == "fwd" else 3) * nbytes / bandwidth * 1e6


if __name__ == "__main__":
    main()
