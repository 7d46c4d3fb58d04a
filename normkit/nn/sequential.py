"""A chain of layers with the layer interface itself, so it nests and an optimizer takes it."""
from __future__ import annotations

import numpy as np

__all__ = ["Sequential"]

_INTERFACE = ("forward", "backward", "params", "grads", "state")


class Sequential:
    """``Sequential([Dense(...), normkit.make("batch", 128), ReLU(), ...])``.

    Any object with ``forward(x, training)``, ``backward(dy)``, ``params``, ``grads`` and
    ``state`` is a layer, so every normalizer from :func:`normkit.make` (including "none") drops
    in. ``params``/``grads``/``state`` are flat dicts named ``"<index>.<key>"`` (``"0.weight"``,
    ``"1.running_mean"``) holding the layers' own arrays, not copies.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        seen = set()
        for i, layer in enumerate(self.layers):
            missing = [name for name in _INTERFACE if not hasattr(layer, name)]
            if missing:
                raise TypeError(f"layers[{i}] ({type(layer).__name__}) lacks {missing}: a layer needs "
                                f"forward(x, training), backward(dy), params, grads and state")
            if id(layer) in seen:
                raise ValueError(f"layers[{i}] ({type(layer).__name__}) appears twice; each position "
                                 f"needs its own layer object (it keeps its own forward state)")
            seen.add(id(layer))

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    def backward(self, dy: np.ndarray) -> np.ndarray:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def _flat(self, member: str) -> dict[str, np.ndarray]:
        return {f"{i}.{key}": value
                for i, layer in enumerate(self.layers)
                for key, value in getattr(layer, member).items()}

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self._flat("params")

    @property
    def grads(self) -> dict[str, np.ndarray]:
        return self._flat("grads")

    @property
    def state(self) -> dict[str, np.ndarray]:
        return self._flat("state")

    def num_params(self) -> int:
        """The number of learnable scalars."""
        return sum(int(p.size) for p in self.params.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"
