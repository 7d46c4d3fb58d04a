"""Numba kernels: pure functions on NumPy arrays, callable from a user's own ``@njit`` code."""
