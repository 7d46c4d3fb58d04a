"""normkit: normalization layers compared — Numba kernels behind one interface."""
__version__ = "0.1.0"
