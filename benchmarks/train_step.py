"""Time one training step (forward, loss, backward, SGD-momentum update) of a 64-128-128-10 MLP
with batch norm, normkit against PyTorch (one thread), interleaved, median and IQR per step.

    PYTHONPATH=. python benchmarks/train_step.py [--batch 2] [--repeats 300] [--norm auto]

``--norm auto`` uses ``normkit.make("batch", ...)`` when the package has it and otherwise a
stand-in batch norm defined below (serial Numba kernels) (``--norm standin`` forces the stand-in).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import normkit
from normkit.kernels._jit import jit
from normkit.nn import SGD, Dense, ReLU, Sequential, SoftmaxCrossEntropy

WIDTHS = (64, 128, 128, 10)


# y = gamma * x_hat + beta, x_hat = (x - mean) * inv_std over the batch axis, per channel
@jit(reduction=True)
def _standin_bn_forward(x, gamma, beta, eps, x_hat, inv_std, y):     # x (N, C)
    n_rows, n_chan = x.shape
    for c in range(n_chan):
        mean = 0.0
        for i in range(n_rows):
            mean += x[i, c]
        mean /= n_rows
        var = 0.0
        for i in range(n_rows):
            var += (x[i, c] - mean) ** 2
        inv_std[c] = 1 / np.sqrt(var / n_rows + eps)
        for i in range(n_rows):
            x_hat[i, c] = (x[i, c] - mean) * inv_std[c]
            y[i, c] = gamma[c] * x_hat[i, c] + beta[c]


# dx = gamma inv_std / N * (N dy - sum(dy) - x_hat sum(dy x_hat)); dbeta = sum dy, dgamma = sum dy x_hat
@jit(reduction=True)
def _standin_bn_backward(dy, x_hat, inv_std, gamma, dgamma, dbeta, dx):
    n_rows, n_chan = dy.shape
    for c in range(n_chan):
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for i in range(n_rows):
            sum_dy += dy[i, c]
            sum_dy_xhat += dy[i, c] * x_hat[i, c]
        dbeta[c] = sum_dy
        dgamma[c] = sum_dy_xhat
        scale = gamma[c] * inv_std[c] / n_rows
        for i in range(n_rows):
            dx[i, c] = scale * (n_rows * dy[i, c] - sum_dy - x_hat[i, c] * sum_dy_xhat)


class StandinBatchNorm:
    """Training-mode batch norm on (N, C): two serial Numba kernels and buffers allocated once
    (no running statistics); only for timing until ``normkit.make("batch")`` is available."""

    def __init__(self, num_features, eps=1e-5, dtype=np.float32):
        self.eps = eps
        self.params = {"gamma": np.ones(num_features, dtype), "beta": np.zeros(num_features, dtype)}
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.state = {}
        self.inv_std = np.empty(num_features, dtype)
        self.x_hat = self.y = self.dx = None

    def forward(self, x, training):
        if self.y is None or self.y.shape != x.shape:
            self.x_hat, self.y, self.dx = (np.empty_like(x) for _ in range(3))
        _standin_bn_forward(x, self.params["gamma"], self.params["beta"], self.eps, self.x_hat,
                            self.inv_std, self.y)
        return self.y

    def backward(self, dy):
        _standin_bn_backward(dy, self.x_hat, self.inv_std, self.params["gamma"],
                             self.grads["gamma"], self.grads["beta"], self.dx)
        return self.dx


def make_norm(kind: str, width: int):
    if kind == "auto" and hasattr(normkit, "make"):
        return normkit.make("batch", width)
    return StandinBatchNorm(width)


def normkit_step(batch: int, norm: str, rng: np.random.Generator):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(Dense(n_in, n_out, rng=rng))
        if i < len(WIDTHS) - 2:
            layers += [make_norm(norm, n_out), ReLU()]
    model = Sequential(layers)
    criterion, opt = SoftmaxCrossEntropy(), SGD(model, lr=0.01, momentum=0.9)
    x = rng.standard_normal((batch, WIDTHS[0])).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], batch)

    def step():
        criterion.forward(model.forward(x, training=True), y)
        model.backward(criterion.backward())
        opt.step()
    return step, model


def torch_step(batch: int, rng: np.random.Generator):
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if i < len(WIDTHS) - 2:
            layers += [torch.nn.BatchNorm1d(n_out), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    criterion = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.from_numpy(rng.standard_normal((batch, WIDTHS[0])).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, WIDTHS[-1], batch))

    def step():
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()
    return step


def per_step_times(step, repeats_inner: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats_inner):
        step()
    return (time.perf_counter() - start) / repeats_inner


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300, help="timed blocks per implementation")
    parser.add_argument("--inner", type=int, default=10, help="steps per timed block")
    parser.add_argument("--norm", choices=("auto", "standin"), default="auto")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    ours, model = normkit_step(args.batch, args.norm, rng)
    theirs = torch_step(args.batch, rng)
    for step in (ours, theirs):                       # compile, warm caches
        for _ in range(50):
            step()
    times = {"normkit": [], "torch": []}
    for _ in range(args.repeats):                     # interleaved: both see the same load
        times["normkit"].append(per_step_times(ours, args.inner))
        times["torch"].append(per_step_times(theirs, args.inner))

    norm_used = type(model[1]).__name__
    print(f"one training step, MLP {'-'.join(map(str, WIDTHS))} + {norm_used}, batch {args.batch}, "
          f"{args.repeats} x {args.inner} steps each")
    print(f"{'impl':8s} {'median us':>10s} {'q25 us':>8s} {'q75 us':>8s}")
    medians = {}
    for name, values in times.items():
        q25, q50, q75 = np.percentile(np.array(values) * 1e6, [25, 50, 75])
        medians[name] = q50
        print(f"{name:8s} {q50:10.1f} {q25:8.1f} {q75:8.1f}")
    print(f"speed-up (torch median / normkit median): {medians['torch'] / medians['normkit']:.1f}x")


if __name__ == "__main__":
    main()
