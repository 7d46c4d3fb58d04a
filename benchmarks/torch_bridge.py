"""normkit's norms inside PyTorch models (``normkit.torch``) against torch's own norms: one
training step (zero_grad, forward, cross-entropy, backward, SGD-momentum update) of a small CNN
and of LSTM classifiers, same process, interleaved, median and IQR per step.

    PYTHONPATH=. python benchmarks/torch_bridge.py [--max-time 20] [--threads 2]

- CNN: 3 conv layers (3->32, 32->64 stride 2, 64->64 stride 2), each followed by batch norm and
  ReLU, global average pool, linear 64->10; batch 32 of 3x32x32 float32. ``torch.nn.BatchNorm2d``
  against ``normkit.torch.BatchNorm2d`` (same weights). "norms only" times the three batch norms
  alone (forward + backward of each on its activation shape, SGD excluded): the norm time per step.
- LSTM classifier: x (T=50, N=32, D=16) -> one LSTM layer, H=64 -> last hidden state -> linear
  64->10. BN-LSTM (per-step statistics) and LN-LSTM written as a PyTorch user does (an
  LSTMCell-style loop over steps with ``F.batch_norm`` / ``F.layer_norm``) against
  ``normkit.torch.LSTM(norm="recurrent_batch" / "layer")``, and the plain LSTM
  (``torch.nn.LSTM`` against ``normkit.torch.LSTM(norm="none")``) for scale. The norms run inside
  normkit's fused LSTM kernels, so the LSTM rows have no separate norm time.
- Thread policy: with torch at --threads threads and at 1 thread, the bridge's default policy
  ("default": a norm's call at torch's thread count, an LSTM call at 1 Numba and 1 BLAS thread)
  against fixed counts ``normkit.torch.set_num_threads(N)`` ("numba=N", for both kinds of call;
  the LSTM's BLAS pools at N too).

Prints a markdown table and writes results/bench/torch_bridge.csv (model, impl, torch_threads,
numba_threads, median_ms, iqr_ms). The implementations take turns (``_timing.interleaved``), so a
shared machine's load hits them alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleaved  # noqa: E402

import normkit.torch as nkt  # noqa: E402

F = torch.nn.functional
ROOT = Path(__file__).resolve().parents[1]


# -- models -----------------------------------------------------------------------------------

def cnn(norm_cls, seed=0):
    torch.manual_seed(seed)
    layers, width = [], 3
    for out, stride in ((32, 1), (64, 2), (64, 2)):
        layers += [torch.nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False),
                   norm_cls(out), torch.nn.ReLU()]
        width = out
    layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


class TorchNormLSTM(torch.nn.Module):
    """BN-LSTM ("batch") or LN-LSTM ("layer") as a PyTorch user writes it, normkit's layout and
    gate order: input term for all steps in one matmul, then a loop with the recurrent norm and
    the cell norm per step (batch norm: running buffers per step)."""

    def __init__(self, D, H, T, kind):
        super().__init__()
        self.H, self.kind = H, kind
        self.W_x = torch.nn.Parameter(torch.randn(D, 4 * H) * 0.2)
        self.W_h = torch.nn.Parameter(torch.eye(H).repeat(1, 4))
        self.b = torch.nn.Parameter(torch.zeros(4 * H))
        g = 0.1 if kind == "batch" else 1.0
        for site, width in (("x", 4 * H), ("h", 4 * H), ("c", H)):
            self.register_parameter(f"gamma_{site}", torch.nn.Parameter(torch.full((width,), g)))
            if kind == "layer" or site == "c":
                self.register_parameter(f"beta_{site}", torch.nn.Parameter(torch.zeros(width)))
            if kind == "batch":
                self.register_buffer(f"mean_{site}", torch.zeros(T, width))
                self.register_buffer(f"var_{site}", torch.ones(T, width))

    def _norm(self, v, site, t):
        beta = getattr(self, f"beta_{site}", None)
        if self.kind == "layer":
            return F.layer_norm(v, v.shape[-1:], getattr(self, f"gamma_{site}"), beta)
        return F.batch_norm(v, getattr(self, f"mean_{site}")[t], getattr(self, f"var_{site}")[t],
                            getattr(self, f"gamma_{site}"), beta, self.training, 0.1)

    def forward(self, x):                      # (T, N, D) -> last h (N, H)
        T, N, _ = x.shape
        H = self.H
        xw = x @ self.W_x
        h = x.new_zeros(N, H)
        c = x.new_zeros(N, H)
        for t in range(T):
            a = self._norm(h @ self.W_h, "h", t) + self._norm(xw[t], "x", t) + self.b
            f, i, o, g = a.split(H, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self._norm(c, "c", t))
        return h


class LSTMClassifier(torch.nn.Module):
    def __init__(self, recurrent, H):
        super().__init__()
        self.recurrent, self.head = recurrent, torch.nn.Linear(H, 10)

    def forward(self, x):
        h = self.recurrent(x)
        if isinstance(h, tuple):               # torch.nn.LSTM
            h = h[0][-1]
        elif h.dim() == 3:
            h = h[-1]
        return self.head(h)


def train_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def norms_only(model, x):
    """Forward + backward of each batch norm of ``model`` alone, on its activation shape."""
    inputs, norms = [], [m for m in model if isinstance(m, (torch.nn.BatchNorm2d, nkt.NormModule))]
    h = x
    with torch.no_grad():
        for m in model:
            if m in norms:
                inputs.append(h.clone().requires_grad_(True))
            h = m(h)
    grads = [torch.randn_like(a) for a in inputs]

    def run():
        for norm, a, g in zip(norms, inputs, grads):
            norm(a).backward(g)
    return run


# -- main -------------------------------------------------------------------------------------

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1,
                                                            numba.config.NUMBA_NUM_THREADS))
    parser.add_argument("--max-time", type=float, default=20.0,
                        help="seconds of sampling per group of interleaved cases")
    parser.add_argument("--steps", type=int, default=50, help="LSTM sequence length T")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench" / "torch_bridge.csv")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    N, D, H, T = 32, 16, 64, args.steps
    g = torch.Generator().manual_seed(0)
    x_img = torch.randn(32, 3, 32, 32, generator=g)
    y_img = torch.randint(0, 10, (32,), generator=g)
    x_seq = torch.randn(T, N, D, generator=g)
    y_seq = torch.randint(0, 10, (N,), generator=g)

    models = {
        "cnn": {"torch": cnn(torch.nn.BatchNorm2d), "normkit": cnn(nkt.BatchNorm2d)},
        "bn-lstm": {"torch": LSTMClassifier(TorchNormLSTM(D, H, T, "batch"), H),
                    "normkit": LSTMClassifier(nkt.LSTM(D, H, norm="recurrent_batch",
                                                       max_steps=T), H)},
        "ln-lstm": {"torch": LSTMClassifier(TorchNormLSTM(D, H, T, "layer"), H),
                    "normkit": LSTMClassifier(nkt.LSTM(D, H, norm="layer"), H)},
        "lstm (no norm)": {"torch": LSTMClassifier(torch.nn.LSTM(D, H), H),
                           "normkit": LSTMClassifier(nkt.LSTM(D, H, norm="none"), H)},
    }
    inputs = {"cnn": (x_img, y_img)}
    rows = []
    for torch_threads in sorted({args.threads, 1}, reverse=True):
        torch.set_num_threads(torch_threads)
        policies = {"default": None}
        policies.update({f"numba={n}": n for n in sorted({1, args.threads})})
        for model_name, impls in models.items():
            x, y = inputs.get(model_name, (x_seq, y_seq))
            fns = {"torch": train_step(impls["torch"], x, y)}
            for label, n in policies.items():
                fns[f"normkit {label}"] = _with_policy(n, train_step(impls["normkit"], x, y))
            if model_name == "cnn":
                fns["torch norms only"] = norms_only(impls["torch"], x)
                for label, n in policies.items():
                    fns[f"normkit norms only {label}"] = _with_policy(n, norms_only(impls["normkit"], x))
            for m in impls.values():
                m.train()
            timings = interleaved(fns, max_time=args.max_time, min_rounds=9, warmup=3)
            for impl, timing in timings.items():
                policy = impl.split()[-1] if impl.startswith("normkit") else "-"
                numba_threads = (int(policy.split("=")[1]) if policy.startswith("numba=") else
                                 None if policy == "-" else
                                 torch_threads if model_name == "cnn" else 1)
                rows.append(dict(model=model_name, impl=impl.rsplit(" ", 1)[0] if policy != "-"
                                 else impl, policy=policy, torch_threads=torch_threads,
                                 numba_threads=numba_threads, median_ms=timing.median * 1e3,
                                 iqr_ms=timing.iqr * 1e3, samples=len(timing.samples)))
            print(f"done: {model_name}, torch threads {torch_threads}", file=sys.stderr)
    nkt.set_num_threads(None)
    df = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False, float_format="%.4g")
    print(f"one training step, median (IQR) ms; CNN batch 32 3x32x32, LSTM T={T} N={N} D={D} "
          f"H={H}; float32")
    print("| model | impl | Numba threads policy | torch threads | Numba threads | median ms | IQR ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        nt = "" if r["numba_threads"] is None else r["numba_threads"]
        print(f"| {r['model']} | {r['impl']} | {r['policy']} | {r['torch_threads']} | {nt} | "
              f"{r['median_ms']:.2f} | {r['iqr_ms']:.2f} |")
    print()
    print("ratio normkit / torch (default policy; < 1: the bridge is faster)")
    for (model, tt), group in df.groupby(["model", "torch_threads"], sort=False):
        ref = group[group.impl == "torch"].median_ms.iloc[0]
        ours = group[(group.impl == "normkit") & (group.policy == "default")].median_ms.iloc[0]
        line = f"  {model:15s} torch threads {tt}: step {ours / ref:.2f}"
        if model == "cnn":
            nref = group[group.impl == "torch norms only"].median_ms.iloc[0]
            nours = group[(group.impl == "normkit norms only")
                          & (group.policy == "default")].median_ms.iloc[0]
            line += f", norms only {nours / nref:.2f} ({nours:.2f} vs {nref:.2f} ms)"
        print(line)
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs); written {args.out}")


def _with_policy(n, fn):
    def run():
        nkt.set_num_threads(n)
        fn()
    return run


if __name__ == "__main__":
    main()
