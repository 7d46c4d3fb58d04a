"""The small training engine the studies need (layers, losses, optimizers, init)."""
from .lstm import LSTM, clip_grad_norm

__all__ = ["LSTM", "clip_grad_norm"]
