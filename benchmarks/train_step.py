"""Time one training step (forward, loss, backward, SGD-momentum update) of a 64-128-128-10 MLP
with batch norm (``normkit.make("batch")``), normkit against PyTorch (one thread), interleaved,
median and IQR per step.

    PYTHONPATH=. python benchmarks/train_step.py [--batch 2] [--repeats 300] [--inner 10]
"""
from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

import normkit
from normkit.nn import SGD, Dense, ReLU, Sequential, SoftmaxCrossEntropy

WIDTHS = (64, 128, 128, 10)


def normkit_step(batch: int, rng: np.random.Generator):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers.append(Dense(n_in, n_out, rng=rng))
        if i < len(WIDTHS) - 2:
            layers += [normkit.make("batch", n_out), ReLU()]
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
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    rng = np.random.default_rng(0)
    ours, model = normkit_step(args.batch, rng)
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
    print(f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
          f"({os.cpu_count()} CPUs); Numba threads {numba.get_num_threads()}")


if __name__ == "__main__":
    main()
