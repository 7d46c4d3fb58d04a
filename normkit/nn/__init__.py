"""The small training engine: layers with the normalizers' interface, losses, optimizers, init.

    model = Sequential([Dense(64, 128, rng=rng), normkit.make("batch", 128), ReLU(),
                        Dense(128, 10, rng=rng)])
    criterion, opt = SoftmaxCrossEntropy(), SGD(model, lr=0.1, momentum=0.9)
    loss = criterion.forward(model.forward(x, training=True), y)
    model.backward(criterion.backward())
    opt.step()

Small batches are dominated by per-call overhead, so layers write into buffers they keep per
input shape, gradients are preallocated and overwritten, and an optimizer updates every parameter
in one Numba call. Dense layers below ``layers.SMALL_DENSE_MACS`` multiply-adds use Numba kernels;
larger ones and every convolution (im2col) use BLAS matmul: run with one BLAS thread per process
(``OPENBLAS_NUM_THREADS=1`` or ``threadpoolctl.threadpool_limits(1)``) when several processes
share the cores — OpenBLAS's threads on a busy 2-core machine made a batch-128 Conv1d 10x slower.
"""
from . import init
from .lstm import LSTM
from .layers import (Conv1d, Conv2d, Dense, Dropout, Flatten, GlobalAvgPool, Layer, ReLU,
                     Sigmoid, Tanh)
from .losses import BinaryCrossEntropy, SoftmaxCrossEntropy
from .optim import SGD, Adam, Optimizer, RMSProp, clip_grad_norm
from .sequential import Sequential

__all__ = [
    "init", "Layer", "Dense", "Conv1d", "Conv2d", "ReLU", "Tanh", "Sigmoid", "Dropout",
    "Flatten", "GlobalAvgPool", "Sequential", "SoftmaxCrossEntropy", "BinaryCrossEntropy",
    "Optimizer", "SGD", "Adam", "RMSProp", "clip_grad_norm", "LSTM",
]
