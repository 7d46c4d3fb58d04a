"""normkit: normalization layers compared — Numba kernels behind one interface.

    norm = normkit.make("batch", 64)
    y = norm.forward(x, training=True)
    dx = norm.backward(dy)

The kernels under it are importable on their own: ``normkit.kernels.batch.forward_train`` etc.
"""
from .norms import (BatchNorm, BatchRenorm, GhostBatchNorm, GroupNorm, Identity, InstanceNorm,
                    LayerNorm, Norm, RMSNorm, available, make, register)
from .recurrent import RecurrentBatchNorm
from .competitors import DynamicTanh, EvoNormB0, EvoNormS0, FilterResponseNorm, SwitchableNorm

__version__ = "0.1.0"

__all__ = [
    "make", "available", "register", "Norm", "BatchNorm", "GhostBatchNorm", "BatchRenorm",
    "LayerNorm", "GroupNorm", "InstanceNorm", "RMSNorm", "Identity", "RecurrentBatchNorm",
    "FilterResponseNorm", "EvoNormS0", "EvoNormB0", "SwitchableNorm", "DynamicTanh",
    "__version__",
]
