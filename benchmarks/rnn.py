"""BN-LSTM and LSTM, forward and backward over a whole sequence: normkit's fused kernels against
PyTorch (an LSTMCell-style loop with per-step batch norm, and torch.nn.LSTM for the plain case).

    python benchmarks/rnn.py                 # T=784 (sequential MNIST), H=100, N=100, float32
    python benchmarks/rnn.py --repeats 9 --steps 100

Prints a markdown table (median and interquartile range over the repeats, in ms) and writes
results/bench/rnn.csv with the columns case, impl, direction, median_us, iqr_us. numba, its BLAS
(OpenBLAS) and PyTorch all run with --threads threads. The implementations take turns within
each repeat (normkit, torch, normkit, torch, ...), so that a machine whose load changes during
the run slows them alike and their ratio stays fair.

The row "GEMMs only" times the three matrix products any BN-LSTM training step needs (h_{t-1} W_h
forward, dr_t W_h^T backward per step, and dW_h = sum_t h_{t-1}^T dr_t) with numpy's BLAS and
nothing else: a floor for normkit, and torch / (GEMMs only) bounds the speed-up over torch.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _threads_from_argv(argv) -> int:
    """--threads N (default: all cores), read before numpy, numba and torch start their pools."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return os.cpu_count() or 1


THREADS = _threads_from_argv(sys.argv[1:])
for _var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from normkit.nn import LSTM  # noqa: E402

F = torch.nn.functional


# -- PyTorch ----------------------------------------------------------------------------------

class TorchBNLSTM(torch.nn.Module):
    """BN-LSTM as a PyTorch user writes it: the input term for all steps in one matmul and one
    batch norm (per-step statistics as channels (t, unit)), then a loop over steps with
    F.batch_norm on the recurrent term and on the cell, each with running buffers per step."""

    def __init__(self, D, H, T, momentum=0.1, eps=1e-5):
        super().__init__()
        self.H, self.T, self.momentum, self.eps = H, T, momentum, eps
        self.W_x = torch.nn.Parameter(torch.randn(D, 4 * H) * 0.1)
        self.W_h = torch.nn.Parameter(torch.eye(H).repeat(1, 4))
        self.b = torch.nn.Parameter(torch.zeros(4 * H))
        self.gamma_x = torch.nn.Parameter(torch.full((4 * H,), 0.1))
        self.gamma_h = torch.nn.Parameter(torch.full((4 * H,), 0.1))
        self.gamma_c = torch.nn.Parameter(torch.full((H,), 0.1))
        self.beta_c = torch.nn.Parameter(torch.zeros(H))
        for site, width in (("x", 4 * H), ("h", 4 * H), ("c", H)):
            self.register_buffer(f"mean_{site}", torch.zeros(T, width))
            self.register_buffer(f"var_{site}", torch.ones(T, width))

    def forward(self, x):                        # x (T, N, D) -> last h (N, H)
        T, N, _ = x.shape
        H = self.H
        xw = (x @ self.W_x).permute(1, 0, 2).reshape(N, T * 4 * H)        # channels (t, unit)
        xn = F.batch_norm(xw, self.mean_x.view(-1), self.var_x.view(-1),
                          self.gamma_x.repeat(T), None, True, self.momentum, self.eps)
        xn = xn.view(N, T, 4 * H).unbind(1)   # (not xn[:, t]: its backward fills a full-size
        h = x.new_zeros(N, H)                  # zero tensor per step)
        c = x.new_zeros(N, H)
        for t in range(T):
            rn = F.batch_norm(h @ self.W_h, self.mean_h[t], self.var_h[t], self.gamma_h, None,
                              True, self.momentum, self.eps)
            f, i, o, g = (rn + xn[t] + self.b).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            cn = F.batch_norm(c, self.mean_c[t], self.var_c[t], self.gamma_c, self.beta_c, True,
                              self.momentum, self.eps)
            h = torch.sigmoid(o) * torch.tanh(cn)
        return h


