"""A helper module next to the toy study: checks that workers can import a study's siblings."""
import numpy as np


def sample(seed: int, width: int, shift: float) -> np.ndarray:
    """Seeded draws, (width,), the same in every process."""
    return np.random.default_rng([seed, width]).normal(shift, 1.0, size=width)