class TorchLSTM(torch.nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.lstm = torch.nn.LSTM(D, H)

    def forward(self, x):
        return self.lstm(x)[1][0][0]             # last h (N, H)


# -- timing -----------------------------------------------------------------------------------

def normkit_step(lstm, x, d_out):
    """One forward + backward of a normkit LSTM: (forward seconds, backward seconds)."""
    t0 = time.perf_counter()
    lstm.forward(x, True)
    t1 = time.perf_counter()
    lstm.backward(d_out)
    return t1 - t0, time.perf_counter() - t1


def torch_step(model, x, d_out):
    """One forward + backward of a torch module (x, d_out tensors): (forward s, backward s)."""
    model.zero_grad()
    t0 = time.perf_counter()
    out = model(x)
    t1 = time.perf_counter()
    out.backward(d_out)
    return t1 - t0, time.perf_counter() - t1


def gemm_step(T, N, H, rng):
    """The BN-LSTM's matrix products alone (see the module docstring), as a closure."""
    h = rng.standard_normal((T + 1, N, H)).astype(np.float32)       # h_{t-1} of every step
    W_h = rng.standard_normal((H, 4 * H)).astype(np.float32)
    W_hT = np.ascontiguousarray(W_h.T)
    dr = rng.standard_normal((T, N, 4 * H)).astype(np.float32)
    r = np.empty((N, 4 * H), np.float32)
    dh = np.empty((N, H), np.float32)

    def step():
        t0 = time.perf_counter()
        for t in range(T):
            np.dot(h[t], W_h, r)
        t1 = time.perf_counter()
        for t in range(T - 1, -1, -1):
            np.dot(dr[t], W_hT, dh)
        np.dot(h[:T].reshape(T * N, H).T, dr.reshape(T * N, 4 * H))
        return t1 - t0, time.perf_counter() - t1
    return step


def summarize(samples):
    q25, q50, q75 = np.percentile(np.asarray(samples) * 1e6, [25, 50, 75])
    return q50, q75 - q25


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=784, help="sequence length T")
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median of them)")
    parser.add_argument("--threads", type=int, default=THREADS,
                        help="threads for numba, its BLAS and torch (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("results/bench/rnn.csv"))
    args = parser.parse_args(argv)
    T, H, N, D = args.steps, args.hidden, args.batch, 1
    threads = numba.get_num_threads()
    torch.set_num_threads(threads)             # the same pool size on both sides
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, N, D)).astype(np.float32)
    d_out = rng.standard_normal((N, H)).astype(np.float32)

    xt, dt = torch.from_numpy(x), torch.from_numpy(d_out)
    bn = LSTM(D, H, norm="recurrent_batch", max_steps=T, return_sequences=False)
    plain = LSTM(D, H, return_sequences=False)
    torch_bn, torch_plain = TorchBNLSTM(D, H, T), TorchLSTM(D, H)
    runs = {
        ("BN-LSTM", "normkit"): lambda: normkit_step(bn, x, d_out),
        ("BN-LSTM", "torch loop"): lambda: torch_step(torch_bn, xt, dt),
        ("BN-LSTM", "GEMMs only"): gemm_step(T, N, H, rng),
        ("LSTM", "normkit"): lambda: normkit_step(plain, x, d_out),
        ("LSTM", "torch.nn.LSTM"): lambda: torch_step(torch_plain, xt, dt),
    }
    samples = {key: [] for key in runs}
    for repeat in range(args.repeats + 1):        # repeat 0: warm-up (and compile if cold)
        for key, run in runs.items():
            fwd, bwd = run()
            if repeat > 0:
                samples[key].append((fwd, bwd))
    rows = []
    for (case, impl), pairs in samples.items():
        fwd, bwd = zip(*pairs)
        total = [f + b for f, b in pairs]
        for direction, values in (("forward", fwd), ("backward", bwd), ("forward+backward", total)):
            median, iqr = summarize(values)
            rows.append(dict(case=case, impl=impl, direction=direction, median_us=median, iqr_us=iqr))
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)

    print(f"T={T}, H={H}, N={N}, float32, {threads} threads (numba and torch), "
          f"{args.repeats} repeats\n")
    print("| case | impl | direction | median (ms) | IQR (ms) | impl / normkit |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ours = table[(table.case == row["case"]) & (table.impl == "normkit")
                     & (table.direction == row["direction"])].median_us.iloc[0]
        ratio = row["median_us"] / ours
        print(f"| {row['case']} | {row['impl']} | {row['direction']} | {row['median_us'] / 1e3:.1f} "
              f"| {row['iqr_us'] / 1e3:.1f} | {ratio:.2f} |")
    paired = {key: [sum(pair) for pair in pairs] for key, pairs in samples.items()}

    def per_repeat_ratio(case, impl, reference="normkit"):
        return np.median(np.divide(paired[(case, impl)], paired[(case, reference)]))
    print(f"\nforward+backward, median of the per-repeat ratios: BN-LSTM torch loop / normkit "
          f"{per_repeat_ratio('BN-LSTM', 'torch loop'):.2f}, LSTM torch.nn.LSTM / normkit "
          f"{per_repeat_ratio('LSTM', 'torch.nn.LSTM'):.2f}; bound on torch loop / normkit "
          f"from the matrix products alone: "
          f"{per_repeat_ratio('BN-LSTM', 'torch loop', 'GEMMs only'):.2f}")


if __name__ == "__main__":
    main()
